#!/usr/bin/env python3
"""PyTorch CPU baseline for `neuroshard-engine bench-train`: the identical NeuroLLM model
(pre-norm RMSNorm eps 1e-6, rotate-half RoPE theta 10000, causal GQA via
scaled_dot_product_attention, SwiGLU, no biases, untied embedding/head), the same batch shape,
AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, wd 0.01) with global-norm clipping 1.0, timed the
same way (median of N steps after a warm-up; cpu_step_s = process CPU time per step / threads).
Prints one JSON line with the same fields.

`--dtype bf16` runs forward and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
(bf16 GEMMs through oneDNN, f32 weights and optimizer), the baseline of `bench-train --dtype
bf16`.

Usage: python3 engine/benches/torch_train.py --model bench --steps 5 --threads 2 [--dtype bf16]
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, max_seq=128),
    "default": dict(vocab=2048, hidden=192, layers=4, heads=6, kv_heads=2, ffn=512, max_seq=256),
    "bench": dict(vocab=8192, hidden=512, layers=11, heads=16, kv_heads=4, ffn=2048, max_seq=2048),
    "gpt2-small": dict(vocab=32768, hidden=768, layers=12, heads=12, kv_heads=4, ffn=2048, max_seq=1024),
}


class RMSNorm(torch.nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):  # x [B, H, T, D]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Layer(torch.nn.Module):
    def __init__(self, c, h, kvh, ffn):
        super().__init__()
        d = c // h
        self.h, self.kvh, self.d = h, kvh, d
        self.ln1, self.ln2 = RMSNorm(c), RMSNorm(c)
        self.q = torch.nn.Linear(c, c, bias=False)
        self.k = torch.nn.Linear(c, kvh * d, bias=False)
        self.v = torch.nn.Linear(c, kvh * d, bias=False)
        self.o = torch.nn.Linear(c, c, bias=False)
        self.gate = torch.nn.Linear(c, ffn, bias=False)
        self.up = torch.nn.Linear(c, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, c, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        n = self.ln1(x)
        q = rope(self.q(n).view(b, t, self.h, self.d).transpose(1, 2), cos, sin)
        k = rope(self.k(n).view(b, t, self.kvh, self.d).transpose(1, 2), cos, sin)
        v = self.v(n).view(b, t, self.kvh, self.d).transpose(1, 2)
        rep = self.h // self.kvh
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c))
        n = self.ln2(x)
        return x + self.down(F.silu(self.gate(n)) * self.up(n))


class Model(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        c = p["hidden"]
        self.emb = torch.nn.Embedding(p["vocab"], c)
        self.layers = torch.nn.ModuleList(Layer(c, p["heads"], p["kv_heads"], p["ffn"]) for _ in range(p["layers"]))
        self.norm = RMSNorm(c)
        self.head = torch.nn.Linear(c, p["vocab"], bias=False)
        self.d = c // p["heads"]
        for prm in self.parameters():
            if prm.dim() == 2:
                torch.nn.init.normal_(prm, 0.0, 0.02)

    def forward(self, ids, labels):
        t = ids.shape[1]
        half = self.d // 2
        inv = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / self.d)
        ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
        cos, sin = ang.cos().float(), ang.sin().float()
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bench")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    p = PRESETS[a.model]
    seq = a.seq or min(256, p["max_seq"])
    model = Model(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    data = torch.randint(10, p["vocab"], (a.batch, seq + 1))
    ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step():
        if a.dtype == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels)
        else:
            loss = model(ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times, cpu, losses = [], [], []
    for _ in range(a.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / a.threads)
    med = statistics.median(times)
    cmed = statistics.median(cpu)
    c, L, V, f = p["hidden"], p["layers"], p["vocab"], p["ffn"]
    kv = p["kv_heads"] * (c // p["heads"])
    matmul = L * (2 * c * c + 2 * c * kv + 3 * c * f) + V * c
    tokens = a.batch * seq
    flops = 6 * matmul * tokens + 12 * L * tokens * seq * c
    params = sum(x.numel() for x in model.parameters())
    print(json.dumps(dict(
        model=a.model, device="cpu-torch-" + torch.__version__, dtype=a.dtype, threads=a.threads, batch=a.batch, seq=seq,
        steps=a.steps, tokens_per_s=tokens / med, step_s=med, gflops=flops / med / 1e9, params=params,
        cpu_step_s=cmed, cpu_gflops=flops / cmed / 1e9, loss_first=losses[0], loss_last=losses[-1],
    )))


if __name__ == "__main__":
    main()
