#!/usr/bin/env python3
"""Optional interoperability check: load a grad-dump's Hugging Face export with
`transformers.LlamaForCausalLM` (unchanged), recompute the loss and every gradient with PyTorch
autograd, and compare with the engine's. Needs torch and transformers (not installed by CI;
`grad_check.py` is the CI check).

Usage: python3 engine/tests/hf_check.py DIR   (DIR from `neuroshard-engine grad-dump`)
"""

import json
import struct
import sys

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

TOL = 1e-4


def read_safetensors(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    dt = {"F32": np.float32, "I32": np.int32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + s : 8 + n + e], dtype=dt[info["dtype"]]).reshape(info["shape"])
    return out


def main(d):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(f"{d}/model", torch_dtype=torch.float64)
    model.eval()
    batch = read_safetensors(f"{d}/batch.safetensors")
    grads = read_safetensors(f"{d}/grads.safetensors")
    info = json.load(open(f"{d}/loss.json"))
    ids = torch.tensor(batch["input_ids"].astype(np.int64))
    labels = torch.tensor(batch["labels"].astype(np.int64))
    logits = model(input_ids=ids).logits
    v_live = info.get("v_live", logits.shape[-1])
    logits = logits[..., :v_live]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v_live), labels.reshape(-1))
    loss.backward()
    failures = []
    lerr = abs(loss.item() - info["loss"]) / abs(loss.item())
    print(f"loss: transformers {loss.item():.8f} engine {info['loss']:.8f} rel err {lerr:.2e}")
    if not lerr <= TOL:
        failures.append("loss")
    params = dict(model.named_parameters())
    if set(params) != set(grads):
        failures.append(f"names differ: {sorted(set(params) ^ set(grads))}")
    worst = 0.0
    for name in sorted(grads):
        if name not in params:
            continue
        ref = params[name].grad.numpy()
        ours = grads[name].astype(np.float64)
        err = np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)
        worst = max(worst, err)
        if not err <= TOL:
            failures.append(f"{name}: {err:.2e}")
    print(f"{len(grads)} gradients, worst relative error {worst:.2e}")
    tok = AutoTokenizer.from_pretrained(f"{d}/model")
    text = "The lighthouse keeper wrote a letter."
    ids = tok(text)["input_ids"]
    back = tok.decode(ids)
    print(f"tokenizer: {len(ids)} ids, round trip {'ok' if back == text else repr(back)}")
    if back != text:
        failures.append("tokenizer round trip")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
