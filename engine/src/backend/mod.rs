//! The compute backend: one trait, implemented by the CPU (`cpu.rs`) and by CUDA, so the model
//! (`crate::model`) is written once and runs on either.
//!
//! A backend owns device memory through two opaque buffer types: [`Backend::Buf`] holds f32
//! values (weights, activations, gradients, optimizer moments) and [`Backend::Ids`] holds u32
//! token ids or targets. The model never looks inside a buffer; it moves data in and out with
//! `upload*` / `download` / `write*` and calls one method per op. Every op method mirrors the
//! kernel of the same name in `neuroshard_kernels::cpu` (same argument order, same shape
//! letters, same semantics); in particular backward methods ACCUMULATE (`+=`) into their
//! gradient outputs, except `cross_entropy_backward`, which writes.
//!
//! Shapes: row-major; B batch, T time, C channels, H heads, KVH kv heads, D head dim, V (padded)
//! vocabulary, `Bt = B*T` rows, F ffn width. The model checks shapes before calling; a backend
//! may check again and return [`BackendError::Shape`].
//!
//! Architecture invariant: methods take `&self` and are called from one thread at a time (the
//! runtime serializes commands); a CUDA backend keeps its scratch behind interior mutability.

pub mod cpu;
mod cpu_serve;
pub mod cuda;
pub mod serve;

pub use serve::{DecodeAttnShape, DecodeCache, Int8Weight};

/// Error from a backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Data-dependent bad input (a token id or target out of range).
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        source: neuroshard_kernels::KernelError,
    },
    /// Buffer lengths that do not fit the op's shape.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The device failed (CUDA launch failure, out of memory, sticky context error). The engine
    /// reports it and exits so the supervisor restarts it from the last checkpoint.
    #[error("device fault in {op}: {message}")]
    Device { op: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Hyper-parameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Shape of an attention call: q/out [B,T,H,D], k/v [B,T,KVH,D], lse [B,H,T].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
}

/// Shape of a cached (generation) attention call: `tq` new queries per sequence at positions
/// `past..past+tq`, attending to keys `0..=position` of a cache laid out [B, TMAX, KVH, D].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedAttnShape {
    pub b: usize,
    pub tq: usize,
    pub past: usize,
    pub tmax: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
}

/// The dtype a backend's training GEMMs compute in (mixed precision: see [`Backend::Half`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bf16 operands, f32 accumulation and f32 results.
    Bf16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// Which nodes can replay each other's training bit for bit: the engine version, the device
/// kind and dtype, and on the CPU the instruction sets the kernels pick at run time (the f32
/// GEMMs' micro-kernel and the bf16 GEMM differ with them). Training is chaotic (a last-bit
/// difference grows about tenfold every 25 steps, BENCHMARKS.md "Checked work: replays across
/// hardware"), so a verifier only judges a replay of a claimant of its own class. `device` is
/// "cpu" or the CUDA device's name.
pub fn replay_class(device: &str, cuda: bool, dtype: Dtype) -> String {
    let isa = if cuda { "cuda" } else { cpu_isa() };
    format!(
        "neuroshard-engine {} {device} {isa} {}",
        env!("CARGO_PKG_VERSION"),
        dtype.as_str()
    )
}

/// The widest instruction set the CPU kernels use here.
fn cpu_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if neuroshard_kernels::cpu::fast::native_bf16() {
            return "x86-avx512-bf16";
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            return "x86-avx512";
        }
        if has!("avx2") && has!("fma") {
            return "x86-avx2-fma";
        }
        "x86-baseline"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

/// The training dtype asked for (`training.dtype` in the daemon's config, LoadModel's `dtype`,
/// bench-train's `--dtype`) on a device with or without native bf16 arithmetic (`native`:
/// AVX512-BF16 on the CPU, tensor cores on CUDA). "" or "auto" is bf16 where native, f32
/// elsewhere; "bf16" where not native falls back to f32. Either fallback logs one line.
pub fn resolve_dtype(
    requested: &str,
    native: bool,
    device: &str,
) -> std::result::Result<Dtype, String> {
    match (requested, native) {
        ("f32", _) => Ok(Dtype::F32),
        ("" | "auto" | "bf16", true) => Ok(Dtype::Bf16),
        ("" | "auto", false) => {
            tracing::info!(
                device,
                "no native bf16 arithmetic (AVX512-BF16 on a CPU): training in f32"
            );
            Ok(Dtype::F32)
        }
        ("bf16", false) => {
            tracing::warn!(
                device,
                "bf16 asked for, but this device has no native bf16 arithmetic (AVX512-BF16 on a CPU): training in f32"
            );
            Ok(Dtype::F32)
        }
        (other, _) => Err(format!("unknown dtype {other:?} (auto, f32, bf16)")),
    }
}

