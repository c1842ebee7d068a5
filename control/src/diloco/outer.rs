//! The outer step of DiLoCo: Nesterov momentum on the aggregated pseudo-gradient, applied
//! from the round's starting weights.
//!
//! `m ← μ·m + Δ`, `θ ← θ_start − lr·(Δ + μ·m)`, element by element in f32, in layout order.
//! Same inputs, same bits: every honest replica that aggregated the same contributions
//! ends the round with the same weights and momentum.

/// Outer-optimizer settings (DiLoCo paper: Nesterov, momentum 0.9, lr 0.7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterOpt {
    pub lr: f32,
    pub momentum: f32,
}

impl Default for OuterOpt {
    fn default() -> Self {
        OuterOpt {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

impl OuterOpt {
    /// Updates `momentum` and returns the new weights. All three slices have one length.
    pub fn step(&self, theta_start: &[f32], delta: &[f32], momentum: &mut [f32]) -> Vec<f32> {
        theta_start
            .iter()
            .zip(delta)
            .zip(momentum.iter_mut())
            .map(|((&t, &d), m)| {
                *m = self.momentum * *m + d;
                t - self.lr * (d + self.momentum * *m)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_with_lr_one_and_no_momentum_lands_on_the_local_weights() {
        // θ_local = θ_start − Δ: plain averaging of one replica reproduces it.
        let opt = OuterOpt {
            lr: 1.0,
            momentum: 0.0,
        };
        let start = [1.0, 2.0, 3.0];
        let local = [0.5, 2.5, 3.0];
        let delta: Vec<f32> = start.iter().zip(&local).map(|(s, l)| s - l).collect();
        let mut m = vec![0.0; 3];
        assert_eq!(opt.step(&start, &delta, &mut m), local.to_vec());
    }

    #[test]
    fn nesterov_momentum_accumulates() {
        let opt = OuterOpt::default();
        let mut m = vec![0.0f32];
        let t1 = opt.step(&[0.0], &[1.0], &mut m);
        assert_eq!(m, vec![1.0]);
        assert!((t1[0] - (-0.7 * 1.9)).abs() < 1e-6);
        let t2 = opt.step(&t1, &[1.0], &mut m);
        assert!((m[0] - 1.9).abs() < 1e-6);
        assert!((t2[0] - (t1[0] - 0.7 * (1.0 + 0.9 * 1.9))).abs() < 1e-6);
    }
}
