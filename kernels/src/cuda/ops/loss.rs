//! Cross-entropy over a padded, masked vocabulary.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{cfg_rows, check_len, dim, launch};
use crate::cuda::dtype::GpuDtype;
use crate::cuda::error::{CudaError, ensure};
use crate::cuda::runtime::CudaKernels;

fn check(
    op: &'static str,
    logits: usize,
    targets: usize,
    rows: usize,
    vp: usize,
    v_live: usize,
) -> Result<[i32; 3], CudaError> {
    ensure(v_live >= 1 && v_live <= vp, op, || {
        format!("v_live {v_live} not in 1..={vp}")
    })?;
    check_len(op, "logits", logits, rows * vp)?;
    check_len(op, "targets", targets, rows)?;
    Ok([
        dim(op, "rows", rows)?,
        dim(op, "vp", vp)?,
        dim(op, "v_live", v_live)?,
    ])
}

impl CudaKernels {
    /// loss[0] = mean over rows of (lse(row[:v_live]) - row[target]); `losses` [rows] is
    /// scratch that ends up holding the per-row losses. No host synchronisation: read
    /// `loss` with [`CudaKernels::download`] when needed.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_forward<T: GpuDtype>(
        &self,
        loss: &mut CudaSlice<f32>,
        losses: &mut CudaSlice<f32>,
        logits: &CudaSlice<T>,
        targets: &CudaSlice<u32>,
        rows: usize,
        vp: usize,
        v_live: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "cross_entropy_forward";
        let [r, vpi, vl] = check(OP, logits.len(), targets.len(), rows, vp, v_live)?;
        check_len(OP, "losses", losses.len(), rows)?;
        check_len(OP, "loss", loss.len(), 1)?;
        let f = self.func_for::<T>("cross_entropy_fwd")?;
        launch!(
            self,
            "cross_entropy_forward",
            f,
            cfg_rows(rows, 256)?,
            [&mut *losses, logits, targets, &r, &vpi, &vl]
        )?;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "cross_entropy_forward",
            self.func("cross_entropy_mean_f32")?,
            one,
            [loss, &*losses, &r]
        )
    }

    /// dlogits (written) = (softmax(row[:v_live]) - onehot(target)) * dloss / rows; columns
    /// >= v_live get 0.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_backward<T: GpuDtype>(
        &self,
        dlogits: &mut CudaSlice<T>,
        logits: &CudaSlice<T>,
        targets: &CudaSlice<u32>,
        rows: usize,
        vp: usize,
        v_live: usize,
        dloss: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "cross_entropy_backward";
        let [r, vpi, vl] = check(OP, logits.len(), targets.len(), rows, vp, v_live)?;
        check_len(OP, "dlogits", dlogits.len(), rows * vp)?;
        let f = self.func_for::<T>("cross_entropy_bwd")?;
        launch!(
            self,
            "cross_entropy_backward",
            f,
            cfg_rows(rows, 256)?,
            [dlogits, logits, targets, &r, &vpi, &vl, &dloss]
        )
    }
}
