//! int8 weight-only decode matmul (the reference): `out [M,N] ≈ inp [M,K] @ weight [N,K]^T`
//! with the weight quantized once per output channel and each input row quantized on the
//! fly, both symmetric:
//!
//! - weight row j: `scale_w[j] = max|w[j,:]| / 127`, `wq[j,p] = round(w[j,p] / scale_w[j])`
//!   in -127..=127 (a zero row gets scale 1); `wsum[j] = Σ_p wq[j,p]`;
//! - input row i: `scale_x[i] = max|x[i,:]| / 127`, `xq[i,p] = round(x[i,p] / scale_x[i])`;
//! - `out[i,j] = scale_x[i] * scale_w[j] * Σ_p xq[i,p] * wq[j,p]` (the sum in i32, exact).
//!
//! The sum is integer arithmetic, so every implementation (this one, the AVX-512 VNNI one in
//! `fast`, a GPU one) gets the same bits; the fast path feeds `vpdpbusd` (u8 × s8) with
//! `xq + 128` and subtracts `128 * wsum[j]`, which is exact. Weights in memory are `i8`
//! rows of K; `wsum` is kept as f32 (|wsum| ≤ 127 K < 2^24, so exact).

/// Per-channel symmetric quantization of `w [N,K]`: (int8 rows, scales [N], row sums [N]).
pub fn quantize_rows_int8(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    assert_eq!(w.len(), n * k, "quantize_rows_int8: weight is not [N, K]");
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0.0f32; n];
    let mut sums = vec![0.0f32; n];
    for j in 0..n {
        let row = &w[j * k..(j + 1) * k];
        let s = row_scale(row);
        let mut sum = 0i32;
        for (qv, &x) in q[j * k..(j + 1) * k].iter_mut().zip(row) {
            *qv = quantize(x, s);
            sum += *qv as i32;
        }
        scales[j] = s;
        sums[j] = sum as f32;
    }
    (q, scales, sums)
}

/// `max|row| / 127`, or 1 for a row of zeros (or non-finite values, which quantize to 0).
#[inline]
pub(crate) fn row_scale(row: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for &x in row {
        let a = x.abs();
        if a > m {
            m = a;
        }
    }
    if m > 0.0 && m.is_finite() {
        m / 127.0
    } else {
        1.0
    }
}

/// `round(x / s)` clamped to -127..=127 (NaN gives 0).
#[inline]
pub(crate) fn quantize(x: f32, s: f32) -> i8 {
    let v = (x / s).round();
    if v.is_nan() {
        0
    } else {
        v.clamp(-127.0, 127.0) as i8
    }
}

/// out [M,N] from inp [M,K] and a weight quantized by [`quantize_rows_int8`] (overwrites).
#[allow(clippy::too_many_arguments)]
pub fn matmul_int8_forward(
    out: &mut [f32],
    inp: &[f32],
    wq: &[i8],
    scales: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    check_int8_shapes(out.len(), inp.len(), wq.len(), scales.len(), m, k, n);
    let mut xq = vec![0i8; k];
    for i in 0..m {
        let row = &inp[i * k..(i + 1) * k];
        let sx = row_scale(row);
        for (q, &x) in xq.iter_mut().zip(row) {
            *q = quantize(x, sx);
        }
        for j in 0..n {
            let w = &wq[j * k..(j + 1) * k];
            let acc: i32 = xq.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum();
            out[i * n + j] = sx * scales[j] * acc as f32;
        }
    }
}

pub(crate) fn check_int8_shapes(
    out: usize,
    inp: usize,
    wq: usize,
    scales: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out, m * n, "matmul_int8: out is not [M, N]");
    assert_eq!(inp, m * k, "matmul_int8: inp is not [M, K]");
    assert_eq!(wq, n * k, "matmul_int8: weight is not [N, K]");
    assert_eq!(scales, n, "matmul_int8: scales is not [N]");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    /// The quantized product stays close to the f32 one. Values uniform in ±1, K = 256:
    /// products are ~5 in size; each operand's rounding (±1/254 of its row maximum) adds an
    /// error of ~0.02 rms per side, so 0.1 (about 3 sigma of the sum) bounds every element.
    #[test]
    fn close_to_f32_product() {
        let (m, k, n) = (3, 256, 40);
        let mut r = rng(60);
        let inp = rand_vec(&mut r, m * k, 1.0);
        let w = rand_vec(&mut r, n * k, 1.0);
        let (q, s, sums) = quantize_rows_int8(&w, n, k);
        for j in 0..n {
            let sum: i32 = q[j * k..(j + 1) * k].iter().map(|&v| v as i32).sum();
            assert_eq!(sums[j], sum as f32);
        }
        let mut want = vec![0.0; m * n];
        crate::cpu::matmul_forward(&mut want, &inp, &w, m, k, n);
        let mut got = vec![0.0; m * n];
        matmul_int8_forward(&mut got, &inp, &q, &s, m, k, n);
        assert_close("out", &got, &want, 0.0, 0.1);
    }

    #[test]
    fn zero_and_extreme_rows() {
        let (q, s, _) = quantize_rows_int8(&[0.0, 0.0, 2.0, -4.0], 2, 2);
        assert_eq!(s, vec![1.0, 4.0 / 127.0]);
        assert_eq!(q, vec![0, 0, 64, -127]);
    }
}
