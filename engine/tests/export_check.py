#!/usr/bin/env python3
"""Independent check of `neuroshard model export` (GGUF and Hugging Face layouts).

Usage: python3 engine/tests/export_check.py --gguf FILE --hf DIR --cases CASES.json
                                            [--llama-cpp] [--transformers]

CASES.json is a list of {"prompt", "max_tokens", "text", "tokens_generated"}: greedy
continuations our engine produced (temperature 0). For each case and each implementation
below, the prompt is tokenized as the engine does (the EOS document separator, then the text
through the exported tokenizer), continued greedily for max_tokens tokens (ending early at
EOS), decoded, and compared with the engine's text and token count:

1. numpy over the Hugging Face export (config.json + model.safetensors, rotate-half RoPE as
   transformers' LlamaForCausalLM computes it; the forward of grad_check.py), tokenized and
   decoded by Hugging Face `tokenizers` from tokenizer.json;
2. numpy over the GGUF file as read by the `gguf` package (llama.cpp's conventions:
   dimensions innermost first, interleaved RoPE pairs, so the q/k permutation the export
   applies is checked, not assumed), tokenized with the GGUF metadata's own vocabulary;
3. with --llama-cpp: llama.cpp itself (llama-cpp-python) loading the GGUF file: its tokenizer
   (from the GGUF metadata) must give the same prompt ids, its logits the same continuation;
4. with --transformers: transformers' LlamaForCausalLM loading the Hugging Face folder
   unchanged (float32), its AutoTokenizer giving the same prompt ids.

Before that, every tensor and metadata key of the GGUF file is read with the `gguf` package
and checked: the architecture keys against config.json, every tensor equal (bit for bit, after
undoing the RoPE permutation) to the Hugging Face export's, the vocabulary and merges equal to
tokenizer.json's.

Ids at or above the tokenizer's vocabulary (padding of the embedding table, token type UNUSED
in the GGUF file) are never sampled, as in our engine. A missing package fails (exit 2).
"""

import argparse
import json
import os
import sys

try:
    import numpy as np
    import gguf
    from tokenizers import Tokenizer
except ImportError as e:  # fail loudly: CI must install them (scripts/test.sh)
    sys.stderr.write(f"export_check.py: {e} (pip install numpy gguf tokenizers)\n")
    sys.exit(2)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grad_check import attention, read_safetensors, rmsnorm, rope, rope_tables, silu  # noqa: E402

EOS_ID = 2
UNUSED = 5  # llama.cpp's token type of padding ids


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


