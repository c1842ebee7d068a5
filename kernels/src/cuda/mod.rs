//! CUDA kernels: the sources (`kernels/cuda/*.cu`, embedded), the NVRTC compile helper,
//! module loading through cudarc, and typed launch wrappers with the CPU ops' names.
//!
//! Nothing here needs CUDA at build time (cudarc loads libcuda / libnvrtc dynamically), and
//! nothing panics when they are missing: [`device::probe`] and [`nvrtc::nvrtc_available`]
//! say so first.

pub mod device;
pub mod dtype;
pub mod error;
pub mod nvrtc;
pub mod ops;
pub mod runtime;
pub mod source;

/// The cudarc version the kernels are built against, for callers that hold device buffers.
pub use cudarc;
pub use device::{DeviceProbe, probe};
pub use dtype::{Bf16, GpuDtype};
pub use error::CudaError;
pub use nvrtc::{Arch, CompiledModule, compile_family, nvrtc_available};
pub use runtime::{CudaKernels, ModuleSource};
pub use source::{FAMILIES, KernelFamily};
