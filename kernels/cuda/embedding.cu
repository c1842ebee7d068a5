// Token embedding lookup.
// forward:  out[Bt, C] = table[ids[Bt], C]; an id >= V writes NaN (never a silent wrong row;
//           the host validates ids before upload and reports the error).
// backward: dtable[V, C] (f32, the parameter gradient) += dout[Bt, C] scattered by ids.
//           atomicAdd: the summation order between equal ids is not deterministic.
#include "common.cuh"

template <typename T>
__device__ void embedding_fwd_impl(T* out, const unsigned int* ids, const T* table, int bt, int c,
                                   int v) {
    const long long total = (long long)bt * c;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / c, col = i - row * c;
        const unsigned int id = ids[row];
        out[i] = id < (unsigned int)v ? table[(long long)id * c + col] : from_f32<T>(NS_NAN);
    }
}

template <typename T>
__device__ void embedding_bwd_impl(float* dtable, const T* dout, const unsigned int* ids, int bt,
                                   int c, int v) {
    const long long total = (long long)bt * c;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / c, col = i - row * c;
        const unsigned int id = ids[row];
        if (id < (unsigned int)v) atomicAdd(&dtable[(long long)id * c + col], to_f32(dout[i]));
    }
}

extern "C" __global__ void embedding_fwd_f32(float* out, const unsigned int* ids,
                                             const float* table, int bt, int c, int v) {
    embedding_fwd_impl(out, ids, table, bt, c, v);
}
extern "C" __global__ void embedding_fwd_bf16(bf16_t* out, const unsigned int* ids,
                                              const bf16_t* table, int bt, int c, int v) {
    embedding_fwd_impl(out, ids, table, bt, c, v);
}
extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout,
                                             const unsigned int* ids, int bt, int c, int v) {
    embedding_bwd_impl(dtable, dout, ids, bt, c, v);
}
extern "C" __global__ void embedding_bwd_bf16(float* dtable, const bf16_t* dout,
                                              const unsigned int* ids, int bt, int c, int v) {
    embedding_bwd_impl(dtable, dout, ids, bt, c, v);
}
