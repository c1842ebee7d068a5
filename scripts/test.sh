#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (Python
# packages, the CUDA compiler wheels for the kernel compile check, systemd-analyze, a
# PostgreSQL server for the ledger tests, e2fsprogs, libfaketime, iproute2 and nftables),
# builds the binaries, runs every test.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p neuroshard-kernels   # extra args go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== setup"
if ! command -v cargo >/dev/null; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
fi
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    }
}
command -v systemd-analyze >/dev/null || apt_install systemd
# The storage test mounts an ext4 image on a loop device; the ledger crash test runs a node
# with its clock days ahead (libfaketime) to unstake past the lock.
command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || apt_install e2fsprogs
command -v faketime >/dev/null || apt_install faketime
# The TLS tests drive curl against the node's HTTPS port.
command -v curl >/dev/null || apt_install curl ca-certificates
# The network lab (tests/tests/lab.rs) makes namespaces, shapes links and cuts partitions.
command -v ip >/dev/null && command -v tc >/dev/null || apt_install iproute2
command -v nft >/dev/null || apt_install nftables
# The dashboard test drives a real headless browser.
command -v chromium >/dev/null || apt_install chromium
command -v python3 >/dev/null || apt_install python3 python3-pip
python3 -c 'import numpy, tokenizers, openai' 2>/dev/null || \
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore numpy tokenizers openai
# The lab's throughput plot (scripts/lab-plot.py).
python3 -c 'import matplotlib' 2>/dev/null || \
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore matplotlib
# The model export's check (tests/tests/model_export.rs, engine/tests/export_check.py): the
# `gguf` reader, transformers on PyTorch, and llama.cpp (llama-cpp-python compiles it from
# source). PyTorch's CPU-only wheel when its index answers, else PyPI's (with its CUDA
# libraries: ~5 GB, ~3.5 min here). Figures in BENCHMARKS.md ("Model export check set-up").
pip_quiet() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
python3 -c 'import torch' 2>/dev/null || \
    pip_quiet --timeout 10 --retries 0 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || pip_quiet torch
python3 -c 'import gguf, transformers, llama_cpp' 2>/dev/null || \
    pip_quiet gguf transformers llama-cpp-python
# NVRTC, CUDA headers and ptxas from PyPI: every CUDA kernel is compiled in the tests.
. scripts/cuda-env.sh
. scripts/postgres-test-server.sh
trap 'eval "${NS_PG_STOP:-true}" >/dev/null 2>&1 || true' EXIT

echo "== build"
# The integration tests start the real binaries: build them first (same profile as the tests),
# with the `adversary` feature: the checked-work scenarios start a node that cheats on purpose
# (a release build never has it, and refuses a configured cheat).
features=(--features neuroshard/adversary,neuroshard-engine/adversary)
cargo build --workspace --bins "${features[@]}"
# The chosen peer-to-peer stack's bench binary (rust-libp2p), for the nat:: scenario: its own
# workspace and target dir (bench/p2p), so the main build never compiles the stacks.
cargo build --release --manifest-path bench/p2p/Cargo.toml -p libp2p-bench

echo "== test"
# Hugging Face's tokenizers must read our tokenizer.json and produce the same ids.
python3 shared/tests/hf_tokenizer_check.py
log=$(mktemp)
# The whole workspace unless the caller picks packages: cargo ignores `-p` next to `--workspace`.
scope=(--workspace)
for arg in "$@"; do
    case $arg in -p | -p?* | --package | --package=*) scope=() ;; esac
done
# The same features as the build, so the binaries are not rebuilt (a picked package that is
# not the daemon is built without them).
[ ${#scope[@]} -gt 0 ] || features=()
# Every test binary runs even after one failed, so a run reports every failure at once.
cargo test --no-fail-fast "${scope[@]}" "${features[@]}" "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo's last line is the last crate's doc-tests).
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