/// A compute device. See the module docs for conventions.
pub trait Backend: Send + 'static {
    /// f32 values in device memory.
    type Buf: Send + 'static;
    /// bf16 values in device memory: the low-precision copies of mixed precision (a weight's
    /// copy refreshed after each optimizer step, a GEMM's rounded input or output gradient),
    /// never a master copy: weights, gradients and optimizer state stay in [`Backend::Buf`].
    type Half: Send + 'static;
    /// u32 ids in device memory.
    type Ids: Send + 'static;

    /// "cpu" or "cuda".
    fn kind(&self) -> &'static str;
    /// A human name of the device (CPU model, GPU name).
    fn device_name(&self) -> String;
    /// (bytes in use by this backend's buffers, total device bytes); zeros when unknown.
    fn memory(&self) -> (u64, u64);
    /// The dtype the model's training GEMMs run in on this backend (chosen when it was made).
    fn compute_dtype(&self) -> Dtype;
    /// Waits for queued work (a no-op on the CPU); surfaces asynchronous device faults.
    fn synchronize(&self) -> Result<()>;

    // ---- memory ----
    /// A buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids>;
    /// Copies the whole buffer to `out` (`out.len()` must equal the buffer length).
    fn download(&self, buf: &Self::Buf, out: &mut [f32]) -> Result<()>;
    /// Overwrites the whole buffer from `host` (same length).
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// The buffer's values in place when they live in host memory (the CPU backend), so
    /// hashing, checkpoints and shm writes need no copy; `None` on a device.
    fn host_view<'a>(&self, _buf: &'a Self::Buf) -> Option<&'a [f32]> {
        None
    }
    fn ids_len(&self, ids: &Self::Ids) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// `dst[dst_off..dst_off+n] = src[src_off..src_off+n]`.
    fn copy_range(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        n: usize,
    ) -> Result<()>;
    /// `out = a + b` (the residual connection).
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// A bf16 buffer of `n` zeros.
    fn zeros_half(&self, n: usize) -> Result<Self::Half>;
    fn half_len(&self, h: &Self::Half) -> usize;
    /// `dst = bf16(src)`, round to nearest even (same length).
    fn to_half(&self, dst: &mut Self::Half, src: &Self::Buf) -> Result<()>;
    /// `y += x`.
    fn accumulate(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;

    // ---- ops (forward / backward pairs) ----
    /// out [Bt,C] = table [V,C] [ids [Bt]].
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        table: &Self::Buf,
        c: usize,
    ) -> Result<()>;
    /// dtable [V,C] += scatter(dout [Bt,C]) by ids.
    fn embedding_backward(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        c: usize,
    ) -> Result<()>;
    /// out [Bt,C] = inp * rstd * weight [C]; rstd [Bt].
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// dinp [Bt,C] +=, dweight [C] +=.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        c: usize,
    ) -> Result<()>;
    /// out [M,N] = inp [M,K] @ weight [N,K]^T.
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// dinp [M,K] += dout @ weight; dweight [N,K] += dout^T @ inp.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// [`Backend::matmul_forward`] on bf16 operands with f32 accumulation: out [M,N] (f32) =
    /// inp [M,K] @ weight [N,K]^T.
    fn matmul_forward_bf16(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Half,
        weight: &Self::Half,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// [`Backend::matmul_backward`] on bf16 operands: dinp [M,K] += dout @ weight and
    /// dweight [N,K] += dout^T @ inp, accumulated in f32 into the f32 gradients.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_bf16(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dout: &Self::Half,
        inp: &Self::Half,
        weight: &Self::Half,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// out [B,T,H,D] = rope(inp) at positions `pos_offset + t` (rotate-half, theta).
    #[allow(clippy::too_many_arguments)]
    fn rope_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()>;
    /// dinp += rope^T(dout).
    #[allow(clippy::too_many_arguments)]
    fn rope_backward(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()>;
    /// Causal GQA: out [B,T,H,D], lse [B,H,T] from q, k, v.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
    ) -> Result<()>;
    /// dq +=, dk +=, dv += from dout and the forward's inputs, out and lse.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        s: AttnShape,
    ) -> Result<()>;
    /// Generation attention over a KV cache (no lse, no backward): out [B,TQ,H,D] from
    /// q [B,TQ,H,D] and the caches [B,TMAX,KVH,D], whose rows `0..past+tq` are filled.
    fn attention_cached(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        s: CachedAttnShape,
    ) -> Result<()>;
    /// out = silu(gate) * up.
    fn swiglu_forward(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf) -> Result<()>;
    /// dgate +=, dup +=.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()>;
    /// Mean over rows of the masked-vocabulary cross-entropy of logits [Bt,Vp].
    fn cross_entropy_forward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ids,
        rows: usize,
        vp: usize,
        v_live: usize,
    ) -> Result<f32>;
    /// dlogits (WRITTEN) = (softmax - onehot) * dloss / rows on live columns, 0 elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        rows: usize,
        vp: usize,
        v_live: usize,
        dloss: f32,
    ) -> Result<()>;

    // ---- optimizer ----
    /// One AdamW step (`t` starts at 1); gradients are used as they are (scale them first).
    fn adamw_step(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        t: u64,
        hp: AdamW,
    ) -> Result<()>;
    /// [`Backend::adamw_step`] on `grads × grad_scale`, then `grads` zeroed: what a training
    /// step does after its backward passes. A backend may do it in one pass over memory.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step_zeroing(
        &self,
        params: &mut Self::Buf,
        grads: &mut Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        t: u64,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<()> {
        if grad_scale != 1.0 {
            self.scale(grads, grad_scale)?;
        }
        self.adamw_step(params, grads, m, v, t, hp)?;
        self.fill(grads, 0.0)
    }
    /// sqrt(sum of squares) over all the buffers.
    fn global_norm(&self, grads: &[&Self::Buf]) -> Result<f32>;

    // ---- serving (decode; see `serve.rs`) ----
    /// out [M,N] = inp [M,K] @ weight [N,K]^T for the few rows of a decode step. A row's
    /// result must not depend on the other rows, so a sequence decoded in a batch gets the
    /// bits it gets alone. Default: `matmul_forward`.
    fn matmul_decode(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.matmul_forward(out, inp, weight, m, k, n)
    }
    /// One decode step of attention for N sequences of ragged lengths: q_pre, out [N,H,D],
    /// k_pre, v [N,KVH,D]; sequence i's rows are rotated at its position, its key and value
    /// appended to its caches, and its output attends over its cache rows `0..=pos`. Default:
    /// the single-sequence ops in a loop.
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        q_pre: &Self::Buf,
        k_pre: &Self::Buf,
        v: &Self::Buf,
        seqs: &mut [DecodeCache<'_, Self::Buf>],
        s: DecodeAttnShape,
    ) -> Result<()> {
        serve::attention_decode_each(self, out, q_pre, k_pre, v, seqs, s)
    }
    /// `weight` [N,K] quantized to int8 per output channel. Default: not available.
    fn quantize_int8(
        &self,
        _weight: &Self::Buf,
        _n: usize,
        _k: usize,
    ) -> Result<Int8Weight<Self::Buf>> {
        Err(serve::no_int8("quantize_int8", self.kind()))
    }
    /// out [M,N] = inp [M,K] @ dequant(w)^T with the inputs quantized per row (int8 decode).
    /// Default: not available.
    fn matmul_int8(
        &self,
        _out: &mut Self::Buf,
        _inp: &Self::Buf,
        _w: &Int8Weight<Self::Buf>,
        _m: usize,
    ) -> Result<()> {
        Err(serve::no_int8("matmul_int8", self.kind()))
    }
}

/// Checks a buffer length against the length an op expects.
pub fn check_len(op: &'static str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(BackendError::Shape {
            op,
            detail: format!("{what} has {len} elements, expected {expected}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod replay_class_tests {
    use super::*;

    #[test]
    fn the_replay_class_names_version_device_instruction_set_and_dtype() {
        let f = replay_class("cpu", false, Dtype::F32);
        let b = replay_class("cpu", false, Dtype::Bf16);
        assert_ne!(f, b, "dtypes are different classes");
        assert!(f.starts_with(&format!(
            "neuroshard-engine {} cpu ",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(f.ends_with(" f32") && b.ends_with(" bf16"), "{f} / {b}");
        // The same machine and dtype: the same class, every time.
        assert_eq!(f, replay_class("cpu", false, Dtype::F32));
        let g = replay_class("NVIDIA H200", true, Dtype::Bf16);
        assert!(g.ends_with("NVIDIA H200 cuda bf16"), "{g}");
        assert_ne!(g, b);
    }
}
