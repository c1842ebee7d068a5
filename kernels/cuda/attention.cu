// Fused causal grouped-query attention, flash style: no T x T matrix in global memory.
// Shapes: q, out, dq, dout [B, T, H, D]; k, v, dk, dv [B, T, KVH, D]; lse, delta [B, H, T].
// Query head h reads kv head h / (H / KVH). Scale 1/sqrt(D). D <= 128 (ATT_MAXD).
//
// forward (attention_fwd_*): grid (ceil(T/8), B*H), block 256 = 8 warps, one warp per query
//   row. Keys/values stream through shared memory in tiles of 32; lane j scores key j of the
//   tile; online softmax (running max m, running sum l) per warp; lane x accumulates output
//   dims x, x+32, ... Writes out and lse = m + log(l) (f32).
// generation (attention_cached_fwd_*): the same kernel for TQ new queries at positions
//   past..past+TQ over a KV cache [B, TMAX, KVH, D]; grid (ceil(TQ/8), B*H); no lse.
// backward, three launches, all deterministic (no atomics):
//   attention_bwd_delta_*: delta[b,h,t] = dot(dout, out) (one warp per row).
//   attention_bwd_dq_*:  like forward, one warp per query: p = exp(s - lse), dp = dout.v,
//                        ds = p (dp - delta), dq += scale * sum_j ds k_j.   (accumulates)
//   attention_bwd_dkv_*: grid (ceil(T/8), B*KVH), one warp per key j, loops over the heads of
//                        its group and over query tiles i >= j:
//                        dv += sum p dout_i, dk += scale * sum ds q_i.      (accumulates)
// Dynamic shared memory (floats): fwd 64(D+1) + 8D, dq 64(D+1) + 16D, dkv 64(D+1) + 16D + 64.
#include "common.cuh"

#define ATT_WARPS 8
#define ATT_TILE 32
#define ATT_MAXD 128
#define ATT_R (ATT_MAXD / 32)

// Rows [row0, row0 + 32) of a [B, T, NH, D] tensor (batch bi, head hh) into s[32][D + 1];
// rows past T are zero.
template <typename T>
__device__ __forceinline__ void load_tile(float* s, const T* x, int bi, int row0, int t, int nh,
                                          int hh, int d) {
    for (int e = threadIdx.x; e < ATT_TILE * d; e += blockDim.x) {
        const int r = e / d, c = e - r * d, row = row0 + r;
        s[r * (d + 1) + c] =
            row < t ? to_f32(x[(((long long)bi * t + row) * nh + hh) * d + c]) : 0.0f;
    }
}

// Queries q [B, TQ, H, D] at positions past + i; keys/values [B, TK, KVH, D] (TK = T in
// training, the cache length TMAX in generation, with rows 0..past+TQ filled). lse may be null.
template <typename T>
__device__ void att_fwd_impl(T* out, float* lse, const T* q, const T* k, const T* v, int b, int tq,
                             int past, int tk, int h, int kvh, int d) {
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + ATT_TILE * (d + 1);
    float* Qs = Vs + ATT_TILE * (d + 1);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bi = blockIdx.y / h, hi = blockIdx.y % h, g = hi / (h / kvh);
    const int q0 = blockIdx.x * ATT_WARPS, qi = q0 + warp, qpos = past + qi;
    const float scale = rsqrtf((float)d);
    const long long qoff = (((long long)bi * tq + qi) * h + hi) * d;
    float* myq = Qs + warp * d;
    if (qi < tq)
        for (int x = lane; x < d; x += 32) myq[x] = to_f32(q[qoff + x]) * scale;
    float m = NS_NEG_INF, l = 0.0f, acc[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) acc[r] = 0.0f;
    const int kmax = past + min(q0 + ATT_WARPS - 1, tq - 1);
    for (int k0 = 0; k0 <= kmax; k0 += ATT_TILE) {
        __syncthreads();
        load_tile(Ks, k, bi, k0, tk, kvh, g, d);
        load_tile(Vs, v, bi, k0, tk, kvh, g, d);
        __syncthreads();
        if (qi >= tq || k0 > qpos) continue;  // warp-uniform
        const int j = k0 + lane;
        float s = NS_NEG_INF;
        if (j <= qpos) {
            s = 0.0f;
            const float* kr = Ks + lane * (d + 1);
            for (int x = 0; x < d; ++x) s = fmaf(myq[x], kr[x], s);
        }
        const float m_new = fmaxf(m, warp_max(s));
        const float p = j <= qpos ? expf(s - m_new) : 0.0f;
        const float corr = expf(m - m_new);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) acc[r] *= corr;
        const int jn = min(ATT_TILE, qpos - k0 + 1);
        for (int jj = 0; jj < jn; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const float* vr = Vs + jj * (d + 1);
#pragma unroll
            for (int r = 0; r < ATT_R; ++r) {
                const int x = lane + 32 * r;
                if (x < d) acc[r] = fmaf(pj, vr[x], acc[r]);
            }
        }
        m = m_new;
    }
    if (qi < tq) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int x = lane + 32 * r;
            if (x < d) out[qoff + x] = from_f32<T>(acc[r] * inv);
        }
        if (lse && lane == 0) lse[((long long)bi * h + hi) * tq + qi] = m + logf(l);
    }
}

