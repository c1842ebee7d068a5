//! Fast bf16 linear layer: bf16 operands, f32 accumulation, f32 results, the same three
//! products as `matmul` (forward, dinp, dweight) with the transposes expressed by strides.
//!
//! On a CPU with AVX512-BF16 (detected at run time) a packed GEMM whose micro-kernel is
//! `vdpbf16ps`: each instruction multiplies 16 pairs of bf16 and adds both products to 16 f32
//! accumulators, twice the work of an f32 FMA. Goto-style blocking: a KC x NC block of the
//! right operand and an MC x KC block of the left are packed into pairs along the reduction
//! (u32 = two bf16), the 12 x 32 micro-kernel keeps its 24 accumulators in registers. The
//! result is cut into one band of rows (or columns) per thread of the current rayon pool.
//! Elsewhere the operands are widened to f32 and go through the f32 GEMM (same values: the
//! widening is exact).

use half::bf16;
use std::sync::OnceLock;

/// Whether this CPU executes `vdpbf16ps` (AVX512-BF16, with AVX512F/BW/VL for the packing),
/// checked once.
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the fast bf16 GEMM here is usable on this CPU (the engine's default dtype rule).
pub fn native_bf16() -> bool {
    has_avx512_bf16()
}

/// `dst[i] = bf16(src[i])`, round to nearest even, split across the current rayon pool;
/// `vcvtneps2bf16` where available (which reads f32 subnormals as zero, below 1.2e-38).
pub fn to_bf16(dst: &mut [bf16], src: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "to_bf16: lengths differ");
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx512_bf16() {
                // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above).
                unsafe { avx::convert(d, s) };
                return;
            }
            crate::cpu::matmul_bf16::to_bf16(d, s);
        });
}

fn widen(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// out [M,N] = inp [M,K] @ weight [N,K]^T (overwrites out), bf16 operands, f32 sums.
pub fn matmul_bf16_forward(
    out: &mut [f32],
    inp: &[bf16],
    weight: &[bf16],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "matmul_bf16: out is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul_bf16: inp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul_bf16: weight is not [N, K]");
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // rhs = weight^T [K,N]: element (p, j) at j*K + p. SAFETY: lengths checked above,
        // the CPU has the instructions.
        unsafe {
            avx::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                n,
                false,
                avx::Mat::new(inp, k, 1),
                avx::Mat::new(weight, 1, k),
            )
        };
        return;
    }
    super::matmul_forward(out, &widen(inp), &widen(weight), m, k, n);
}

