// AdamW (decoupled weight decay, bias-corrected) and global-norm gradient clipping.
// Parameter gradients and optimizer moments are always f32.
// adamw_step_f32:  params (f32) updated in place, exactly the CPU reference's order:
//     m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr*wd*p; p -= lr * (m/bc1) / (sqrt(v/bc2) + eps)
//   bc1 = 1 - b1^t, bc2 = 1 - b2^t are computed on the host (as the CPU does, in f64).
//   g = grads * gscale[0] when gscale is not null (fused clipping, no host round trip).
// adamw_step_bf16: the f32 master weights get the same update, then the bf16 copy is written.
// global norm: global_norm_partial_f32 (fixed grid, one partial per block, written at
//   partials[blockIdx.x]) then global_norm_finalize_f32 (one block, f64, fixed order).
// clip_scale_f32: scale[0] = min(max_norm / (norm[0] + 1e-6), 1).
// scale_in_place_f32: x *= scale[0] (device scalar).
#include "common.cuh"

__device__ __forceinline__ float adamw_one(float* p, float g, float* m, float* v, float lr,
                                           float b1, float b2, float eps, float wd, float bc1,
                                           float bc2) {
    const float mi = b1 * *m + (1.0f - b1) * g;
    const float vi = b2 * *v + (1.0f - b2) * g * g;
    *m = mi;
    *v = vi;
    float x = *p;
    x -= lr * wd * x;
    x -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    *p = x;
    return x;
}

extern "C" __global__ void adamw_step_f32(float* params, const float* grads, float* m, float* v,
                                          long long n, float lr, float b1, float b2, float eps,
                                          float wd, float bc1, float bc2, const float* gscale) {
    const float s = gscale ? gscale[0] : 1.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        adamw_one(&params[i], grads[i] * s, &m[i], &v[i], lr, b1, b2, eps, wd, bc1, bc2);
}

extern "C" __global__ void adamw_step_bf16(float* master, bf16_t* params, const float* grads,
                                           float* m, float* v, long long n, float lr, float b1,
                                           float b2, float eps, float wd, float bc1, float bc2,
                                           const float* gscale) {
    const float s = gscale ? gscale[0] : 1.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        params[i] = f32_to_bf16(
            adamw_one(&master[i], grads[i] * s, &m[i], &v[i], lr, b1, b2, eps, wd, bc1, bc2));
}

// Block size must be 256.
extern "C" __global__ void global_norm_partial_f32(float* partials, const float* x, long long n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        s += v * v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block of 256 threads.
extern "C" __global__ void global_norm_finalize_f32(float* norm, const float* partials, int count) {
    __shared__ double part[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += (double)partials[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < (int)blockDim.x; ++i) total += part[i];
        norm[0] = (float)sqrt(total);
    }
}

extern "C" __global__ void clip_scale_f32(float* scale, const float* norm, float max_norm) {
    if (blockIdx.x == 0 && threadIdx.x == 0) scale[0] = fminf(max_norm / (norm[0] + 1e-6f), 1.0f);
}

extern "C" __global__ void scale_in_place_f32(float* x, long long n, const float* scale) {
    const float s = scale[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] *= s;
}
