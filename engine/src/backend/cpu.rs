//! The CPU backend: buffers are `Vec<f32>` / `Vec<u32>` and every op calls the fast path of
//! `neuroshard_kernels::cpu::fast` (parallel over the current rayon pool). Lengths are checked
//! here first, so a shape mistake is an error, not a kernel assertion.

use neuroshard_kernels::cpu::fast as k;
use rayon::prelude::*;

use half::bf16;

use super::{
    AdamW, AttnShape, Backend, BackendError, CachedAttnShape, DecodeAttnShape, DecodeCache, Dtype,
    Int8Weight, Result, check_len,
};

/// Elementwise loops split into chunks of this many floats across the pool.
const PAR_CHUNK: usize = 1 << 14;

/// The CPU backend, with the dtype its training GEMMs run in.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    dtype: Dtype,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    /// An f32 backend.
    pub fn new() -> CpuBackend {
        CpuBackend { dtype: Dtype::F32 }
    }

    /// A backend whose training GEMMs run in `dtype`. bf16 on a CPU without AVX512-BF16 is
    /// correct but slow (operands widened to f32): callers pick it through
    /// [`CpuBackend::native_bf16`].
    pub fn with_dtype(dtype: Dtype) -> CpuBackend {
        CpuBackend { dtype }
    }

    /// Whether this CPU has native bf16 arithmetic (AVX512-BF16 `vdpbf16ps`), checked at run
    /// time.
    pub fn native_bf16() -> bool {
        k::native_bf16()
    }
}

