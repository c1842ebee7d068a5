// Softmax cross-entropy over a padded vocabulary: logits[Bt, Vp], targets[Bt];
// columns >= v_live are masked out (never enter the softmax, get zero gradient).
// forward:  losses[Bt] (f32) = lse(row[:v_live]) - row[target]; a target >= v_live gives NaN
//           (the host validates targets first). cross_entropy_mean_f32 then writes
//           mean(losses) to loss[0] with a fixed summation order.
// backward: dlogits (WRITTEN, not accumulated) = (softmax - onehot) * dloss / rows.
// One block per row.
#include "common.cuh"

template <typename T>
__device__ float row_lse(const T* row, int v_live, float* scratch) {
    float mx = NS_NEG_INF;
    for (int j = threadIdx.x; j < v_live; j += blockDim.x) mx = fmaxf(mx, to_f32(row[j]));
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v_live; j += blockDim.x) s += expf(to_f32(row[j]) - mx);
    s = block_sum(s, scratch);
    return mx + logf(s);
}

template <typename T>
__device__ void ce_fwd_impl(float* losses, const T* logits, const unsigned int* targets, int rows,
                            int vp, int v_live) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* row = logits + (long long)r * vp;
    const float lse = row_lse(row, v_live, scratch);
    if (threadIdx.x == 0) {
        const unsigned int tgt = targets[r];
        losses[r] = tgt < (unsigned int)v_live ? lse - to_f32(row[tgt]) : NS_NAN;
    }
}

template <typename T>
__device__ void ce_bwd_impl(T* dlogits, const T* logits, const unsigned int* targets, int rows,
                            int vp, int v_live, float dloss) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* row = logits + (long long)r * vp;
    T* drow = dlogits + (long long)r * vp;
    const float lse = row_lse(row, v_live, scratch);
    const float scale = dloss / (float)rows;
    const unsigned int tgt = targets[r];
    const bool ok = tgt < (unsigned int)v_live;
    for (int j = threadIdx.x; j < vp; j += blockDim.x) {
        float g = 0.0f;
        if (j < v_live) {
            g = expf(to_f32(row[j]) - lse) * scale;
            if ((unsigned int)j == tgt) g -= scale;
            if (!ok) g = NS_NAN;
        }
        drow[j] = from_f32<T>(g);
    }
}

extern "C" __global__ void cross_entropy_fwd_f32(float* losses, const float* logits,
                                                 const unsigned int* targets, int rows, int vp,
                                                 int v_live) {
    ce_fwd_impl(losses, logits, targets, rows, vp, v_live);
}
extern "C" __global__ void cross_entropy_fwd_bf16(float* losses, const bf16_t* logits,
                                                  const unsigned int* targets, int rows, int vp,
                                                  int v_live) {
    ce_fwd_impl(losses, logits, targets, rows, vp, v_live);
}
extern "C" __global__ void cross_entropy_bwd_f32(float* dlogits, const float* logits,
                                                 const unsigned int* targets, int rows, int vp,
                                                 int v_live, float dloss) {
    ce_bwd_impl(dlogits, logits, targets, rows, vp, v_live, dloss);
}
extern "C" __global__ void cross_entropy_bwd_bf16(bf16_t* dlogits, const bf16_t* logits,
                                                  const unsigned int* targets, int rows, int vp,
                                                  int v_live, float dloss) {
    ce_bwd_impl(dlogits, logits, targets, rows, vp, v_live, dloss);
}

// One block: loss[0] = mean(losses[0..rows]) accumulated in f64, fixed order.
extern "C" __global__ void cross_entropy_mean_f32(float* loss, const float* losses, int rows) {
    __shared__ double part[1024];
    double s = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) s += (double)losses[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < (int)blockDim.x; ++i) total += part[i];
        loss[0] = rows > 0 ? (float)(total / (double)rows) : 0.0f;
    }
}
