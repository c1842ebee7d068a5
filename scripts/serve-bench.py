#!/usr/bin/env python3
"""Decode benchmark against Hugging Face transformers (eager) and llama.cpp on the same weights.

Usage: python3 scripts/serve-bench.py [--engine target/release/neuroshard-engine]
           [--model bench] [--batch 1,8,32] [--prompt 128] [--steps 64] [--threads 2]
           [--reps 3] [--dir /tmp/serve-bench]

1. `neuroshard-engine bench-generate --export DIR` writes the seeded `--model` preset as a
   Hugging Face Llama folder (DIR/hf) and a GGUF f32 file; llama.cpp's own quantizer
   (llama-cpp-python's `llama_model_quantize`) makes the q8_0 file from it.
2. Then `--reps` rounds, each running in turn (one process each, so the runs alternate in one
   sitting): ours f32, ours int8, transformers eager f32, llama.cpp f32, llama.cpp q8_0.

Every implementation runs the same protocol: for each batch size B, B prompts of `--prompt`
seeded random ids are admitted one after another (time to first token = prefill of one
prompt + its first token, the median over the B admissions), then `--steps` decode steps
run all B sequences together (decode tokens/s = B * steps / their wall time). Greedy
decoding everywhere. Prints one JSON line per run and a median table at the end.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time


def prompts(vocab, b, n, seed):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for _ in range(b)]


def run_hf(a):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained(
        os.path.join(a.dir, "hf"), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    vocab = model.config.vocab_size
    out = []
    with torch.inference_mode():
        model(torch.tensor([[11, 12, 13]]), use_cache=True)  # warm-up
        for b in a.batch:
            ps = torch.tensor(prompts(vocab, b, a.prompt, 100 + b))
            ttft, cttft = [], []
            for i in range(b):
                t0, c0 = time.perf_counter(), time.process_time()
                o = model(ps[i : i + 1], use_cache=True)
                o.logits[:, -1].argmax(-1)
                ttft.append(time.perf_counter() - t0)
                cttft.append((time.process_time() - c0) / a.threads)
            o = model(ps, use_cache=True)
            pkv, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                o = model(tok[:, None], past_key_values=pkv, use_cache=True)
                pkv, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / a.threads
            out.append(result("hf-eager f32", b, ttft, cttft, b * a.steps, wall, cpu))
    return out


def run_llama(a, path, name):
    import numpy as np
    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    out = []
    for b in a.batch:
        cp = L.llama_context_default_params()
        cp.n_ctx = b * (a.prompt + a.steps + 8)
        cp.n_batch = cp.n_ubatch = max(a.prompt, b)
        cp.n_seq_max = b
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = a.threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(max(a.prompt, b), 0, b)

        def decode(rows):
            batch.n_tokens = len(rows)
            for j, (tok, pos, seq, logits) in enumerate(rows):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                batch.seq_id[j][0], batch.logits[j] = seq, logits
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            return [
                int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, j), shape=(vocab,)).argmax())
                for j, r in enumerate(rows)
                if r[3]
            ]

        ps = prompts(vocab, b, a.prompt, 100 + b)
        ttft, cttft, toks = [], [], []
        for i, p in enumerate(ps):
            t0, c0 = time.perf_counter(), time.process_time()
            toks += decode([(t, j, i, j == len(p) - 1) for j, t in enumerate(p)])
            ttft.append(time.perf_counter() - t0)
            cttft.append((time.process_time() - c0) / a.threads)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(a.steps):
            toks = decode([(toks[i], a.prompt + s, i, True) for i in range(b)])
        wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / a.threads
        out.append(result(name, b, ttft, cttft, b * a.steps, wall, cpu))
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def run_ours(a, weights):
    cmd = [
        a.engine, "bench-generate", "--model", a.model, "--batch", ",".join(map(str, a.batch)),
        "--prompt", str(a.prompt), "--steps", str(a.steps), "--threads", str(a.threads),
        "--weights", weights, "--greedy",
    ]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    out = []
    for line in lines:
        r = json.loads(line)
        out.append(
            {
                "impl": f"ours {weights}",
                "batch": r["batch"],
                "ttft_ms": round(r["ttft_ms"], 1),
                "cpu_ttft_ms": round(r["cpu_ttft_ms"], 1),
                "decode_tokens_per_s": round(r["decode_tokens_per_s"], 1),
                "cpu_decode_tokens_per_s": round(r["cpu_decode_tokens_per_s"], 1),
            }
        )
    return out


def result(name, b, ttft, cttft, tokens, wall, cpu):
    """Wall figures and CPU-normalized ones (process CPU time / threads), as bench-generate."""
    return {
        "impl": name,
        "batch": b,
        "ttft_ms": round(statistics.median(ttft) * 1e3, 1),
        "cpu_ttft_ms": round(statistics.median(cttft) * 1e3, 1),
        "decode_tokens_per_s": round(tokens / wall, 1),
        "cpu_decode_tokens_per_s": round(tokens / cpu, 1) if cpu > 0 else 0.0,
    }


def quantize_q8(a):
    import llama_cpp as L

    src, dst = os.path.join(a.dir, "model-f32.gguf"), os.path.join(a.dir, "model-q8_0.gguf")
    qp = L.llama_model_quantize_default_params()
    qp.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0
    qp.nthread = a.threads
    if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(qp)) != 0:
        raise SystemExit("llama_model_quantize failed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="target/release/neuroshard-engine")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/serve-bench")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # one implementation, in a child
    a = ap.parse_args()
    if a.only:
        runs = {
            "hf": lambda: run_hf(a),
            "llama-f32": lambda: run_llama(a, os.path.join(a.dir, "model-f32.gguf"), "llama.cpp f32"),
            "llama-q8": lambda: run_llama(a, os.path.join(a.dir, "model-q8_0.gguf"), "llama.cpp q8_0"),
        }
        for r in runs[a.only]():
            print(json.dumps(r), flush=True)
        return
    subprocess.run(
        [a.engine, "bench-generate", "--model", a.model, "--export", a.dir], check=True, capture_output=True
    )
    quantize_q8(a)
    me = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
    results = []
    for rep in range(a.reps):
        for kind in ["ours-f32", "ours-int8", "hf", "llama-f32", "llama-q8"]:
            if kind.startswith("ours"):
                rs = run_ours(a, kind[5:])
            else:
                out = subprocess.run(me + ["--only", kind], check=True, capture_output=True, text=True)
                rs = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
            for r in rs:
                r["rep"] = rep
                print(json.dumps(r), flush=True)
            results += rs
    print("\n| implementation | batch | TTFT ms wall (CPU-norm) | decode tokens/s wall (min-max) | decode tokens/s CPU-norm (min-max) |")
    print("|---|---|---|---|---|")
    names = list(dict.fromkeys(r["impl"] for r in results))
    for name in names:
        for b in a.batch:
            rs = [r for r in results if r["impl"] == name and r["batch"] == b]
            t = [r["decode_tokens_per_s"] for r in rs]
            c = [r["cpu_decode_tokens_per_s"] for r in rs]
            f = statistics.median(r["ttft_ms"] for r in rs)
            cf = statistics.median(r["cpu_ttft_ms"] for r in rs)
            print(
                f"| {name} | {b} | {f:.0f} ({cf:.0f}) | {statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f})"
                f" | {statistics.median(c):.1f} ({min(c):.1f}-{max(c):.1f}) |"
            )


if __name__ == "__main__":
    main()
