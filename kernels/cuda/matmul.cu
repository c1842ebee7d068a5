// Linear layer GEMMs (no bias). Shapes (llm.c style):
//   forward:        out[M, N]      = inp[M, K] @ weight[N, K]^T              (written)
//   backward dinp:  dinp[M, K]    += dout[M, N] @ weight[N, K]               (accumulated)
//   backward dw:    dweight[N, K] += dout[M, N]^T @ inp[M, K]  (f32 always)  (accumulated)
// Every product is C[Mc, Nc] (+)= sum_r A(i, r) B(r, j) with A and B addressed through a
// compile-time layout: "r-contiguous" means the reduction index is the fastest one.
//
// Two implementations:
//   *_f32 : SIMT tiled kernel, 64x64 tile, 16-deep, 4x4 outputs per thread (the reference).
//   *_bf16: tensor cores via mma.sync.m16n8k16 (bf16 in, f32 accumulate; sm_80 and sm_90),
//           128x128 tile, 32-deep, 8 warps of 64x32. Single-stage shared memory (no cp.async
//           pipeline yet). Edges are zero-padded, so any M, N, K is correct.
#include "common.cuh"

// A(i, r): R_CONTIG ? a[i*ld + r] : a[r*ld + i]
template <bool R_CONTIG, typename T>
__device__ __forceinline__ float load_a(const T* a, long long ld, int i, int r, int mi, int mr) {
    if (i >= mi || r >= mr) return 0.0f;
    return to_f32(R_CONTIG ? a[(long long)i * ld + r] : a[(long long)r * ld + i]);
}

template <typename TC>
__device__ __forceinline__ void store_c(TC* c, long long idx, float v, int accumulate) {
    c[idx] = from_f32<TC>(accumulate ? to_f32(c[idx]) + v : v);
}