fn kernel(op: &'static str) -> impl FnOnce(neuroshard_kernels::KernelError) -> BackendError {
    move |source| BackendError::Kernel { op, source }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "cpu".to_string())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Half = Vec<bf16>;

    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn compute_dtype(&self) -> Dtype {
        self.dtype
    }

    fn device_name(&self) -> String {
        format!("{} ({} threads)", cpu_name(), rayon::current_num_threads())
    }

    /// (resident set of this process, physical memory), from /proc; zeros where unreadable.
    fn memory(&self) -> (u64, u64) {
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u64>().ok())
            })
            .map(|pages| pages * 4096)
            .unwrap_or(0);
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|kb| kb.parse::<u64>().ok())
                    })
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        (rss, total)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        check_len("download", "out", out.len(), buf.len())?;
        out.copy_from_slice(buf);
        Ok(())
    }

    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        check_len("write", "host", host.len(), buf.len())?;
        buf.copy_from_slice(host);
        Ok(())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn host_view<'a>(&self, buf: &'a Vec<f32>) -> Option<&'a [f32]> {
        Some(buf)
    }

    fn ids_len(&self, ids: &Vec<u32>) -> usize {
        ids.len()
    }

    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        buf.par_chunks_mut(PAR_CHUNK).for_each(|c| c.fill(value));
        Ok(())
    }

    fn copy_range(
        &self,
        dst: &mut Vec<f32>,
        dst_off: usize,
        src: &Vec<f32>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        if dst_off.checked_add(n).is_none_or(|e| e > dst.len())
            || src_off.checked_add(n).is_none_or(|e| e > src.len())
        {
            return Err(BackendError::Shape {
                op: "copy_range",
                detail: format!(
                    "range dst {dst_off}+{n} of {} or src {src_off}+{n} of {} out of bounds",
                    dst.len(),
                    src.len()
                ),
            });
        }
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
        Ok(())
    }

    fn add(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> Result<()> {
        check_len("add", "a", a.len(), out.len())?;
        check_len("add", "b", b.len(), out.len())?;
        out.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = a + b;
                }
            });
        Ok(())
    }

    fn zeros_half(&self, n: usize) -> Result<Vec<bf16>> {
        Ok(vec![bf16::ZERO; n])
    }

    fn half_len(&self, h: &Vec<bf16>) -> usize {
        h.len()
    }

    fn to_half(&self, dst: &mut Vec<bf16>, src: &Vec<f32>) -> Result<()> {
        check_len("to_half", "src", src.len(), dst.len())?;
        k::to_bf16(dst, src);
        Ok(())
    }

    fn accumulate(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        check_len("accumulate", "x", x.len(), y.len())?;
        y.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y += x;
                }
            });
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        x.par_chunks_mut(PAR_CHUNK)
            .for_each(|c| k::scale_in_place(c, s));
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_forward";
        check_len(OP, "out", out.len(), ids.len() * c)?;
        if c == 0 || !table.len().is_multiple_of(c) {
            return Err(BackendError::Shape {
                op: OP,
                detail: format!("table of {} is not [V, {c}]", table.len()),
            });
        }
        k::embedding_forward(out, ids, table, c).map_err(kernel(OP))
    }

    fn embedding_backward(
        &self,
        dtable: &mut Vec<f32>,
        dout: &Vec<f32>,
        ids: &Vec<u32>,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        check_len(OP, "dout", dout.len(), ids.len() * c)?;
        if c == 0 || !dtable.len().is_multiple_of(c) {
            return Err(BackendError::Shape {
                op: OP,
                detail: format!("dtable of {} is not [V, {c}]", dtable.len()),
            });
        }
        k::embedding_backward(dtable, dout, ids, c).map_err(kernel(OP))
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_forward";
        check_len(OP, "out", out.len(), rows * c)?;
        check_len(OP, "inp", inp.len(), rows * c)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        check_len(OP, "weight", weight.len(), c)?;
        k::rmsnorm_forward(out, rstd, inp, weight, rows, c, eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_backward";
        for (what, len) in [
            ("dinp", dinp.len()),
            ("dout", dout.len()),
            ("inp", inp.len()),
        ] {
            check_len(OP, what, len, rows * c)?;
        }
        check_len(OP, "dweight", dweight.len(), c)?;
        check_len(OP, "weight", weight.len(), c)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        k::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, rows, c);
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        m: usize,
        kk: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_forward";
        check_len(OP, "out", out.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * kk)?;
        check_len(OP, "weight", weight.len(), n * kk)?;
        k::matmul_forward(out, inp, weight, m, kk, n);
        Ok(())
    }

    fn matmul_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        m: usize,
        kk: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_backward";
        check_len(OP, "dout", dout.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * kk)?;
        check_len(OP, "dinp", dinp.len(), m * kk)?;
        check_len(OP, "weight", weight.len(), n * kk)?;
        check_len(OP, "dweight", dweight.len(), n * kk)?;
        k::matmul_backward(dinp, dweight, dout, inp, weight, m, kk, n);
        Ok(())
    }

    fn matmul_forward_bf16(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<bf16>,
        weight: &Vec<bf16>,
        m: usize,
        kk: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_forward_bf16";
        check_len(OP, "out", out.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * kk)?;
        check_len(OP, "weight", weight.len(), n * kk)?;
        k::matmul_bf16_forward(out, inp, weight, m, kk, n);
        Ok(())
    }

    fn matmul_backward_bf16(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dout: &Vec<bf16>,
        inp: &Vec<bf16>,
        weight: &Vec<bf16>,
        m: usize,
        kk: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_backward_bf16";
        check_len(OP, "dout", dout.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * kk)?;
        check_len(OP, "dinp", dinp.len(), m * kk)?;
        check_len(OP, "weight", weight.len(), n * kk)?;
        check_len(OP, "dweight", dweight.len(), n * kk)?;
        k::matmul_bf16_backward(dinp, dweight, dout, inp, weight, m, kk, n);
        Ok(())
    }

    fn rope_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_forward";
        check_rope(OP, out.len(), inp.len(), b, t, h, d)?;
        k::rope_forward(out, inp, b, t, h, d, pos_offset, theta);
        Ok(())
    }

    fn rope_backward(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_backward";
        check_rope(OP, dinp.len(), dout.len(), b, t, h, d)?;
        k::rope_backward(dinp, dout, b, t, h, d, pos_offset, theta);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        kk: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        check_attn(OP, s, q.len(), kk.len(), v.len(), out.len(), lse.len())?;
        k::attention_forward(out, lse, q, kk, v, s.b, s.t, s.h, s.kvh, s.d);
        Ok(())
    }

    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        kk: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        s: AttnShape,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        check_attn(OP, s, q.len(), kk.len(), v.len(), out.len(), lse.len())?;
        check_attn(OP, s, dq.len(), dk.len(), dv.len(), dout.len(), lse.len())?;
        k::attention_backward(
            dq, dk, dv, dout, q, kk, v, out, lse, s.b, s.t, s.h, s.kvh, s.d,
        );
        Ok(())
    }

    fn attention_cached(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        s: CachedAttnShape,
    ) -> Result<()> {
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
        if kvh == 0 || h % kvh != 0 || d == 0 || past + tq > tmax {
            return Err(BackendError::Shape {
                op: OP,
                detail: format!("heads {h}/{kvh}, d {d}, positions {past}+{tq} > cache {tmax}"),
            });
        }
        check_len(OP, "q", q.len(), b * tq * h * d)?;
        check_len(OP, "out", out.len(), b * tq * h * d)?;
        check_len(OP, "k_cache", k_cache.len(), b * tmax * kvh * d)?;
        check_len(OP, "v_cache", v_cache.len(), b * tmax * kvh * d)?;
        k::attention_cached_forward(out, q, k_cache, v_cache, b, tq, past, tmax, h, kvh, d);
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>) -> Result<()> {
        const OP: &str = "swiglu_forward";
        check_len(OP, "gate", gate.len(), out.len())?;
        check_len(OP, "up", up.len(), out.len())?;
        out.par_chunks_mut(PAR_CHUNK)
            .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (g, u))| k::swiglu_forward(o, g, u));
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
    ) -> Result<()> {
        const OP: &str = "swiglu_backward";
        let n = dout.len();
        for (what, len) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ] {
            check_len(OP, what, len, n)?;
        }
        dgate
            .par_chunks_mut(PAR_CHUNK)
            .zip(dup.par_chunks_mut(PAR_CHUNK))
            .zip(
                dout.par_chunks(PAR_CHUNK)
                    .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK))),
            )
            .for_each(|((dg, du), (d, (g, u)))| k::swiglu_backward(dg, du, d, g, u));
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        rows: usize,
        vp: usize,
        v_live: usize,
    ) -> Result<f32> {
        const OP: &str = "cross_entropy_forward";
        check_ce(OP, logits.len(), targets.len(), rows, vp, v_live)?;
        k::cross_entropy_forward(logits, targets, rows, vp, v_live).map_err(kernel(OP))
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        rows: usize,
        vp: usize,
        v_live: usize,
        dloss: f32,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_backward";
        check_ce(OP, logits.len(), targets.len(), rows, vp, v_live)?;
        check_len(OP, "dlogits", dlogits.len(), rows * vp)?;
        k::cross_entropy_backward(dlogits, logits, targets, rows, vp, v_live, dloss)
            .map_err(kernel(OP))
    }

    fn adamw_step(
        &self,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        t: u64,
        hp: AdamW,
    ) -> Result<()> {
        check_adamw(
            "adamw_step",
            [params.len(), grads.len(), m.len(), v.len()],
            t,
        )?;
        params
            .par_chunks_mut(PAR_CHUNK)
            .zip(grads.par_chunks(PAR_CHUNK))
            .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
            .for_each(|((p, g), (m, v))| {
                k::adamw_step(
                    p,
                    g,
                    m,
                    v,
                    t,
                    hp.lr,
                    hp.beta1,
                    hp.beta2,
                    hp.eps,
                    hp.weight_decay,
                )
            });
        Ok(())
    }

    fn adamw_step_zeroing(
        &self,
        params: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        t: u64,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<()> {
        check_adamw(
            "adamw_step_zeroing",
            [params.len(), grads.len(), m.len(), v.len()],
            t,
        )?;
        k::adamw_step_zeroing(
            params,
            grads,
            m,
            v,
            t,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            grad_scale,
        );
        Ok(())
    }

    fn global_norm(&self, grads: &[&Vec<f32>]) -> Result<f32> {
        let slices: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        Ok(k::global_norm(&slices))
    }

    fn matmul_decode(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        m: usize,
        kk: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_decode";
        check_len(OP, "out", out.len(), m * n)?;
        check_len(OP, "inp", inp.len(), m * kk)?;
        check_len(OP, "weight", weight.len(), n * kk)?;
        k::matmul_rows_forward(out, inp, weight, m, kk, n);
        Ok(())
    }

    fn attention_decode(
        &self,
        out: &mut Vec<f32>,
        q_pre: &Vec<f32>,
        k_pre: &Vec<f32>,
        v: &Vec<f32>,
        seqs: &mut [DecodeCache<'_, Vec<f32>>],
        s: DecodeAttnShape,
    ) -> Result<()> {
        super::cpu_serve::attention_decode(out, q_pre, k_pre, v, seqs, s)
    }

    fn quantize_int8(
        &self,
        weight: &Vec<f32>,
        n: usize,
        kk: usize,
    ) -> Result<Int8Weight<Vec<f32>>> {
        check_len("quantize_int8", "weight", weight.len(), n * kk)?;
        Ok(super::cpu_serve::quantize_int8(weight, n, kk))
    }

    fn matmul_int8(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        w: &Int8Weight<Vec<f32>>,
        m: usize,
    ) -> Result<()> {
        super::cpu_serve::matmul_int8(out, inp, w, m)
    }
}

fn check_rope(
    op: &'static str,
    a: usize,
    b_len: usize,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> Result<()> {
    if !d.is_multiple_of(2) {
        return Err(BackendError::Shape {
            op,
            detail: format!("head dim {d} must be even"),
        });
    }
    check_len(op, "out", a, b * t * h * d)?;
    check_len(op, "inp", b_len, b * t * h * d)
}

fn check_attn(
    op: &'static str,
    s: AttnShape,
    q: usize,
    kk: usize,
    v: usize,
    out: usize,
    lse: usize,
) -> Result<()> {
    if s.kvh == 0 || !s.h.is_multiple_of(s.kvh) || s.d == 0 {
        return Err(BackendError::Shape {
            op,
            detail: format!("heads {} not a multiple of kv heads {}", s.h, s.kvh),
        });
    }
    let qn = s.b * s.t * s.h * s.d;
    let kn = s.b * s.t * s.kvh * s.d;
    check_len(op, "q", q, qn)?;
    check_len(op, "out", out, qn)?;
    check_len(op, "k", kk, kn)?;
    check_len(op, "v", v, kn)?;
    check_len(op, "lse", lse, s.b * s.h * s.t)
}

/// params, grads, m and v (`lens`) of one length, and the step `t` from 1.
fn check_adamw(op: &'static str, lens: [usize; 4], t: u64) -> Result<()> {
    for (what, len) in ["grads", "m", "v"].into_iter().zip(&lens[1..]) {
        check_len(op, what, *len, lens[0])?;
    }
    if t == 0 {
        return Err(BackendError::Shape {
            op,
            detail: "step t starts at 1".into(),
        });
    }
    Ok(())
}

fn check_ce(
    op: &'static str,
    logits: usize,
    targets: usize,
    rows: usize,
    vp: usize,
    v_live: usize,
) -> Result<()> {
    if v_live == 0 || v_live > vp {
        return Err(BackendError::Shape {
            op,
            detail: format!("live vocabulary {v_live} not in 1..={vp}"),
        });
    }
    check_len(op, "logits", logits, rows * vp)?;
    check_len(op, "targets", targets, rows)
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
