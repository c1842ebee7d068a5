//! Compiling kernel families with NVRTC (loaded dynamically through cudarc).
//!
//! The library is looked up as `libnvrtc.so.12` on the loader path; `scripts/cuda-env.sh`
//! installs the PyPI wheel and exports `LD_LIBRARY_PATH`. cudarc panics when the library is
//! missing, so every entry point checks [`nvrtc_available`] first and returns
//! [`CudaError::NvrtcMissing`] instead.

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::{result, sys};

use super::error::CudaError;
use super::source::KernelFamily;

/// GPU architectures the kernels are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// A100 class (Ampere).
    Sm80,
    /// H100 / H200 class (Hopper).
    Sm90,
}

impl Arch {
    /// Both architectures the compile check covers.
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// `sm_80` / `sm_90`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The architecture for a device's compute capability: 9.x and above use sm_90,
    /// 8.x sm_80 (its CUBIN runs on every 8.x).
    pub fn for_capability(major: i32, _minor: i32) -> Option<Arch> {
        match major {
            8 => Some(Arch::Sm80),
            m if m >= 9 => Some(Arch::Sm90),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A family compiled for one architecture: PTX text (for reading and `ptxas -v`) and the
/// CUBIN (machine code the driver loads without JIT).
#[derive(Debug, Clone)]
pub struct CompiledModule {
    pub family: &'static str,
    pub arch: Arch,
    pub ptx: String,
    pub cubin: Vec<u8>,
}

/// Whether libnvrtc can be loaded (never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, e.g. (12, 9).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for writes.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    rc.result().map_err(|e| CudaError::Compile {
        family: "-",
        arch: "-".into(),
        log: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

/// The options every family is compiled with.
pub fn compile_options(arch: Arch) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={}", arch.as_str()),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    // Not needed by our kernels (they are header-free), but allowed for experiments.
    if let Ok(dir) = std::env::var("NEUROSHARD_CUDA_INCLUDE")
        && !dir.is_empty()
    {
        opts.push(format!("--include-path={dir}"));
    }
    opts
}

/// Compiles one family for `arch` to PTX and CUBIN. A compile error carries NVRTC's log.
pub fn compile_family(family: &KernelFamily, arch: Arch) -> Result<CompiledModule, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let fail = |log: String| CudaError::Compile {
        family: family.name,
        arch: arch.to_string(),
        log,
    };
    let src =
        CString::new(family.expanded_source()).map_err(|_| fail("source holds a NUL".into()))?;
    let name = CString::new(format!("{}.cu", family.name)).expect("family names hold no NUL");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let out = (|| {
        let opts = compile_options(arch);
        // SAFETY: `prog` was just created and is destroyed only below.
        if let Err(e) = unsafe { result::compile_program(prog, &opts) } {
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            return Err(fail(format!("{e:?}\n{log}")));
        }
        // SAFETY: compiled successfully above.
        let ptx = unsafe { result::get_ptx(prog) }.map_err(|e| fail(format!("get ptx: {e:?}")))?;
        let cubin = unsafe { get_cubin(prog) }.map_err(|e| fail(format!("get cubin: {e:?}")))?;
        Ok(CompiledModule {
            family: family.name,
            arch,
            ptx: c_chars_to_string(&ptx),
            cubin,
        })
    })();
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// # Safety
/// `prog` must be a successfully compiled program for a real (`sm_XX`) architecture.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per the caller's contract.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }.result()?;
    Ok(buf)
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_and_capabilities() {
        assert_eq!(Arch::Sm90.as_str(), "sm_90");
        assert_eq!(Arch::for_capability(9, 0), Some(Arch::Sm90));
        assert_eq!(Arch::for_capability(8, 6), Some(Arch::Sm80));
        assert_eq!(Arch::for_capability(7, 5), None);
        assert!(compile_options(Arch::Sm80).contains(&"--gpu-architecture=sm_80".to_string()));
    }
}
