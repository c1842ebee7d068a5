//! The CPU backend's serving ops (batched decode attention, int8 weights): checks, then the
//! fast kernels of `neuroshard_kernels::cpu::fast`.

use neuroshard_kernels::cpu::fast as k;

use super::{BackendError, DecodeAttnShape, DecodeCache, Int8Weight, Result, check_len};

pub(super) fn attention_decode(
    out: &mut [f32],
    q_pre: &[f32],
    k_pre: &[f32],
    v: &[f32],
    seqs: &mut [DecodeCache<'_, Vec<f32>>],
    s: DecodeAttnShape,
) -> Result<()> {
    const OP: &str = "attention_decode";
    let DecodeAttnShape { h, kvh, d, theta } = s;
    if kvh == 0 || h % kvh != 0 || d == 0 || d % 2 != 0 {
        return Err(BackendError::Shape {
            op: OP,
            detail: format!("heads {h}/{kvh}, head dim {d}"),
        });
    }
    let n = seqs.len();
    check_len(OP, "out", out.len(), n * h * d)?;
    check_len(OP, "q", q_pre.len(), n * h * d)?;
    check_len(OP, "k", k_pre.len(), n * kvh * d)?;
    check_len(OP, "v", v.len(), n * kvh * d)?;
    let kv = kvh * d;
    let mut ks = Vec::with_capacity(n);
    for sq in seqs.iter_mut() {
        check_len(OP, "k_cache", sq.k.len(), sq.rows * kv)?;
        check_len(OP, "v_cache", sq.v.len(), sq.rows * kv)?;
        if sq.pos >= sq.rows {
            return Err(BackendError::Shape {
                op: OP,
                detail: format!("position {} beyond cache of {} rows", sq.pos, sq.rows),
            });
        }
        ks.push(k::DecodeSeq {
            k_cache: sq.k.as_mut_slice(),
            v_cache: sq.v.as_mut_slice(),
            pos: sq.pos,
        });
    }
    k::attention_decode_forward(out, q_pre, k_pre, v, &mut ks, h, kvh, d, theta);
    Ok(())
}

/// Quantizes on the host and packs the int8 values four to a word.
pub(super) fn quantize_int8(weight: &[f32], n: usize, kk: usize) -> Int8Weight<Vec<f32>> {
    let (q, scales, sums) = k::quantize_rows_int8(weight, n, kk);
    let mut packed = vec![0.0f32; (n * kk).div_ceil(4)];
    bytemuck::cast_slice_mut::<f32, i8>(&mut packed)[..n * kk].copy_from_slice(&q);
    Int8Weight {
        q: packed,
        scales,
        sums,
        n,
        k: kk,
    }
}

pub(super) fn matmul_int8(
    out: &mut [f32],
    inp: &[f32],
    w: &Int8Weight<Vec<f32>>,
    m: usize,
) -> Result<()> {
    const OP: &str = "matmul_int8";
    let (n, kk) = (w.n, w.k);
    check_len(OP, "out", out.len(), m * n)?;
    check_len(OP, "inp", inp.len(), m * kk)?;
    check_len(OP, "weight", w.q.len(), (n * kk).div_ceil(4))?;
    check_len(OP, "scales", w.scales.len(), n)?;
    check_len(OP, "sums", w.sums.len(), n)?;
    let q = &bytemuck::cast_slice::<f32, i8>(&w.q)[..n * kk];
    k::matmul_int8_forward(out, inp, q, &w.scales, &w.sums, m, kk, n);
    Ok(())
}
