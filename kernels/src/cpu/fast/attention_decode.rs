//! Fast batched decode attention (see `cpu::attention_decode`): one pass over the sequences
//! (RoPE of the query and key rows, the cache append), then one over every (sequence, head)
//! row across the threads, whatever each sequence's length. Each row goes through the same
//! RoPE and attention row kernels as `rope_forward` and `attention_cached_forward`, so a
//! sequence gets the same bits here as decoded alone.

use rayon::prelude::*;

use super::attention_cached::{Shape, cached_row};
use super::rope::rotate;
use super::simd::with_scratch;
use crate::cpu::attention_decode::{DecodeSeq, check_decode_shapes};
use crate::cpu::rope::rope_cos_sin;

/// out [N,H,D]; appends each sequence's rotated key and its value at its position.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_forward(
    out: &mut [f32],
    q_pre: &[f32],
    k_pre: &[f32],
    v: &[f32],
    seqs: &mut [DecodeSeq],
    h: usize,
    kvh: usize,
    d: usize,
    theta: f32,
) {
    check_decode_shapes(
        out.len(),
        q_pre.len(),
        k_pre.len(),
        v.len(),
        seqs,
        h,
        kvh,
        d,
    );
    let (c, kv, half) = (h * d, kvh * d, d / 2);
    let mut q = vec![0.0f32; q_pre.len()];
    seqs.par_iter_mut()
        .zip(q.par_chunks_mut(c))
        .enumerate()
        .for_each(|(i, (s, qr))| {
            let mut cs = vec![0.0f32; d];
            for j in 0..half {
                (cs[j], cs[half + j]) = rope_cos_sin(s.pos, j, d, theta);
            }
            rotate(qr, &q_pre[i * c..(i + 1) * c], &cs, false);
            let row = s.pos * kv..(s.pos + 1) * kv;
            rotate(
                &mut s.k_cache[row.clone()],
                &k_pre[i * kv..(i + 1) * kv],
                &cs,
                false,
            );
            s.v_cache[row].copy_from_slice(&v[i * kv..(i + 1) * kv]);
        });
    let group = h / kvh;
    let seqs = &*seqs;
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(4)
        .for_each(|(row, o)| {
            let (i, hi) = (row / h, row % h);
            let s = &seqs[i];
            let shape = Shape {
                tmax: s.k_cache.len() / kv,
                kvh,
                d,
            };
            with_scratch(s.pos + 1, |scores| {
                cached_row(
                    o,
                    &q[row * d..(row + 1) * d],
                    [s.k_cache, s.v_cache],
                    scores,
                    0,
                    hi / group,
                    shape,
                )
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention_decode as reference;
    use crate::cpu::testutil::*;

    /// Ragged lengths (1 to 40 filled rows, caches of different sizes): the fast pass
    /// matches the reference, outputs and appended cache rows.
    #[test]
    fn matches_reference_on_ragged_batches() {
        let (h, kvh, d) = (8, 2, 16);
        let kv = kvh * d;
        let mut r = rng(70);
        let pos = [0usize, 39, 5, 17, 1, 23];
        let tmax = [1usize, 40, 64, 18, 2, 30];
        let n = pos.len();
        let q = rand_vec(&mut r, n * h * d, 2.0);
        let k = rand_vec(&mut r, n * kv, 2.0);
        let v = rand_vec(&mut r, n * kv, 1.0);
        let caches: Vec<(Vec<f32>, Vec<f32>)> = tmax
            .iter()
            .map(|&t| (rand_vec(&mut r, t * kv, 2.0), rand_vec(&mut r, t * kv, 1.0)))
            .collect();
        let run = |fast: bool| {
            let mut cs = caches.clone();
            let mut seqs: Vec<DecodeSeq> = cs
                .iter_mut()
                .zip(pos)
                .map(|((kc, vc), pos)| DecodeSeq {
                    k_cache: kc,
                    v_cache: vc,
                    pos,
                })
                .collect();
            let mut out = vec![f32::NAN; n * h * d];
            if fast {
                attention_decode_forward(&mut out, &q, &k, &v, &mut seqs, h, kvh, d, 1e4);
            } else {
                reference::attention_decode_forward(
                    &mut out, &q, &k, &v, &mut seqs, h, kvh, d, 1e4,
                );
            }
            drop(seqs);
            (out, cs)
        };
        let (want, want_caches) = run(false);
        let (got, got_caches) = run(true);
        assert_close("out", &got, &want, 1e-4, 1e-5);
        for ((gk, gv), (wk, wv)) in got_caches.iter().zip(&want_caches) {
            assert_close("k_cache", gk, wk, 1e-6, 1e-6);
            assert_eq!(gv, wv);
        }
    }
}
