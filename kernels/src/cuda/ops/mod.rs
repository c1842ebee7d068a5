//! Launch wrappers: the CPU ops' names and argument order, on device buffers.
//!
//! Conventions as in `cpu`: backward functions accumulate (`+=`) into gradient outputs
//! (except `cross_entropy_backward`, which writes). `T` is the activation/weight dtype
//! (`f32` or [`crate::cuda::Bf16`]); parameter gradients, optimizer moments, `rstd`, `lse`
//! and losses are always f32. Argument mismatches return [`CudaError::Shape`]; launches are
//! asynchronous, so a fault may surface at the next synchronising call.
//!
//! Ids and targets live on the device and are NOT validated here: the caller validates them
//! on the host before upload (the kernels write NaN for an out-of-range id, never a silently
//! wrong row).

pub mod attention;
pub mod elementwise;
pub mod layers;
pub mod loss;
pub mod matmul;
pub mod optim;

use cudarc::driver::LaunchConfig;

use super::error::{CudaError, ensure};

/// Threads per block for the 1-D kernels.
pub(crate) const BLOCK: u32 = 256;

/// A grid-stride launch over `n` elements.
pub(crate) fn cfg_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row.
pub(crate) fn cfg_rows(rows: usize, threads: u32) -> Result<LaunchConfig, CudaError> {
    ensure(rows <= i32::MAX as usize, "launch", || {
        format!("{rows} rows")
    })?;
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A dimension as the kernels' `int`.
pub(crate) fn dim(op: &'static str, name: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape {
        op,
        detail: format!("{name} = {v} exceeds i32"),
    })
}

/// Checks that `buf` has `want` elements.
pub(crate) fn check_len(
    op: &'static str,
    name: &str,
    have: usize,
    want: usize,
) -> Result<(), CudaError> {
    ensure(have == want, op, || {
        format!("{name} has {have} elements, expected {want}")
    })
}

/// Launches `$f` with `$cfg` and the listed arguments (each a reference).
macro_rules! launch {
    ($k:expr, $op:literal, $f:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg as _;
        let cfg = $cfg;
        let mut b = $k.stream().launch_builder($f);
        $( b.arg($arg); )*
        // SAFETY: the argument list matches the kernel's C signature in kernels/cuda (types
        // and order); buffer lengths were checked by the caller.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err($crate::cuda::error::CudaError::driver($op))
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes() {
        assert_eq!(cfg_1d(0).grid_dim.0, 1);
        assert_eq!(cfg_1d(257).grid_dim.0, 2);
        assert_eq!(cfg_1d(1 << 40).grid_dim.0, 65_536);
        assert!(dim("op", "n", 1 << 31).is_err());
        assert!(
            check_len("op", "x", 3, 4)
                .unwrap_err()
                .to_string()
                .contains("x has 3")
        );
    }
}
