//! Test helpers shared by the op tests: a seeded RNG, random tensors, a central
//! finite-difference gradient check and an elementwise closeness check.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`.
pub fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// `sum(out * w)` accumulated in f64: the scalar loss used by the gradient checks.
pub fn dot64(out: &[f32], w: &[f32]) -> f64 {
    assert_eq!(out.len(), w.len());
    out.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Checks `analytic` against central differences of `loss` around `x`, element by element:
/// `|num - ana| <= atol + rtol * max(|num|, |ana|)`.
pub fn check_grad(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    h: f32,
    rtol: f64,
    atol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let fp = loss(&xp);
        xp[i] = x[i] - h;
        let fm = loss(&xp);
        xp[i] = x[i];
        // The perturbation actually applied in f32.
        let step = ((x[i] + h) as f64) - ((x[i] - h) as f64);
        let num = (fp - fm) / step;
        let ana = analytic[i] as f64;
        let tol = atol + rtol * num.abs().max(ana.abs());
        assert!(
            (num - ana).abs() <= tol,
            "{name}[{i}]: finite difference {num} vs analytic {ana} (tol {tol})"
        );
    }
}

/// Elementwise `|got - want| <= atol + rtol * |want|`.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol && g.is_finite(),
            "{name}[{i}]: got {g}, want {w} (tol {tol})"
        );
    }
}
