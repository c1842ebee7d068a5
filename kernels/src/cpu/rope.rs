//! Rotary position embedding, rotate-half layout (Llama / Hugging Face): within each head of
//! size D, element `i` is paired with `i + D/2` for `i < D/2`, rotated by the angle
//! `pos * theta^(-2i/D)` where `pos = pos_offset + t`.
//!
//! `y[i] = x[i] cos - x[i+D/2] sin`, `y[i+D/2] = x[i+D/2] cos + x[i] sin`.

/// Cosine and sine of the rotation angle for pair `i` at position `pos` (computed in f64,
/// rounded to f32; shared by the reference and the fast path so both agree exactly).
#[inline]
pub(crate) fn rope_cos_sin(pos: usize, i: usize, d: usize, theta: f32) -> (f32, f32) {
    let inv_freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
    let angle = pos as f64 * inv_freq;
    (angle.cos() as f32, angle.sin() as f32)
}

fn check_shapes(a: usize, b_len: usize, b: usize, t: usize, h: usize, d: usize) {
    assert!(d.is_multiple_of(2), "rope: head dim {d} must be even");
    assert_eq!(a, b * t * h * d, "rope: tensor is not [B, T, H, D]");
    assert_eq!(b_len, b * t * h * d, "rope: tensor is not [B, T, H, D]");
}

/// out [B,T,H,D] = rope(inp [B,T,H,D]) (overwrites out).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    out: &mut [f32],
    inp: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
    theta: f32,
) {
    check_shapes(out.len(), inp.len(), b, t, h, d);
    let half = d / 2;
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let base = ((bi * t + ti) * h + hi) * d;
                for i in 0..half {
                    let (cos, sin) = rope_cos_sin(pos_offset + ti, i, d, theta);
                    let x1 = inp[base + i];
                    let x2 = inp[base + i + half];
                    out[base + i] = x1 * cos - x2 * sin;
                    out[base + i + half] = x2 * cos + x1 * sin;
                }
            }
        }
    }
}

/// dinp [B,T,H,D] += rope^T(dout [B,T,H,D]) (the inverse rotation).
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    dinp: &mut [f32],
    dout: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
    theta: f32,
) {
    check_shapes(dinp.len(), dout.len(), b, t, h, d);
    let half = d / 2;
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let base = ((bi * t + ti) * h + hi) * d;
                for i in 0..half {
                    let (cos, sin) = rope_cos_sin(pos_offset + ti, i, d, theta);
                    let d1 = dout[base + i];
                    let d2 = dout[base + i + half];
                    dinp[base + i] += d1 * cos + d2 * sin;
                    dinp[base + i + half] += d2 * cos - d1 * sin;
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
    fn position_zero_is_identity_and_norm_is_preserved() {
        let mut r = rng(9);
        let (b, t, h, d) = (2, 5, 3, 6);
        let inp = rand_vec(&mut r, b * t * h * d, 1.0);
        let mut out = vec![0.0; inp.len()];
        rope_forward(&mut out, &inp, b, t, h, d, 0, 10000.0);
        for bi in 0..b {
            let row = bi * t * h * d;
            // t = 0 rows are unchanged.
            assert_close(
                "t0",
                &out[row..row + h * d],
                &inp[row..row + h * d],
                0.0,
                0.0,
            );
        }
        for (x, y) in inp.chunks_exact(d).zip(out.chunks_exact(d)) {
            let nx: f32 = x.iter().map(|v| v * v).sum();
            let ny: f32 = y.iter().map(|v| v * v).sum();
            assert!((nx - ny).abs() < 1e-5 * nx.max(1.0));
        }
    }

    #[test]
    fn matches_hand_computed_rotation() {
        // D = 2: a single pair rotated by pos * 1 radian.
        let inp = [1.0, 0.0];
        let mut out = [0.0; 2];
        rope_forward(&mut out, &inp, 1, 1, 1, 2, 3, 10000.0);
        assert_close("rot", &out, &[3f32.cos(), 3f32.sin()], 1e-6, 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Linear map: rtol 1e-3, atol 1e-3 with h = 1e-2.
        for (seed, b, t, h, d, off) in [
            (10u64, 2usize, 3usize, 2usize, 6usize, 0usize),
            (11, 1, 4, 1, 8, 7),
        ] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, b * t * h * d, 1.0);
            let w = rand_vec(&mut r, inp.len(), 1.0);
            let mut dinp = vec![0.5; inp.len()];
            rope_backward(&mut dinp, &w, b, t, h, d, off, 10000.0);
            let dinp: Vec<f32> = dinp.iter().map(|x| x - 0.5).collect();
            check_grad("dinp", &inp, &dinp, 1e-2, 1e-3, 1e-3, |x| {
                let mut out = vec![0.0; x.len()];
                rope_forward(&mut out, x, b, t, h, d, off, 10000.0);
                dot64(&out, &w)
            });
        }
    }
}
