//! Linear-layer GEMMs: f32 through the SIMT tiled kernel, bf16 through the mma.sync
//! tensor-core kernel (f32 accumulation).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{check_len, dim, launch};
use crate::cuda::dtype::{Bf16, GpuDtype};
use crate::cuda::error::CudaError;
use crate::cuda::runtime::CudaKernels;

/// Output tile edge of the kernel used for dtype `T`.
fn tile<T: GpuDtype>() -> usize {
    if T::SUFFIX == "f32" { 64 } else { 128 }
}

/// Grid over an output of shape [rows, cols].
fn cfg_gemm(rows: usize, cols: usize, tile: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            cols.div_ceil(tile).max(1) as u32,
            rows.div_ceil(tile).max(1) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims(op: &'static str, m: usize, k: usize, n: usize) -> Result<(i32, i32, i32), CudaError> {
    let (mi, ki, ni) = (dim(op, "m", m)?, dim(op, "k", k)?, dim(op, "n", n)?);
    for (name, len) in [("m*k", m * k), ("n*k", n * k), ("m*n", m * n)] {
        dim(op, name, len)?; // the kernels index with 64-bit offsets, but keep products sane
    }
    Ok((mi, ki, ni))
}

impl CudaKernels {
    /// out[M, N] = inp[M, K] @ weight[N, K]^T.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        inp: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul_forward";
        check_len(OP, "out", out.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * k)?;
        check_len(OP, "weight", weight.len(), n * k)?;
        let (mi, ki, ni) = dims(OP, m, k, n)?;
        let f = self.func_for::<T>("matmul_fwd")?;
        launch!(
            self,
            "matmul_forward",
            f,
            cfg_gemm(m, n, tile::<T>()),
            [out, inp, weight, &mi, &ki, &ni]
        )
    }

    /// out[M, N] (f32) = inp[M, K] @ weight[N, K]^T with bf16 inputs (LM-head logits).
    pub fn matmul_forward_f32out(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<Bf16>,
        weight: &CudaSlice<Bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul_forward_f32out";
        check_len(OP, "out", out.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * k)?;
        check_len(OP, "weight", weight.len(), n * k)?;
        let (mi, ki, ni) = dims(OP, m, k, n)?;
        let f = self.func("matmul_fwd_bf16_f32out")?;
        launch!(
            self,
            "matmul_forward_f32out",
            f,
            cfg_gemm(m, n, 128),
            [out, inp, weight, &mi, &ki, &ni]
        )
    }

    /// dinp[M, K] += dout[M, N] @ weight[N, K]; dweight[N, K] (f32) += dout^T @ inp.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward<T: GpuDtype>(
        &self,
        dinp: &mut CudaSlice<T>,
        dweight: &mut CudaSlice<f32>,
        dout: &CudaSlice<T>,
        inp: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul_backward";
        check_len(OP, "dout", dout.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * k)?;
        check_len(OP, "dinp", dinp.len(), m * k)?;
        check_len(OP, "weight", weight.len(), n * k)?;
        check_len(OP, "dweight", dweight.len(), n * k)?;
        let (mi, ki, ni) = dims(OP, m, k, n)?;
        let tl = tile::<T>();
        let f = self.func_for::<T>("matmul_bwd_dinp")?;
        launch!(
            self,
            "matmul_backward",
            f,
            cfg_gemm(m, k, tl),
            [dinp, dout, weight, &mi, &ki, &ni]
        )?;
        let f = self.func_for::<T>("matmul_bwd_dweight")?;
        launch!(
            self,
            "matmul_backward",
            f,
            cfg_gemm(n, k, tl),
            [dweight, dout, inp, &mi, &ki, &ni]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_ragged_outputs() {
        let c = cfg_gemm(65, 130, 64);
        assert_eq!((c.grid_dim.0, c.grid_dim.1), (3, 2));
        let c = cfg_gemm(0, 0, 128);
        assert_eq!((c.grid_dim.0, c.grid_dim.1), (1, 1));
        assert_eq!(tile::<f32>(), 64);
        assert_eq!(tile::<Bf16>(), 128);
    }
}
