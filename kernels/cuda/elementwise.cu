// Elementwise and reduction helpers: fill, scale, add, accumulate, casts f32 <-> bf16.
// Shapes: flat [n]. Grid-stride loops, so any grid size is correct.
#include "common.cuh"

template <typename T>
__device__ void fill_impl(T* x, long long n, float val) {
    const T v = from_f32<T>(val);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = v;
}

template <typename T>
__device__ void scale_impl(T* x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) * s);
}

// out = a + b (out may alias a or b).
template <typename T>
__device__ void add_impl(T* out, const T* a, const T* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

// y += x.
template <typename T>
__device__ void accumulate_impl(T* y, const T* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(x[i]));
}

extern "C" __global__ void fill_fwd_f32(float* x, long long n, float v) { fill_impl(x, n, v); }
extern "C" __global__ void fill_fwd_bf16(bf16_t* x, long long n, float v) { fill_impl(x, n, v); }
extern "C" __global__ void scale_fwd_f32(float* x, long long n, float s) { scale_impl(x, n, s); }
extern "C" __global__ void scale_fwd_bf16(bf16_t* x, long long n, float s) { scale_impl(x, n, s); }
extern "C" __global__ void add_fwd_f32(float* o, const float* a, const float* b, long long n) {
    add_impl(o, a, b, n);
}
extern "C" __global__ void add_fwd_bf16(bf16_t* o, const bf16_t* a, const bf16_t* b, long long n) {
    add_impl(o, a, b, n);
}
extern "C" __global__ void accumulate_fwd_f32(float* y, const float* x, long long n) {
    accumulate_impl(y, x, n);
}
extern "C" __global__ void accumulate_fwd_bf16(bf16_t* y, const bf16_t* x, long long n) {
    accumulate_impl(y, x, n);
}
// Mixed: f32 accumulator += bf16 values (gradient of a bf16 activation into f32 storage).
extern "C" __global__ void accumulate_fwd_f32_bf16(float* y, const bf16_t* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += to_f32(x[i]);
}

extern "C" __global__ void cast_fwd_f32_bf16(bf16_t* out, const float* inp, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(inp[i]);
}
extern "C" __global__ void cast_fwd_bf16_f32(float* out, const bf16_t* inp, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = to_f32(inp[i]);
}
