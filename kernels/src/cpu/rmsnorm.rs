//! RMSNorm without bias: `y = x * rstd * w`, `rstd = 1 / sqrt(mean(x^2) + eps)` per row.

/// out [Bt,C], rstd [Bt] (saved for backward) from inp [Bt,C] and weight [C].
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    rows: usize,
    c: usize,
    eps: f32,
) {
    assert!(c > 0, "rmsnorm: c must be positive");
    assert_eq!(inp.len(), rows * c, "rmsnorm: inp is not [Bt, C]");
    assert_eq!(out.len(), rows * c, "rmsnorm: out is not [Bt, C]");
    assert_eq!(rstd.len(), rows, "rmsnorm: rstd is not [Bt]");
    assert_eq!(weight.len(), c, "rmsnorm: weight is not [C]");
    for r in 0..rows {
        let x = &inp[r * c..(r + 1) * c];
        let mut ss = 0.0f32;
        for &xi in x {
            ss += xi * xi;
        }
        let s = 1.0 / (ss / c as f32 + eps).sqrt();
        rstd[r] = s;
        let y = &mut out[r * c..(r + 1) * c];
        for i in 0..c {
            y[i] = x[i] * s * weight[i];
        }
    }
}

/// dinp [Bt,C] += and dweight [C] += from dout [Bt,C], with inp, weight and the saved rstd.
///
/// `dx_i = rstd * w_i * dy_i - rstd^3 / C * x_i * sum_j(dy_j * w_j * x_j)`,
/// `dw_i += dy_i * x_i * rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    assert!(c > 0, "rmsnorm: c must be positive");
    for (name, len) in [
        ("dinp", dinp.len()),
        ("dout", dout.len()),
        ("inp", inp.len()),
    ] {
        assert_eq!(len, rows * c, "rmsnorm: {name} is not [Bt, C]");
    }
    assert_eq!(rstd.len(), rows, "rmsnorm: rstd is not [Bt]");
    assert_eq!(weight.len(), c, "rmsnorm: weight is not [C]");
    assert_eq!(dweight.len(), c, "rmsnorm: dweight is not [C]");
    for r in 0..rows {
        let x = &inp[r * c..(r + 1) * c];
        let dy = &dout[r * c..(r + 1) * c];
        let s = rstd[r];
        let mut dot = 0.0f32;
        for i in 0..c {
            dot += dy[i] * weight[i] * x[i];
        }
        let k = s * s * s * dot / c as f32;
        let dx = &mut dinp[r * c..(r + 1) * c];
        for i in 0..c {
            dx[i] += s * weight[i] * dy[i] - k * x[i];
            dweight[i] += dy[i] * x[i] * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    const EPS: f32 = 1e-6;

    fn loss(inp: &[f32], weight: &[f32], w: &[f32], rows: usize, c: usize) -> f64 {
        let mut out = vec![0.0; rows * c];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(&mut out, &mut rstd, inp, weight, rows, c, EPS);
        dot64(&out, w)
    }

    #[test]
    fn forward_has_unit_rms_with_unit_weight() {
        let mut r = rng(2);
        let (rows, c) = (3, 16);
        let inp = rand_vec(&mut r, rows * c, 3.0);
        let mut out = vec![0.0; rows * c];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(&mut out, &mut rstd, &inp, &vec![1.0; c], rows, c, EPS);
        for row in out.chunks_exact(c) {
            let ms: f32 = row.iter().map(|y| y * y).sum::<f32>() / c as f32;
            assert!((ms - 1.0).abs() < 1e-4, "mean square {ms}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Tolerance: rtol 1e-2, atol 1e-3 on central differences with h = 1e-2 (f32 forward,
        // f64 loss accumulation).
        for (seed, rows, c) in [(3u64, 2usize, 7usize), (4, 3, 16), (5, 1, 1)] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, rows * c, 1.0);
            let weight = rand_vec(&mut r, c, 1.0);
            let w = rand_vec(&mut r, rows * c, 1.0);
            let mut out = vec![0.0; rows * c];
            let mut rstd = vec![0.0; rows];
            rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, rows, c, EPS);
            let mut dinp = vec![0.25; rows * c];
            let mut dweight = vec![-0.5; c];
            rmsnorm_backward(&mut dinp, &mut dweight, &w, &inp, &weight, &rstd, rows, c);
            let dinp: Vec<f32> = dinp.iter().map(|d| d - 0.25).collect();
            let dweight: Vec<f32> = dweight.iter().map(|d| d + 0.5).collect();
            check_grad("dinp", &inp, &dinp, 1e-2, 1e-2, 1e-3, |x| {
                loss(x, &weight, &w, rows, c)
            });
            check_grad("dweight", &weight, &dweight, 1e-2, 1e-2, 1e-3, |wt| {
                loss(&inp, wt, &w, rows, c)
            });
        }
    }
}
