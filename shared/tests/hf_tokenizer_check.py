#!/usr/bin/env python3
"""Checks that Hugging Face `tokenizers` (and `transformers`, when installed) load NeuroShard's
tokenizer.json and give exactly the ids our Rust tokenizer gives.

Run from the repository root: `python3 shared/tests/hf_tokenizer_check.py [FILE...]`.
It builds and runs the `tokenizer_hf_cases` example (honouring CARGO_TARGET_DIR), which trains a
tokenizer on generated multilingual text and writes cases for it and for every given
tokenizer.json; other files are texts added as cases. Without arguments it checks the engine's
shipped tokenizer (engine/corpus/tokenizer.json) on the built-in corpus.
Requires `pip install tokenizers`; exits 2 with a clear message when it is missing.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

try:
    from tokenizers import Tokenizer
except ImportError:
    print("hf_tokenizer_check: the python package 'tokenizers' is missing (pip install tokenizers)", file=sys.stderr)
    sys.exit(2)

try:
    from transformers import PreTrainedTokenizerFast
except ImportError:
    PreTrainedTokenizerFast = None


def check_dir(path):
    tok_path = os.path.join(path, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    cases = json.load(open(os.path.join(path, "cases.json"), encoding="utf-8"))
    fast = PreTrainedTokenizerFast(tokenizer_file=tok_path) if PreTrainedTokenizerFast else None
    failed = 0
    for case in cases:
        text, want = case["text"], case["ids"]
        got = tok.encode(text, add_special_tokens=False).ids
        back = tok.decode(want, skip_special_tokens=False)
        problems = []
        if got != want:
            problems.append(f"ids differ: hf {got} vs ours {want}")
        if back != text:
            problems.append(f"hf decode gives {back!r}")
        if fast is not None and fast.encode(text, add_special_tokens=False) != want:
            problems.append("transformers ids differ")
        if problems:
            failed += 1
            if failed <= 5:
                print(f"{path}: text {text!r}: " + "; ".join(problems))
    print(f"{path}: {len(cases) - failed} passed, {failed} failed")
    return len(cases) - failed, failed


def main():
    out = tempfile.mkdtemp(prefix="hf-tokenizer-check-")
    cmd = ["cargo", "run", "-q", "-p", "neuroshard-shared", "--example", "tokenizer_hf_cases", "--", out]
    files = sys.argv[1:]
    if not files and os.path.exists("engine/corpus/tokenizer.json"):
        files = ["engine/corpus/tokenizer.json"] + sorted(glob.glob("engine/corpus/*.txt"))
    subprocess.run(cmd + [os.path.abspath(p) for p in files], check=True)
    passed = failed = 0
    for name in sorted(os.listdir(out)):
        p, f = check_dir(os.path.join(out, name))
        passed, failed = passed + p, failed + f
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
