#!/usr/bin/env python3
"""Independent check of the engine's loss and gradients.

Usage: python3 engine/tests/grad_check.py DIR

DIR is written by `neuroshard-engine grad-dump` (see engine/src/dev.rs). This script reads the
Hugging Face Llama export DIR/model/ (config.json + model.safetensors), the batch and the
engine's gradients, recomputes the mean cross-entropy and the gradient of every parameter with
its own float64 numpy implementation (forward and hand-written backward, nothing shared with
the Rust code), and fails unless every relative error ||ours - numpy|| / ||numpy|| is <= 1e-4.

Only numpy is needed; safetensors files are parsed here (8-byte header length, JSON header,
raw little-endian data).
"""

import json
import struct
import sys

try:
    import numpy as np
except ImportError:  # fail loudly: CI must install numpy
    sys.stderr.write("grad_check.py: numpy is not installed (pip install numpy)\n")
    sys.exit(2)

TOL = 1e-4
DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "U32": np.uint32}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float64 if info["dtype"].startswith("F") else np.int64)
    return out


def rmsnorm(x, w, eps):
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * w, r


def rmsnorm_back(dy, x, w, r):
    g = dy * w
    c = x.shape[-1]
    dx = r * g - x * r**3 * (g * x).sum(-1, keepdims=True) / c
    dw = (dy * x * r).reshape(-1, c).sum(0)
    return dx, dw


def rope_tables(t, d, theta):
    half = d // 2
    inv = theta ** (-2.0 * np.arange(half) / d)
    ang = np.arange(t)[:, None] * inv[None, :]  # [T, D/2]
    return np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]


def rope(x, cos, sin):  # x [B,T,H,D], rotate-half
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_back(dy, cos, sin):  # the inverse rotation
    half = dy.shape[-1] // 2
    d1, d2 = dy[..., :half], dy[..., half:]
    return np.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], -1)


def attention(q, k, v, group):
    # q [B,T,H,D]; k, v [B,T,KVH,D]; query head h reads kv head h // group.
    b, t, h, d = q.shape
    kk = np.repeat(k, group, axis=2)
    vv = np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kk) / np.sqrt(d)
    mask = np.triu(np.ones((t, t), dtype=bool), 1)
    s = np.where(mask[None, None], -np.inf, s)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", p, vv)
    return o, p, kk, vv


def attention_back(do, q, kk, vv, p, group):
    b, t, h, d = q.shape
    dp = np.einsum("bihd,bjhd->bhij", do, vv)
    dvv = np.einsum("bhij,bihd->bjhd", p, do)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    dq = np.einsum("bhij,bjhd->bihd", ds, kk)
    dkk = np.einsum("bhij,bihd->bjhd", ds, q)
    kvh = h // group
    dk = dkk.reshape(b, t, kvh, group, d).sum(3)
    dv = dvv.reshape(b, t, kvh, group, d).sum(3)
    return dq, dk, dv


def silu(x):
    return x / (1.0 + np.exp(-x))


