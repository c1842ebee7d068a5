//! Fused causal GQA attention (flash style) launch wrappers.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{check_len, dim, launch};
use crate::cuda::dtype::GpuDtype;
use crate::cuda::error::{CudaError, ensure};
use crate::cuda::runtime::CudaKernels;

/// Query (or key) rows per block: one warp each.
const WARPS: usize = 8;
/// Largest head dimension the kernels hold in registers.
pub const ATTENTION_MAX_HEAD_DIM: usize = 128;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
}

impl AttnShape {
    fn check(&self, op: &'static str) -> Result<[i32; 5], CudaError> {
        let AttnShape { b, t, h, kvh, d } = *self;
        ensure(d > 0 && d <= ATTENTION_MAX_HEAD_DIM, op, || {
            format!("head dim {d} not in 1..={ATTENTION_MAX_HEAD_DIM}")
        })?;
        ensure(kvh > 0 && h % kvh == 0, op, || {
            format!("heads {h} not a multiple of kv heads {kvh}")
        })?;
        ensure(b * h <= 65_535 && b * kvh <= 65_535, op, || {
            format!("b*h = {} too large", b * h)
        })?;
        Ok([
            dim(op, "b", b)?,
            dim(op, "t", t)?,
            dim(op, "h", h)?,
            dim(op, "kvh", kvh)?,
            dim(op, "d", d)?,
        ])
    }

    fn cfg(&self, heads: usize, smem_floats: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.t.div_ceil(WARPS).max(1) as u32,
                (self.b * heads).max(1) as u32,
                1,
            ),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: (smem_floats * 4) as u32,
        }
    }

    fn q_len(&self) -> usize {
        self.b * self.t * self.h * self.d
    }

    fn kv_len(&self) -> usize {
        self.b * self.t * self.kvh * self.d
    }

    fn lse_len(&self) -> usize {
        self.b * self.h * self.t
    }
}

/// Shape of a generation call: `tq` new queries per sequence at positions `past..past+tq`
/// over caches [B, TMAX, KVH, D] whose rows `0..past+tq` are filled.
#[derive(Debug, Clone, Copy)]
pub struct CachedAttnShape {
    pub b: usize,
    pub tq: usize,
    pub past: usize,
    pub tmax: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
}

impl CudaKernels {
    /// Generation attention over a KV cache (no lse, no backward): out [B, TQ, H, D].
    pub fn attention_cached<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaSlice<T>,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        s: CachedAttnShape,
    ) -> Result<(), CudaError> {
        const OP: &str = "attention_cached";
        let CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            kvh,
            d,
        } = s;
        let base = AttnShape {
            b,
            t: tq,
            h,
            kvh,
            d,
        };
        base.check(OP)?;
        ensure(past + tq <= tmax, OP, || {
            format!("past {past} + tq {tq} exceeds cache length {tmax}")
        })?;
        check_len(OP, "q", q.len(), b * tq * h * d)?;
        check_len(OP, "out", out.len(), b * tq * h * d)?;
        check_len(OP, "k_cache", k_cache.len(), b * tmax * kvh * d)?;
        check_len(OP, "v_cache", v_cache.len(), b * tmax * kvh * d)?;
        let a = [
            dim(OP, "b", b)?,
            dim(OP, "tq", tq)?,
            dim(OP, "past", past)?,
            dim(OP, "tmax", tmax)?,
            dim(OP, "h", h)?,
            dim(OP, "kvh", kvh)?,
            dim(OP, "d", d)?,
        ];
        let smem = 64 * (d + 1) + WARPS * d;
        let f = self.func_for::<T>("attention_cached_fwd")?;
        launch!(
            self,
            "attention_cached",
            f,
            base.cfg(h, smem),
            [
                out, q, k_cache, v_cache, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6]
            ]
        )
    }

    /// out[B, T, H, D], lse[B, H, T] = causal softmax(q k^T / sqrt(D)) v.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: GpuDtype>(
        &self,
        out: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        s: AttnShape,
    ) -> Result<(), CudaError> {
        const OP: &str = "attention_forward";
        let [b, t, h, kvh, d] = s.check(OP)?;
        check_len(OP, "q", q.len(), s.q_len())?;
        check_len(OP, "out", out.len(), s.q_len())?;
        check_len(OP, "k", k.len(), s.kv_len())?;
        check_len(OP, "v", v.len(), s.kv_len())?;
        check_len(OP, "lse", lse.len(), s.lse_len())?;
        let smem = 64 * (s.d + 1) + WARPS * s.d;
        let f = self.func_for::<T>("attention_fwd")?;
        launch!(
            self,
            "attention_forward",
            f,
            s.cfg(s.h, smem),
            [out, lse, q, k, v, &b, &t, &h, &kvh, &d]
        )
    }

    /// dq += .., dk += .., dv += .. (flash backward, recomputing probabilities from lse).
    /// `delta` is scratch of [B, H, T] f32 (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: GpuDtype>(
        &self,
        dq: &mut CudaSlice<T>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
        delta: &mut CudaSlice<f32>,
        dout: &CudaSlice<T>,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<(), CudaError> {
        const OP: &str = "attention_backward";
        let [b, t, h, kvh, d] = s.check(OP)?;
        for (name, len) in [
            ("q", q.len()),
            ("out", out.len()),
            ("dq", dq.len()),
            ("dout", dout.len()),
        ] {
            check_len(OP, name, len, s.q_len())?;
        }
        for (name, len) in [
            ("k", k.len()),
            ("v", v.len()),
            ("dk", dk.len()),
            ("dv", dv.len()),
        ] {
            check_len(OP, name, len, s.kv_len())?;
        }
        check_len(OP, "lse", lse.len(), s.lse_len())?;
        check_len(OP, "delta", delta.len(), s.lse_len())?;
        let rows = s.b * s.t * s.h;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS).max(1) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.func_for::<T>("attention_bwd_delta")?;
        launch!(
            self,
            "attention_backward",
            f,
            cfg,
            [&mut *delta, dout, out, &b, &t, &h, &d]
        )?;
        let smem = 64 * (s.d + 1) + 2 * WARPS * s.d;
        let f = self.func_for::<T>("attention_bwd_dq")?;
        launch!(
            self,
            "attention_backward",
            f,
            s.cfg(s.h, smem),
            [dq, dout, q, k, v, lse, &*delta, &b, &t, &h, &kvh, &d]
        )?;
        let smem = 64 * (s.d + 1) + 2 * WARPS * s.d + 64;
        let f = self.func_for::<T>("attention_bwd_dkv")?;
        launch!(
            self,
            "attention_backward",
            f,
            s.cfg(s.kvh, smem),
            [dk, dv, dout, q, k, v, lse, &*delta, &b, &t, &h, &kvh, &d]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_and_shared_memory_fits() {
        let s = AttnShape {
            b: 2,
            t: 5,
            h: 4,
            kvh: 3,
            d: 32,
        };
        assert!(s.check("x").unwrap_err().to_string().contains("multiple"));
        let s = AttnShape {
            b: 1,
            t: 5,
            h: 4,
            kvh: 2,
            d: 130,
        };
        assert!(s.check("x").is_err());
        // Worst case (dkv, D = 128) stays under the 48 KiB default limit.
        let d = ATTENTION_MAX_HEAD_DIM;
        assert!((64 * (d + 1) + 2 * WARPS * d + 64) * 4 <= 48 * 1024);
        let s = AttnShape {
            b: 2,
            t: 9,
            h: 4,
            kvh: 2,
            d: 16,
        };
        assert_eq!(s.cfg(s.h, 10).grid_dim, (2, 8, 1));
    }
}
