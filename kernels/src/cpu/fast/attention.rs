//! Fast causal GQA attention, tiled (flash style): parallel over (batch, head) in forward
//! and over (batch, kv head) in backward (so each task owns the dk/dv rows of its kv head).
//! Each task walks query tiles of `TQ` rows; per tile the scores against the causal key
//! prefix (at most `TQ x T`) live in per-task scratch, the products (Q K^T, P V, and in
//! backward dO V^T, P^T dO, dS^T Q, dS K) run through single-threaded `gemm` calls with
//! strides straight on the [B,T,H,D] layout, and softmax uses a vectorized `exp`. No T x T
//! matrix is ever built.

use rayon::prelude::*;

use super::matmul::gemm_raw;
use super::simd::{SyncPtr, dot, exp, exp_in_place_sum, max as simd_max, multiversion};
use crate::cpu::attention::check_shapes;

/// Query rows per tile.
const TQ: usize = 64;

#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
}

impl Dims {
    /// Offset of q/out/dq/dout[b, i, hi, 0].
    fn q_at(&self, bi: usize, i: usize, hi: usize) -> usize {
        ((bi * self.t + i) * self.h + hi) * self.d
    }
    /// Offset of k/v/dk/dv[b, j, g, 0].
    fn kv_at(&self, bi: usize, j: usize, g: usize) -> usize {
        ((bi * self.t + j) * self.kvh + g) * self.d
    }
}

/// out [B,T,H,D] and lse [B,H,T] from q [B,T,H,D], k, v [B,T,KVH,D] (overwrites both).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
) {
    check_shapes(
        q.len(),
        k.len(),
        v.len(),
        out.len(),
        lse.len(),
        b,
        t,
        h,
        kvh,
        d,
    );
    if t == 0 {
        return;
    }
    let outp = SyncPtr(out.as_mut_ptr());
    let dims = Dims { t, h, kvh, d };
    lse.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0.0f32; TQ.min(t) * t],
        |scores, (bh, lse_row)| {
            let (bi, hi) = (bh / h, bh % h);
            let (qs, qrs) = (dims.q_at(bi, 0, hi), h * d);
            let g = hi / (h / kvh);
            let (ks, krs) = (dims.kv_at(bi, 0, g), kvh * d);
            for i0 in (0..t).step_by(TQ) {
                let rows = TQ.min(t - i0);
                let nk = i0 + rows;
                let s = &mut scores[..rows * nk];
                // SAFETY: q rows i0..i0+rows of head hi and k rows 0..nk of kv head g are in
                // bounds (check_shapes); s is this task's scratch.
                unsafe {
                    gemm_raw(
                        rows,
                        nk,
                        d,
                        s.as_mut_ptr(),
                        nk,
                        false,
                        q.as_ptr().add(qs + i0 * qrs),
                        qrs,
                        1,
                        k.as_ptr().add(ks),
                        1,
                        krs,
                        false,
                    )
                };
                softmax_rows(
                    s,
                    &mut lse_row[i0..i0 + rows],
                    i0,
                    nk,
                    1.0 / (d as f32).sqrt(),
                );
                // SAFETY: out[b, i0..i0+rows, hi, :] belongs to this (b, h) task only (tasks
                // write disjoint heads); v rows 0..nk are in bounds.
                unsafe {
                    gemm_raw(
                        rows,
                        d,
                        nk,
                        outp.at(qs + i0 * qrs),
                        qrs,
                        false,
                        s.as_ptr(),
                        nk,
                        1,
                        v.as_ptr().add(ks),
                        krs,
                        1,
                        false,
                    )
                };
            }
        },
    );
}

