//! Types of the serving ops at the end of the [`Backend`] trait (batched decode matmul and
//! attention, int8 weights), and their default implementations composed from the other ops,
//! which a backend without its own kernels (CUDA today) runs.

use super::{Backend, BackendError, CachedAttnShape, Result};

/// One sequence of a batched decode step: its KV caches of one layer, [TMAX, KVH, D] each,
/// rows `0..pos` filled, and `pos`, the position of its new token.
pub struct DecodeCache<'a, Buf> {
    pub k: &'a mut Buf,
    pub v: &'a mut Buf,
    pub pos: usize,
    /// Rows of the caches (TMAX).
    pub rows: usize,
}

/// Heads, kv heads, head dim and RoPE theta of a batched decode attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeAttnShape {
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    pub theta: f32,
}

/// A weight [N,K] quantized per output channel for int8 decode (see
/// `neuroshard_kernels::cpu::matmul_int8`): the int8 values travel in the backend's 32-bit
/// buffers, four to a word (`ceil(N*K/4)` words, row-major bytes), with one f32 scale and
/// one row sum per row.
pub struct Int8Weight<Buf> {
    pub q: Buf,
    pub scales: Buf,
    pub sums: Buf,
    pub n: usize,
    pub k: usize,
}

/// Default `attention_decode`: per sequence, RoPE of its rows, the cache append and cached
/// attention, with the single-sequence ops (what `attention_decode` does in one call).
pub(super) fn attention_decode_each<B: Backend + ?Sized>(
    be: &B,
    out: &mut B::Buf,
    q_pre: &B::Buf,
    k_pre: &B::Buf,
    v: &B::Buf,
    seqs: &mut [DecodeCache<'_, B::Buf>],
    s: DecodeAttnShape,
) -> Result<()> {
    let DecodeAttnShape { h, kvh, d, theta } = s;
    let (c, kv) = (h * d, kvh * d);
    let (mut q1p, mut q1, mut k1p, mut k1, mut o1) = (
        be.zeros(c)?,
        be.zeros(c)?,
        be.zeros(kv)?,
        be.zeros(kv)?,
        be.zeros(c)?,
    );
    for (i, sq) in seqs.iter_mut().enumerate() {
        if sq.pos >= sq.rows {
            return Err(BackendError::Shape {
                op: "attention_decode",
                detail: format!("position {} beyond cache of {} rows", sq.pos, sq.rows),
            });
        }
        be.copy_range(&mut q1p, 0, q_pre, i * c, c)?;
        be.rope_forward(&mut q1, &q1p, 1, 1, h, d, sq.pos, theta)?;
        be.copy_range(&mut k1p, 0, k_pre, i * kv, kv)?;
        be.rope_forward(&mut k1, &k1p, 1, 1, kvh, d, sq.pos, theta)?;
        be.copy_range(sq.k, sq.pos * kv, &k1, 0, kv)?;
        be.copy_range(sq.v, sq.pos * kv, v, i * kv, kv)?;
        let shape = CachedAttnShape {
            b: 1,
            tq: 1,
            past: sq.pos,
            tmax: sq.rows,
            h,
            kvh,
            d,
        };
        be.attention_cached(&mut o1, &q1, sq.k, sq.v, shape)?;
        be.copy_range(out, i * c, &o1, 0, c)?;
    }
    Ok(())
}

/// The error of a backend without int8 kernels.
pub(super) fn no_int8(op: &'static str, kind: &str) -> BackendError {
    BackendError::Shape {
        op,
        detail: format!("int8 weights are not implemented on the {kind} backend (use f32)"),
    }
}
