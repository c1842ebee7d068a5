// SwiGLU gate: out[n] = silu(gate) * up, silu(x) = x * sigmoid(x).
// backward (accumulates): dgate += dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)));
//                         dup   += dout * silu(g).
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd_impl(T* out, const T* gate, const T* up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        const float sig = 1.0f / (1.0f + expf(-g));
        out[i] = from_f32<T>(g * sig * to_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd_impl(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                                long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dout[i]);
        const float sig = 1.0f / (1.0f + expf(-g));
        dgate[i] = from_f32<T>(to_f32(dgate[i]) + d * u * sig * (1.0f + g * (1.0f - sig)));
        dup[i] = from_f32<T>(to_f32(dup[i]) + d * g * sig);
    }
}

extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up,
                                          long long n) {
    swiglu_fwd_impl(out, gate, up, n);
}
extern "C" __global__ void swiglu_fwd_bf16(bf16_t* out, const bf16_t* gate, const bf16_t* up,
                                           long long n) {
    swiglu_fwd_impl(out, gate, up, n);
}
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout,
                                          const float* gate, const float* up, long long n) {
    swiglu_bwd_impl(dgate, dup, dout, gate, up, n);
}
extern "C" __global__ void swiglu_bwd_bf16(bf16_t* dgate, bf16_t* dup, const bf16_t* dout,
                                           const bf16_t* gate, const bf16_t* up, long long n) {
    swiglu_bwd_impl(dgate, dup, dout, gate, up, n);
}