template <typename T>
__device__ void att_bwd_delta_impl(float* delta, const T* dout, const T* out, int b, int t, int h,
                                   int d) {
    const int lane = threadIdx.x & 31;
    const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long long)b * t * h) return;  // row = (bi*T + ti)*H + hi
    float s = 0.0f;
    for (int x = lane; x < d; x += 32) s += to_f32(dout[row * d + x]) * to_f32(out[row * d + x]);
    s = warp_sum(s);
    const long long hi = row % h, bt = row / h, ti = bt % t, bi = bt / t;
    if (lane == 0) delta[(bi * h + hi) * t + ti] = s;
}

template <typename T>
__device__ void att_bwd_dq_impl(T* dq, const T* dout, const T* q, const T* k, const T* v,
                                const float* lse, const float* delta, int b, int t, int h,
                                int kvh, int d) {
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + ATT_TILE * (d + 1);
    float* Qs = Vs + ATT_TILE * (d + 1);
    float* Ds = Qs + ATT_WARPS * d;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bi = blockIdx.y / h, hi = blockIdx.y % h, g = hi / (h / kvh);
    const int q0 = blockIdx.x * ATT_WARPS, qi = q0 + warp;
    const float scale = rsqrtf((float)d);
    const long long qoff = (((long long)bi * t + qi) * h + hi) * d;
    float* myq = Qs + warp * d;
    float* mydo = Ds + warp * d;
    float my_lse = 0.0f, my_delta = 0.0f;
    if (qi < t) {
        for (int x = lane; x < d; x += 32) {
            myq[x] = to_f32(q[qoff + x]) * scale;
            mydo[x] = to_f32(dout[qoff + x]);
        }
        my_lse = lse[((long long)bi * h + hi) * t + qi];
        my_delta = delta[((long long)bi * h + hi) * t + qi];
    }
    float acc[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) acc[r] = 0.0f;
    const int kmax = min(q0 + ATT_WARPS - 1, t - 1);
    for (int k0 = 0; k0 <= kmax; k0 += ATT_TILE) {
        __syncthreads();
        load_tile(Ks, k, bi, k0, t, kvh, g, d);
        load_tile(Vs, v, bi, k0, t, kvh, g, d);
        __syncthreads();
        if (qi >= t || k0 > qi) continue;
        const int j = k0 + lane;
        float ds = 0.0f;
        if (j <= qi) {
            const float* kr = Ks + lane * (d + 1);
            const float* vr = Vs + lane * (d + 1);
            float s = 0.0f, dp = 0.0f;
            for (int x = 0; x < d; ++x) {
                s = fmaf(myq[x], kr[x], s);
                dp = fmaf(mydo[x], vr[x], dp);
            }
            const float p = expf(s - my_lse);
            ds = p * (dp - my_delta);
        }
        const int jn = min(ATT_TILE, qi - k0 + 1);
        for (int jj = 0; jj < jn; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
            const float* kr = Ks + jj * (d + 1);
#pragma unroll
            for (int r = 0; r < ATT_R; ++r) {
                const int x = lane + 32 * r;
                if (x < d) acc[r] = fmaf(dsj, kr[x], acc[r]);
            }
        }
    }
    if (qi < t) {
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int x = lane + 32 * r;
            if (x < d) dq[qoff + x] = from_f32<T>(to_f32(dq[qoff + x]) + scale * acc[r]);
        }
    }
}