multiversion! {
    /// Scores tile [rows, nk] for query rows i0.. -> probabilities in place (causal: column
    /// j > i gets 0), and lse per row.
    fn softmax_rows(s: &mut [f32], lse: &mut [f32], i0: usize, nk: usize, scale: f32) {
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            let (live, masked) = row.split_at_mut(i0 + r + 1);
            // Scores are scaled inside exp: max(scale * s) = scale * max(s) as scale > 0.
            let max = scale * simd_max(live);
            let sum = exp_in_place_sum(live, scale, max);
            lse[r] = max + sum.ln();
            let inv = 1.0 / sum;
            for x in live.iter_mut() {
                *x *= inv;
            }
            masked.fill(0.0);
        }
    }
}

/// dq [B,T,H,D] +=, dk, dv [B,T,KVH,D] += from dout, using the forward's inputs, out, lse.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
) {
    check_shapes(
        q.len(),
        k.len(),
        v.len(),
        out.len(),
        lse.len(),
        b,
        t,
        h,
        kvh,
        d,
    );
    assert_eq!(dq.len(), q.len(), "attention: dq is not [B, T, H, D]");
    assert_eq!(dout.len(), q.len(), "attention: dout is not [B, T, H, D]");
    assert_eq!(dk.len(), k.len(), "attention: dk is not [B, T, KVH, D]");
    assert_eq!(dv.len(), v.len(), "attention: dv is not [B, T, KVH, D]");
    if t == 0 {
        return;
    }
    let (dqp, dkp, dvp) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let dims = Dims { t, h, kvh, d };
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    (0..b * kvh).into_par_iter().for_each_init(
        || vec![0.0f32; 2 * TQ.min(t) * t],
        |scratch, bg| {
            // Task (b, g) writes only dq[b, :, hi, :] for the query heads hi of kv group g
            // and dk/dv[b, :, g, :]: disjoint across tasks.
            let (bi, g) = (bg / kvh, bg % kvh);
            let (ks, krs) = (dims.kv_at(bi, 0, g), kvh * d);
            let qrs = h * d;
            for hi in g * group..(g + 1) * group {
                let qs = dims.q_at(bi, 0, hi);
                for i0 in (0..t).step_by(TQ) {
                    let rows = TQ.min(t - i0);
                    let nk = i0 + rows;
                    let (p, ds) = scratch.split_at_mut(TQ.min(t) * t);
                    let (p, ds) = (&mut p[..rows * nk], &mut ds[..rows * nk]);
                    let qt = qs + i0 * qrs;
                    // SAFETY (all gemm calls below): every strided range is in bounds by
                    // check_shapes; p and ds are this task's scratch; dq rows of head hi and
                    // dk/dv rows of kv head g are written by this task only.
                    unsafe {
                        // S = Q_t K^T, dP = dO_t V^T.
                        gemm_raw(
                            rows,
                            nk,
                            d,
                            p.as_mut_ptr(),
                            nk,
                            false,
                            q.as_ptr().add(qt),
                            qrs,
                            1,
                            k.as_ptr().add(ks),
                            1,
                            krs,
                            false,
                        );
                        gemm_raw(
                            rows,
                            nk,
                            d,
                            ds.as_mut_ptr(),
                            nk,
                            false,
                            dout.as_ptr().add(qt),
                            qrs,
                            1,
                            v.as_ptr().add(ks),
                            1,
                            krs,
                            false,
                        );
                    }
                    let lse_t = &lse[(bi * h + hi) * t + i0..(bi * h + hi) * t + i0 + rows];
                    let inp = [dout, out];
                    backward_probs(p, ds, lse_t, inp, (qt, qrs), i0, nk, d, scale);
                    unsafe {
                        // dV += P^T dO_t, dK += dS^T Q_t, dQ_t += dS K.
                        gemm_raw(
                            nk,
                            d,
                            rows,
                            dvp.at(ks),
                            krs,
                            true,
                            p.as_ptr(),
                            1,
                            nk,
                            dout.as_ptr().add(qt),
                            qrs,
                            1,
                            false,
                        );
                        gemm_raw(
                            nk,
                            d,
                            rows,
                            dkp.at(ks),
                            krs,
                            true,
                            ds.as_ptr(),
                            1,
                            nk,
                            q.as_ptr().add(qt),
                            qrs,
                            1,
                            false,
                        );
                        gemm_raw(
                            rows,
                            d,
                            nk,
                            dqp.at(qt),
                            qrs,
                            true,
                            ds.as_ptr(),
                            nk,
                            1,
                            k.as_ptr().add(ks),
                            krs,
                            1,
                            false,
                        );
                    }
                }
            }
        },
    );
}

