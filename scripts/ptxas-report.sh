#!/usr/bin/env bash
# Register and spill report for every CUDA kernel: compiles each family to PTX with NVRTC
# (the cuda_compile test writes target/ptx/*.ptx), runs `ptxas -v` on each for sm_90 and
# sm_80, and writes a table to target/ptxas-report.txt (override: $1). Kernels that spill
# are flagged "SPILL"; with --fail-on-spill the script then exits 1.
#
#   bash scripts/ptxas-report.sh [REPORT_FILE] [--fail-on-spill]
set -euo pipefail
cd "$(dirname "$0")/.."

report=target/ptxas-report.txt
fail_on_spill=0
for a in "$@"; do
    case "$a" in
        --fail-on-spill) fail_on_spill=1 ;;
        *) report="$a" ;;
    esac
done

# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
ptx_dir="${NEUROSHARD_PTX_OUT:-$PWD/target/ptx}"
export NEUROSHARD_PTX_OUT="$ptx_dir"
# Always regenerate, so the report matches the current sources.
cargo test -q -p neuroshard-kernels --test cuda_compile every_kernel_family >&2

mkdir -p "$(dirname "$report")"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for arch in sm_90 sm_80; do
    for ptx in "$ptx_dir"/*."$arch".ptx; do
        family=$(basename "$ptx" ".$arch.ptx")
        "$NEUROSHARD_PTXAS" -v -arch="$arch" -o /dev/null "$ptx" 2>&1 |
            awk -v fam="$family" -v arch="$arch" '
                /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
                /bytes stack frame/ { stack = $1; sst = $5; sld = $9 }
                /Used [0-9]+ registers/ {
                    regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
                    smem = 0
                    if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
                    flag = (sst + sld > 0) ? "SPILL" : "ok"
                    printf "%-6s %-14s %-28s %5s %8s %8s %6s %7s  %s\n", arch, fam, fn, regs, sst, sld, stack, smem, flag
                }'
    done
done >"$tmp"

{
    echo "# ptxas -v report ($("$NEUROSHARD_PTXAS" --version | tail -1))"
    echo "# spill columns are bytes of spill stores / loads; smem is static shared memory (bytes)"
    printf "%-6s %-14s %-28s %5s %8s %8s %6s %7s  %s\n" arch family kernel regs spill_st spill_ld stack smem status
    cat "$tmp"
} >"$report"
kernels=$(wc -l <"$tmp")
spills=$(grep -c ' SPILL$' "$tmp" || true)
cat "$report"
echo "ptxas-report: $kernels kernel builds, $spills spilling; written to $report" >&2
if [ "$kernels" -eq 0 ]; then
    echo "ptxas-report: no kernels parsed" >&2
    exit 1
fi
if [ "$fail_on_spill" = 1 ] && [ "$spills" -gt 0 ]; then
    exit 1
fi
