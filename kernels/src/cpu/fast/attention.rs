//! Fast causal GQA attention, tiled (flash style), parallel over (batch, kv head): each task
//! owns the query heads of one kv group, so it alone writes their out/lse/dq rows and the
//! dk/dv rows of its kv head. A task walks query tiles of `TQ` positions; the group's query
//! rows of a tile (G heads x TQ positions, G = H/KVH) are gathered into one contiguous
//! block so that each product is a single `gemm` call sharing the K/V panel: S = Q K^T and
//! O = P V in forward; S, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ = dS K in backward.
//! Scores against the causal key prefix (at most G*TQ x T) live in per-task scratch, never
//! a T x T matrix; softmax uses a vectorized `exp`.

use rayon::prelude::*;

use super::matmul::gemm_raw;
use super::simd::{
    SyncPtr, dot, exp, exp_in_place_sum, max as simd_max, multiversion, with_scratch,
};
use crate::cpu::attention::{check_grad_shapes, check_shapes};

/// Query positions per tile.
const TQ: usize = 32;

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
    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.h / self.kvh
    }
}

/// A strided matrix operand: element (r, c) at `p + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View {
    p: *const f32,
    rs: usize,
    cs: usize,
}

fn view(x: &[f32], offset: usize, rs: usize, cs: usize) -> View {
    View {
        p: x[offset..].as_ptr(),
        rs,
        cs,
    }
}

/// `dst[m,n] (row stride dst_rs) = (acc ? dst : 0) + a[m,k] @ b[k,n]`, single-threaded.
///
/// # Safety
/// As `gemm_raw`: every addressed element in bounds, dst exclusively owned by the caller.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    a: View,
    b: View,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm_raw(
            m, n, k, dst, dst_rs, acc, a.p, a.rs, a.cs, b.p, b.rs, b.cs, false,
        )
    }
}

/// Copies the rows [b, i0..i0+rows, heads of group g, :] of x into `buf` as a contiguous
/// [G*rows, D] block, head-major (row hh*rows + r is head g*G+hh at position i0+r).
fn gather(buf: &mut [f32], x: &[f32], dims: Dims, bi: usize, g: usize, i0: usize, rows: usize) {
    let (d, group) = (dims.d, dims.group());
    for hh in 0..group {
        for r in 0..rows {
            let src = dims.q_at(bi, i0 + r, g * group + hh);
            let dst = (hh * rows + r) * d;
            buf[dst..dst + d].copy_from_slice(&x[src..src + d]);
        }
    }
}

/// Per-task scratch views, sized for the largest tile, carved from the thread's scratch.
struct Scratch<'a> {
    a: &'a mut [f32],
    b: &'a mut [f32],
    qt: &'a mut [f32],
    dot: &'a mut [f32],
    dqt: &'a mut [f32],
}

impl Scratch<'_> {
    fn len(dims: Dims) -> usize {
        let m = dims.group() * TQ.min(dims.t);
        2 * m * dims.t + 3 * m * dims.d
    }

    fn carve(buf: &mut [f32], dims: Dims) -> Scratch<'_> {
        let m = dims.group() * TQ.min(dims.t);
        let (a, rest) = buf.split_at_mut(m * dims.t);
        let (b, rest) = rest.split_at_mut(m * dims.t);
        let (qt, rest) = rest.split_at_mut(m * dims.d);
        let (dot, dqt) = rest.split_at_mut(m * dims.d);
        Scratch { a, b, qt, dot, dqt }
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
    let group = dims.group();
    let scale = 1.0 / (d as f32).sqrt();
    // lse [B,H,T]: the rows of the heads of group g in batch b are contiguous.
    lse.par_chunks_mut(group * t)
        .enumerate()
        .for_each(|(bg, lse_group)| {
            with_scratch(Scratch::len(dims), |buf| {
                let sc = &mut Scratch::carve(buf, dims);
                let (bi, g) = (bg / kvh, bg % kvh);
                let ks = dims.kv_at(bi, 0, g);
                let (kt, vv) = (view(k, ks, 1, kvh * d), view(v, ks, kvh * d, 1));
                for i0 in (0..t).step_by(TQ) {
                    let rows = TQ.min(t - i0);
                    let (m, nk) = (group * rows, i0 + rows);
                    gather(sc.qt, q, dims, bi, g, i0, rows);
                    let s = &mut sc.a[..m * nk];
                    // SAFETY: scratch is this task's; K rows 0..nk of kv head g in bounds.
                    unsafe {
                        mm(
                            m,
                            nk,
                            d,
                            s.as_mut_ptr(),
                            nk,
                            false,
                            view(sc.qt, 0, d, 1),
                            kt,
                        )
                    };
                    for (hh, s_head) in s.chunks_exact_mut(rows * nk).enumerate() {
                        let l = &mut lse_group[hh * t + i0..hh * t + i0 + rows];
                        softmax_rows(s_head, l, i0, nk, scale);
                    }
                    let o = &mut sc.dqt[..m * d];
                    // SAFETY: as above; V rows 0..nk in bounds.
                    unsafe { mm(m, d, nk, o.as_mut_ptr(), d, false, view(s, 0, nk, 1), vv) };
                    for hh in 0..group {
                        for r in 0..rows {
                            let dst = dims.q_at(bi, i0 + r, g * group + hh);
                            // SAFETY: out rows of the heads of group g in batch b belong to
                            // this task only; in bounds by check_shapes.
                            let dst = unsafe { std::slice::from_raw_parts_mut(outp.at(dst), d) };
                            let src = (hh * rows + r) * d;
                            dst.copy_from_slice(&o[src..src + d]);
                        }
                    }
                }
            })
        });
}

