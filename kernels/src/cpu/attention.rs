//! Causal grouped-query attention with scale `1/sqrt(D)`.
//!
//! q [B,T,H,D], k and v [B,T,KVH,D], out [B,T,H,D]; query head `h` reads kv head
//! `h / (H/KVH)` (Hugging Face `repeat_kv` order). Forward also saves lse [B,H,T], the
//! log-sum-exp of each query row's scaled scores, so backward recomputes the probabilities
//! one row at a time (flash style) instead of keeping a T x T matrix.

#[allow(clippy::too_many_arguments)]
pub(crate) fn check_shapes(
    q: usize,
    k: usize,
    v: usize,
    out: usize,
    lse: usize,
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
) {
    assert!(
        d > 0 && kvh > 0 && h.is_multiple_of(kvh),
        "attention: heads {h} not a multiple of kv heads {kvh}"
    );
    assert_eq!(q, b * t * h * d, "attention: q is not [B, T, H, D]");
    assert_eq!(out, b * t * h * d, "attention: out is not [B, T, H, D]");
    assert_eq!(k, b * t * kvh * d, "attention: k is not [B, T, KVH, D]");
    assert_eq!(v, b * t * kvh * d, "attention: v is not [B, T, KVH, D]");
    assert_eq!(lse, b * h * t, "attention: lse is not [B, H, T]");
}

/// Backward's gradient buffers match the forward's shapes (v has k's shape, checked by
/// `check_shapes`).
pub(crate) fn check_grad_shapes(dq: usize, dk: usize, dv: usize, dout: usize, q: usize, k: usize) {
    assert_eq!(dq, q, "attention: dq is not [B, T, H, D]");
    assert_eq!(dout, q, "attention: dout is not [B, T, H, D]");
    assert_eq!(dk, k, "attention: dk is not [B, T, KVH, D]");
    assert_eq!(dv, k, "attention: dv is not [B, T, KVH, D]");
}

/// out [B,T,H,D] and lse [B,H,T] from q [B,T,H,D], k, v [B,T,KVH,D] (overwrites both).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
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
    let scale = 1.0 / (d as f32).sqrt();
    let group = h / kvh;
    let mut scores = vec![0.0f32; t];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / group;
            for i in 0..t {
                let qo = ((bi * t + i) * h + hi) * d;
                let mut max = f32::NEG_INFINITY;
                for j in 0..=i {
                    let ko = ((bi * t + j) * kvh + g) * d;
                    let mut s = 0.0f32;
                    for x in 0..d {
                        s += q[qo + x] * k[ko + x];
                    }
                    scores[j] = s * scale;
                    max = max.max(scores[j]);
                }
                let mut sum = 0.0f32;
                for s in &mut scores[..=i] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                lse[(bi * h + hi) * t + i] = max + sum.ln();
                let o = &mut out[qo..qo + d];
                o.fill(0.0);
                for j in 0..=i {
                    let vo = ((bi * t + j) * kvh + g) * d;
                    let p = scores[j] / sum;
                    for x in 0..d {
                        o[x] += p * v[vo + x];
                    }
                }
            }
        }
    }
}

/// dq [B,T,H,D] +=, dk, dv [B,T,KVH,D] += from dout [B,T,H,D], using the forward's inputs,
/// out and lse.
///
/// With `p_j = exp(s_j - lse)`: `dv_j += p_j dout`, `ds_j = p_j (dout.v_j - dout.out)`,
/// `dq += scale sum_j ds_j k_j`, `dk_j += scale ds_j q`.
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
    let scale = 1.0 / (d as f32).sqrt();
    let group = h / kvh;
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / group;
            for i in 0..t {
                let qo = ((bi * t + i) * h + hi) * d;
                let l = lse[(bi * h + hi) * t + i];
                let mut di = 0.0f32;
                for x in 0..d {
                    di += dout[qo + x] * out[qo + x];
                }
                for j in 0..=i {
                    let ko = ((bi * t + j) * kvh + g) * d;
                    let mut s = 0.0f32;
                    let mut dp = 0.0f32;
                    for x in 0..d {
                        s += q[qo + x] * k[ko + x];
                        dp += dout[qo + x] * v[ko + x];
                    }
                    let p = (s * scale - l).exp();
                    let ds = p * (dp - di) * scale;
                    for x in 0..d {
                        dv[ko + x] += p * dout[qo + x];
                        dq[qo + x] += ds * k[ko + x];
                        dk[ko + x] += ds * q[qo + x];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn first_position_copies_its_value_and_lse_matches_f64() {
        let mut r = rng(12);
        let (b, t, h, kvh, d) = (2, 4, 4, 2, 3);
        let q = rand_vec(&mut r, b * t * h * d, 1.0);
        let k = rand_vec(&mut r, b * t * kvh * d, 1.0);
        let v = rand_vec(&mut r, b * t * kvh * d, 1.0);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; b * h * t];
        attention_forward(&mut out, &mut lse, &q, &k, &v, b, t, h, kvh, d);
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / kvh);
                let o = (bi * t * h + hi) * d;
                let vo = (bi * t * kvh + g) * d;
                assert_close("t0", &out[o..o + d], &v[vo..vo + d], 1e-6, 1e-6);
                for i in 0..t {
                    let qo = ((bi * t + i) * h + hi) * d;
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            let ko = ((bi * t + j) * kvh + g) * d;
                            (0..d)
                                .map(|x| q[qo + x] as f64 * k[ko + x] as f64)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let want = s.iter().map(|s| s.exp()).sum::<f64>().ln();
                    let got = lse[(bi * h + hi) * t + i] as f64;
                    assert!((got - want).abs() < 1e-5, "lse {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Tolerance: rtol 1e-2, atol 1e-3, h = 1e-2 (f32 forward, f64 loss accumulation).
        for (seed, b, t, h, kvh, d) in [
            (13u64, 1usize, 5usize, 4usize, 2usize, 3usize),
            (14, 2, 3, 2, 2, 4),
            (15, 1, 1, 3, 1, 2),
        ] {
            let mut r = rng(seed);
            let q = rand_vec(&mut r, b * t * h * d, 1.0);
            let k = rand_vec(&mut r, b * t * kvh * d, 1.0);
            let v = rand_vec(&mut r, b * t * kvh * d, 1.0);
            let w = rand_vec(&mut r, q.len(), 1.0);
            let mut out = vec![0.0; q.len()];
            let mut lse = vec![0.0; b * h * t];
            attention_forward(&mut out, &mut lse, &q, &k, &v, b, t, h, kvh, d);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(
                &mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &out, &lse, b, t, h, kvh, d,
            );
            let loss = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut out = vec![0.0; q.len()];
                let mut lse = vec![0.0; b * h * t];
                attention_forward(&mut out, &mut lse, q, k, v, b, t, h, kvh, d);
                dot64(&out, &w)
            };
            check_grad("dq", &q, &dq, 1e-2, 1e-2, 1e-3, |x| loss(x, &k, &v));
            check_grad("dk", &k, &dk, 1e-2, 1e-2, 1e-3, |x| loss(&q, x, &v));
            check_grad("dv", &v, &dv, 1e-2, 1e-2, 1e-3, |x| loss(&q, &k, x));
        }
    }
}
