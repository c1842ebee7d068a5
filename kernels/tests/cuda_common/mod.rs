//! Helpers for the GPU tests (`cuda_*_gpu.rs`): device setup behind NEUROSHARD_GPU_TESTS,
//! random inputs, NaN poisoning, bf16 quantisation of CPU inputs, and a result table.

#![allow(dead_code)]

use std::fmt::Write as _;

use cudarc::driver::CudaSlice;
use neuroshard_kernels::cuda::{CudaKernels, GpuDtype, ModuleSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The device, when NEUROSHARD_GPU_TESTS=1; `None` (with a line on stderr) otherwise.
/// With the variable set, a missing device is a failure, never a skip.
pub fn gpu_or_skip(test: &str) -> Option<CudaKernels> {
    if std::env::var("NEUROSHARD_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("{test}: NEUROSHARD_GPU_TESTS is not 1: GPU comparison not run on this machine");
        return None;
    }
    match CudaKernels::new(0, ModuleSource::Auto) {
        Ok(k) => {
            eprintln!(
                "{test}: device {} ({}), modules {:?}",
                k.device_name(),
                k.arch(),
                modules_source()
            );
            Some(k)
        }
        Err(e) => panic!("{test}: NEUROSHARD_GPU_TESTS=1 but the CUDA device cannot be used: {e}"),
    }
}

fn modules_source() -> String {
    std::env::var("NEUROSHARD_CUDA_MODULES").unwrap_or_else(|_| "nvrtc".into())
}

/// Seed from NEUROSHARD_GPU_SEED, else fresh from the clock (printed so a failure can be
/// replayed).
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("NEUROSHARD_GPU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (replay with NEUROSHARD_GPU_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

pub fn randv(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

pub fn rand_ids(r: &mut StdRng, n: usize, limit: usize) -> Vec<u32> {
    (0..n).map(|_| r.random_range(0..limit as u32)).collect()
}

/// `x` rounded through `T` (identity for f32): the exact values the GPU sees.
pub fn quant<T: GpuDtype>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

pub fn up<T: GpuDtype>(k: &CudaKernels, x: &[f32]) -> CudaSlice<T> {
    let v: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    k.upload(&v).expect("upload")
}

pub fn up_u32(k: &CudaKernels, x: &[u32]) -> CudaSlice<u32> {
    k.stream().clone_htod(x).expect("upload ids")
}

pub fn down<T: GpuDtype>(k: &CudaKernels, x: &CudaSlice<T>) -> Vec<f32> {
    k.download(x)
        .expect("download")
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// A buffer filled with NaN, so an element the kernel forgets to write shows up.
pub fn poisoned<T: GpuDtype>(k: &CudaKernels, n: usize) -> CudaSlice<T> {
    let mut x = k.zeros::<T>(n).expect("alloc");
    k.fill(&mut x, f32::NAN).expect("poison");
    x
}

/// Collected comparisons of one test run.
#[derive(Default)]
pub struct Report {
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    /// Compares `got` with `want`: the error is max|got - want| / max(max|want|, 1e-6) and
    /// must be <= tol; any non-finite value where the reference is finite fails (poison).
    pub fn check(
        &mut self,
        op: &str,
        dtype: &str,
        shape: &str,
        got: &[f32],
        want: &[f32],
        tol: f32,
    ) {
        let mut status = "ok";
        let mut err = 0.0f32;
        let mut bad = 0usize;
        if got.len() != want.len() {
            status = "FAIL";
            err = f32::INFINITY;
        } else {
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (g, w) in got.iter().zip(want) {
                if !g.is_finite() && w.is_finite() {
                    bad += 1;
                } else if w.is_finite() {
                    err = err.max((g - w).abs() / scale);
                }
            }
            if bad > 0 || err > tol || err.is_nan() {
                status = "FAIL";
            }
        }
        let row =
            format!("{op:<26} {dtype:<5} {shape:<28} {err:>10.2e} {tol:>8.0e} {bad:>6} {status}");
        eprintln!("{row}");
        if status != "ok" {
            self.failures.push(row.clone());
        }
        self.rows.push(row);
    }

    pub fn finish(self, test: &str) {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{test}: {} comparisons, {} failed",
            self.rows.len(),
            self.failures.len()
        );
        let _ = writeln!(
            s,
            "{:<26} {:<5} {:<28} {:>10} {:>8} {:>6} status",
            "op", "dtype", "shape", "max_err", "tol", "nonfin"
        );
        for r in &self.rows {
            let _ = writeln!(s, "{r}");
        }
        eprintln!("{s}");
        assert!(
            self.failures.is_empty(),
            "{test}: failures:\n{}",
            self.failures.join("\n")
        );
    }
}

/// Tolerance for a dtype: f32 value, or the bf16 value.
pub fn tol<T: GpuDtype>(f32_tol: f32, bf16_tol: f32) -> f32 {
    if T::SUFFIX == "f32" {
        f32_tol
    } else {
        bf16_tol
    }
}