multiversion! {
    /// Scores tile [rows, nk] for query positions i0.. -> probabilities in place (causal:
    /// column j > i gets 0), and lse per row.
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
    check_grad_shapes(dq.len(), dk.len(), dv.len(), dout.len(), q.len(), k.len());
    if t == 0 {
        return;
    }
    let (dqp, dkp, dvp) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let dims = Dims { t, h, kvh, d };
    let group = dims.group();
    let scale = 1.0 / (d as f32).sqrt();
    (0..b * kvh).into_par_iter().for_each(|bg| {
        with_scratch(Scratch::len(dims), |buf| {
            let sc = &mut Scratch::carve(buf, dims);
            // Task (b, g) writes only dq rows of the heads of group g in batch b and the
            // dk/dv rows of kv head g in batch b: disjoint across tasks.
            let (bi, g) = (bg / kvh, bg % kvh);
            let ks = dims.kv_at(bi, 0, g);
            let krs = kvh * d;
            let (kt, vt) = (view(k, ks, 1, krs), view(v, ks, 1, krs));
            for i0 in (0..t).step_by(TQ) {
                let rows = TQ.min(t - i0);
                let (m, nk) = (group * rows, i0 + rows);
                gather(sc.qt, q, dims, bi, g, i0, rows);
                gather(sc.dot, dout, dims, bi, g, i0, rows);
                let (p, ds) = (&mut sc.a[..m * nk], &mut sc.b[..m * nk]);
                let (qv, dov) = (view(sc.qt, 0, d, 1), view(sc.dot, 0, d, 1));
                // SAFETY: p, ds are this task's scratch; K/V rows 0..nk in bounds.
                unsafe {
                    mm(m, nk, d, p.as_mut_ptr(), nk, false, qv, kt);
                    mm(m, nk, d, ds.as_mut_ptr(), nk, false, dov, vt);
                }
                for (hh, (ph, dsh)) in p
                    .chunks_exact_mut(rows * nk)
                    .zip(ds.chunks_exact_mut(rows * nk))
                    .enumerate()
                {
                    let hi = g * group + hh;
                    let l = &lse[(bi * h + hi) * t + i0..(bi * h + hi) * t + i0 + rows];
                    let q_rows = (dims.q_at(bi, i0, hi), h * d);
                    backward_probs(ph, dsh, l, [dout, out], q_rows, i0, nk, d, scale);
                }
                let dqt = &mut sc.dqt[..m * d];
                // SAFETY: dk/dv rows 0..nk of kv head g in batch b belong to this task only;
                // the views address this task's scratch and in-bounds K rows.
                unsafe {
                    mm(nk, d, m, dvp.at(ks), krs, true, view(p, 0, 1, nk), dov);
                    mm(nk, d, m, dkp.at(ks), krs, true, view(ds, 0, 1, nk), qv);
                    mm(
                        m,
                        d,
                        nk,
                        dqt.as_mut_ptr(),
                        d,
                        false,
                        view(ds, 0, nk, 1),
                        view(k, ks, krs, 1),
                    );
                }
                for hh in 0..group {
                    for r in 0..rows {
                        let dst = dims.q_at(bi, i0 + r, g * group + hh);
                        // SAFETY: dq rows of the heads of group g in batch b belong to this
                        // task only; in bounds by check_shapes.
                        let dst = unsafe { std::slice::from_raw_parts_mut(dqp.at(dst), d) };
                        let src = (hh * rows + r) * d;
                        add_into(dst, &dqt[src..src + d]);
                    }
                }
            }
        })
    });
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(x) {
        *a += x;
    }
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
