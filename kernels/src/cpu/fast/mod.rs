//! Fast CPU paths, with the same names and signatures as the references in `cpu::*`. The
//! engine calls these; each is tested against its reference on random inputs of several
//! shapes. Embedding (a row copy / scatter-add) re-exports the reference.
//!
//! Parallelism is rayon's current pool (the caller sizes it); matmul uses all of its
//! threads inside `gemm`, the other ops split rows or chunks across it.

mod adamw;
mod attention;
mod attention_cached;
mod attention_decode;
mod cross_entropy;
mod matmul;
mod matmul_bf16;
mod matmul_int8;
mod matmul_rows;
mod rmsnorm;
mod rope;
pub(crate) mod simd;
mod swiglu;

pub use super::attention_decode::DecodeSeq;
pub use super::embedding::{embedding_backward, embedding_forward};
pub use super::matmul_int8::quantize_rows_int8;
pub use adamw::{adamw_step, adamw_step_zeroing, clip_scale, global_norm, scale_in_place};
pub use attention::{attention_backward, attention_forward};
pub use attention_cached::attention_cached_forward;
pub use attention_decode::attention_decode_forward;
pub use cross_entropy::{cross_entropy_backward, cross_entropy_forward};
pub use matmul::{matmul_backward, matmul_forward};
pub use matmul_bf16::{matmul_bf16_backward, matmul_bf16_forward, native_bf16, to_bf16};
pub use matmul_int8::{has_vnni, matmul_int8_forward};
pub use matmul_rows::matmul_rows_forward;
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};

#[cfg(test)]
mod tests {
    use super::simd::FORCE_BASELINE;
    use crate::cpu::testutil::*;
    use std::sync::atomic::Ordering;

    /// Resets FORCE_BASELINE even when an assertion fails.
    struct Baseline;
    impl Drop for Baseline {
        fn drop(&mut self) {
            FORCE_BASELINE.store(false, Ordering::Relaxed);
        }
    }

    /// The per-op tests exercise the AVX2+FMA build on this machine; this one runs the
    /// baseline build of the vectorized kernels against the references. (Other tests that
    /// run meanwhile may take the baseline path too; both paths are correct.)
    #[test]
    fn baseline_build_matches_reference() {
        FORCE_BASELINE.store(true, Ordering::Relaxed);
        let _reset = Baseline;
        assert!(!super::simd::has_avx2_fma());
        let mut r = rng(900);
        let n = 1000;
        let (g, u) = (rand_vec(&mut r, n, 10.0), rand_vec(&mut r, n, 1.0));
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        super::swiglu_forward(&mut a, &g, &u);
        crate::cpu::swiglu_forward(&mut b, &g, &u);
        assert_close("swiglu", &a, &b, 1e-5, 1e-6);

        let (rows, c) = (9, 40);
        let x = rand_vec(&mut r, rows * c, 2.0);
        let w = rand_vec(&mut r, c, 1.0);
        let (mut o1, mut s1, mut o2, mut s2) = (
            vec![0.0; rows * c],
            vec![0.0; rows],
            vec![0.0; rows * c],
            vec![0.0; rows],
        );
        super::rmsnorm_forward(&mut o1, &mut s1, &x, &w, rows, c, 1e-6);
        crate::cpu::rmsnorm_forward(&mut o2, &mut s2, &x, &w, rows, c, 1e-6);
        assert_close("rmsnorm", &o1, &o2, 1e-5, 1e-6);

        let targets: Vec<u32> = (0..rows as u32).collect();
        let l1 = super::cross_entropy_forward(&x, &targets, rows, c, 37).unwrap();
        let l2 = crate::cpu::cross_entropy_forward(&x, &targets, rows, c, 37).unwrap();
        assert!(
            (l1 - l2).abs() < 1e-5 * l2.abs().max(1.0),
            "loss {l1} vs {l2}"
        );

        let (b, t, h, kvh, d) = (2, 19, 4, 2, 6);
        let q = rand_vec(&mut r, b * t * h * d, 2.0);
        let k = rand_vec(&mut r, b * t * kvh * d, 2.0);
        let v = rand_vec(&mut r, b * t * kvh * d, 1.0);
        let (mut o1, mut l1) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        let (mut o2, mut l2) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        super::attention_forward(&mut o1, &mut l1, &q, &k, &v, b, t, h, kvh, d);
        crate::cpu::attention_forward(&mut o2, &mut l2, &q, &k, &v, b, t, h, kvh, d);
        assert_close("attention", &o1, &o2, 1e-4, 1e-5);
        assert_close("lse", &l1, &l2, 1e-5, 1e-5);
    }

    /// The fast ops run inside whatever rayon pool the caller installs (1 or 3 threads).
    #[test]
    fn fast_ops_run_in_caller_sized_pools() {
        let mut r = rng(901);
        let (m, k, n) = (70, 33, 45);
        let inp = rand_vec(&mut r, m * k, 1.0);
        let w = rand_vec(&mut r, n * k, 1.0);
        let mut want = vec![0.0; m * n];
        crate::cpu::matmul_forward(&mut want, &inp, &w, m, k, n);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0.0; m * n];
            pool.install(|| super::matmul_forward(&mut got, &inp, &w, m, k, n));
            assert_close("matmul", &got, &want, 1e-4, 1e-4);
        }
    }
}
