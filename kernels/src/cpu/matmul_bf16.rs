//! bf16 linear layer, the mixed-precision reference: operands rounded to bf16 (round to
//! nearest even), products and sums in f32, results in f32. Same layout and semantics as
//! `matmul`: `out[M,N] = inp[M,K] @ weight[N,K]^T`, backward ACCUMULATES into f32 gradients.
//!
//! The f32 reference on the widened operands is the truth: `matmul_bf16_*` here equal
//! `matmul_*` on `bf16 -> f32` copies up to f32 summation order.

use half::bf16;

/// `dst[i] = bf16(src[i])`, round to nearest even (NaN stays NaN).
pub fn to_bf16(dst: &mut [bf16], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "to_bf16: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

fn widen(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// out [M,N] = inp [M,K] @ weight [N,K]^T (overwrites out), bf16 operands, f32 sums.
pub fn matmul_bf16_forward(
    out: &mut [f32],
    inp: &[bf16],
    weight: &[bf16],
    m: usize,
    k: usize,
    n: usize,
) {
    super::matmul::matmul_forward(out, &widen(inp), &widen(weight), m, k, n);
}

/// dinp [M,K] += dout [M,N] @ weight [N,K]; dweight [N,K] += dout^T @ inp [M,K]; bf16
/// operands, f32 sums and f32 gradients.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[bf16],
    inp: &[bf16],
    weight: &[bf16],
    m: usize,
    k: usize,
    n: usize,
) {
    super::matmul::matmul_backward(
        dinp,
        dweight,
        &widen(dout),
        &widen(inp),
        &widen(weight),
        m,
        k,
        n,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn rounding_is_to_nearest_even_with_relative_error_below_2_pow_minus_8() {
        let mut r = rng(1);
        let x = rand_vec(&mut r, 4096, 100.0);
        let mut h = vec![bf16::ZERO; x.len()];
        to_bf16(&mut h, &x);
        for (a, b) in x.iter().zip(&h) {
            let e = (a - b.to_f32()).abs();
            assert!(e <= a.abs() * 2f32.powi(-8), "{a} -> {b}");
        }
        // 1 + 2^-8 is exactly half way between 1 and the next bf16: ties go to even (1.0).
        let mut t = [bf16::ZERO; 2];
        to_bf16(&mut t, &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)]);
        assert_eq!(t[0].to_f32(), 1.0);
        assert_eq!(t[1].to_f32(), 1.0 + 2f32.powi(-6));
    }

    /// The mixed-precision product against the f32 product of the unrounded operands: the
    /// error is the operands' rounding, a relative 2^-8 per operand, summed over K with random
    /// signs: within 2^-7 * sqrt(K) * (typical |x w|), here atol 0.02 * sqrt(K) for unit
    /// inputs.
    #[test]
    fn forward_and_backward_within_bf16_rounding_of_f32() {
        let (m, k, n) = (17, 64, 23);
        let mut r = rng(2);
        let (x, w, dy) = (
            rand_vec(&mut r, m * k, 1.0),
            rand_vec(&mut r, n * k, 1.0),
            rand_vec(&mut r, m * n, 1.0),
        );
        let round = |v: &[f32]| {
            let mut h = vec![bf16::ZERO; v.len()];
            to_bf16(&mut h, v);
            h
        };
        let (xh, wh, dyh) = (round(&x), round(&w), round(&dy));
        let mut want = vec![0.0; m * n];
        crate::cpu::matmul_forward(&mut want, &x, &w, m, k, n);
        let mut got = vec![0.0; m * n];
        matmul_bf16_forward(&mut got, &xh, &wh, m, k, n);
        let tol = 0.02 * (k as f32).sqrt();
        assert_close("out", &got, &want, 0.0, tol);
        let (mut di, mut dw) = (vec![0.5; m * k], vec![-0.5; n * k]);
        let (mut wdi, mut wdw) = (di.clone(), dw.clone());
        crate::cpu::matmul_backward(&mut wdi, &mut wdw, &dy, &x, &w, m, k, n);
        matmul_bf16_backward(&mut di, &mut dw, &dyh, &xh, &wh, m, k, n);
        assert_close("dinp", &di, &wdi, 0.0, 0.02 * (n as f32).sqrt());
        assert_close("dweight", &dw, &wdw, 0.0, 0.02 * (m as f32).sqrt());
    }
}
