# Installs NVRTC, the CUDA runtime headers and ptxas from PyPI wheels (no CUDA toolkit, no
# GPU needed) and exports what the CUDA compile check needs. Source it:
#
#   source scripts/cuda-env.sh        # then: cargo test -p neuroshard-kernels
#
# or, from a script that cannot source: eval "$(bash scripts/cuda-env.sh --print)".
# Exports:
#   LD_LIBRARY_PATH          += the wheel's lib dir, so cudarc's dlopen finds libnvrtc.so.12
#   NEUROSHARD_NVRTC_LIB     that lib dir
#   NEUROSHARD_CUDA_INCLUDE  cuda_runtime/include (optional NVRTC include path)
#   NEUROSHARD_PTXAS         the ptxas binary (scripts/ptxas-report.sh)
# Wheels go to $NEUROSHARD_CUDA_WHEELS (default ~/.cache/neuroshard/cuda-wheels) once.

_ns_cuda_env() {
    local dir="${NEUROSHARD_CUDA_WHEELS:-$HOME/.cache/neuroshard/cuda-wheels}"
    local py="${PYTHON:-python3}"
    if [ ! -e "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] || [ ! -x "$dir/nvidia/cuda_nvcc/bin/ptxas" ]; then
        echo "cuda-env: installing NVRTC/runtime/nvcc wheels into $dir" >&2
        mkdir -p "$dir" || return 1
        "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --upgrade --target "$dir" \
            nvidia-cuda-nvrtc-cu12==12.9.86 \
            nvidia-cuda-runtime-cu12==12.9.79 \
            nvidia-cuda-nvcc-cu12==12.9.86 >&2 || {
            echo "cuda-env: pip install failed" >&2
            return 1
        }
    fi
    NEUROSHARD_NVRTC_LIB="$dir/nvidia/cuda_nvrtc/lib"
    NEUROSHARD_CUDA_INCLUDE="$dir/nvidia/cuda_runtime/include"
    NEUROSHARD_PTXAS="$dir/nvidia/cuda_nvcc/bin/ptxas"
    chmod +x "$NEUROSHARD_PTXAS" 2>/dev/null
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$NEUROSHARD_NVRTC_LIB:"*) ;;
        *) LD_LIBRARY_PATH="$NEUROSHARD_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    export LD_LIBRARY_PATH NEUROSHARD_NVRTC_LIB NEUROSHARD_CUDA_INCLUDE NEUROSHARD_PTXAS
}

if [ "${1:-}" = "--print" ]; then
    _ns_cuda_env || exit 1
    printf 'export LD_LIBRARY_PATH=%q\n' "$LD_LIBRARY_PATH"
    printf 'export NEUROSHARD_NVRTC_LIB=%q\n' "$NEUROSHARD_NVRTC_LIB"
    printf 'export NEUROSHARD_CUDA_INCLUDE=%q\n' "$NEUROSHARD_CUDA_INCLUDE"
    printf 'export NEUROSHARD_PTXAS=%q\n' "$NEUROSHARD_PTXAS"
else
    _ns_cuda_env
fi
