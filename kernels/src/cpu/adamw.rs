//! AdamW with decoupled weight decay (PyTorch `torch.optim.AdamW` semantics) and the
//! global-norm gradient clipping helpers.

/// One AdamW step on params [n] with grads [n] and moments m, v [n]; `t` starts at 1.
///
/// `p -= lr * wd * p`, then `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
/// `p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
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
    let n = params.len();
    assert!(
        grads.len() == n && m.len() == n && v.len() == n,
        "adamw: length mismatch"
    );
    assert!(t >= 1, "adamw: step t starts at 1");
    let (bc1, bc2) = bias_corrections(t, beta1, beta2);
    for i in 0..n {
        let g = grads[i];
        m[i] = beta1 * m[i] + (1.0 - beta1) * g;
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
        let mhat = m[i] / bc1;
        let vhat = v[i] / bc2;
        params[i] -= lr * weight_decay * params[i];
        params[i] -= lr * mhat / (vhat.sqrt() + eps);
    }
}

/// `(1 - beta1^t, 1 - beta2^t)`, computed in f64.
pub(crate) fn bias_corrections(t: u64, beta1: f32, beta2: f32) -> (f32, f32) {
    let t = t.min(i32::MAX as u64) as i32;
    (
        (1.0 - (beta1 as f64).powi(t)) as f32,
        (1.0 - (beta2 as f64).powi(t)) as f32,
    )
}

/// `sqrt(sum of squares)` over all gradient tensors, accumulated in f64.
pub fn global_norm(grads: &[&[f32]]) -> f32 {
    let mut ss = 0.0f64;
    for g in grads {
        for &x in *g {
            ss += x as f64 * x as f64;
        }
    }
    ss.sqrt() as f32
}

/// Gradient scale for clipping to `max_norm`: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// `x *= s` elementwise.
pub fn scale_in_place(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    /// The PyTorch AdamW update written independently in f64.
    fn adamw_f64(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: i32, hp: [f64; 5]) {
        let [lr, b1, b2, eps, wd] = hp;
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
            p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
        }
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        let mut p = [1.0f32, -2.0, 0.5];
        let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
        adamw_step(
            &mut p,
            &[0.3, -4.0, 1e-3],
            &mut m,
            &mut v,
            1,
            0.1,
            0.9,
            0.999,
            1e-8,
            0.0,
        );
        assert_close("p", &p, &[0.9, -1.9, 0.4], 1e-4, 1e-5);
    }

    #[test]
    fn several_steps_match_f64_pytorch_formula() {
        let mut r = rng(18);
        let n = 23;
        let hp = [3e-3f64, 0.9, 0.95, 1e-8, 0.1];
        let mut p = rand_vec(&mut r, n, 1.0);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
        for t in 1..=5u64 {
            let g = rand_vec(&mut r, n, 1.0);
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            adamw_step(&mut p, &g, &mut m, &mut v, t, 3e-3, 0.9, 0.95, 1e-8, 0.1);
            adamw_f64(&mut p64, &g64, &mut m64, &mut v64, t as i32, hp);
        }
        let want: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
        assert_close("p", &p, &want, 1e-5, 1e-6);
    }

    #[test]
    fn norm_clip_and_scale() {
        let a = [3.0f32, 0.0];
        let b = [4.0f32];
        let n = global_norm(&[&a, &b]);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((clip_scale(n, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_scale(n, 10.0), 1.0);
        let mut x = [1.0f32, -2.0];
        scale_in_place(&mut x, 0.5);
        assert_eq!(x, [0.5, -1.0]);
        assert_eq!(global_norm(&[]), 0.0);
    }
}