/// dinp [M,K] += dout [M,N] @ weight [N,K]; dweight [N,K] += dout^T @ inp [M,K]; bf16
/// operands, f32 sums accumulated into the f32 gradients.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[bf16],
    inp: &[bf16],
    weight: &[bf16],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dout.len(), m * n, "matmul_bf16: dout is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul_bf16: inp is not [M, K]");
    assert_eq!(dinp.len(), m * k, "matmul_bf16: dinp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul_bf16: weight is not [N, K]");
    assert_eq!(dweight.len(), n * k, "matmul_bf16: dweight is not [N, K]");
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: lengths checked above, the CPU has the instructions.
        unsafe {
            // dinp: lhs dout [M,N], rhs weight [N,K].
            avx::gemm(
                m,
                k,
                n,
                dinp.as_mut_ptr(),
                k,
                true,
                avx::Mat::new(dout, n, 1),
                avx::Mat::new(weight, k, 1),
            );
            // dweight: lhs dout^T [N,M] (element (j, i) at i*N + j), rhs inp [M,K].
            avx::gemm(
                n,
                k,
                m,
                dweight.as_mut_ptr(),
                k,
                true,
                avx::Mat::new(dout, 1, n),
                avx::Mat::new(inp, k, 1),
            );
        }
        return;
    }
    super::matmul_backward(
        dinp,
        dweight,
        &widen(dout),
        &widen(inp),
        &widen(weight),
        m,
        k,
        n,
    );
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use half::bf16;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Micro-tile rows and columns (24 zmm accumulators), reduction block (even), row block
    /// (a multiple of MR) and column block of the packed right operand.
    const MR: usize = 12;
    const NR: usize = 32;
    const KC: usize = 256;
    const MC: usize = 96;
    const NC: usize = 1024;
    /// Rows (or columns) below which a band is not worth a thread.
    const MIN_PART: usize = 64;

    /// A read-only bf16 operand: element (r, c) at `ptr + r*rs + c*cs` (the address as usize
    /// so bands can cross threads).
    #[derive(Clone, Copy)]
    pub(super) struct Mat {
        ptr: usize,
        rs: usize,
        cs: usize,
    }

    impl Mat {
        pub(super) fn new(x: &[bf16], rs: usize, cs: usize) -> Mat {
            Mat {
                ptr: x.as_ptr() as usize,
                rs,
                cs,
            }
        }
        fn at(self, r: usize, c: usize) -> Mat {
            Mat {
                ptr: self.ptr + 2 * (r * self.rs + c * self.cs),
                ..self
            }
        }
        /// The address of element (r, c).
        ///
        /// # Safety
        /// (r, c) must be inside the operand.
        #[inline(always)]
        unsafe fn ptr(self, r: usize, c: usize) -> *const u16 {
            // SAFETY: forwarded from the caller.
            unsafe { (self.ptr as *const u16).add(r * self.rs + c * self.cs) }
        }
        /// The raw bits of element (r, c).
        ///
        /// # Safety
        /// (r, c) must be inside the operand.
        #[inline(always)]
        unsafe fn get(self, r: usize, c: usize) -> u32 {
            // SAFETY: forwarded from the caller.
            unsafe { u32::from(*(self.ptr as *const u16).add(r * self.rs + c * self.cs)) }
        }
    }

    thread_local! {
        /// Packed left block and right panel of the calling thread.
        static PACK: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// # Safety
    /// 16-lane chunks of `s` are read and of `d` written; the CPU has AVX512F + AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn convert(d: &mut [bf16], s: &[f32]) {
        let n = d.len().min(s.len());
        let mut i = 0;
        while i < n {
            let l = (n - i).min(16);
            let mask: __mmask16 = if l == 16 { 0xffff } else { (1u16 << l) - 1 };
            // SAFETY: lanes beyond l are masked off in the load and the store.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, s.as_ptr().add(i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(d.as_mut_ptr().add(i) as *mut i16, mask, h);
            }
            i += 16;
        }
    }

    /// `dst[m,n] (row stride dst_rs) = (accumulate ? dst : 0) + a[m,k] @ b[k,n]`, cut into
    /// one band per thread of the current rayon pool.
    ///
    /// # Safety
    /// Every element of a, b and dst in range is inside its allocation; dst is written by
    /// no one else and overlaps neither operand; the CPU has AVX512F + AVX512-BF16.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        a: Mat,
        b: Mat,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let threads = rayon::current_num_threads();
        let split_rows = m >= 2 * MIN_PART || m >= n;
        let len = if split_rows { m } else { n };
        let parts = threads.min(len / MIN_PART).max(1);
        if parts == 1 {
            // SAFETY: forwarded from the caller.
            unsafe { serial(m, n, k, dst, dst_rs, accumulate, a, b) };
            return;
        }
        let chunk = len.div_ceil(parts).next_multiple_of(MR.max(16));
        let dst = dst as usize;
        rayon::scope(|s| {
            for start in (0..len).step_by(chunk) {
                let l = chunk.min(len - start);
                s.spawn(move |_| {
                    let dst = dst as *mut f32;
                    // SAFETY: each band owns its rows (columns) of dst, inside the caller's
                    // ranges; the operands are only read.
                    unsafe {
                        if split_rows {
                            let d = dst.add(start * dst_rs);
                            serial(l, n, k, d, dst_rs, accumulate, a.at(start, 0), b)
                        } else {
                            let d = dst.add(start);
                            serial(m, l, k, d, dst_rs, accumulate, a, b.at(0, start))
                        }
                    }
                });
            }
        });
    }

    /// [`gemm`] on the calling thread.
    ///
    /// # Safety
    /// As [`gemm`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn serial(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        a: Mat,
        b: Mat,
    ) {
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    // SAFETY: row r of dst is inside its allocation (caller).
                    unsafe { std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(0.0) };
                }
            }
            return;
        }
        PACK.with_borrow_mut(|(apack, bpack)| {
            apack.resize(MC * KC / 2, 0);
            bpack.resize(NC * KC / 2, 0);
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    let kp = kc.div_ceil(2);
                    // SAFETY: the block is inside b (caller); the panel fits bpack.
                    unsafe { pack_b(bpack, b, pc, kc, jc, nc) };
                    let acc = accumulate || pc > 0;
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        // SAFETY: as above, for a.
                        unsafe { pack_a(apack, a, ic, mc, pc, kc) };
                        for jp in 0..nc.div_ceil(NR) {
                            let cols = NR.min(nc - jp * NR);
                            for ib in 0..mc.div_ceil(MR) {
                                let rows = MR.min(mc - ib * MR);
                                // SAFETY: the tile is inside dst; the packed slices hold kp
                                // pairs of MR rows and NR columns.
                                unsafe {
                                    kernel(
                                        kp,
                                        apack.as_ptr().add(ib * kp * MR),
                                        bpack.as_ptr().add(jp * kp * NR),
                                        dst.add((ic + ib * MR) * dst_rs + jc + jp * NR),
                                        dst_rs,
                                        acc,
                                        rows,
                                        cols,
                                    )
                                };
                            }
                        }
                    }
                }
            }
        });
    }

    /// Packs rows `i0..i0+mc`, reduction `p0..p0+kc` of `a` as `[row block][pair][MR]` u32
    /// (low half the even reduction index), zeros past the edges.
    ///
    /// # Safety
    /// The block is inside `a`; the CPU has AVX512F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pack_a(out: &mut [u32], a: Mat, i0: usize, mc: usize, p0: usize, kc: usize) {
        let kp = kc.div_ceil(2);
        for ib in 0..mc.div_ceil(MR) {
            let blk = &mut out[ib * kp * MR..(ib + 1) * kp * MR];
            let full = (ib + 1) * MR <= mc && kc.is_multiple_of(2);
            if full && a.cs == 1 {
                // Pairs contiguous in memory: one u32 load per pair.
                for r in 0..MR {
                    // SAFETY: row i0 + ib*MR + r, reduction p0..p0+kc are inside a.
                    let src = unsafe { a.ptr(i0 + ib * MR + r, p0) } as *const u32;
                    for p in 0..kp {
                        // SAFETY: as above (kc even, so the pair's second half is inside).
                        blk[p * MR + r] = unsafe { src.add(p).read_unaligned() };
                    }
                }
            } else if full && a.rs == 1 {
                // Rows along memory (a transpose read): interleave two reduction rows.
                let mask: __mmask16 = (1 << MR) - 1;
                for p in 0..kp {
                    // SAFETY: reduction rows p0+2p and p0+2p+1, columns i0+ib*MR.. +MR are
                    // inside a; the masked store stays in the block's MR slots.
                    unsafe {
                        let r0 = a.ptr(i0 + ib * MR, p0 + 2 * p);
                        let r1 = a.ptr(i0 + ib * MR, p0 + 2 * p + 1);
                        let v = interleave16(r0, r1, mask);
                        _mm512_mask_storeu_epi32(blk.as_mut_ptr().add(p * MR) as *mut i32, mask, v);
                    }
                }
            } else {
                for r in 0..MR {
                    let i = ib * MR + r;
                    for p in 0..kp {
                        let k0 = 2 * p;
                        blk[p * MR + r] = if i >= mc {
                            0
                        } else {
                            // SAFETY: inside the block (caller).
                            let lo = unsafe { a.get(i0 + i, p0 + k0) };
                            let hi = if k0 + 1 < kc {
                                // SAFETY: as above.
                                unsafe { a.get(i0 + i, p0 + k0 + 1) }
                            } else {
                                0
                            };
                            lo | (hi << 16)
                        };
                    }
                }
            }
        }
    }

    /// 16 (or the `mask`ed first few) u32 pairs `lo[j] | hi[j] << 16` from two bf16 rows.
    ///
    /// # Safety
    /// The masked lanes of both rows are readable; the CPU has AVX512F/BW/VL.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn interleave16(lo: *const u16, hi: *const u16, mask: __mmask16) -> __m512i {
        // SAFETY: masked lanes only (caller).
        unsafe {
            let l = _mm256_maskz_loadu_epi16(mask, lo as *const i16);
            let h = _mm256_maskz_loadu_epi16(mask, hi as *const i16);
            _mm512_or_si512(
                _mm512_cvtepu16_epi32(l),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
            )
        }
    }

    /// Packs reduction `p0..p0+kc`, columns `j0..j0+nc` of `b` as `[column panel][pair][NR]`
    /// u32, zeros past the edges.
    ///
    /// # Safety
    /// The block is inside `b`; the CPU has AVX512F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pack_b(out: &mut [u32], b: Mat, p0: usize, kc: usize, j0: usize, nc: usize) {
        let kp = kc.div_ceil(2);
        for jp in 0..nc.div_ceil(NR) {
            let pan = &mut out[jp * kp * NR..(jp + 1) * kp * NR];
            let cols = NR.min(nc - jp * NR);
            let full = cols == NR && kc.is_multiple_of(2);
            if full && b.rs == 1 {
                // Pairs contiguous in memory (a weight read as its transpose).
                for j in 0..NR {
                    // SAFETY: column j0+jp*NR+j, reduction p0..p0+kc are inside b.
                    let src = unsafe { b.ptr(p0, j0 + jp * NR + j) } as *const u32;
                    for p in 0..kp {
                        // SAFETY: as above (kc even).
                        pan[p * NR + j] = unsafe { src.add(p).read_unaligned() };
                    }
                }
            } else if full && b.cs == 1 {
                // Rows contiguous: interleave two reduction rows, 16 columns at a time.
                for p in 0..kp {
                    for half in 0..2 {
                        let j = j0 + jp * NR + 16 * half;
                        // SAFETY: rows p0+2p, p0+2p+1, columns j..j+16 are inside b; the
                        // store fills 16 of the panel's slots.
                        unsafe {
                            let v = interleave16(
                                b.ptr(p0 + 2 * p, j),
                                b.ptr(p0 + 2 * p + 1, j),
                                0xffff,
                            );
                            _mm512_storeu_si512(
                                pan.as_mut_ptr().add(p * NR + 16 * half) as *mut __m512i,
                                v,
                            );
                        }
                    }
                }
            } else {
                for p in 0..kp {
                    let k0 = 2 * p;
                    for j in 0..NR {
                        pan[p * NR + j] = if j >= cols {
                            0
                        } else {
                            // SAFETY: inside the block (caller).
                            let lo = unsafe { b.get(p0 + k0, j0 + jp * NR + j) };
                            let hi = if k0 + 1 < kc {
                                // SAFETY: as above.
                                unsafe { b.get(p0 + k0 + 1, j0 + jp * NR + j) }
                            } else {
                                0
                            };
                            lo | (hi << 16)
                        };
                    }
                }
            }
        }
    }

    /// The 12 x 32 tile at `c`: `(acc ? c : 0) + sum over kp pairs`, written for the first
    /// `rows` rows and `cols` columns.
    ///
    /// # Safety
    /// `a` holds kp*MR pairs, `b` kp*NR; the written part of the tile is inside dst.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        c_rs: usize,
        acc: bool,
        rows: usize,
        cols: usize,
    ) {
        let mut s = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            // SAFETY: inside the packed slices (caller); 32 u32 of b, MR of a per pair.
            unsafe {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const __m512i));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const __m512i));
                let ap = a.add(p * MR);
                for (r, sr) in s.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    sr[0] = _mm512_dpbf16_ps(sr[0], av, b0);
                    sr[1] = _mm512_dpbf16_ps(sr[1], av, b1);
                }
            }
        }
        let mask = |l: usize| -> __mmask16 {
            if l >= 16 {
                0xffff
            } else {
                ((1u32 << l) - 1) as __mmask16
            }
        };
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for (r, sr) in s.iter().enumerate().take(rows) {
            // SAFETY: masked lanes only touch the tile's `cols` columns of row r.
            unsafe {
                let row = c.add(r * c_rs);
                let (mut v0, mut v1) = (sr[0], sr[1]);
                if acc {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul_bf16 as reference;
    use crate::cpu::testutil::*;

    // Odd sizes past every block edge: K odd and above KC (an odd pair, two reduction
    // blocks), N above NC, M above MC, and the shapes cut into bands of columns.
    const SHAPES: [(usize, usize, usize); 8] = [
        (7, 13, 5),
        (1, 1, 1),
        (1, 64, 33),
        (33, 17, 1),
        (64, 96, 80),
        (130, 301, 150),
        (7, 20, 300),
        (100, 40, 1100),
    ];

    fn round(v: &[f32]) -> Vec<bf16> {
        let mut h = vec![bf16::ZERO; v.len()];
        reference::to_bf16(&mut h, v);
        h
    }

    #[test]
    fn conversion_equals_reference() {
        let mut r = rng(300);
        let x = rand_vec(&mut r, 40_003, 1e3);
        let (mut a, mut b) = (vec![bf16::ZERO; x.len()], vec![bf16::ZERO; x.len()]);
        to_bf16(&mut a, &x);
        reference::to_bf16(&mut b, &x);
        assert_eq!(a, b);
    }

    /// Same bf16 operands as the reference, so the only difference is f32 summation order:
    /// rtol 1e-5, atol 1e-5 per unit of the reduction length.
    #[test]
    fn forward_matches_reference() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let mut r = rng(310 + seed as u64);
            let inp = round(&rand_vec(&mut r, m * k, 1.0));
            let weight = round(&rand_vec(&mut r, n * k, 1.0));
            let mut want = vec![0.0; m * n];
            reference::matmul_bf16_forward(&mut want, &inp, &weight, m, k, n);
            let mut got = vec![f32::NAN; m * n];
            matmul_bf16_forward(&mut got, &inp, &weight, m, k, n);
            assert_close("out", &got, &want, 1e-5, 1e-5 * k as f32);
        }
    }

    #[test]
    fn backward_matches_reference_and_accumulates() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let mut r = rng(320 + seed as u64);
            let inp = round(&rand_vec(&mut r, m * k, 1.0));
            let weight = round(&rand_vec(&mut r, n * k, 1.0));
            let dout = round(&rand_vec(&mut r, m * n, 1.0));
            let dinp0 = rand_vec(&mut r, m * k, 1.0);
            let dweight0 = rand_vec(&mut r, n * k, 1.0);
            let (mut want_di, mut want_dw) = (dinp0.clone(), dweight0.clone());
            reference::matmul_bf16_backward(
                &mut want_di,
                &mut want_dw,
                &dout,
                &inp,
                &weight,
                m,
                k,
                n,
            );
            let (mut di, mut dw) = (dinp0, dweight0);
            matmul_bf16_backward(&mut di, &mut dw, &dout, &inp, &weight, m, k, n);
            assert_close("dinp", &di, &want_di, 1e-5, 1e-5 * n as f32);
            assert_close("dweight", &dw, &want_dw, 1e-5, 1e-5 * m as f32);
        }
    }

    /// This test machine's CPU decides which path the tests above took; say which.
    #[test]
    fn reports_the_path_taken() {
        eprintln!("avx512_bf16 GEMM: {}", has_avx512_bf16());
        let (m, k, n) = (3, 4, 2);
        let mut out = vec![0.0; m * n];
        matmul_bf16_forward(
            &mut out,
            &round(&[1.0; 12]),
            &round(&[0.5, 0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0]),
            m,
            k,
            n,
        );
        assert_eq!(out, [2.0, 8.0, 2.0, 8.0, 2.0, 8.0]);
    }
}
