//! Compile check: every kernel family under `kernels/cuda/` must compile with NVRTC for
//! sm_80 and sm_90, and every listed kernel symbol must be in the result. Needs libnvrtc
//! (`source scripts/cuda-env.sh`); no GPU. The PTX and CUBIN files are written to
//! `$NEUROSHARD_PTX_OUT` (default `<workspace>/target/ptx/`) for `scripts/ptxas-report.sh`
//! and for GPU machines without NVRTC (`NEUROSHARD_CUDA_MODULES`).
//!
//! Without NVRTC this test FAILS with instructions. Only outside CI can it be waived, by
//! setting `NEUROSHARD_SKIP_CUDA_COMPILE=1` (it then says so on stderr and passes).

use std::path::PathBuf;

use neuroshard_kernels::cuda::nvrtc::{Arch, compile_family, nvrtc_available, nvrtc_version};
use neuroshard_kernels::cuda::runtime::module_file_name;
use neuroshard_kernels::cuda::source::FAMILIES;

fn out_dir() -> PathBuf {
    match std::env::var("NEUROSHARD_PTX_OUT") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ptx"),
    }
}

fn nvrtc_or_fail() -> bool {
    if nvrtc_available() {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    let waived = std::env::var("NEUROSHARD_SKIP_CUDA_COMPILE")
        .map(|v| v == "1")
        .unwrap_or(false);
    if waived && !ci {
        eprintln!(
            "cuda_compile: NVRTC missing and NEUROSHARD_SKIP_CUDA_COMPILE=1: kernels NOT compile-checked"
        );
        return false;
    }
    panic!(
        "NVRTC (libnvrtc.so.12) not found: run `source scripts/cuda-env.sh` before `cargo test` \
         (CI={ci}; outside CI NEUROSHARD_SKIP_CUDA_COMPILE=1 waives this check)"
    );
}

#[test]
fn every_kernel_family_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_fail() {
        return;
    }
    let (major, minor) = nvrtc_version().expect("nvrtc version");
    eprintln!("cuda_compile: NVRTC {major}.{minor}");
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("create ptx output dir");
    let mut failures = Vec::new();
    for family in FAMILIES {
        for arch in Arch::ALL {
            let started = std::time::Instant::now();
            match compile_family(family, arch) {
                Ok(m) => {
                    for sym in family.symbols {
                        if !m.ptx.contains(&format!(".entry {sym}(")) {
                            failures.push(format!(
                                "{}/{arch}: symbol {sym} not in the PTX",
                                family.name
                            ));
                        }
                    }
                    if m.cubin.len() < 64 || &m.cubin[..4] != b"\x7fELF" {
                        failures.push(format!("{}/{arch}: CUBIN is not an ELF image", family.name));
                    }
                    std::fs::write(dir.join(module_file_name(family.name, arch, "ptx")), &m.ptx)
                        .expect("write ptx");
                    std::fs::write(
                        dir.join(module_file_name(family.name, arch, "cubin")),
                        &m.cubin,
                    )
                    .expect("write cubin");
                    eprintln!(
                        "cuda_compile: {:<14} {arch}: ok, {} kernels, {:.1}s",
                        family.name,
                        family.symbols.len(),
                        started.elapsed().as_secs_f32()
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernel compile failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    if !nvrtc_or_fail() {
        return;
    }
    let broken = neuroshard_kernels::cuda::source::KernelFamily {
        name: "broken",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void broken_fwd_f32(float* x) { x[0] = undefined_name; }\n",
        symbols: &["broken_fwd_f32"],
    };
    let err = compile_family(&broken, Arch::Sm90)
        .expect_err("must not compile")
        .to_string();
    assert!(
        err.contains("undefined_name"),
        "log missing from error: {err}"
    );
    assert!(err.contains("broken") && err.contains("sm_90"), "{err}");
}
