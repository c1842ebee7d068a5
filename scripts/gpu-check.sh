#!/usr/bin/env bash
# The GPU proof for the CUDA kernels, in two halves.
#
#   bash scripts/gpu-check.sh --prepare
#       On a developer machine (network, no GPU needed): compiles every kernel family to
#       CUBIN + PTX for sm_80/sm_90 with NVRTC, builds the GPU test binaries and the
#       benchmark, strips them and puts everything into target/gpu-pack/ (well under 64 MiB).
#       Carry that directory to the CUDA machine (the device tool: carry ["target/gpu-pack"]).
#
#   bash scripts/gpu-check.sh
#       On the CUDA machine (driver only; no toolkit, no network needed): uses the pack when
#       present (NEUROSHARD_CUDA_MODULES = its modules, so no NVRTC is needed); without a
#       pack, builds with cargo (and NVRTC from the pip wheels, which needs network).
#       Runs, each under a timeout, in about 5 minutes:
#         1. every op, GPU vs CPU reference, fresh random inputs, several shapes incl. ragged
#            ones, outputs poisoned with NaN first, stated tolerances (cuda_vs_cpu_gpu)
#         2. the engine's CudaBackend against its CpuBackend, through the Backend trait
#         3. GPU faults: OOM and an illegal address come back as errors, never a hang
#         4. benchmarks: GEMM TFLOP/s, bf16 training step (bench and gpt2-small presets),
#            tokens/s and MFU
#       Prints a summary table; logs go to $OUT (the device tool's output folder) or
#       target/gpu-check/. Exits non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pack="${NEUROSHARD_GPU_PACK:-$root/target/gpu-pack}"

prepare() {
    set -e
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh
    rm -rf "$pack"
    mkdir -p "$pack/bin" "$pack/modules"
    NEUROSHARD_PTX_OUT="$pack/modules" cargo test -q -p neuroshard-kernels --test cuda_compile
    local json exe
    json=$(cargo test -p neuroshard-kernels --no-run --message-format=json \
        --test cuda_vs_cpu_gpu --test cuda_fault_gpu 2>/dev/null)
    for t in cuda_vs_cpu_gpu cuda_fault_gpu; do
        exe=$(printf '%s\n' "$json" | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$t" | tail -1)
        [ -n "$exe" ] || { echo "gpu-check: no executable for $t" >&2; exit 1; }
        cp "$exe" "$pack/bin/$t"
    done
    # Dev profile: the kernels crate and every dependency are built with opt-level 3 there.
    # The engine's unit tests: the CUDA backend against the CPU backend through the trait.
    json=$(cargo test -p neuroshard-engine --lib --no-run --message-format=json 2>/dev/null)
    exe=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "neuroshard_engine":
        print(m["executable"])' | tail -1)
    [ -n "$exe" ] || { echo "gpu-check: no engine test executable" >&2; exit 1; }
    cp "$exe" "$pack/bin/engine_tests"
    cargo build -q -p neuroshard-kernels --example cuda_bench
    cp "${CARGO_TARGET_DIR:-$root/target}/debug/examples/cuda_bench" "$pack/bin/cuda_bench"
    if command -v strip >/dev/null; then strip --strip-debug "$pack"/bin/*; fi
    git rev-parse HEAD >"$pack/REVISION" 2>/dev/null || true
    ldd --version 2>&1 | head -1 >"$pack/GLIBC" || true
    du -sh "$pack"
    echo "gpu-check: pack ready in $pack (carry it to the CUDA machine)"
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit $?
fi

out="${OUT:-$root/target/gpu-check}"
mkdir -p "$out"
summary=()
failed=0
record() { # name status seconds note
    summary+=("$(printf '%-26s %-6s %6ss  %s' "$1" "$2" "$3" "$4")")
    [ "$2" = ok ] || failed=1
}

echo "== gpu-check $(date -u +%FT%TZ) rev $(cat "$pack/REVISION" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
fi

bin="$pack/bin"
if [ -x "$bin/cuda_vs_cpu_gpu" ] && [ -x "$bin/cuda_fault_gpu" ] && [ -x "$bin/cuda_bench" ] && [ -x "$bin/engine_tests" ]; then
    echo "gpu-check: using the prebuilt pack in $pack"
    if ls "$pack"/modules/*.cubin >/dev/null 2>&1; then
        export NEUROSHARD_CUDA_MODULES="$pack/modules"
    fi
else
    echo "gpu-check: no pack; building here"
    if ! command -v cargo >/dev/null; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "gpu-check: cargo missing; installing rustup (needs network)"
            curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >"$out/rustup.log" 2>&1 &&
                export PATH="$HOME/.cargo/bin:$PATH" || {
                echo "gpu-check: no pack and no cargo: run 'bash scripts/gpu-check.sh --prepare' on a dev machine and carry target/gpu-pack"
                exit 2
            }
        fi
    fi
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh || echo "gpu-check: NVRTC wheels unavailable; the build will need NEUROSHARD_CUDA_MODULES"
    NEUROSHARD_GPU_PACK="$pack" bash scripts/gpu-check.sh --prepare >"$out/prepare.log" 2>&1 || {
        tail -30 "$out/prepare.log"
        exit 2
    }
    export NEUROSHARD_CUDA_MODULES="$pack/modules"
fi

run_step() { # name timeout_s command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    local dt=$((SECONDS - t0))
    case $rc in
        0) record "$name" ok "$dt" "" ;;
        124) record "$name" FAIL "$dt" "timed out after ${limit}s" ;;
        *) record "$name" FAIL "$dt" "exit $rc (see $out/$name.log)" ;;
    esac
    return $rc
}

export NEUROSHARD_GPU_TESTS=1
run_step ops_vs_cpu 300 "$bin/cuda_vs_cpu_gpu" --nocapture --test-threads=1
grep -E '^(op |[a-z_.]+ +(f32|bf16) )' "$out/ops_vs_cpu.log" >"$out/ops_table.txt" || true
grep -E 'seed|device' "$out/ops_vs_cpu.log" | head -3
run_step backend_parity 120 "$bin/engine_tests" backend::cuda --nocapture --test-threads=1
run_step gpu_faults 90 "$bin/cuda_fault_gpu" --nocapture --test-threads=1
run_step bench 240 "$bin/cuda_bench" --steps 10

echo
echo "== op comparisons (max|gpu-cpu|/max|cpu|, tolerance, non-finite count)"
cat "$out/ops_table.txt"
grep ' FAIL$' "$out/ops_table.txt" | sed 's/^/FAILED: /' || true
echo
echo "== backend parity (CudaBackend vs CpuBackend through the Backend trait)"
grep 'gpu backend parity' "$out/backend_parity.log" || true
echo
echo "== faults"
grep 'gpu_faults' "$out/gpu_faults.log" | tail -5
echo
echo "== benchmarks"
cat "$out/bench.log"
echo
echo "== summary"
printf '%s\n' "${summary[@]}"
[ "$failed" = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILED"
exit "$failed"