// ---------------------------------------------------------------- SIMT (f32)
#define S_BM 64
#define S_BN 64
#define S_BR 16
template <bool A_RC, bool B_RC, typename T, typename TC>
__device__ void gemm_simt(TC* c, const T* a, const T* b, int mc, int nc, int rr, long long lda,
                          long long ldb, long long ldc, int accumulate) {
    __shared__ float As[S_BR][S_BM + 4];
    __shared__ float Bs[S_BR][S_BN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int i0 = blockIdx.y * S_BM, j0 = blockIdx.x * S_BN;
    float acc[4][4] = {};
    for (int r0 = 0; r0 < rr; r0 += S_BR) {
        for (int e = tid; e < S_BM * S_BR; e += 256) {
            int i, r;
            if (A_RC) { i = e / S_BR; r = e % S_BR; } else { r = e / S_BM; i = e % S_BM; }
            As[r][i] = load_a<A_RC>(a, lda, i0 + i, r0 + r, mc, rr);
            int j, r2;
            // B(r, j) viewed as a "matrix with rows j": B_RC ? b[j*ldb + r] : b[r*ldb + j]
            if (B_RC) { j = e / S_BR; r2 = e % S_BR; } else { r2 = e / S_BN; j = e % S_BN; }
            Bs[r2][j] = load_a<B_RC>(b, ldb, j0 + j, r0 + r2, nc, rr);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < S_BR; ++r) {
            float av[4], bv[4];
#pragma unroll
            for (int x = 0; x < 4; ++x) { av[x] = As[r][ty + 16 * x]; bv[x] = Bs[r][tx + 16 * x]; }
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(av[x], bv[y], acc[x][y]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) {
            const int i = i0 + ty + 16 * x, j = j0 + tx + 16 * y;
            if (i < mc && j < nc) store_c(c, (long long)i * ldc + j, acc[x][y], accumulate);
        }
}

// ---------------------------------------------------------------- tensor cores (bf16)
#define T_BM 128
#define T_BN 128
#define T_BK 32
#define T_PAD 8

__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a,
                                               const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <bool R_CONTIG>
__device__ __forceinline__ bf16_t load_bf16(const bf16_t* a, long long ld, int i, int r, int mi,
                                            int mr) {
    if (i >= mi || r >= mr) return (bf16_t)0;
    return R_CONTIG ? a[(long long)i * ld + r] : a[(long long)r * ld + i];
}

template <bool A_RC, bool B_RC, typename TC>
__device__ void gemm_mma(TC* c, const bf16_t* a, const bf16_t* b, int mc, int nc, int rr,
                         long long lda, long long ldb, long long ldc, int accumulate) {
    __shared__ __align__(16) bf16_t As[T_BM][T_BK + T_PAD];
    __shared__ __align__(16) bf16_t Bs[T_BN][T_BK + T_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;  // 2 x 4 warps
    const int g = lane >> 2, tg = lane & 3;
    const int i0 = blockIdx.y * T_BM, j0 = blockIdx.x * T_BN;
    float acc[4][4][4];
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y)
#pragma unroll
            for (int z = 0; z < 4; ++z) acc[x][y][z] = 0.0f;

    for (int r0 = 0; r0 < rr; r0 += T_BK) {
        for (int e = tid; e < T_BM * T_BK; e += 256) {
            int i, r;
            if (A_RC) { i = e / T_BK; r = e % T_BK; } else { r = e / T_BM; i = e % T_BM; }
            As[i][r] = load_bf16<A_RC>(a, lda, i0 + i, r0 + r, mc, rr);
            int j, r2;
            if (B_RC) { j = e / T_BK; r2 = e % T_BK; } else { r2 = e / T_BN; j = e % T_BN; }
            Bs[j][r2] = load_bf16<B_RC>(b, ldb, j0 + j, r0 + r2, nc, rr);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < T_BK; kk += 16) {
            unsigned int af[4][4], bfr[4][2];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const int row = wm + x * 16 + g;
                af[x][0] = *(const unsigned int*)&As[row][kk + tg * 2];
                af[x][1] = *(const unsigned int*)&As[row + 8][kk + tg * 2];
                af[x][2] = *(const unsigned int*)&As[row][kk + tg * 2 + 8];
                af[x][3] = *(const unsigned int*)&As[row + 8][kk + tg * 2 + 8];
            }
#pragma unroll
            for (int y = 0; y < 4; ++y) {
                const int col = wn + y * 8 + g;
                bfr[y][0] = *(const unsigned int*)&Bs[col][kk + tg * 2];
                bfr[y][1] = *(const unsigned int*)&Bs[col][kk + tg * 2 + 8];
            }
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int y = 0; y < 4; ++y) mma_bf16_16816(acc[x][y], af[x], bfr[y]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y)
#pragma unroll
            for (int z = 0; z < 4; ++z) {
                const int i = i0 + wm + x * 16 + g + (z >= 2 ? 8 : 0);
                const int j = j0 + wn + y * 8 + tg * 2 + (z & 1);
                if (i < mc && j < nc) store_c(c, (long long)i * ldc + j, acc[x][y][z], accumulate);
            }
}

// ---------------------------------------------------------------- entry points
// Launch: SIMT block 256, grid (ceil(Nc/64), ceil(Mc/64)); MMA block 256, grid
// (ceil(Nc/128), ceil(Mc/128)), where (Mc, Nc) is the output's shape.
extern "C" __global__ void matmul_fwd_f32(float* out, const float* inp, const float* weight, int m,
                                          int k, int n) {
    gemm_simt<true, true>(out, inp, weight, m, n, k, k, k, n, 0);
}
extern "C" __global__ void matmul_bwd_dinp_f32(float* dinp, const float* dout, const float* weight,
                                               int m, int k, int n) {
    gemm_simt<true, false>(dinp, dout, weight, m, k, n, n, k, k, 1);
}
extern "C" __global__ void matmul_bwd_dweight_f32(float* dweight, const float* dout,
                                                  const float* inp, int m, int k, int n) {
    gemm_simt<false, false>(dweight, dout, inp, n, k, m, n, k, k, 1);
}
extern "C" __global__ void matmul_fwd_bf16(bf16_t* out, const bf16_t* inp, const bf16_t* weight,
                                           int m, int k, int n) {
    gemm_mma<true, true>(out, inp, weight, m, n, k, k, k, n, 0);
}
extern "C" __global__ void matmul_bwd_dinp_bf16(bf16_t* dinp, const bf16_t* dout,
                                                const bf16_t* weight, int m, int k, int n) {
    gemm_mma<true, false>(dinp, dout, weight, m, k, n, n, k, k, 1);
}
extern "C" __global__ void matmul_bwd_dweight_bf16(float* dweight, const bf16_t* dout,
                                                   const bf16_t* inp, int m, int k, int n) {
    gemm_mma<false, false>(dweight, dout, inp, n, k, m, n, k, k, 1);
}
// Forward with f32 output (LM-head logits kept in f32 for the loss).
extern "C" __global__ void matmul_fwd_bf16_f32out(float* out, const bf16_t* inp,
                                                  const bf16_t* weight, int m, int k, int n) {
    gemm_mma<true, true>(out, inp, weight, m, n, k, k, k, n, 0);
}
