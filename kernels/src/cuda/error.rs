//! Errors of the CUDA side: a missing library or device, a kernel that does not compile or
//! load, a shape that does not fit the op, and any fault the driver reports.

use cudarc::driver::DriverError;

/// Error from compiling, loading or launching a CUDA kernel.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The NVRTC library (libnvrtc.so.12) cannot be loaded.
    #[error(
        "nvrtc library not found (libnvrtc.so.12); source scripts/cuda-env.sh or set LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    /// The CUDA driver library (libcuda.so) cannot be loaded.
    #[error("cuda driver library not found (libcuda.so.1)")]
    DriverMissing,
    /// The driver library loads but cannot be initialised (driver/library mismatch, no
    /// permission on /dev/nvidia*).
    #[error("cuda driver failed to initialise: {0}")]
    DriverInit(String),
    /// The driver loads but reports no device.
    #[error("no cuda device found")]
    NoDevice,
    /// NVRTC rejected a kernel family.
    #[error("nvrtc failed to compile {family} for {arch}: {log}")]
    Compile {
        family: &'static str,
        arch: String,
        log: String,
    },
    /// A precompiled module file is missing or unreadable.
    #[error("cannot read precompiled module {path}: {source}")]
    ModuleFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An argument does not fit the op (length, dimension, limit).
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The driver reported an error (launch failure, illegal address, out of memory, ...).
    /// After most of these the context is unusable: the process must exit.
    #[error("cuda driver error in {op}: {source}")]
    Driver {
        op: &'static str,
        #[source]
        source: DriverError,
    },
    /// A kernel symbol is missing from its loaded module.
    #[error("kernel {symbol} missing from module {family}")]
    MissingKernel {
        family: &'static str,
        symbol: String,
    },
}

impl CudaError {
    /// Wraps a driver error with the op that hit it.
    pub fn driver(op: &'static str) -> impl FnOnce(DriverError) -> CudaError {
        move |source| CudaError::Driver { op, source }
    }

    /// True when the error leaves the device in an unknown state (any driver error): the
    /// engine must stop serving and exit non-zero so supervision restarts it.
    pub fn is_fatal(&self) -> bool {
        matches!(self, CudaError::Driver { .. })
    }
}

/// Checks a condition of an op's arguments, returning [`CudaError::Shape`] when it fails.
pub(crate) fn ensure(
    ok: bool,
    op: &'static str,
    detail: impl FnOnce() -> String,
) -> Result<(), CudaError> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape {
            op,
            detail: detail(),
        })
    }
}