def main(out_dir):
    cfg = json.load(open(f"{out_dir}/model/config.json"))
    info = json.load(open(f"{out_dir}/loss.json"))
    W = read_safetensors(f"{out_dir}/model/model.safetensors")
    G = read_safetensors(f"{out_dir}/grads.safetensors")
    batch = read_safetensors(f"{out_dir}/batch.safetensors")
    ids, labels = batch["input_ids"], batch["labels"]
    B, T = ids.shape
    C = cfg["hidden_size"]
    H, KVH = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = C // H
    L = cfg["num_hidden_layers"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    V = cfg["vocab_size"]
    v_live = info.get("v_live", V)
    group = H // KVH
    cos, sin = rope_tables(T, D, theta)

    # ---- forward ----
    x = W["model.embed_tokens.weight"][ids]  # [B,T,C]
    saved = []
    for l in range(L):
        p = f"model.layers.{l}"
        n1, r1 = rmsnorm(x, W[f"{p}.input_layernorm.weight"], eps)
        q = rope((n1 @ W[f"{p}.self_attn.q_proj.weight"].T).reshape(B, T, H, D), cos, sin)
        k = rope((n1 @ W[f"{p}.self_attn.k_proj.weight"].T).reshape(B, T, KVH, D), cos, sin)
        v = (n1 @ W[f"{p}.self_attn.v_proj.weight"].T).reshape(B, T, KVH, D)
        o, probs, kk, vv = attention(q, k, v, group)
        att = o.reshape(B, T, C)
        x2 = x + att @ W[f"{p}.self_attn.o_proj.weight"].T
        n2, r2 = rmsnorm(x2, W[f"{p}.post_attention_layernorm.weight"], eps)
        gate = n2 @ W[f"{p}.mlp.gate_proj.weight"].T
        up = n2 @ W[f"{p}.mlp.up_proj.weight"].T
        hmid = silu(gate) * up
        out = x2 + hmid @ W[f"{p}.mlp.down_proj.weight"].T
        saved.append((x, n1, r1, q, kk, vv, probs, att, x2, n2, r2, gate, up, hmid))
        x = out
    nf, rf = rmsnorm(x, W["model.norm.weight"], eps)
    logits = nf @ W["lm_head.weight"].T  # [B,T,V]
    logits[..., v_live:] = -np.inf
    m = logits.max(-1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
    logp = logits - lse
    N = B * T
    loss = -np.take_along_axis(logp, labels[..., None], -1).sum() / N

    # ---- backward ----
    grads = {}
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, labels[..., None], np.take_along_axis(dlogits, labels[..., None], -1) - 1.0, -1)
    dlogits[..., v_live:] = 0.0
    dlogits /= N
    grads["lm_head.weight"] = dlogits.reshape(N, V).T @ nf.reshape(N, C)
    dnf = dlogits @ W["lm_head.weight"]
    dx, grads["model.norm.weight"] = rmsnorm_back(dnf, x, W["model.norm.weight"], rf)
    for l in reversed(range(L)):
        p = f"model.layers.{l}"
        xin, n1, r1, q, kk, vv, probs, att, x2, n2, r2, gate, up, hmid = saved[l]
        flat = lambda a: a.reshape(N, -1)
        dout = dx
        grads[f"{p}.mlp.down_proj.weight"] = flat(dout).T @ flat(hmid)
        dh = dout @ W[f"{p}.mlp.down_proj.weight"]
        sig = 1.0 / (1.0 + np.exp(-gate))
        dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
        dup = dh * silu(gate)
        grads[f"{p}.mlp.gate_proj.weight"] = flat(dgate).T @ flat(n2)
        grads[f"{p}.mlp.up_proj.weight"] = flat(dup).T @ flat(n2)
        dn2 = dgate @ W[f"{p}.mlp.gate_proj.weight"] + dup @ W[f"{p}.mlp.up_proj.weight"]
        dx2n, grads[f"{p}.post_attention_layernorm.weight"] = rmsnorm_back(dn2, x2, W[f"{p}.post_attention_layernorm.weight"], r2)
        dx2 = dout + dx2n
        grads[f"{p}.self_attn.o_proj.weight"] = flat(dx2).T @ flat(att)
        datt = (dx2 @ W[f"{p}.self_attn.o_proj.weight"]).reshape(B, T, H, D)
        dq, dk, dv = attention_back(datt, q, kk, vv, probs, group)
        dqp = rope_back(dq, cos, sin).reshape(B, T, C)
        dkp = rope_back(dk, cos, sin).reshape(B, T, KVH * D)
        dv = dv.reshape(B, T, KVH * D)
        grads[f"{p}.self_attn.q_proj.weight"] = flat(dqp).T @ flat(n1)
        grads[f"{p}.self_attn.k_proj.weight"] = flat(dkp).T @ flat(n1)
        grads[f"{p}.self_attn.v_proj.weight"] = flat(dv).T @ flat(n1)
        dn1 = (
            dqp @ W[f"{p}.self_attn.q_proj.weight"]
            + dkp @ W[f"{p}.self_attn.k_proj.weight"]
            + dv @ W[f"{p}.self_attn.v_proj.weight"]
        )
        dxn, grads[f"{p}.input_layernorm.weight"] = rmsnorm_back(dn1, xin, W[f"{p}.input_layernorm.weight"], r1)
        dx = dx2 + dxn
    demb = np.zeros_like(W["model.embed_tokens.weight"])
    np.add.at(demb, ids.reshape(-1), dx.reshape(N, C))
    grads["model.embed_tokens.weight"] = demb

    # ---- compare ----
    failures = []
    loss_err = abs(info["loss"] - loss) / abs(loss)
    print(f"loss: engine {info['loss']:.8f} numpy {loss:.8f} rel err {loss_err:.2e}")
    if not loss_err <= TOL:
        failures.append("loss")
    if set(G) != set(W):
        failures.append(f"gradient names differ from parameter names: {sorted(set(G) ^ set(W))}")
    if set(grads) != set(W):
        failures.append(f"numpy computed {len(grads)} gradients for {len(W)} parameters")
    worst = 0.0
    for name in sorted(W):
        if name not in G or name not in grads:
            continue
        ours, ref = G[name], grads[name]
        if ours.shape != ref.shape:
            failures.append(f"{name}: shape {ours.shape} vs {ref.shape}")
            continue
        denom = np.linalg.norm(ref)
        err = np.linalg.norm(ours - ref) / max(denom, 1e-30)
        worst = max(worst, err)
        flag = "" if err <= TOL else "  <-- FAIL"
        print(f"{name:50s} |g| {denom:.3e} rel err {err:.2e}{flag}")
        if not err <= TOL or denom == 0.0:
            failures.append(f"{name}: rel err {err:.3e} (|g| {denom:.3e})")
    print(f"checked {len(G)} gradients, worst relative error {worst:.2e} (tolerance {TOL:g})")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
