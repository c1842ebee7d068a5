//! Fast RoPE: parallel over positions; each task computes the cos/sin row of its position
//! once (same f64 formula as the reference) and applies it to every batch row and head.

use rayon::prelude::*;

use super::simd::{SyncPtr, multiversion};
use crate::cpu::rope::rope_cos_sin;

fn check_shapes(a: usize, b_len: usize, b: usize, t: usize, h: usize, d: usize) {
    assert!(d.is_multiple_of(2), "rope: head dim {d} must be even");
    assert_eq!(a, b * t * h * d, "rope: tensor is not [B, T, H, D]");
    assert_eq!(b_len, b * t * h * d, "rope: tensor is not [B, T, H, D]");
}

/// out [B,T,H,D] = rope(inp [B,T,H,D]).
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
    let outp = SyncPtr(out.as_mut_ptr());
    run(b, t, h, d, pos_offset, theta, |cs, row| {
        // SAFETY: the task of position ti alone writes rows (b, ti) for every b.
        let o = unsafe { std::slice::from_raw_parts_mut(outp.at(row), h * d) };
        rotate(o, &inp[row..row + h * d], cs, false);
    });
}

/// dinp [B,T,H,D] += rope^T(dout [B,T,H,D]).
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
    let dp = SyncPtr(dinp.as_mut_ptr());
    run(b, t, h, d, pos_offset, theta, |cs, row| {
        // SAFETY: the task of position ti alone writes rows (b, ti) for every b.
        let o = unsafe { std::slice::from_raw_parts_mut(dp.at(row), h * d) };
        rotate(o, &dout[row..row + h * d], cs, true);
    });
}

/// Runs `f(cos_sin, row_offset)` for every (b, t) row, parallel over t; `cos_sin` holds
/// D/2 cosines then D/2 sines for position `pos_offset + t`.
#[allow(clippy::too_many_arguments)]
fn run(
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
    theta: f32,
    f: impl Fn(&[f32], usize) + Sync,
) {
    let half = d / 2;
    (0..t).into_par_iter().for_each_init(
        || vec![0.0f32; d],
        |cs, ti| {
            for i in 0..half {
                (cs[i], cs[half + i]) = rope_cos_sin(pos_offset + ti, i, d, theta);
            }
            for bi in 0..b {
                f(cs, (bi * t + ti) * h * d);
            }
        },
    );
}

multiversion! {
    /// Rotates each head of one [H, D] row: forward writes `out = R x`, backward
    /// accumulates `out += R^T x`.
    pub(crate) fn rotate(out: &mut [f32], x: &[f32], cs: &[f32], backward: bool) {
        let half = cs.len() / 2;
        let (cos, sin) = cs.split_at(half);
        for (o, x) in out.chunks_exact_mut(2 * half).zip(x.chunks_exact(2 * half)) {
            let (o1, o2) = o.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            if backward {
                for i in 0..half {
                    o1[i] += x1[i] * cos[i] + x2[i] * sin[i];
                    o2[i] += x2[i] * cos[i] - x1[i] * sin[i];
                }
            } else {
                for i in 0..half {
                    o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                    o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::rope as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference() {
        for (seed, b, t, h, d, off) in [
            (800u64, 1usize, 1usize, 1usize, 2usize, 0usize),
            (801, 2, 17, 3, 6, 5),
            (802, 4, 33, 4, 32, 0),
        ] {
            let mut r = rng(seed);
            let x = rand_vec(&mut r, b * t * h * d, 1.0);
            let mut want = vec![0.0; x.len()];
            reference::rope_forward(&mut want, &x, b, t, h, d, off, 10000.0);
            let mut got = vec![f32::NAN; x.len()];
            rope_forward(&mut got, &x, b, t, h, d, off, 10000.0);
            assert_close("out", &got, &want, 1e-6, 1e-7);
            let d0 = rand_vec(&mut r, x.len(), 1.0);
            let mut want = d0.clone();
            reference::rope_backward(&mut want, &x, b, t, h, d, off, 10000.0);
            let mut got = d0;
            rope_backward(&mut got, &x, b, t, h, d, off, 10000.0);
            assert_close("dinp", &got, &want, 1e-6, 1e-7);
        }
    }
}
