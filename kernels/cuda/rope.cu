// Rotary position embedding, rotate-half convention, on [B, T, H, D] (D even).
// For pair i < D/2 at position p = pos_offset + t: angle = p * theta^(-2i/D) (in f64, as the
// CPU reference), out[i] = x1 cos - x2 sin, out[i + D/2] = x2 cos + x1 sin.
// backward (accumulates): dinp[i] += d1 cos + d2 sin, dinp[i + D/2] += d2 cos - d1 sin.
// One thread per pair; in-place (out == inp) is safe.
#include "common.cuh"

__device__ __forceinline__ void rope_angle(long long pair, int t, int h, int d, long long pos_offset,
                                           float theta, long long* base, int* i, float* c,
                                           float* s) {
    const int half = d / 2;
    *i = (int)(pair % half);
    const long long row = pair / half;  // (b*T + t)*H + h
    const int ti = (int)((row / h) % t);
    *base = row * d;
    const double inv_freq = pow((double)theta, -2.0 * (double)(*i) / (double)d);
    double sd, cd;
    sincos((double)(pos_offset + ti) * inv_freq, &sd, &cd);
    *c = (float)cd;
    *s = (float)sd;
}

template <typename T>
__device__ void rope_fwd_impl(T* out, const T* inp, int b, int t, int h, int d,
                              long long pos_offset, float theta) {
    const long long pairs = (long long)b * t * h * (d / 2);
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        long long base;
        int i;
        float c, s;
        rope_angle(p, t, h, d, pos_offset, theta, &base, &i, &c, &s);
        const float x1 = to_f32(inp[base + i]), x2 = to_f32(inp[base + i + d / 2]);
        out[base + i] = from_f32<T>(x1 * c - x2 * s);
        out[base + i + d / 2] = from_f32<T>(x2 * c + x1 * s);
    }
}

template <typename T>
__device__ void rope_bwd_impl(T* dinp, const T* dout, int b, int t, int h, int d,
                              long long pos_offset, float theta) {
    const long long pairs = (long long)b * t * h * (d / 2);
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        long long base;
        int i;
        float c, s;
        rope_angle(p, t, h, d, pos_offset, theta, &base, &i, &c, &s);
        const float d1 = to_f32(dout[base + i]), d2 = to_f32(dout[base + i + d / 2]);
        const long long a = base + i, z = base + i + d / 2;
        dinp[a] = from_f32<T>(to_f32(dinp[a]) + d1 * c + d2 * s);
        dinp[z] = from_f32<T>(to_f32(dinp[z]) + d2 * c - d1 * s);
    }
}

extern "C" __global__ void rope_fwd_f32(float* out, const float* inp, int b, int t, int h, int d,
                                        long long pos_offset, float theta) {
    rope_fwd_impl(out, inp, b, t, h, d, pos_offset, theta);
}
extern "C" __global__ void rope_fwd_bf16(bf16_t* out, const bf16_t* inp, int b, int t, int h,
                                         int d, long long pos_offset, float theta) {
    rope_fwd_impl(out, inp, b, t, h, d, pos_offset, theta);
}
extern "C" __global__ void rope_bwd_f32(float* dinp, const float* dout, int b, int t, int h, int d,
                                        long long pos_offset, float theta) {
    rope_bwd_impl(dinp, dout, b, t, h, d, pos_offset, theta);
}
extern "C" __global__ void rope_bwd_bf16(bf16_t* dinp, const bf16_t* dout, int b, int t, int h,
                                         int d, long long pos_offset, float theta) {
    rope_bwd_impl(dinp, dout, b, t, h, d, pos_offset, theta);
}
