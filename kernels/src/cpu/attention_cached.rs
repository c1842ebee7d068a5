//! Generation attention over a KV cache (forward only, no lse): `tq` new queries per
//! sequence at positions `past..past+tq` attend causally to cache rows `0..=position`.
//!
//! q, out [B,TQ,H,D]; k_cache, v_cache [B,TMAX,KVH,D] whose rows `0..past+tq` are filled
//! (rows beyond are never read). Same scale (1/sqrt(D)) and GQA mapping (query head `h`
//! reads kv head `h / (H/KVH)`) as `attention_forward`, so its result equals the last `tq`
//! rows of `attention_forward` over the first `past+tq` positions.

#[allow(clippy::too_many_arguments)]
pub(crate) fn check_cached_shapes(
    out: usize,
    q: usize,
    k_cache: usize,
    v_cache: usize,
    b: usize,
    tq: usize,
    past: usize,
    tmax: usize,
    h: usize,
    kvh: usize,
    d: usize,
) {
    assert!(
        d > 0 && kvh > 0 && h.is_multiple_of(kvh),
        "attention_cached: heads {h} not a multiple of kv heads {kvh}"
    );
    assert!(
        past + tq <= tmax,
        "attention_cached: positions {past}+{tq} exceed cache {tmax}"
    );
    assert_eq!(
        q,
        b * tq * h * d,
        "attention_cached: q is not [B, TQ, H, D]"
    );
    assert_eq!(
        out,
        b * tq * h * d,
        "attention_cached: out is not [B, TQ, H, D]"
    );
    assert_eq!(
        k_cache,
        b * tmax * kvh * d,
        "attention_cached: k_cache is not [B, TMAX, KVH, D]"
    );
    assert_eq!(
        v_cache,
        b * tmax * kvh * d,
        "attention_cached: v_cache is not [B, TMAX, KVH, D]"
    );
}

/// out [B,TQ,H,D] from q [B,TQ,H,D] and the caches [B,TMAX,KVH,D] (overwrites out).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
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
    let scale = 1.0 / (d as f32).sqrt();
    let group = h / kvh;
    let mut scores = vec![0.0f32; past + tq];
    for bi in 0..b {
        for i in 0..tq {
            let pos = past + i;
            for hi in 0..h {
                let g = hi / group;
                let qo = ((bi * tq + i) * h + hi) * d;
                let mut max = f32::NEG_INFINITY;
                for j in 0..=pos {
                    let ko = ((bi * tmax + j) * kvh + g) * d;
                    let mut s = 0.0f32;
                    for x in 0..d {
                        s += q[qo + x] * k_cache[ko + x];
                    }
                    scores[j] = s * scale;
                    max = max.max(scores[j]);
                }
                let mut sum = 0.0f32;
                for s in &mut scores[..=pos] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[qo..qo + d];
                o.fill(0.0);
                for j in 0..=pos {
                    let vo = ((bi * tmax + j) * kvh + g) * d;
                    let p = scores[j] / sum;
                    for x in 0..d {
                        o[x] += p * v_cache[vo + x];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::attention_forward;
    use crate::cpu::testutil::*;

    #[test]
    fn equals_the_last_rows_of_full_causal_attention() {
        for (seed, b, tq, past, tmax, h, kvh, d) in [
            (
                20u64, 2usize, 1usize, 0usize, 4usize, 4usize, 2usize, 6usize,
            ),
            (21, 1, 3, 5, 9, 2, 1, 8),
            (22, 2, 1, 16, 20, 6, 3, 5),
        ] {
            let mut r = rng(seed);
            let l = past + tq;
            let kc = rand_vec(&mut r, b * tmax * kvh * d, 1.5);
            let vc = rand_vec(&mut r, b * tmax * kvh * d, 1.0);
            let qn = rand_vec(&mut r, b * tq * h * d, 1.5);
            // Full-sequence inputs: cache rows 0..l, queries placed at positions past..l.
            let (rk, rq) = (kvh * d, h * d);
            let mut qf = rand_vec(&mut r, b * l * rq, 1.0);
            let (mut kf, mut vf) = (vec![0.0; b * l * rk], vec![0.0; b * l * rk]);
            for bi in 0..b {
                kf[bi * l * rk..(bi + 1) * l * rk]
                    .copy_from_slice(&kc[bi * tmax * rk..(bi * tmax + l) * rk]);
                vf[bi * l * rk..(bi + 1) * l * rk]
                    .copy_from_slice(&vc[bi * tmax * rk..(bi * tmax + l) * rk]);
                qf[(bi * l + past) * rq..(bi + 1) * l * rq]
                    .copy_from_slice(&qn[bi * tq * rq..(bi + 1) * tq * rq]);
            }
            let (mut of, mut lse) = (vec![0.0; b * l * rq], vec![0.0; b * h * l]);
            attention_forward(&mut of, &mut lse, &qf, &kf, &vf, b, l, h, kvh, d);
            let mut want = Vec::new();
            for bi in 0..b {
                want.extend_from_slice(&of[(bi * l + past) * rq..(bi + 1) * l * rq]);
            }
            let mut got = vec![f32::NAN; b * tq * rq];
            attention_cached_forward(&mut got, &qn, &kc, &vc, b, tq, past, tmax, h, kvh, d);
            assert_close("out", &got, &want, 1e-5, 1e-6);
        }
    }
}
