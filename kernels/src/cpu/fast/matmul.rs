//! Fast linear layer: all three products (forward, dinp, dweight) go straight to the `gemm`
//! crate with strides that express the transposes, so nothing is copied or transposed here.
//! A product is cut into one band of dst per thread of the current rayon pool, each band a
//! serial gemm call.

use gemm::{Parallelism, gemm};

/// `dst[m,n] (row stride dst_rs) = (accumulate ? dst : 0) + lhs[m,k] @ rhs[k,n]`, each
/// operand given by a raw pointer and its row and column strides in elements. `parallel`
/// cuts dst into one band per thread of the current rayon pool, otherwise it all runs on
/// the calling thread.
///
/// # Safety
/// Every element `r * rs + c * cs` (r, c in range) must be inside its allocation; the dst
/// elements must not be read or written by anyone else during the call and must not
/// overlap lhs or rhs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row r of dst is inside its allocation (caller).
                unsafe { std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(0.0) };
            }
        }
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // dst in equal bands of rows (of columns when it has too few rows), one per thread, each a
    // serial gemm that packs its own operands: in a training step on two cores this measured
    // a little faster than gemm's own rayon split (BENCHMARKS.md, training step).
    let split_rows = m >= 2 * MIN_PART || m >= n;
    let len = if split_rows { m } else { n };
    let parts = threads.min(len / MIN_PART).max(1);
    if parts == 1 {
        // SAFETY: forwarded from the caller.
        unsafe {
            gemm_serial(
                m, n, k, dst, dst_rs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs,
            )
        };
        return;
    }
    let chunk = len.div_ceil(parts).next_multiple_of(16);
    let (dst, lhs, rhs) = (dst as usize, lhs as usize, rhs as usize);
    rayon::scope(|s| {
        for start in (0..len).step_by(chunk) {
            let l = chunk.min(len - start);
            // The band's shape and where it starts in dst, lhs and rhs.
            let (rows, cols, at_dst, at_lhs, at_rhs) = if split_rows {
                (l, n, start * dst_rs, start * lhs_rs, 0)
            } else {
                (m, l, start, 0, start * rhs_cs)
            };
            s.spawn(move |_| {
                let (dst, lhs, rhs) = (dst as *mut f32, lhs as *const f32, rhs as *const f32);
                // SAFETY: each band owns its dst rows (or columns), inside the caller's
                // ranges; lhs and rhs are only read.
                unsafe {
                    gemm_serial(
                        rows,
                        cols,
                        k,
                        dst.add(at_dst),
                        dst_rs,
                        accumulate,
                        lhs.add(at_lhs),
                        lhs_rs,
                        lhs_cs,
                        rhs.add(at_rhs),
                        rhs_rs,
                        rhs_cs,
                    )
                }
            });
        }
    });
}

/// Rows (or columns) below which a part is not worth a thread.
const MIN_PART: usize = 64;

/// `gemm_raw` on the calling thread.
///
/// # Safety
/// As [`gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// out [M,N] = inp [M,K] @ weight [N,K]^T (overwrites out).
pub fn matmul_forward(out: &mut [f32], inp: &[f32], weight: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "matmul: out is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul: inp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul: weight is not [N, K]");
    // rhs = weight^T [K,N]: element (p, j) at j*K + p.
    // SAFETY: lengths checked above.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n,
            false,
            inp.as_ptr(),
            k,
            1,
            weight.as_ptr(),
            1,
            k,
            true,
        )
    }
}

/// dinp [M,K] += dout [M,N] @ weight [N,K]; dweight [N,K] += dout^T @ inp [M,K].
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dout.len(), m * n, "matmul: dout is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul: inp is not [M, K]");
    assert_eq!(dinp.len(), m * k, "matmul: dinp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul: weight is not [N, K]");
    assert_eq!(dweight.len(), n * k, "matmul: dweight is not [N, K]");
    // SAFETY: lengths checked above. dinp: lhs dout [M,N], rhs weight [N,K].
    unsafe {
        gemm_raw(
            m,
            k,
            n,
            dinp.as_mut_ptr(),
            k,
            true,
            dout.as_ptr(),
            n,
            1,
            weight.as_ptr(),
            k,
            1,
            true,
        )
    }
    // dweight: lhs dout^T [N,M] (element (j, i) at i*N + j), rhs inp [M,K].
    // SAFETY: lengths checked above.
    unsafe {
        gemm_raw(
            n,
            k,
            m,
            dweight.as_mut_ptr(),
            k,
            true,
            dout.as_ptr(),
            1,
            n,
            inp.as_ptr(),
            k,
            1,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul as reference;
    use crate::cpu::testutil::*;

    // Odd sizes; (130, 70, 150) is cut into bands of rows, (7, 20, 300) into bands of columns
    // when the pool has two threads or more.
    const SHAPES: [(usize, usize, usize); 7] = [
        (7, 13, 5),
        (1, 1, 1),
        (1, 64, 33),
        (33, 17, 1),
        (64, 96, 80),
        (130, 70, 150),
        (7, 20, 300),
    ];

    #[test]
    fn forward_matches_reference() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let mut r = rng(100 + seed as u64);
            let inp = rand_vec(&mut r, m * k, 1.0);
            let weight = rand_vec(&mut r, n * k, 1.0);
            let mut want = vec![0.0; m * n];
            reference::matmul_forward(&mut want, &inp, &weight, m, k, n);
            let mut got = vec![f32::NAN; m * n];
            matmul_forward(&mut got, &inp, &weight, m, k, n);
            assert_close("out", &got, &want, 1e-4, 1e-5 * k as f32);
        }
    }

    #[test]
    fn backward_matches_reference_and_accumulates() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let mut r = rng(200 + seed as u64);
            let inp = rand_vec(&mut r, m * k, 1.0);
            let weight = rand_vec(&mut r, n * k, 1.0);
            let dout = rand_vec(&mut r, m * n, 1.0);
            let dinp0 = rand_vec(&mut r, m * k, 1.0);
            let dweight0 = rand_vec(&mut r, n * k, 1.0);
            let (mut want_di, mut want_dw) = (dinp0.clone(), dweight0.clone());
            reference::matmul_backward(&mut want_di, &mut want_dw, &dout, &inp, &weight, m, k, n);
            let (mut di, mut dw) = (dinp0, dweight0);
            matmul_backward(&mut di, &mut dw, &dout, &inp, &weight, m, k, n);
            assert_close("dinp", &di, &want_di, 1e-4, 1e-5 * n as f32);
            assert_close("dweight", &dw, &want_dw, 1e-4, 1e-5 * m as f32);
        }
    }

    #[test]
    fn zero_k_writes_zeros_forward() {
        let mut out = vec![5.0; 6];
        matmul_forward(&mut out, &[], &[], 2, 0, 3);
        assert!(out.iter().all(|&x| x == 0.0));
    }
}