multiversion! {
    /// Turns the score tile p (= Q K^T) into probabilities `exp(s*scale - lse)` (0 above the
    /// diagonal) and ds (= dO V^T) into `p * (dP - D_i) * scale`, `D_i = dO_i . O_i`.
    #[allow(clippy::too_many_arguments)]
    fn backward_probs(
        p: &mut [f32],
        ds: &mut [f32],
        lse: &[f32],
        inp: [&[f32]; 2],
        q_rows: (usize, usize),
        i0: usize,
        nk: usize,
        d: usize,
        scale: f32,
    ) {
        let [dout, out] = inp;
        let (qt, qrs) = q_rows;
        for (r, (prow, dsrow)) in p.chunks_exact_mut(nk).zip(ds.chunks_exact_mut(nk)).enumerate() {
            let o = qt + r * qrs;
            let di = dot(&dout[o..o + d], &out[o..o + d]);
            let l = lse[r];
            let live = i0 + r + 1;
            for (x, y) in prow[..live].iter_mut().zip(&mut dsrow[..live]) {
                *x = exp(*x * scale - l);
                *y = *x * (*y - di) * scale;
            }
            prow[live..].fill(0.0);
            dsrow[live..].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention as reference;
    use crate::cpu::testutil::*;

    const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
        (1, 1, 2, 1, 6),
        (2, 17, 4, 2, 6),
        (1, 17, 3, 3, 8),
        (3, 5, 6, 2, 5),
        (1, 33, 8, 2, 32),
        (2, 64, 4, 1, 16),
        (1, 150, 4, 2, 8),
    ];

    #[test]
    fn forward_and_backward_match_reference() {
        for (seed, &(b, t, h, kvh, d)) in SHAPES.iter().enumerate() {
            let mut r = rng(300 + seed as u64);
            let q = rand_vec(&mut r, b * t * h * d, 2.0);
            let k = rand_vec(&mut r, b * t * kvh * d, 2.0);
            let v = rand_vec(&mut r, b * t * kvh * d, 1.0);
            let dout = rand_vec(&mut r, q.len(), 1.0);
            let (mut out_r, mut lse_r) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
            reference::attention_forward(&mut out_r, &mut lse_r, &q, &k, &v, b, t, h, kvh, d);
            let (mut out, mut lse) = (vec![f32::NAN; q.len()], vec![f32::NAN; b * h * t]);
            attention_forward(&mut out, &mut lse, &q, &k, &v, b, t, h, kvh, d);
            assert_close("out", &out, &out_r, 1e-4, 1e-5);
            assert_close("lse", &lse, &lse_r, 1e-5, 1e-5);

            let dq0 = rand_vec(&mut r, q.len(), 1.0);
            let dk0 = rand_vec(&mut r, k.len(), 1.0);
            let dv0 = rand_vec(&mut r, v.len(), 1.0);
            let (mut dq_r, mut dk_r, mut dv_r) = (dq0.clone(), dk0.clone(), dv0.clone());
            reference::attention_backward(
                &mut dq_r, &mut dk_r, &mut dv_r, &dout, &q, &k, &v, &out_r, &lse_r, b, t, h, kvh, d,
            );
            let (mut dq, mut dk, mut dv) = (dq0, dk0, dv0);
            attention_backward(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, b, t, h, kvh, d,
            );
            assert_close("dq", &dq, &dq_r, 1e-3, 1e-4);
            assert_close("dk", &dk, &dk_r, 1e-3, 1e-4);
            assert_close("dv", &dv, &dv_r, 1e-3, 1e-4);
        }
    }
}
