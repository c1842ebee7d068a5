//! Fast RMSNorm: parallel over blocks of rows, vectorized row kernels; backward reduces
//! dweight through one partial [C] buffer per rayon split.

use rayon::prelude::*;

use super::simd::multiversion;

/// Rows per parallel task.
const ROWS: usize = 16;

/// out [Bt,C], rstd [Bt] from inp [Bt,C] and weight [C].
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    rows: usize,
    c: usize,
    eps: f32,
) {
    assert!(c > 0, "rmsnorm: c must be positive");
    assert_eq!(inp.len(), rows * c, "rmsnorm: inp is not [Bt, C]");
    assert_eq!(out.len(), rows * c, "rmsnorm: out is not [Bt, C]");
    assert_eq!(rstd.len(), rows, "rmsnorm: rstd is not [Bt]");
    assert_eq!(weight.len(), c, "rmsnorm: weight is not [C]");
    out.par_chunks_mut(ROWS * c)
        .zip(rstd.par_chunks_mut(ROWS))
        .zip(inp.par_chunks(ROWS * c))
        .for_each(|((o, s), x)| forward_rows(o, s, x, weight, eps));
}

multiversion! {
    fn forward_rows(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], eps: f32) {
        let c = weight.len();
        for ((y, s), x) in out.chunks_exact_mut(c).zip(rstd.iter_mut()).zip(inp.chunks_exact(c)) {
            let r = 1.0 / (sum_sq(x) / c as f32 + eps).sqrt();
            *s = r;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * r * w;
            }
        }
    }
}

#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    super::simd::dot(x, x)
}

/// dinp [Bt,C] +=, dweight [C] += from dout [Bt,C], inp, weight and the saved rstd.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    assert!(c > 0, "rmsnorm: c must be positive");
    for (name, len) in [
        ("dinp", dinp.len()),
        ("dout", dout.len()),
        ("inp", inp.len()),
    ] {
        assert_eq!(len, rows * c, "rmsnorm: {name} is not [Bt, C]");
    }
    assert_eq!(rstd.len(), rows, "rmsnorm: rstd is not [Bt]");
    assert_eq!(weight.len(), c, "rmsnorm: weight is not [C]");
    assert_eq!(dweight.len(), c, "rmsnorm: dweight is not [C]");
    let partial = dinp
        .par_chunks_mut(ROWS * c)
        .zip(dout.par_chunks(ROWS * c))
        .zip(inp.par_chunks(ROWS * c))
        .zip(rstd.par_chunks(ROWS))
        .fold(
            || vec![0.0f32; c],
            |mut dw, (((dx, dy), x), s)| {
                backward_rows(dx, &mut dw, dy, x, weight, s);
                dw
            },
        )
        .reduce_with(|mut a, b| {
            add_into(&mut a, &b);
            a
        });
    if let Some(dw) = partial {
        add_into(dweight, &dw);
    }
}

multiversion! {
    fn add_into(acc: &mut [f32], x: &[f32]) {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

multiversion! {
    fn backward_rows(
        dinp: &mut [f32],
        dweight: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        rstd: &[f32],
    ) {
        let c = weight.len();
        let rows = dinp.chunks_exact_mut(c).zip(dout.chunks_exact(c)).zip(inp.chunks_exact(c));
        for (((dx, dy), x), &s) in rows.zip(rstd) {
            let mut acc = [0.0f32; 8];
            let mut i = 0;
            while i + 8 <= c {
                for l in 0..8 {
                    acc[l] += dy[i + l] * weight[i + l] * x[i + l];
                }
                i += 8;
            }
            let mut dot = acc.iter().sum::<f32>();
            while i < c {
                dot += dy[i] * weight[i] * x[i];
                i += 1;
            }
            let k = s * s * s * dot / c as f32;
            for i in 0..c {
                dx[i] += s * weight[i] * dy[i] - k * x[i];
                dweight[i] += dy[i] * x[i] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::rmsnorm as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference() {
        for (seed, rows, c) in [
            (400u64, 1usize, 1usize),
            (401, 7, 13),
            (402, 37, 64),
            (403, 100, 512),
        ] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, rows * c, 2.0);
            let weight = rand_vec(&mut r, c, 1.0);
            let dout = rand_vec(&mut r, rows * c, 1.0);
            let (mut out_r, mut rstd_r) = (vec![0.0; rows * c], vec![0.0; rows]);
            reference::rmsnorm_forward(&mut out_r, &mut rstd_r, &inp, &weight, rows, c, 1e-6);
            let (mut out, mut rstd) = (vec![f32::NAN; rows * c], vec![f32::NAN; rows]);
            rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, rows, c, 1e-6);
            assert_close("out", &out, &out_r, 1e-5, 1e-6);
            assert_close("rstd", &rstd, &rstd_r, 1e-5, 1e-6);
            let dinp0 = rand_vec(&mut r, rows * c, 1.0);
            let dw0 = rand_vec(&mut r, c, 1.0);
            let (mut di_r, mut dw_r) = (dinp0.clone(), dw0.clone());
            reference::rmsnorm_backward(
                &mut di_r, &mut dw_r, &dout, &inp, &weight, &rstd_r, rows, c,
            );
            let (mut di, mut dw) = (dinp0, dw0);
            rmsnorm_backward(&mut di, &mut dw, &dout, &inp, &weight, &rstd, rows, c);
            assert_close("dinp", &di, &di_r, 1e-4, 1e-5);
            assert_close("dweight", &dw, &dw_r, 1e-4, 1e-4);
        }
    }
}