template <typename T>
__device__ void att_bwd_dkv_impl(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                 const float* lse, const float* delta, int b, int t, int h,
                                 int kvh, int d) {
    extern __shared__ float smem[];
    float* Qs = smem;
    float* Os = Qs + ATT_TILE * (d + 1);  // dout tile
    float* Kr = Os + ATT_TILE * (d + 1);
    float* Vr = Kr + ATT_WARPS * d;
    float* Ls = Vr + ATT_WARPS * d;
    float* Es = Ls + ATT_TILE;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bi = blockIdx.y / kvh, g = blockIdx.y % kvh, group = h / kvh;
    const int k0 = blockIdx.x * ATT_WARPS, kj = k0 + warp;
    const float scale = rsqrtf((float)d);
    const long long koff = (((long long)bi * t + kj) * kvh + g) * d;
    float* myk = Kr + warp * d;
    float* myv = Vr + warp * d;
    if (kj < t)
        for (int x = lane; x < d; x += 32) {
            myk[x] = to_f32(k[koff + x]);
            myv[x] = to_f32(v[koff + x]);
        }
    float dka[ATT_R], dva[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) dka[r] = dva[r] = 0.0f;
    for (int hi = g * group; hi < (g + 1) * group; ++hi) {
        const long long lrow = ((long long)bi * h + hi) * t;
        for (int q0 = (k0 / ATT_TILE) * ATT_TILE; q0 < t; q0 += ATT_TILE) {
            __syncthreads();
            load_tile(Qs, q, bi, q0, t, h, hi, d);
            load_tile(Os, dout, bi, q0, t, h, hi, d);
            if (threadIdx.x < ATT_TILE) {
                const int i = q0 + threadIdx.x;
                Ls[threadIdx.x] = i < t ? lse[lrow + i] : 0.0f;
                Es[threadIdx.x] = i < t ? delta[lrow + i] : 0.0f;
            }
            __syncthreads();
            if (kj >= t || q0 + ATT_TILE - 1 < kj) continue;  // warp-uniform
            const int i = q0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i >= kj && i < t) {
                const float* qr = Qs + lane * (d + 1);
                const float* orow = Os + lane * (d + 1);
                float s = 0.0f, dp = 0.0f;
                for (int x = 0; x < d; ++x) {
                    s = fmaf(qr[x], myk[x], s);
                    dp = fmaf(orow[x], myv[x], dp);
                }
                p = expf(s * scale - Ls[lane]);
                ds = p * (dp - Es[lane]);
            }
            for (int ii = max(0, kj - q0); ii < ATT_TILE && q0 + ii < t; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
                const float* qr = Qs + ii * (d + 1);
                const float* orow = Os + ii * (d + 1);
#pragma unroll
                for (int r = 0; r < ATT_R; ++r) {
                    const int x = lane + 32 * r;
                    if (x < d) {
                        dva[r] = fmaf(pi, orow[x], dva[r]);
                        dka[r] = fmaf(dsi, qr[x], dka[r]);
                    }
                }
            }
        }
    }
    if (kj < t) {
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int x = lane + 32 * r;
            if (x < d) {
                dk[koff + x] = from_f32<T>(to_f32(dk[koff + x]) + scale * dka[r]);
                dv[koff + x] = from_f32<T>(to_f32(dv[koff + x]) + dva[r]);
            }
        }
    }
}

#define ATT_ENTRY(SUF, T)                                                                        \
    extern "C" __global__ void attention_fwd_##SUF(T* out, float* lse, const T* q, const T* k,   \
                                                   const T* v, int b, int t, int h, int kvh,     \
                                                   int d) {                                      \
        att_fwd_impl(out, lse, q, k, v, b, t, 0, t, h, kvh, d);                                  \
    }                                                                                            \
    extern "C" __global__ void attention_cached_fwd_##SUF(                                       \
        T* out, const T* q, const T* k_cache, const T* v_cache, int b, int tq, int past,          \
        int tmax, int h, int kvh, int d) {                                                       \
        att_fwd_impl(out, (float*)0, q, k_cache, v_cache, b, tq, past, tmax, h, kvh, d);         \
    }                                                                                            \
    extern "C" __global__ void attention_bwd_delta_##SUF(float* delta, const T* dout,            \
                                                         const T* out, int b, int t, int h,      \
                                                         int d) {                                \
        att_bwd_delta_impl(delta, dout, out, b, t, h, d);                                        \
    }                                                                                            \
    extern "C" __global__ void attention_bwd_dq_##SUF(T* dq, const T* dout, const T* q,          \
                                                      const T* k, const T* v, const float* lse,  \
                                                      const float* delta, int b, int t, int h,   \
                                                      int kvh, int d) {                          \
        att_bwd_dq_impl(dq, dout, q, k, v, lse, delta, b, t, h, kvh, d);                         \
    }                                                                                            \
    extern "C" __global__ void attention_bwd_dkv_##SUF(                                          \
        T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,       \
        const float* delta, int b, int t, int h, int kvh, int d) {                               \
        att_bwd_dkv_impl(dk, dv, dout, q, k, v, lse, delta, b, t, h, kvh, d);                    \
    }

ATT_ENTRY(f32, float)
ATT_ENTRY(bf16, bf16_t)
