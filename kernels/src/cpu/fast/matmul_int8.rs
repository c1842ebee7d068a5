//! Fast int8 weight-only decode matmul (see `cpu::matmul_int8` for the scheme). The input
//! rows are quantized once per call; then, as in `matmul_rows`, threads split N and every
//! int8 weight row is read once for all M rows, in blocks of 4 weight rows × 4 input rows.
//! With AVX-512 VNNI (`vpdpbusd`, detected at run time) 64 products per instruction, u8
//! inputs (`xq + 128`) against s8 weights, corrected by `128 * wsum`; elsewhere a portable
//! i32 loop. The integer sums are exact, so both paths and the reference give the same bits.

use rayon::prelude::*;

use super::simd::SyncPtr;
use crate::cpu::matmul_int8::{check_int8_shapes, quantize, row_scale};

/// Weight rows per task (as `matmul_rows`).
const COLS_PER_TASK: usize = 16;

/// out [M,N] from inp [M,K] and the int8 weight [N,K] with its per-row scales and row sums
/// (from `quantize_rows_int8`); overwrites out.
#[allow(clippy::too_many_arguments)]
pub fn matmul_int8_forward(
    out: &mut [f32],
    inp: &[f32],
    wq: &[i8],
    scales: &[f32],
    sums: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    check_int8_shapes(out.len(), inp.len(), wq.len(), scales.len(), m, k, n);
    assert_eq!(sums.len(), n, "matmul_int8: sums is not [N]");
    if m == 0 || n == 0 {
        return;
    }
    let vnni = has_vnni();
    // Quantized inputs: i8 for the portable path, u8 (xq + 128) for VNNI.
    let mut xq = vec![0u8; m * k];
    let mut sx = vec![0.0f32; m];
    for (i, sxi) in sx.iter_mut().enumerate() {
        let row = &inp[i * k..(i + 1) * k];
        let s = row_scale(row);
        *sxi = s;
        for (q, &x) in xq[i * k..(i + 1) * k].iter_mut().zip(row) {
            let v = quantize(x, s);
            *q = if vnni {
                (v as i32 + 128) as u8
            } else {
                v as u8
            };
        }
    }
    let o = SyncPtr(out.as_mut_ptr());
    let ops = Operands {
        xq: &xq,
        sx: &sx,
        wq,
        scales,
        sums,
        k,
        n,
    };
    let tasks = n.div_ceil(COLS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|t| {
        let j0 = t * COLS_PER_TASK;
        let j1 = (j0 + COLS_PER_TASK).min(n);
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: the CPU has AVX-512F/BW/VNNI (checked); this task alone writes the
            // columns j0..j1 of out, inside out.
            unsafe { vnni::columns(o, &ops, m, j0, j1) };
            return;
        }
        for (i, &sxi) in sx.iter().enumerate() {
            let x = &ops.xq[i * k..(i + 1) * k];
            for j in j0..j1 {
                let w = &wq[j * k..(j + 1) * k];
                let acc: i32 = x
                    .iter()
                    .zip(w)
                    .map(|(&a, &b)| a as i8 as i32 * b as i32)
                    .sum();
                // SAFETY: (i, j) is inside out and in this task's columns.
                unsafe { *o.at(i * n + j) = sxi * scales[j] * acc as f32 };
            }
        }
    });
}

struct Operands<'a> {
    xq: &'a [u8],
    sx: &'a [f32],
    wq: &'a [i8],
    scales: &'a [f32],
    sums: &'a [f32],
    k: usize,
    n: usize,
}

/// Whether this CPU has AVX-512 VNNI (with F and BW for the loads), detected at run time.
pub fn has_vnni() -> bool {
    #[cfg(test)]
    if super::simd::FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Operands, SyncPtr};
    use std::arch::x86_64::*;

    /// Columns j0..j1 of out for every row.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; no other thread writes these columns meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn columns(o: SyncPtr, ops: &Operands, m: usize, j0: usize, j1: usize) {
        let mut j = j0;
        while j < j1 {
            let nr = (j1 - j).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                // SAFETY: rows i..i+mr and columns j..j+nr are inside the operands.
                unsafe {
                    match (mr, nr) {
                        (4, 4) => block::<4, 4>(o, ops, i, j),
                        _ => {
                            for ii in i..i + mr {
                                for jj in j..j + nr {
                                    block::<1, 1>(o, ops, ii, jj);
                                }
                            }
                        }
                    }
                }
                i += mr;
            }
            j += nr;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block<const MR: usize, const NR: usize>(
        o: SyncPtr,
        ops: &Operands,
        i: usize,
        j: usize,
    ) {
        let k = ops.k;
        let mut acc = [[_mm512_setzero_si512(); NR]; MR];
        let x = ops.xq.as_ptr();
        let w = ops.wq.as_ptr();
        let full = k / 64 * 64;
        let mut p = 0;
        // SAFETY: every load reads bytes p..p+64 (or the masked tail) of rows inside the
        // operands.
        unsafe {
            while p < full {
                let mut wv = [_mm512_setzero_si512(); NR];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add((j + c) * k + p) as *const __m512i);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_si512(x.add((i + r) * k + p) as *const __m512i);
                    for (c, a) in row.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(*a, xv, wv[c]);
                    }
                }
                p += 64;
            }
            if p < k {
                let mask: __mmask64 = (1u64 << (k - p)) - 1;
                let mut wv = [_mm512_setzero_si512(); NR];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_epi8(mask, w.add((j + c) * k + p));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_epi8(mask, x.add((i + r) * k + p) as *const i8);
                    for (c, a) in row.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(*a, xv, wv[c]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    let (ii, jj) = (i + r, j + c);
                    let dot = _mm512_reduce_add_epi32(*a) - 128 * ops.sums[jj] as i32;
                    *o.at(ii * ops.n + jj) = ops.sx[ii] * ops.scales[jj] * dot as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul_int8 as reference;
    use crate::cpu::testutil::*;

    /// Integer sums are exact: the fast path (VNNI here when the CPU has it, else portable)
    /// and the reference give the same bits, tails and odd shapes included.
    #[test]
    fn matches_reference_exactly() {
        for (seed, m, k, n) in [
            (50u64, 1usize, 1usize, 1usize),
            (51, 1, 512, 130),
            (52, 5, 37, 9),
            (53, 8, 512, 2048),
            (54, 13, 2048, 67),
            (55, 32, 100, 33),
        ] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, m * k, 3.0);
            let w = rand_vec(&mut r, n * k, 0.1);
            let (q, s, sums) = reference::quantize_rows_int8(&w, n, k);
            let mut want = vec![0.0; m * n];
            reference::matmul_int8_forward(&mut want, &inp, &q, &s, m, k, n);
            let mut got = vec![f32::NAN; m * n];
            matmul_int8_forward(&mut got, &inp, &q, &s, &sums, m, k, n);
            assert_eq!(got, want, "m {m} k {k} n {n} (vnni {})", has_vnni());
        }
    }
}
