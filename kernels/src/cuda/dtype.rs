//! Element types the kernels are built for: `f32` and bf16 (carried as raw bits, as the
//! kernels do, so no cudarc `f16` feature is needed).

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// A bfloat16 value as its 16 raw bits.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Bf16(pub u16);

// SAFETY: a plain 2-byte value with no padding; the kernels read it as `unsigned short`.
unsafe impl DeviceRepr for Bf16 {}
// SAFETY: all-zero bits are +0.0.
unsafe impl ValidAsZeroBits for Bf16 {}

impl Bf16 {
    /// Round to nearest even, exactly as `f32_to_bf16` in `common.cuh`; NaN stays NaN.
    pub fn from_f32(x: f32) -> Bf16 {
        let u = x.to_bits();
        if u & 0x7fff_ffff > 0x7f80_0000 {
            return Bf16(((u >> 16) | 0x40) as u16);
        }
        let u = u.wrapping_add(0x7fff + ((u >> 16) & 1));
        Bf16((u >> 16) as u16)
    }

    /// Exact widening.
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// An element type with kernels: the symbol suffix and conversions to and from f32.
pub trait GpuDtype:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static
{
    /// Kernel symbol suffix: `f32` or `bf16`.
    const SUFFIX: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl GpuDtype for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl GpuDtype for Bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        Bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        Bf16::to_f32(self)
    }
}

/// Converts a slice to `T`.
pub fn convert_from_f32<T: GpuDtype>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// Converts a slice to f32.
pub fn convert_to_f32<T: GpuDtype>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        assert_eq!(Bf16::from_f32(1.0).to_f32(), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 1.0 / 64.0);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(Bf16::from_f32(f32::INFINITY).to_f32(), f32::INFINITY);
        assert_eq!(Bf16::from_f32(-0.0).0, 0x8000);
        let x = 3.3125_f32 + 1e-3;
        assert!((Bf16::from_f32(x).to_f32() - x).abs() <= x * 2f32.powi(-8));
    }

    #[test]
    fn conversions_round_trip_through_the_trait() {
        let v = [0.5f32, -2.0, 1e-3];
        let b: Vec<Bf16> = convert_from_f32(&v);
        let back = convert_to_f32(&b);
        for (x, y) in v.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8));
        }
        assert_eq!(<f32 as GpuDtype>::SUFFIX, "f32");
        assert_eq!(<Bf16 as GpuDtype>::SUFFIX, "bf16");
    }
}
