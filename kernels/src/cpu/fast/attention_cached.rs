//! Fast generation attention over a KV cache: parallel over (sequence, query, head) rows,
//! one vectorized row kernel with the thread's reused scratch for the scores.

use rayon::prelude::*;

use super::simd::{dot, exp_in_place_sum, max as simd_max, multiversion, with_scratch};
use crate::cpu::attention_cached::check_cached_shapes;

/// out [B,TQ,H,D] from q [B,TQ,H,D] and the caches [B,TMAX,KVH,D] (overwrites out).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_forward(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    b: usize,
    tq: usize,
    past: usize,
    tmax: usize,
    h: usize,
    kvh: usize,
    d: usize,
) {
    check_cached_shapes(
        out.len(),
        q.len(),
        k_cache.len(),
        v_cache.len(),
        b,
        tq,
        past,
        tmax,
        h,
        kvh,
        d,
    );
    let group = h / kvh;
    let shape = Shape { tmax, kvh, d };
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(4)
        .for_each(|(row, o)| {
            let (hi, i, bi) = (row % h, (row / h) % tq, row / (h * tq));
            let len = past + i + 1;
            with_scratch(len, |scores| {
                cached_row(
                    o,
                    &q[row * d..(row + 1) * d],
                    [k_cache, v_cache],
                    scores,
                    bi,
                    hi / group,
                    shape,
                )
            });
        });
}

#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) tmax: usize,
    pub(crate) kvh: usize,
    pub(crate) d: usize,
}

multiversion! {
    pub(crate) fn cached_row(
        o: &mut [f32],
        qv: &[f32],
        caches: [&[f32]; 2],
        scores: &mut [f32],
        bi: usize,
        g: usize,
        shape: Shape,
    ) {
        let [k_cache, v_cache] = caches;
        let Shape { tmax, kvh, d } = shape;
        let row = |j: usize| ((bi * tmax + j) * kvh + g) * d;
        for (j, s) in scores.iter_mut().enumerate() {
            let ko = row(j);
            *s = dot(qv, &k_cache[ko..ko + d]);
        }
        let scale = 1.0 / (d as f32).sqrt();
        let max = scale * simd_max(scores);
        let inv = 1.0 / exp_in_place_sum(scores, scale, max);
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vo = row(j);
            let p = p * inv;
            for (o, &v) in o.iter_mut().zip(&v_cache[vo..vo + d]) {
                *o += p * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention_cached as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference() {
        for (seed, b, tq, past, tmax, h, kvh, d) in [
            (
                30u64, 1usize, 1usize, 0usize, 1usize, 1usize, 1usize, 2usize,
            ),
            (31, 2, 1, 17, 32, 4, 2, 6),
            (32, 3, 4, 9, 16, 6, 2, 32),
            (33, 1, 1, 255, 256, 16, 4, 32),
        ] {
            let mut r = rng(seed);
            let kc = rand_vec(&mut r, b * tmax * kvh * d, 2.0);
            let vc = rand_vec(&mut r, b * tmax * kvh * d, 1.0);
            let q = rand_vec(&mut r, b * tq * h * d, 2.0);
            let mut want = vec![0.0; q.len()];
            reference::attention_cached_forward(
                &mut want, &q, &kc, &vc, b, tq, past, tmax, h, kvh, d,
            );
            let mut got = vec![f32::NAN; q.len()];
            attention_cached_forward(&mut got, &q, &kc, &vc, b, tq, past, tmax, h, kvh, d);
            assert_close("out", &got, &want, 1e-4, 1e-5);
        }
    }
}
