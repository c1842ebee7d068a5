//! Decode matmul for a few rows: `out [M,N] = inp [M,K] @ weight [N,K]^T` with M the batch
//! of a decode step (1 to a few dozen). `gemm` packs the weight before multiplying, which
//! for small M costs more than the product; here every weight row is read once per call,
//! straight from memory, and multiplied with all M input rows while it is in L1 (blocks of
//! 4 weight rows × 4 input rows, 16 accumulators). Threads split N.
//!
//! Each output element is computed by the same instruction sequence whatever M, the block
//! it falls in and the thread split (lane-wise FMAs over K in steps of 16, masked at the
//! tail, then one fixed reduction), so a row's result does not depend on the other rows of
//! the batch: a sequence decoded in a batch gets bit for bit what it gets alone. The
//! reference is `cpu::matmul_forward`.

use rayon::prelude::*;

use super::simd::SyncPtr;

/// Weight rows per task: 4 KiB to 32 KiB of weights (K = 256 to 2048), enough to amortize
/// a task and small enough that two threads share even the k/v projections (N = 128).
const COLS_PER_TASK: usize = 16;

/// out [M,N] = inp [M,K] @ weight [N,K]^T (overwrites out).
pub fn matmul_rows_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "matmul_rows: out is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul_rows: inp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul_rows: weight is not [N, K]");
    if m == 0 || n == 0 {
        return;
    }
    let o = SyncPtr(out.as_mut_ptr());
    let avx512 = has_avx512f();
    let tasks = n.div_ceil(COLS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|t| {
        let j0 = t * COLS_PER_TASK;
        let j1 = (j0 + COLS_PER_TASK).min(n);
        // SAFETY: this task alone writes the columns j0..j1 of out (every row), all inside
        // out (m * n elements).
        unsafe { columns(o, inp, weight, m, k, n, j0, j1, avx512) };
    });
}

/// Columns `j0..j1` of out for every row (with AVX-512F when `avx512`, which the caller
/// has detected).
///
/// # Safety
/// `o` points to out [M,N]; no other thread touches these columns meanwhile; `avx512` only
/// where the CPU has AVX-512F.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    o: SyncPtr,
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    avx512: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the CPU has AVX-512F (checked); out ranges forwarded from the caller.
        unsafe { avx512::columns(o, inp, weight, m, k, n, j0, j1) };
        return;
    }
    let mut j = j0;
    while j < j1 {
        let nr = (j1 - j).min(4);
        for i in 0..m {
            for jj in j..j + nr {
                let v = portable_dot(&inp[i * k..(i + 1) * k], &weight[jj * k..(jj + 1) * k]);
                // SAFETY: (i, jj) is inside out and in this task's columns.
                unsafe { *o.at(i * n + jj) = v };
            }
        }
        j += nr;
    }
}

/// 16-lane dot product (lane-wise sums, then a fixed pairwise reduction), so LLVM
/// vectorizes it on any x86_64.
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// Whether the CPU has AVX-512F (std caches the detection). Not switched by the tests'
/// FORCE_BASELINE: a row must get the same bits in every call of one process (the portable
/// path has its own test).
#[inline]
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::SyncPtr;
    use std::arch::x86_64::*;

    /// As [`super::columns`], with AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as [`super::columns`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(
        o: SyncPtr,
        inp: &[f32],
        weight: &[f32],
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        while j < j1 {
            let nr = (j1 - j).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                // SAFETY: rows i..i+mr and columns j..j+nr are inside the operands.
                unsafe {
                    match (mr, nr) {
                        (4, 4) => block::<4, 4>(o, inp, weight, k, n, i, j),
                        (4, _) => each::<4>(o, inp, weight, k, n, i, j, nr),
                        (3, _) => each::<3>(o, inp, weight, k, n, i, j, nr),
                        (2, _) => each::<2>(o, inp, weight, k, n, i, j, nr),
                        _ => each::<1>(o, inp, weight, k, n, i, j, nr),
                    }
                }
                i += mr;
            }
            j += nr;
        }
    }

    /// `MR` rows against `nr` (< 4 or 4) weight rows, one weight row at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn each<const MR: usize>(
        o: SyncPtr,
        inp: &[f32],
        weight: &[f32],
        k: usize,
        n: usize,
        i: usize,
        j: usize,
        nr: usize,
    ) {
        for jj in j..j + nr {
            // SAFETY: forwarded.
            unsafe { block::<MR, 1>(o, inp, weight, k, n, i, jj) };
        }
    }

    /// out[i..i+MR, j..j+NR]: lane-wise FMAs over K (masked tail), then `reduce_add`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const MR: usize, const NR: usize>(
        o: SyncPtr,
        inp: &[f32],
        weight: &[f32],
        k: usize,
        n: usize,
        i: usize,
        j: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let x = inp.as_ptr();
        let w = weight.as_ptr();
        let full = k / 16 * 16;
        let mut p = 0;
        // SAFETY: every load reads p..p+16 (or the masked tail) of rows inside the operands.
        unsafe {
            while p < full {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add((j + c) * k + p));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add((i + r) * k + p));
                    for (c, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(xv, wv[c], *a);
                    }
                }
                p += 16;
            }
            if p < k {
                let mask: __mmask16 = (1u32 << (k - p)) as u16 - 1;
                let mut wv = [_mm512_setzero_ps(); NR];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, w.add((j + c) * k + p));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add((i + r) * k + p));
                    for (c, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(xv, wv[c], *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    *o.at((i + r) * n + j + c) = _mm512_reduce_add_ps(*a);
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
    fn matches_reference() {
        for (seed, m, k, n) in [
            (40u64, 1usize, 1usize, 1usize),
            (41, 1, 512, 130),
            (42, 5, 37, 9),
            (43, 8, 512, 2048),
            (44, 13, 2048, 67),
            (45, 32, 100, 33),
        ] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, m * k, 1.0);
            let w = rand_vec(&mut r, n * k, 1.0);
            let mut want = vec![0.0; m * n];
            crate::cpu::matmul_forward(&mut want, &inp, &w, m, k, n);
            let mut got = vec![f32::NAN; m * n];
            matmul_rows_forward(&mut got, &inp, &w, m, k, n);
            assert_close("out", &got, &want, 1e-4, 1e-4);
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        let (m, k, n) = (6, 70, 10);
        let mut r = rng(47);
        let inp = rand_vec(&mut r, m * k, 1.0);
        let w = rand_vec(&mut r, n * k, 1.0);
        let mut want = vec![0.0; m * n];
        crate::cpu::matmul_forward(&mut want, &inp, &w, m, k, n);
        let mut got = vec![f32::NAN; m * n];
        // SAFETY: one call writes all of out, on this thread.
        unsafe { columns(SyncPtr(got.as_mut_ptr()), &inp, &w, m, k, n, 0, n, false) };
        assert_close("out", &got, &want, 1e-4, 1e-4);
    }

    /// A row's result is the same bits whatever the other rows of the call.
    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (m, k, n) = (11, 300, 70);
        let mut r = rng(46);
        let inp = rand_vec(&mut r, m * k, 1.0);
        let w = rand_vec(&mut r, n * k, 1.0);
        let mut all = vec![0.0; m * n];
        matmul_rows_forward(&mut all, &inp, &w, m, k, n);
        for i in 0..m {
            let mut one = vec![0.0; n];
            matmul_rows_forward(&mut one, &inp[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }
}
