//! Embedding, RMSNorm, RoPE and SwiGLU launch wrappers (shapes as in `cpu`).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{cfg_1d, cfg_rows, check_len, dim, launch};
use crate::cuda::dtype::GpuDtype;
use crate::cuda::error::{CudaError, ensure};
use crate::cuda::runtime::CudaKernels;

impl CudaKernels {
    /// out[Bt, C] = table[ids[Bt], C]. `table` is [V, C].
    pub fn embedding_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        ids: &CudaSlice<u32>,
        table: &CudaSlice<T>,
        c: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "embedding_forward";
        ensure(c > 0 && table.len().is_multiple_of(c), OP, || {
            format!("table {} not [V, {c}]", table.len())
        })?;
        check_len(OP, "out", out.len(), ids.len() * c)?;
        let (bt, ci, v) = (
            dim(OP, "bt", ids.len())?,
            dim(OP, "c", c)?,
            dim(OP, "v", table.len() / c)?,
        );
        let f = self.func_for::<T>("embedding_fwd")?;
        launch!(
            self,
            "embedding_forward",
            f,
            cfg_1d(out.len()),
            [out, ids, table, &bt, &ci, &v]
        )
    }

    /// dtable[V, C] (f32) += scatter(dout[Bt, C]) by ids.
    pub fn embedding_backward<T: GpuDtype>(
        &self,
        dtable: &mut CudaSlice<f32>,
        dout: &CudaSlice<T>,
        ids: &CudaSlice<u32>,
        c: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "embedding_backward";
        ensure(c > 0 && dtable.len().is_multiple_of(c), OP, || {
            format!("dtable {} not [V, {c}]", dtable.len())
        })?;
        check_len(OP, "dout", dout.len(), ids.len() * c)?;
        let (bt, ci, v) = (
            dim(OP, "bt", ids.len())?,
            dim(OP, "c", c)?,
            dim(OP, "v", dtable.len() / c)?,
        );
        let f = self.func_for::<T>("embedding_bwd")?;
        launch!(
            self,
            "embedding_backward",
            f,
            cfg_1d(dout.len()),
            [dtable, dout, ids, &bt, &ci, &v]
        )
    }

    /// out = inp * rstd * weight; rstd[Bt] = 1/sqrt(mean(inp^2) + eps).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_forward";
        ensure(c > 0, OP, || "c must be positive".into())?;
        check_len(OP, "inp", inp.len(), rows * c)?;
        check_len(OP, "out", out.len(), rows * c)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        check_len(OP, "weight", weight.len(), c)?;
        let (r, ci) = (dim(OP, "rows", rows)?, dim(OP, "c", c)?);
        let f = self.func_for::<T>("rmsnorm_fwd")?;
        launch!(
            self,
            "rmsnorm_forward",
            f,
            cfg_rows(rows, 256)?,
            [out, rstd, inp, weight, &r, &ci, &eps]
        )
    }

    /// dinp += d(out)/d(inp)^T dout; dweight (f32) += sum_rows dout * inp * rstd.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward<T: GpuDtype>(
        &self,
        dinp: &mut CudaSlice<T>,
        dweight: &mut CudaSlice<f32>,
        dout: &CudaSlice<T>,
        inp: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_backward";
        ensure(c > 0, OP, || "c must be positive".into())?;
        for (name, len) in [
            ("dinp", dinp.len()),
            ("dout", dout.len()),
            ("inp", inp.len()),
        ] {
            check_len(OP, name, len, rows * c)?;
        }
        check_len(OP, "dweight", dweight.len(), c)?;
        check_len(OP, "weight", weight.len(), c)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        let (r, ci) = (dim(OP, "rows", rows)?, dim(OP, "c", c)?);
        let f = self.func_for::<T>("rmsnorm_bwd")?;
        launch!(
            self,
            "rmsnorm_backward",
            f,
            cfg_rows(rows, 256)?,
            [dinp, dout, inp, weight, rstd, &r, &ci]
        )?;
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, 1, 1),
            block_dim: (32, 16, 1),
            shared_mem_bytes: 0,
        };
        let f = self.func_for::<T>("rmsnorm_bwd_dweight")?;
        launch!(
            self,
            "rmsnorm_backward",
            f,
            cfg,
            [dweight, dout, inp, rstd, &r, &ci]
        )
    }

    /// Rotate-half RoPE on [B, T, H, D] at positions pos_offset + t. `out` may not alias
    /// `inp` through this API (cudarc borrows), but the kernel itself is in-place safe.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        inp: &CudaSlice<T>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<(), CudaError> {
        let (bi, ti, hi, di, pos) =
            rope_args("rope_forward", out.len(), inp.len(), b, t, h, d, pos_offset)?;
        let f = self.func_for::<T>("rope_fwd")?;
        launch!(
            self,
            "rope_forward",
            f,
            cfg_1d(out.len() / 2),
            [out, inp, &bi, &ti, &hi, &di, &pos, &theta]
        )
    }

    /// dinp += R^T dout.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_backward<T: GpuDtype>(
        &self,
        dinp: &mut CudaSlice<T>,
        dout: &CudaSlice<T>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<(), CudaError> {
        let (bi, ti, hi, di, pos) = rope_args(
            "rope_backward",
            dinp.len(),
            dout.len(),
            b,
            t,
            h,
            d,
            pos_offset,
        )?;
        let f = self.func_for::<T>("rope_bwd")?;
        launch!(
            self,
            "rope_backward",
            f,
            cfg_1d(dinp.len() / 2),
            [dinp, dout, &bi, &ti, &hi, &di, &pos, &theta]
        )
    }

    /// out = silu(gate) * up.
    pub fn swiglu_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        check_len("swiglu_forward", "gate", gate.len(), out.len())?;
        check_len("swiglu_forward", "up", up.len(), out.len())?;
        let n = out.len() as i64;
        let f = self.func_for::<T>("swiglu_fwd")?;
        launch!(
            self,
            "swiglu_forward",
            f,
            cfg_1d(out.len()),
            [out, gate, up, &n]
        )
    }

    /// dgate += dout * up * silu'(gate); dup += dout * silu(gate).
    pub fn swiglu_backward<T: GpuDtype>(
        &self,
        dgate: &mut CudaSlice<T>,
        dup: &mut CudaSlice<T>,
        dout: &CudaSlice<T>,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        let n = dout.len();
        for (name, len) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ] {
            check_len("swiglu_backward", name, len, n)?;
        }
        let nn = n as i64;
        let f = self.func_for::<T>("swiglu_bwd")?;
        launch!(
            self,
            "swiglu_backward",
            f,
            cfg_1d(n),
            [dgate, dup, dout, gate, up, &nn]
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn rope_args(
    op: &'static str,
    a: usize,
    b_len: usize,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
) -> Result<(i32, i32, i32, i32, i64), CudaError> {
    ensure(d > 0 && d.is_multiple_of(2), op, || {
        format!("head dim {d} must be even")
    })?;
    check_len(op, "out", a, b * t * h * d)?;
    check_len(op, "inp", b_len, b * t * h * d)?;
    let pos = i64::try_from(pos_offset).map_err(|_| CudaError::Shape {
        op,
        detail: "pos_offset too large".into(),
    })?;
    Ok((
        dim(op, "b", b)?,
        dim(op, "t", t)?,
        dim(op, "h", h)?,
        dim(op, "d", d)?,
        pos,
    ))
}
