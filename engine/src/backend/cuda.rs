//! The CUDA backend: buffers are device allocations (`CudaSlice<f32>`), every op launches the
//! hand-written kernel of the same name from `neuroshard_kernels::cuda` (f32 variants), and
//! [`open_device`] picks the device for `--device auto|cuda|cpu`.
//!
//! Faults: every driver error (launch failure, illegal address, out of memory, a sticky
//! context error) comes back as [`BackendError::Device`]; the engine must then report it and
//! exit non-zero (supervision restarts it from the last checkpoint). Launches are
//! asynchronous, so a fault may surface at the next call that synchronises
//! (`download`, `cross_entropy_forward`, `global_norm`, `synchronize`): none of them can
//! return data computed after a fault.

use std::collections::HashMap;

use neuroshard_kernels::KernelError;
use neuroshard_kernels::cuda::cudarc::driver::CudaSlice;
use neuroshard_kernels::cuda::ops::attention as katt;
use neuroshard_kernels::cuda::ops::optim::{AdamWParams, NORM_PARTIALS_PER_TENSOR};
use neuroshard_kernels::cuda::{
    Bf16, CudaError, CudaKernels, DeviceProbe, ModuleSource, nvrtc_available, probe,
};
use parking_lot::Mutex;

use super::{AdamW, AttnShape, Backend, BackendError, CachedAttnShape, Dtype, Result, check_len};

/// Token ids on the device, with their maximum kept on the host so ops can reject an
/// out-of-range id (as the CPU backend does) without reading the device.
pub struct CudaIds {
    dev: CudaSlice<u32>,
    max: Option<u32>,
}

/// One CUDA device with every kernel loaded.
pub struct CudaBackend {
    k: CudaKernels,
    /// Reused scratch buffers (per-row losses, attention delta, norm partials), by name.
    scratch: Mutex<HashMap<&'static str, CudaSlice<f32>>>,
    /// bf16 input gradients of the bf16 GEMM backward, by length, before they are added to
    /// the f32 gradient.
    scratch_half: Mutex<HashMap<usize, CudaSlice<Bf16>>>,
    /// The dtype of the training GEMMs.
    dtype: Dtype,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("kernels", &self.k)
            .finish()
    }
}

/// Maps a kernel-side error to the backend's.
fn dev(e: CudaError) -> BackendError {
    match e {
        CudaError::Shape { op, detail } => BackendError::Shape { op, detail },
        CudaError::Driver { op, source } => BackendError::Device {
            op,
            message: source.to_string(),
        },
        other => BackendError::Device {
            op: "cuda",
            message: other.to_string(),
        },
    }
}

fn check_ids(op: &'static str, ids: &CudaIds, limit: usize) -> Result<()> {
    match ids.max {
        Some(id) if id as usize >= limit => Err(BackendError::Kernel {
            op,
            source: KernelError::IdOutOfRange { id, limit },
        }),
        _ => Ok(()),
    }
}

impl CudaBackend {
    /// Opens device `ordinal`; kernels from `$NEUROSHARD_CUDA_MODULES` (precompiled) when set,
    /// else compiled by NVRTC now.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let k = CudaKernels::new(ordinal, ModuleSource::Auto).map_err(dev)?;
        Ok(CudaBackend {
            k,
            scratch: Mutex::new(HashMap::new()),
            scratch_half: Mutex::new(HashMap::new()),
            dtype: Dtype::F32,
        })
    }

    /// Sets the dtype of the training GEMMs: bf16 runs them on the tensor cores (mma.sync,
    /// sm_80 and later, which `new` requires).
    pub fn set_dtype(&mut self, dtype: Dtype) {
        self.dtype = dtype;
    }

    /// The loaded kernels (for benchmarks and tests).
    pub fn kernels(&self) -> &CudaKernels {
        &self.k
    }

    /// Takes scratch buffer `name` of exactly `n` floats out of the cache (allocating it when
    /// the cached one has another size); give it back with [`Self::put_scratch`].
    fn take_scratch(&self, name: &'static str, n: usize) -> Result<CudaSlice<f32>> {
        let cached = self.scratch.lock().remove(name);
        match cached {
            Some(b) if b.len() == n => Ok(b),
            _ => self.k.zeros::<f32>(n).map_err(dev),
        }
    }

    fn put_scratch(&self, name: &'static str, buf: CudaSlice<f32>) {
        self.scratch.lock().insert(name, buf);
    }

    fn read_scalar(&self, buf: &CudaSlice<f32>) -> Result<f32> {
        let v = self.k.download(buf).map_err(dev)?;
        Ok(v.first().copied().unwrap_or(f32::NAN))
    }
}

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

