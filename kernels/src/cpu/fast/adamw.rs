//! Fast AdamW and gradient-norm helpers: parallel over chunks, vectorized kernels.

use rayon::prelude::*;

use super::simd::multiversion;
use crate::cpu::adamw::bias_corrections;

pub use crate::cpu::adamw::clip_scale;

/// Elements per parallel task.
const CHUNK: usize = 32 * 1024;

/// One AdamW step (same semantics as `cpu::adamw::adamw_step`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
) {
    let lens = [params.len(), grads.len(), m.len(), v.len()];
    let hp = Hyper::checked(lens, t, lr, beta1, beta2, eps, weight_decay);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, hp));
}

#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

impl Hyper {
    /// The step's hyperparameters with its bias corrections, after checking that params,
    /// grads, m and v (`lens`) have one length and that `t` starts at 1.
    fn checked(
        lens: [usize; 4],
        t: u64,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    ) -> Hyper {
        assert!(lens.iter().all(|&l| l == lens[0]), "adamw: length mismatch");
        assert!(t >= 1, "adamw: step t starts at 1");
        let (bc1, bc2) = bias_corrections(t, beta1, beta2);
        Hyper {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bc1,
            bc2,
        }
    }
}

/// [`adamw_step`] on `grads * grad_scale`, then `grads` zeroed: a training step's clip scale,
/// update and gradient reset in one pass over memory instead of three.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_zeroing(
    params: &mut [f32],
    grads: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    grad_scale: f32,
) {
    let lens = [params.len(), grads.len(), m.len(), v.len()];
    let hp = Hyper::checked(lens, t, lr, beta1, beta2, eps, weight_decay);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_zeroing_chunk(p, g, m, v, hp, grad_scale));
}

/// The AdamW update of one parameter (`cpu::adamw::adamw_step`'s arithmetic).
#[inline(always)]
fn update(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, hp: Hyper) {
    let Hyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bc1,
        bc2,
    } = hp;
    *m = beta1 * *m + (1.0 - beta1) * g;
    *v = beta2 * *v + (1.0 - beta2) * g * g;
    let mhat = *m / bc1;
    let vhat = *v / bc2;
    *p -= lr * weight_decay * *p;
    *p -= lr * mhat / (vhat.sqrt() + eps);
}

multiversion! {
    fn adamw_chunk(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: Hyper) {
        let it = params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut());
        for (((p, &g), m), v) in it {
            update(p, g, m, v, hp);
        }
    }
}

multiversion! {
    fn adamw_zeroing_chunk(
        params: &mut [f32],
        grads: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: Hyper,
        grad_scale: f32,
    ) {
        let it = params.iter_mut().zip(grads.iter_mut()).zip(m.iter_mut()).zip(v.iter_mut());
        for (((p, g), m), v) in it {
            update(p, *g * grad_scale, m, v, hp);
            *g = 0.0;
        }
    }
}

/// `sqrt(sum of squares)` over all gradient tensors, accumulated in f64.
pub fn global_norm(grads: &[&[f32]]) -> f32 {
    let ss: f64 = grads
        .iter()
        .map(|g| g.par_chunks(CHUNK).map(sum_sq_f64).sum::<f64>())
        .sum();
    ss.sqrt() as f32
}

multiversion! {
    fn sum_sq_f64(x: &[f32]) -> f64 {
        let mut acc = [0.0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += c[l] as f64 * c[l] as f64;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &v in chunks.remainder() {
            s += v as f64 * v as f64;
        }
        s
    }
}

/// `x *= s` elementwise.
pub fn scale_in_place(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| scale_chunk(c, s));
}

multiversion! {
    fn scale_chunk(x: &mut [f32], s: f32) {
        for v in x {
            *v *= s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::adamw as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference() {
        for (seed, n) in [(700u64, 1usize), (701, 37), (702, 2 * CHUNK + 11)] {
            let mut r = rng(seed);
            let p0 = rand_vec(&mut r, n, 1.0);
            let (mut p_r, mut m_r, mut v_r) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            let (mut p, mut m, mut v) = (p0, vec![0.0; n], vec![0.0; n]);
            for t in 1..=3 {
                let g = rand_vec(&mut r, n, 1.0);
                reference::adamw_step(
                    &mut p_r, &g, &mut m_r, &mut v_r, t, 1e-2, 0.9, 0.95, 1e-8, 0.1,
                );
                adamw_step(&mut p, &g, &mut m, &mut v, t, 1e-2, 0.9, 0.95, 1e-8, 0.1);
            }
            assert_close("params", &p, &p_r, 1e-6, 1e-7);
            assert_close("m", &m, &m_r, 1e-6, 1e-7);
            assert_close("v", &v, &v_r, 1e-6, 1e-7);
            let g2 = rand_vec(&mut r, 5, 1.0);
            let want = reference::global_norm(&[&p, &g2, &[]]);
            let got = global_norm(&[&p, &g2, &[]]);
            assert!((got - want).abs() <= 1e-6 * want, "norm {got} vs {want}");
            let mut x = p.clone();
            scale_in_place(&mut x, 0.3);
            reference::scale_in_place(&mut p, 0.3);
            assert_eq!(x, p);
        }
    }

    #[test]
    fn zeroing_step_equals_scale_then_step_then_zero() {
        for (seed, n) in [(710u64, 1usize), (711, 37), (712, 2 * CHUNK + 11)] {
            let mut r = rng(seed);
            let p0 = rand_vec(&mut r, n, 1.0);
            let (mut p_r, mut m_r, mut v_r) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            let (mut p, mut m, mut v) = (p0, vec![0.0; n], vec![0.0; n]);
            for (t, s) in [(1, 1.0f32), (2, 0.25), (3, 0.7)] {
                let g = rand_vec(&mut r, n, 1.0);
                let mut g_r = g.clone();
                reference::scale_in_place(&mut g_r, s);
                reference::adamw_step(
                    &mut p_r, &g_r, &mut m_r, &mut v_r, t, 1e-2, 0.9, 0.95, 1e-8, 0.1,
                );
                let mut g = g;
                adamw_step_zeroing(
                    &mut p, &mut g, &mut m, &mut v, t, 1e-2, 0.9, 0.95, 1e-8, 0.1, s,
                );
                assert!(g.iter().all(|&x| x == 0.0), "gradients not zeroed");
            }
            assert_close("params", &p, &p_r, 1e-6, 1e-7);
            assert_close("m", &m, &m_r, 1e-6, 1e-7);
            assert_close("v", &v, &v_r, 1e-6, 1e-7);
        }
    }
}
