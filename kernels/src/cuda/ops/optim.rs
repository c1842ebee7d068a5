//! AdamW and global-norm gradient clipping, kept on the device (no host round trip: the
//! clip scale is a device scalar the optimizer reads).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{cfg_1d, check_len, launch};
use crate::cuda::dtype::Bf16;
use crate::cuda::error::{CudaError, ensure};
use crate::cuda::runtime::CudaKernels;

/// Blocks of the first norm stage per tensor (fixed: the summation order is deterministic).
pub const NORM_PARTIALS_PER_TENSOR: usize = 256;

/// AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl CudaKernels {
    /// One AdamW step on f32 parameters (same formula and order as `cpu::adamw_step`).
    /// `t` starts at 1. When `gscale` is given, gradients are multiplied by `gscale[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        t: u64,
        hp: AdamWParams,
        gscale: Option<&CudaSlice<f32>>,
    ) -> Result<(), CudaError> {
        let n = params.len();
        check_adamw(n, grads.len(), m.len(), v.len(), t)?;
        let (bc1, bc2) = crate::cpu::adamw::bias_corrections(t, hp.beta1, hp.beta2);
        let nn = n as i64;
        let f = self.func("adamw_step_f32")?;
        let null: u64 = 0;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = hp;
        match gscale {
            Some(s) => launch!(
                self,
                "adamw_step",
                f,
                cfg_1d(n),
                [
                    params,
                    grads,
                    m,
                    v,
                    &nn,
                    &lr,
                    &beta1,
                    &beta2,
                    &eps,
                    &weight_decay,
                    &bc1,
                    &bc2,
                    s
                ]
            ),
            None => launch!(
                self,
                "adamw_step",
                f,
                cfg_1d(n),
                [
                    params,
                    grads,
                    m,
                    v,
                    &nn,
                    &lr,
                    &beta1,
                    &beta2,
                    &eps,
                    &weight_decay,
                    &bc1,
                    &bc2,
                    &null
                ]
            ),
        }
    }

    /// AdamW on the f32 master weights, then writes their bf16 copy `params`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_bf16(
        &self,
        master: &mut CudaSlice<f32>,
        params: &mut CudaSlice<Bf16>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        t: u64,
        hp: AdamWParams,
        gscale: Option<&CudaSlice<f32>>,
    ) -> Result<(), CudaError> {
        let n = master.len();
        check_adamw(n, grads.len(), m.len(), v.len(), t)?;
        check_len("adamw_step", "bf16 params", params.len(), n)?;
        let (bc1, bc2) = crate::cpu::adamw::bias_corrections(t, hp.beta1, hp.beta2);
        let nn = n as i64;
        let f = self.func("adamw_step_bf16")?;
        let null: u64 = 0;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = hp;
        match gscale {
            Some(s) => launch!(
                self,
                "adamw_step",
                f,
                cfg_1d(n),
                [
                    master,
                    params,
                    grads,
                    m,
                    v,
                    &nn,
                    &lr,
                    &beta1,
                    &beta2,
                    &eps,
                    &weight_decay,
                    &bc1,
                    &bc2,
                    s
                ]
            ),
            None => launch!(
                self,
                "adamw_step",
                f,
                cfg_1d(n),
                [
                    master,
                    params,
                    grads,
                    m,
                    v,
                    &nn,
                    &lr,
                    &beta1,
                    &beta2,
                    &eps,
                    &weight_decay,
                    &bc1,
                    &bc2,
                    &null
                ]
            ),
        }
    }

    /// norm[0] = sqrt(sum of squares over every tensor of `grads`). `partials` is scratch of
    /// at least `NORM_PARTIALS_PER_TENSOR * grads.len()` floats.
    pub fn global_norm(
        &self,
        norm: &mut CudaSlice<f32>,
        partials: &mut CudaSlice<f32>,
        grads: &[&CudaSlice<f32>],
    ) -> Result<(), CudaError> {
        const OP: &str = "global_norm";
        check_len(OP, "norm", norm.len(), 1)?;
        let need = NORM_PARTIALS_PER_TENSOR * grads.len().max(1);
        ensure(partials.len() >= need, OP, || {
            format!("partials has {} floats, needs {need}", partials.len())
        })?;
        if grads.is_empty() {
            return self.fill(norm, 0.0);
        }
        let stage1 = LaunchConfig {
            grid_dim: (NORM_PARTIALS_PER_TENSOR as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.func("global_norm_partial_f32")?;
        for (i, g) in grads.iter().enumerate() {
            let mut view = partials
                .slice_mut(i * NORM_PARTIALS_PER_TENSOR..(i + 1) * NORM_PARTIALS_PER_TENSOR);
            let n = g.len() as i64;
            launch!(self, "global_norm", f, stage1, [&mut view, *g, &n])?;
        }
        let count = (grads.len() * NORM_PARTIALS_PER_TENSOR) as i32;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "global_norm",
            self.func("global_norm_finalize_f32")?,
            one,
            [norm, &*partials, &count]
        )
    }

    /// scale[0] = min(max_norm / (norm[0] + 1e-6), 1), as `cpu::clip_scale`.
    pub fn clip_scale(
        &self,
        scale: &mut CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        max_norm: f32,
    ) -> Result<(), CudaError> {
        check_len("clip_scale", "scale", scale.len(), 1)?;
        check_len("clip_scale", "norm", norm.len(), 1)?;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "clip_scale",
            self.func("clip_scale_f32")?,
            one,
            [scale, norm, &max_norm]
        )
    }

    /// x *= scale[0].
    pub fn scale_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        scale: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_len("scale_in_place", "scale", scale.len(), 1)?;
        let n = x.len() as i64;
        launch!(
            self,
            "scale_in_place",
            self.func("scale_in_place_f32")?,
            cfg_1d(x.len()),
            [x, &n, scale]
        )
    }
}

fn check_adamw(n: usize, g: usize, m: usize, v: usize, t: u64) -> Result<(), CudaError> {
    check_len("adamw_step", "grads", g, n)?;
    check_len("adamw_step", "m", m, n)?;
    check_len("adamw_step", "v", v, n)?;
    ensure(t >= 1, "adamw_step", || "step t starts at 1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_arguments_are_checked() {
        assert!(check_adamw(3, 3, 3, 3, 1).is_ok());
        assert!(
            check_adamw(3, 2, 3, 3, 1)
                .unwrap_err()
                .to_string()
                .contains("grads")
        );
        assert!(
            check_adamw(3, 3, 3, 3, 0)
                .unwrap_err()
                .to_string()
                .contains("starts at 1")
        );
    }
}