/// Picks the device. `Cpu` → `Ok(None)`. `Cuda` → the CUDA backend or a clear error.
/// `Auto` → CUDA only when the driver library is present, a device exists and the kernels
/// load; otherwise `Ok(None)` with one log line saying why the CPU is used.
pub fn open_device(request: DeviceRequest) -> Result<Option<CudaBackend>> {
    let unavailable = |message: String| BackendError::Device {
        op: "cuda device",
        message,
    };
    match request {
        DeviceRequest::Cpu => {
            tracing::info!("device: cpu (requested)");
            Ok(None)
        }
        DeviceRequest::Cuda => {
            let p = probe();
            if !p.is_available() {
                return Err(unavailable(format!("--device cuda: {}", p.describe())));
            }
            let b = CudaBackend::new(0).map_err(|e| unavailable(format!("--device cuda: {e}")))?;
            tracing::info!(device = %b.device_name(), arch = %b.k.arch(), "device: cuda");
            Ok(Some(b))
        }
        DeviceRequest::Auto => match probe() {
            DeviceProbe::Available { .. } => match CudaBackend::new(0) {
                Ok(b) => {
                    tracing::info!(device = %b.device_name(), arch = %b.k.arch(), "device: cuda (auto)");
                    Ok(Some(b))
                }
                Err(e) => {
                    tracing::warn!(
                        "device: cpu (auto): a cuda device exists but cannot be used: {e}"
                    );
                    Ok(None)
                }
            },
            other => {
                tracing::info!("device: cpu (auto): {}", other.describe());
                Ok(None)
            }
        },
    }
}

/// Whether `--device auto` would try CUDA (driver and device present, kernels obtainable).
pub fn cuda_usable() -> bool {
    probe().is_available()
        && (nvrtc_available()
            || std::env::var_os("NEUROSHARD_CUDA_MODULES").is_some_and(|v| !v.is_empty()))
}

