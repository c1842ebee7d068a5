//! fill, scale, add, accumulate and the f32 <-> bf16 casts.

use cudarc::driver::CudaSlice;

use super::{cfg_1d, check_len, launch};
use crate::cuda::dtype::{Bf16, GpuDtype};
use crate::cuda::error::CudaError;
use crate::cuda::runtime::CudaKernels;

impl CudaKernels {
    /// x[:] = v.
    pub fn fill<T: GpuDtype>(&self, x: &mut CudaSlice<T>, v: f32) -> Result<(), CudaError> {
        let n = x.len() as i64;
        launch!(
            self,
            "fill",
            self.func_for::<T>("fill_fwd")?,
            cfg_1d(x.len()),
            [x, &n, &v]
        )
    }

    /// x *= s.
    pub fn scale<T: GpuDtype>(&self, x: &mut CudaSlice<T>, s: f32) -> Result<(), CudaError> {
        let n = x.len() as i64;
        launch!(
            self,
            "scale",
            self.func_for::<T>("scale_fwd")?,
            cfg_1d(x.len()),
            [x, &n, &s]
        )
    }

    /// out = a + b.
    pub fn add<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        check_len("add", "a", a.len(), out.len())?;
        check_len("add", "b", b.len(), out.len())?;
        let n = out.len() as i64;
        launch!(
            self,
            "add",
            self.func_for::<T>("add_fwd")?,
            cfg_1d(out.len()),
            [out, a, b, &n]
        )
    }

    /// y += x (residual connections, gradient accumulation).
    pub fn accumulate<T: GpuDtype>(
        &self,
        y: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        check_len("accumulate", "x", x.len(), y.len())?;
        let n = y.len() as i64;
        let f = self.func_for::<T>("accumulate_fwd")?;
        launch!(self, "accumulate", f, cfg_1d(y.len()), [y, x, &n])
    }

    /// y (f32) += x (bf16).
    pub fn accumulate_bf16_into_f32(
        &self,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<Bf16>,
    ) -> Result<(), CudaError> {
        check_len("accumulate", "x", x.len(), y.len())?;
        let n = y.len() as i64;
        let f = self.func("accumulate_fwd_f32_bf16")?;
        launch!(self, "accumulate", f, cfg_1d(y.len()), [y, x, &n])
    }

    /// out = bf16(inp), round to nearest even.
    pub fn cast_f32_to_bf16(
        &self,
        out: &mut CudaSlice<Bf16>,
        inp: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_len("cast", "inp", inp.len(), out.len())?;
        let n = out.len() as i64;
        launch!(
            self,
            "cast",
            self.func("cast_fwd_f32_bf16")?,
            cfg_1d(out.len()),
            [out, inp, &n]
        )
    }

    /// out = f32(inp), exact.
    pub fn cast_bf16_to_f32(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<Bf16>,
    ) -> Result<(), CudaError> {
        check_len("cast", "inp", inp.len(), out.len())?;
        let n = out.len() as i64;
        launch!(
            self,
            "cast",
            self.func("cast_fwd_bf16_f32")?,
            cfg_1d(out.len()),
            [out, inp, &n]
        )
    }
}
