// RMSNorm, pre-norm, no bias.
// forward:  rstd[Bt] = 1/sqrt(mean(x^2) + eps); out[Bt, C] = x * rstd * weight[C]
// backward: dinp += rstd * (w*dout) - x * rstd^3 / C * sum_j(w_j dout_j x_j)
//           dweight[C] (f32) += sum over rows of dout * x * rstd
// One block per row for forward / dinp; dweight is a separate column-tiled kernel that
// sums rows in a fixed order (deterministic, no atomics).
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd_impl(T* out, float* rstd, const T* inp, const T* weight, int rows,
                                 int c, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* x = inp + (long long)row * c;
    T* y = out + (long long)row * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float v = to_f32(x[j]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)c + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        y[j] = from_f32<T>(to_f32(x[j]) * r * to_f32(weight[j]));
    if (threadIdx.x == 0) rstd[row] = r;
}

template <typename T>
__device__ void rmsnorm_bwd_dinp_impl(T* dinp, const T* dout, const T* inp, const T* weight,
                                      const float* rstd, int rows, int c) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const long long base = (long long)row * c;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        dot += to_f32(weight[j]) * to_f32(dout[base + j]) * to_f32(inp[base + j]);
    dot = block_sum(dot, scratch);
    const float k = r * r * r * dot / (float)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float g = r * to_f32(weight[j]) * to_f32(dout[base + j]) - k * to_f32(inp[base + j]);
        dinp[base + j] = from_f32<T>(to_f32(dinp[base + j]) + g);
    }
}

// Block (32, 16): threadIdx.x picks the column inside a 32-wide tile, threadIdx.y strides
// over rows; the 16 partial sums are then added in a fixed order.
template <typename T>
__device__ void rmsnorm_bwd_dweight_impl(float* dweight, const T* dout, const T* inp,
                                         const float* rstd, int rows, int c) {
    __shared__ float part[16][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < c)
        for (int row = threadIdx.y; row < rows; row += blockDim.y) {
            const long long i = (long long)row * c + col;
            acc += to_f32(dout[i]) * to_f32(inp[i]) * rstd[row];
        }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        float s = 0.0f;
        for (int y = 0; y < (int)blockDim.y; ++y) s += part[y][threadIdx.x];
        dweight[col] += s;
    }
}

extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* inp,
                                           const float* weight, int rows, int c, float eps) {
    rmsnorm_fwd_impl(out, rstd, inp, weight, rows, c, eps);
}
extern "C" __global__ void rmsnorm_fwd_bf16(bf16_t* out, float* rstd, const bf16_t* inp,
                                            const bf16_t* weight, int rows, int c, float eps) {
    rmsnorm_fwd_impl(out, rstd, inp, weight, rows, c, eps);
}
extern "C" __global__ void rmsnorm_bwd_f32(float* dinp, const float* dout, const float* inp,
                                           const float* weight, const float* rstd, int rows,
                                           int c) {
    rmsnorm_bwd_dinp_impl(dinp, dout, inp, weight, rstd, rows, c);
}
extern "C" __global__ void rmsnorm_bwd_bf16(bf16_t* dinp, const bf16_t* dout, const bf16_t* inp,
                                            const bf16_t* weight, const float* rstd, int rows,
                                            int c) {
    rmsnorm_bwd_dinp_impl(dinp, dout, inp, weight, rstd, rows, c);
}
extern "C" __global__ void rmsnorm_bwd_dweight_f32(float* dweight, const float* dout,
                                                   const float* inp, const float* rstd, int rows,
                                                   int c) {
    rmsnorm_bwd_dweight_impl(dweight, dout, inp, rstd, rows, c);
}
extern "C" __global__ void rmsnorm_bwd_dweight_bf16(float* dweight, const bf16_t* dout,
                                                    const bf16_t* inp, const float* rstd,
                                                    int rows, int c) {
    rmsnorm_bwd_dweight_impl(dweight, dout, inp, rstd, rows, c);
}
