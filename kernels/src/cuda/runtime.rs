//! A CUDA context with every kernel family loaded: the object the launch wrappers
//! (`ops`) hang off.
//!
//! Modules come from NVRTC at start-up, or from a directory of precompiled
//! `<family>.<arch>.cubin` (or `.ptx`) files, for machines that have the driver but no
//! libnvrtc (see `scripts/gpu-check.sh`). CUBINs need no JIT, so they also run on drivers
//! older than the NVRTC that built them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;

use super::device::{DeviceProbe, probe};
use super::dtype::GpuDtype;
use super::error::CudaError;
use super::nvrtc::{Arch, compile_family, nvrtc_available};
use super::source::{FAMILIES, KernelFamily};

/// Where the kernel modules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compile every family with NVRTC now.
    Nvrtc,
    /// Load `<family>.<arch>.cubin`, else `<family>.<arch>.ptx`, from this directory.
    Dir(PathBuf),
    /// `$NEUROSHARD_CUDA_MODULES` when set, else NVRTC.
    Auto,
}

impl ModuleSource {
    fn resolve(&self) -> ModuleSource {
        match self {
            ModuleSource::Auto => match std::env::var("NEUROSHARD_CUDA_MODULES") {
                Ok(d) if !d.is_empty() => ModuleSource::Dir(PathBuf::from(d)),
                _ => ModuleSource::Nvrtc,
            },
            other => other.clone(),
        }
    }
}

/// The file name of a precompiled module.
pub fn module_file_name(family: &str, arch: Arch, ext: &str) -> String {
    format!("{family}.{arch}.{ext}")
}

/// One device, one stream, every kernel loaded.
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    name: String,
    functions: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("device", &self.name)
            .field("arch", &self.arch)
            .field("kernels", &self.functions.len())
            .finish()
    }
}

impl CudaKernels {
    /// Opens device `ordinal` and loads every family. Fails (never panics) when the driver,
    /// the device, NVRTC (for [`ModuleSource::Nvrtc`]) or a module file is missing.
    pub fn new(ordinal: usize, source: ModuleSource) -> Result<CudaKernels, CudaError> {
        match probe() {
            DeviceProbe::Available { .. } => {}
            DeviceProbe::NoDriver => return Err(CudaError::DriverMissing),
            DeviceProbe::NoDevice => return Err(CudaError::NoDevice),
            DeviceProbe::DriverError(e) => return Err(CudaError::DriverInit(e)),
        }
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("open context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(CudaError::driver("capability"))?;
        let arch = Arch::for_capability(major, minor).ok_or_else(|| CudaError::Shape {
            op: "open device",
            detail: format!(
                "compute capability {major}.{minor} is below 8.0 (bf16 mma needs sm_80)"
            ),
        })?;
        let name = ctx.name().unwrap_or_else(|_| "cuda device".into());
        let source = source.resolve();
        if source == ModuleSource::Nvrtc && !nvrtc_available() {
            return Err(CudaError::NvrtcMissing);
        }
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for family in FAMILIES {
            let ptx = module_image(family, arch, &source)?;
            let module = ctx
                .load_module(ptx)
                .map_err(CudaError::driver("load module"))?;
            for &sym in family.symbols {
                let f = module
                    .load_function(sym)
                    .map_err(|_| CudaError::MissingKernel {
                        family: family.name,
                        symbol: sym.to_string(),
                    })?;
                functions.insert(sym, f);
            }
            modules.push(module);
        }
        let stream = ctx.default_stream();
        Ok(CudaKernels {
            ctx,
            stream,
            arch,
            name,
            functions,
            _modules: modules,
        })
    }

    /// The loaded kernel `symbol`.
    pub fn func(&self, symbol: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(symbol)
            .ok_or_else(|| CudaError::MissingKernel {
                family: "?",
                symbol: symbol.to_string(),
            })
    }

    /// `<stem>_<dtype>`, e.g. `rmsnorm_fwd_bf16`.
    pub fn func_for<T: GpuDtype>(&self, stem: &str) -> Result<&CudaFunction, CudaError> {
        self.func(&format!("{stem}_{}", T::SUFFIX))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Waits for all queued work; this is where asynchronous faults (illegal address, launch
    /// failure) surface.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronize"))
    }

    /// Allocates `n` zeroed elements.
    pub fn zeros<T: GpuDtype>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros::<T>(n)
            .map_err(CudaError::driver("alloc"))
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: GpuDtype>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .clone_htod(host)
            .map_err(CudaError::driver("upload"))
    }

    /// Copies a device buffer to the host (synchronises).
    pub fn download<T: GpuDtype>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        self.stream
            .clone_dtoh(dev)
            .map_err(CudaError::driver("download"))
    }

    /// Overwrites a device buffer from the host.
    pub fn write<T: GpuDtype>(&self, dev: &mut CudaSlice<T>, host: &[T]) -> Result<(), CudaError> {
        super::error::ensure(dev.len() == host.len(), "write", || {
            format!("device {} vs host {} elements", dev.len(), host.len())
        })?;
        self.stream
            .memcpy_htod(host, dev)
            .map_err(CudaError::driver("write"))
    }
}

fn module_image(
    family: &KernelFamily,
    arch: Arch,
    source: &ModuleSource,
) -> Result<Ptx, CudaError> {
    match source {
        ModuleSource::Dir(dir) => load_from_dir(dir, family.name, arch),
        _ => {
            let m = compile_family(family, arch)?;
            Ok(Ptx::from_binary(m.cubin))
        }
    }
}

fn load_from_dir(dir: &Path, family: &'static str, arch: Arch) -> Result<Ptx, CudaError> {
    let cubin = dir.join(module_file_name(family, arch, "cubin"));
    if cubin.is_file() {
        let bytes = std::fs::read(&cubin).map_err(|source| CudaError::ModuleFile {
            path: cubin.display().to_string(),
            source,
        })?;
        return Ok(Ptx::from_binary(bytes));
    }
    let ptx = dir.join(module_file_name(family, arch, "ptx"));
    let text = std::fs::read_to_string(&ptx).map_err(|source| CudaError::ModuleFile {
        path: ptx.display().to_string(),
        source,
    })?;
    Ok(Ptx::from_src(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_missing_files_are_clear_errors() {
        assert_eq!(
            module_file_name("rope", Arch::Sm90, "cubin"),
            "rope.sm_90.cubin"
        );
        let dir = std::env::temp_dir().join("neuroshard-no-such-module-dir");
        let e = load_from_dir(&dir, "rope", Arch::Sm80).unwrap_err();
        assert!(e.to_string().contains("rope.sm_80.ptx"), "{e}");
    }

    #[test]
    fn opening_without_a_device_is_an_error_not_a_panic() {
        if probe().is_available() {
            return; // covered by the gpu tests
        }
        let e = CudaKernels::new(0, ModuleSource::Nvrtc).unwrap_err();
        assert!(
            matches!(
                e,
                CudaError::DriverMissing | CudaError::NoDevice | CudaError::DriverInit(_)
            ),
            "{e}"
        );
    }
}
