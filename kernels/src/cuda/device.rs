//! Is there a usable CUDA device? Checked without letting cudarc panic on a missing
//! driver library.

use cudarc::driver::{CudaContext, result, sys};

/// What the machine offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceProbe {
    /// libcuda cannot be loaded (no NVIDIA driver).
    NoDriver,
    /// The driver loads but initialising it or counting devices failed.
    DriverError(String),
    /// The driver works and reports zero devices.
    NoDevice,
    /// At least one device.
    Available { count: usize },
}

impl DeviceProbe {
    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            DeviceProbe::NoDriver => "cuda driver library (libcuda.so.1) not found".into(),
            DeviceProbe::DriverError(e) => format!("cuda driver failed to initialise: {e}"),
            DeviceProbe::NoDevice => "cuda driver present but no device found".into(),
            DeviceProbe::Available { count } => format!("{count} cuda device(s) available"),
        }
    }

    pub fn is_available(&self) -> bool {
        matches!(self, DeviceProbe::Available { .. })
    }
}

/// Whether libcuda can be loaded (never panics).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { sys::is_culib_present() }
}

/// Looks for the driver library, then for devices.
pub fn probe() -> DeviceProbe {
    if !driver_available() {
        return DeviceProbe::NoDriver;
    }
    if let Err(e) = result::init() {
        return DeviceProbe::DriverError(e.to_string());
    }
    match CudaContext::device_count() {
        Ok(0) => DeviceProbe::NoDevice,
        Ok(n) if n > 0 => DeviceProbe::Available { count: n as usize },
        Ok(n) => DeviceProbe::DriverError(format!("device count {n}")),
        Err(e) => DeviceProbe::DriverError(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_describes_itself() {
        let p = probe();
        assert!(!p.describe().is_empty());
        if !driver_available() {
            assert_eq!(p, DeviceProbe::NoDriver);
        }
    }
}