class HfModel:
    """The Hugging Face export, forward as transformers' Llama computes it (float64)."""

    def __init__(self, d):
        self.cfg = json.load(open(f"{d}/config.json"))
        self.W = read_safetensors(f"{d}/model.safetensors")

    def logits(self, ids):
        cfg, W = self.cfg, self.W
        T = len(ids)
        C, H, KVH = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        D = cfg["head_dim"]
        eps = cfg["rms_norm_eps"]
        cos, sin = rope_tables(T, D, cfg["rope_theta"])
        x = W["model.embed_tokens.weight"][np.array(ids)][None]  # [1,T,C]
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}"
            n1, _ = rmsnorm(x, W[f"{p}.input_layernorm.weight"], eps)
            q = rope((n1 @ W[f"{p}.self_attn.q_proj.weight"].T).reshape(1, T, H, D), cos, sin)
            k = rope((n1 @ W[f"{p}.self_attn.k_proj.weight"].T).reshape(1, T, KVH, D), cos, sin)
            v = (n1 @ W[f"{p}.self_attn.v_proj.weight"].T).reshape(1, T, KVH, D)
            o, _, _, _ = attention(q, k, v, H // KVH)
            x = x + o.reshape(1, T, H * D) @ W[f"{p}.self_attn.o_proj.weight"].T
            n2, _ = rmsnorm(x, W[f"{p}.post_attention_layernorm.weight"], eps)
            h = silu(n2 @ W[f"{p}.mlp.gate_proj.weight"].T) * (n2 @ W[f"{p}.mlp.up_proj.weight"].T)
            x = x + h @ W[f"{p}.mlp.down_proj.weight"].T
        nf, _ = rmsnorm(x, W["model.norm.weight"], eps)
        return (nf @ W["lm_head.weight"].T)[0, -1]


def rope_interleaved(x, theta):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: pairs (2i, 2i+1) rotated by pos * theta^(-2i/D)."""
    b, t, h, d = x.shape
    inv = theta ** (-2.0 * np.arange(d // 2) / d)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


class GgufModel:
    """The GGUF file as llama.cpp's llama graph reads it (float64)."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.meta = {}
        for f in r.fields.values():
            self.meta[f.name] = field_value(f)
        self.T = {}
        for t in r.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                fail(f"gguf tensor {t.name} is {t.tensor_type!r}, not F32")
            # `shape` is innermost first; the data comes as a row-major array.
            data = np.array(t.data, dtype=np.float64)
            dims = [int(x) for x in t.shape]
            self.T[t.name] = data.reshape(list(reversed(dims)))
        m = self.meta
        if m["general.architecture"] != "llama":
            fail(f"general.architecture is {m['general.architecture']!r}")
        self.types = m["tokenizer.ggml.token_type"]
        self.tokens = m["tokenizer.ggml.tokens"]

    def logits(self, ids):
        m, W = self.meta, self.T
        T = len(ids)
        H, KVH = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
        D = m["llama.rope.dimension_count"]
        eps, theta = m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"]
        x = W["token_embd.weight"][np.array(ids)][None]
        for l in range(m["llama.block_count"]):
            p = f"blk.{l}"
            n1, _ = rmsnorm(x, W[f"{p}.attn_norm.weight"], eps)
            q = rope_interleaved((n1 @ W[f"{p}.attn_q.weight"].T).reshape(1, T, H, D), theta)
            k = rope_interleaved((n1 @ W[f"{p}.attn_k.weight"].T).reshape(1, T, KVH, D), theta)
            v = (n1 @ W[f"{p}.attn_v.weight"].T).reshape(1, T, KVH, D)
            o, _, _, _ = attention(q, k, v, H // KVH)
            x = x + o.reshape(1, T, H * D) @ W[f"{p}.attn_output.weight"].T
            n2, _ = rmsnorm(x, W[f"{p}.ffn_norm.weight"], eps)
            h = silu(n2 @ W[f"{p}.ffn_gate.weight"].T) * (n2 @ W[f"{p}.ffn_up.weight"].T)
            x = x + h @ W[f"{p}.ffn_down.weight"].T
        nf, _ = rmsnorm(x, W["output_norm.weight"], eps)
        return (nf @ W["output.weight"].T)[0, -1]


def field_value(f):
    """A metadata field's value as Python data (the gguf package's ReaderField)."""
    types = f.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    v = f.parts[f.data[0]].tolist()[0]
    return v


def unpermute(w, heads):
    """Undoes the export's rotate-half -> interleaved row permutation of a q/k projection."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def check_gguf_against_hf(g, hf, tok_json):
    cfg, m = hf.cfg, g.meta
    want = {
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.vocab_size": cfg["vocab_size"],
        "llama.rope.dimension_count": cfg["head_dim"],
        "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"],
        "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
    }
    for k, v in want.items():
        if m.get(k) != v:
            fail(f"gguf {k} = {m.get(k)!r}, expected {v!r}")
    for k, v in [("llama.rope.freq_base", cfg["rope_theta"]),
                 ("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])]:
        if abs(m[k] - v) > 1e-6 * max(1.0, abs(v)):
            fail(f"gguf {k} = {m[k]}, expected {v}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    leaf = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
    for l in range(cfg["num_hidden_layers"]):
        for a, b in leaf.items():
            names[f"model.layers.{l}.{a}.weight"] = f"blk.{l}.{b}.weight"
    if sorted(names.values()) != sorted(g.T):
        fail(f"gguf tensors {sorted(g.T)} are not the llama set {sorted(names.values())}")
    if sorted(names) != sorted(hf.W):
        fail(f"hf tensors {sorted(hf.W)} are not the llama set")
    for hn, gn in names.items():
        w = g.T[gn]
        if gn.endswith("attn_q.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif gn.endswith("attn_k.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        if w.shape != hf.W[hn].shape or not np.array_equal(w, hf.W[hn]):
            fail(f"gguf {gn} differs from hf {hn}")
    vocab = tok_json["model"]["vocab"]
    live = len(vocab)
    tokens = g.tokens
    if len(tokens) != cfg["vocab_size"]:
        fail(f"gguf has {len(tokens)} tokens, the embedding {cfg['vocab_size']} rows")
    for s, i in vocab.items():
        if tokens[i] != s:
            fail(f"gguf token {i} is {tokens[i]!r}, tokenizer.json says {s!r}")
    if any(t != UNUSED for t in g.types[live:]):
        fail("padding ids are not UNUSED")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    if g.meta["tokenizer.ggml.merges"] != merges:
        fail("gguf merges differ from tokenizer.json's")
    return live


def greedy(logits_of, prompt_ids, max_tokens, live):
    ids = list(prompt_ids)
    out = []
    for _ in range(max_tokens):
        logits = np.array(logits_of(ids), dtype=np.float64)
        logits[live:] = -np.inf
        t = int(np.argmax(logits))
        out.append(t)
        ids.append(t)
        if t == EOS_ID:
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--llama-cpp", action="store_true")
    ap.add_argument("--transformers", action="store_true")
    a = ap.parse_args()
    cases = json.load(open(a.cases))
    hf = HfModel(a.hf)
    g = GgufModel(a.gguf)
    tok_json = json.load(open(f"{a.hf}/tokenizer.json"))
    live = check_gguf_against_hf(g, hf, tok_json)
    print(f"gguf: {len(g.T)} tensors and {len(g.meta)} metadata keys read; tensors equal the hf export's")
    tok = Tokenizer.from_file(f"{a.hf}/tokenizer.json")
    llm = None
    if a.llama_cpp:
        try:
            import llama_cpp
        except ImportError as e:
            sys.stderr.write(f"export_check.py: {e} (pip install llama-cpp-python)\n")
            sys.exit(2)
        # logits_all: llama-cpp-python keeps the logits in `scores` only then.
        llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=hf.cfg["max_position_embeddings"],
                              n_threads=2, n_batch=hf.cfg["max_position_embeddings"],
                              logits_all=True, verbose=False)
    tf = None
    if a.transformers:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            sys.stderr.write(f"export_check.py: {e} (pip install torch transformers)\n")
            sys.exit(2)
        model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
        model.eval()
        tf_tok = AutoTokenizer.from_pretrained(a.hf)

        def tf_logits(ids, model=model):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0, -1].double().numpy()

        tf = (tf_tok, tf_logits)
    for c in cases:
        prompt = [EOS_ID] + tok.encode(c["prompt"], add_special_tokens=False).ids
        want_text, want_n = c["text"], c["tokens_generated"]
        runs = [("numpy/hf", hf.logits), ("numpy/gguf", g.logits)]
        if llm is not None:
            ids = llm.tokenize(c["prompt"].encode("utf-8"), add_bos=False, special=False)
            if [EOS_ID] + list(ids) != prompt:
                fail(f"llama.cpp tokenizes {c['prompt']!r} as {ids}, tokenizers as {prompt[1:]}")

            def lc_logits(ids, llm=llm):
                llm.reset()
                llm.eval(ids)
                return llm.scores[llm.n_tokens - 1]

            runs.append(("llama.cpp", lc_logits))
        if tf is not None:
            ids = tf[0](c["prompt"], add_special_tokens=False)["input_ids"]
            if [EOS_ID] + list(ids) != prompt:
                fail(f"transformers tokenizes {c['prompt']!r} as {ids}, tokenizers as {prompt[1:]}")
            runs.append(("transformers", tf[1]))
        for name, fn in runs:
            got = greedy(fn, prompt, c["max_tokens"], live)
            text = tok.decode(got, skip_special_tokens=False)
            if name == "llama.cpp":
                lc_text = b"".join(llm.detokenize([t], special=True) for t in got).decode("utf-8", "replace")
                if lc_text != text:
                    fail(f"llama.cpp detokenizes {got} as {lc_text!r}, tokenizers as {text!r}")
            if text != want_text or len(got) != want_n:
                fail(f"{name} on {c['prompt']!r}: {len(got)} tokens {text!r}; engine: {want_n} tokens {want_text!r}")
            print(f"ok {name} {c['prompt']!r}: {len(got)} tokens {text!r}")
    print("PASS")


if __name__ == "__main__":
    main()