fn attn(s: AttnShape) -> katt::AttnShape {
    katt::AttnShape {
        b: s.b,
        t: s.t,
        h: s.h,
        kvh: s.kvh,
        d: s.d,
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Ids = CudaIds;
    type Half = CudaSlice<Bf16>;

    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn device_name(&self) -> String {
        self.k.device_name().to_string()
    }

    fn memory(&self) -> (u64, u64) {
        match self.k.context().mem_get_info() {
            Ok((free, total)) => ((total - free) as u64, total as u64),
            Err(_) => (0, 0),
        }
    }

    fn compute_dtype(&self) -> Dtype {
        self.dtype
    }

    fn zeros_half(&self, n: usize) -> Result<CudaSlice<Bf16>> {
        self.k.zeros(n).map_err(dev)
    }

    fn half_len(&self, h: &CudaSlice<Bf16>) -> usize {
        h.len()
    }

    fn to_half(&self, dst: &mut CudaSlice<Bf16>, src: &CudaSlice<f32>) -> Result<()> {
        self.k.cast_f32_to_bf16(dst, src).map_err(dev)
    }

    fn matmul_forward_bf16(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<Bf16>,
        weight: &CudaSlice<Bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.k
            .matmul_forward_f32out(out, inp, weight, m, k, n)
            .map_err(dev)
    }

    /// The tensor-core kernels write dinp in bf16: into a zeroed scratch, then added to the
    /// f32 dinp; dweight accumulates in f32 directly.
    fn matmul_backward_bf16(
        &self,
        dinp: &mut CudaSlice<f32>,
        dweight: &mut CudaSlice<f32>,
        dout: &CudaSlice<Bf16>,
        inp: &CudaSlice<Bf16>,
        weight: &CudaSlice<Bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check_len("matmul_backward_bf16", "dinp", dinp.len(), m * k)?;
        let mut pool = self.scratch_half.lock();
        let tmp = match pool.entry(m * k) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.k.zeros::<Bf16>(m * k).map_err(dev)?)
            }
        };
        self.k.fill(tmp, 0.0).map_err(dev)?;
        self.k
            .matmul_backward(tmp, dweight, dout, inp, weight, m, k, n)
            .map_err(dev)?;
        self.k.accumulate_bf16_into_f32(dinp, tmp).map_err(dev)
    }

    fn synchronize(&self) -> Result<()> {
        self.k.synchronize().map_err(dev)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.k.zeros(n).map_err(dev)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.k.upload(host).map_err(dev)
    }

    fn upload_ids(&self, host: &[u32]) -> Result<CudaIds> {
        let dev_ids = self.k.stream().clone_htod(host).map_err(|e| {
            dev(CudaError::Driver {
                op: "upload_ids",
                source: e,
            })
        })?;
        Ok(CudaIds {
            dev: dev_ids,
            max: host.iter().copied().max(),
        })
    }

    fn download(&self, buf: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        check_len("download", "out", out.len(), buf.len())?;
        self.k.stream().memcpy_dtoh(buf, out).map_err(|e| {
            dev(CudaError::Driver {
                op: "download",
                source: e,
            })
        })
    }

    fn write(&self, buf: &mut CudaSlice<f32>, host: &[f32]) -> Result<()> {
        check_len("write", "host", host.len(), buf.len())?;
        self.k.write(buf, host).map_err(dev)
    }

    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.dev.len()
    }

    fn fill(&self, buf: &mut CudaSlice<f32>, value: f32) -> Result<()> {
        self.k.fill(buf, value).map_err(dev)
    }

    fn copy_range(
        &self,
        dst: &mut CudaSlice<f32>,
        dst_off: usize,
        src: &CudaSlice<f32>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        let fits = |off: usize, len: usize| off.checked_add(n).is_some_and(|end| end <= len);
        if !fits(dst_off, dst.len()) || !fits(src_off, src.len()) {
            return Err(BackendError::Shape {
                op: "copy_range",
                detail: format!(
                    "{n} floats from {src_off} of {} to {dst_off} of {}",
                    src.len(),
                    dst.len()
                ),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let s = src.slice(src_off..src_off + n);
        let mut d = dst.slice_mut(dst_off..dst_off + n);
        self.k.stream().memcpy_dtod(&s, &mut d).map_err(|e| {
            dev(CudaError::Driver {
                op: "copy_range",
                source: e,
            })
        })
    }

    fn add(&self, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
        self.k.add(out, a, b).map_err(dev)
    }

    fn accumulate(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        self.k.accumulate(y, x).map_err(dev)
    }

    fn scale(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
        self.k.scale(x, s).map_err(dev)
    }

    fn embedding_forward(
        &self,
        out: &mut CudaSlice<f32>,
        ids: &CudaIds,
        table: &CudaSlice<f32>,
        c: usize,
    ) -> Result<()> {
        if let Some(v) = table.len().checked_div(c) {
            check_ids("embedding_forward", ids, v)?;
        }
        self.k
            .embedding_forward(out, &ids.dev, table, c)
            .map_err(dev)
    }

    fn embedding_backward(
        &self,
        dtable: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        ids: &CudaIds,
        c: usize,
    ) -> Result<()> {
        if let Some(v) = dtable.len().checked_div(c) {
            check_ids("embedding_backward", ids, v)?;
        }
        self.k
            .embedding_backward(dtable, dout, &ids.dev, c)
            .map_err(dev)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.k
            .rmsnorm_forward(out, rstd, inp, weight, rows, c, eps)
            .map_err(dev)
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        dweight: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        self.k
            .rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, rows, c)
            .map_err(dev)
    }

    fn matmul_forward(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.k
            .matmul_forward(out, inp, weight, m, k, n)
            .map_err(dev)
    }

    fn matmul_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        dweight: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.k
            .matmul_backward(dinp, dweight, dout, inp, weight, m, k, n)
            .map_err(dev)
    }

    fn rope_forward(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()> {
        self.k
            .rope_forward(out, inp, b, t, h, d, pos_offset, theta)
            .map_err(dev)
    }

    fn rope_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()> {
        self.k
            .rope_backward(dinp, dout, b, t, h, d, pos_offset, theta)
            .map_err(dev)
    }

    fn attention_forward(
        &self,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<()> {
        self.k
            .attention_forward(out, lse, q, k, v, attn(s))
            .map_err(dev)
    }

    fn attention_backward(
        &self,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<()> {
        let mut delta = self.take_scratch("attention_delta", s.b * s.h * s.t)?;
        let r = self
            .k
            .attention_backward(dq, dk, dv, &mut delta, dout, q, k, v, out, lse, attn(s))
            .map_err(dev);
        self.put_scratch("attention_delta", delta);
        r
    }

    fn attention_cached(
        &self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<f32>,
        v_cache: &CudaSlice<f32>,
        s: CachedAttnShape,
    ) -> Result<()> {
        let CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            kvh,
            d,
        } = s;
        let ks = katt::CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            kvh,
            d,
        };
        self.k
            .attention_cached(out, q, k_cache, v_cache, ks)
            .map_err(dev)
    }

    fn swiglu_forward(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
    ) -> Result<()> {
        self.k.swiglu_forward(out, gate, up).map_err(dev)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
    ) -> Result<()> {
        self.k
            .swiglu_backward(dgate, dup, dout, gate, up)
            .map_err(dev)
    }

    fn cross_entropy_forward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaIds,
        rows: usize,
        vp: usize,
        v_live: usize,
    ) -> Result<f32> {
        check_ids("cross_entropy_forward", targets, v_live)?;
        let mut losses = self.take_scratch("ce_losses", rows)?;
        let mut loss = self.take_scratch("ce_loss", 1)?;
        let r = self
            .k
            .cross_entropy_forward(
                &mut loss,
                &mut losses,
                logits,
                &targets.dev,
                rows,
                vp,
                v_live,
            )
            .map_err(dev)
            .and_then(|()| self.read_scalar(&loss));
        self.put_scratch("ce_losses", losses);
        self.put_scratch("ce_loss", loss);
        r
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &CudaIds,
        rows: usize,
        vp: usize,
        v_live: usize,
        dloss: f32,
    ) -> Result<()> {
        check_ids("cross_entropy_backward", targets, v_live)?;
        self.k
            .cross_entropy_backward(dlogits, logits, &targets.dev, rows, vp, v_live, dloss)
            .map_err(dev)
    }

    fn adamw_step(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        t: u64,
        hp: AdamW,
    ) -> Result<()> {
        let hp = AdamWParams {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
        };
        self.k
            .adamw_step(params, grads, m, v, t, hp, None)
            .map_err(dev)
    }

    fn global_norm(&self, grads: &[&CudaSlice<f32>]) -> Result<f32> {
        let mut partials = self.take_scratch(
            "norm_partials",
            NORM_PARTIALS_PER_TENSOR * grads.len().max(1),
        )?;
        let mut norm = self.take_scratch("norm", 1)?;
        let r = self
            .k
            .global_norm(&mut norm, &mut partials, grads)
            .map_err(dev)
            .and_then(|()| self.read_scalar(&norm));
        self.put_scratch("norm_partials", partials);
        self.put_scratch("norm", norm);
        r
    }
}

#[cfg(test)]
mod tests;
