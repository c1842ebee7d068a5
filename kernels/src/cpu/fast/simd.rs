//! Helpers for the fast paths: runtime dispatch to an AVX2+FMA build of a kernel (the crate
//! is compiled for baseline x86_64, so without this LLVM only emits SSE2), a shared raw
//! pointer for disjoint parallel writes, and a vectorizable `exp`.

/// Defines `fn $name(args) -> ret` whose body is compiled twice: once with AVX2+FMA
/// enabled (chosen at run time when the CPU has them) and once for the baseline target.
/// Only the body itself gets the features: keep rayon closures outside of it.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::cpu::fast::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Tests set this to run the baseline (non-AVX2) build of every kernel.
#[cfg(test)]
pub(crate) static FORCE_BASELINE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether this CPU has AVX2 and FMA (std caches the detection).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(test)]
    if FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer that parallel tasks share to write DISJOINT elements of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: only used to write disjoint index sets from different threads (documented at
// each use); the buffer outlives the parallel region.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Pointer to element `offset` (a method, so closures capture the whole `SyncPtr`).
    #[inline(always)]
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    /// Per-thread scratch reused across calls (rayon workers live as long as the pool), so
    /// hot paths do not allocate and fault in fresh pages on every call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of at least `len` floats (contents
/// unspecified). Re-entrant: a nested call on the same thread gets a fresh buffer.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// `exp(x)` for f32 in straight-line code that LLVM vectorizes (Cephes `expf` polynomial,
/// about 2 ulp). Inputs are clamped to [-87, 88] (so tiny results are ~1e-38 instead of 0
/// and large ones finite); NaN stays NaN. No float-to-int conversion (Rust's saturating `as`
/// does not vectorize): `n = round(x / ln 2)` and `2^n` come from the 1.5 * 2^23 trick.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    // The low bits of t hold n (two's complement); NaN gives garbage bits but y is NaN.
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// Dot product with 8 independent accumulators so it vectorizes (summation order differs
/// from a plain loop by rounding only).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Maximum of `x` (NaNs ignored unless all are NaN), -inf when empty; 8 lanes so it
/// vectorizes.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// `x = exp(scale * x - shift)` in place; returns the sum of the new values (8 lanes).
#[inline(always)]
pub(crate) fn exp_in_place_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp(c[l] * scale - shift);
            acc[l] += c[l];
        }
    }
    let mut s = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v * scale - shift);
        s += *v;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.013;
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(f32::INFINITY).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn dot_matches_f64_for_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 33] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n {n}");
        }
    }
}
