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
    /// Round to nearest even by `half`, bit for bit as `f32_to_bf16` in `common.cuh` (a NaN
    /// keeps its upper bits and comes out quiet; infinities and subnormals are rounded like
    /// any other value).
    pub fn from_f32(x: f32) -> Bf16 {
        Bf16(half::bf16::from_f32(x).to_bits())
    }

    /// Exact widening by `half`. A NaN comes out quiet: a signalling one gains the quiet bit,
    /// where the kernels' `to_f32` keeps the bits as they are (both are NaN).
    pub fn to_f32(self) -> f32 {
        half::bf16::from_bits(self.0).to_f32()
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

    /// `f32_to_bf16` of `common.cuh`, line for line: what the kernels compute on the device.
    fn device_f32_to_bf16(x: f32) -> u16 {
        let u = x.to_bits();
        if u & 0x7fff_ffff > 0x7f80_0000 {
            return ((u >> 16) | 0x40) as u16;
        }
        (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
    }

    #[test]
    fn bf16_from_f32_matches_the_kernels_bit_for_bit() {
        // Every 65521st bit pattern (all exponents, both signs, NaNs, subnormals) and the
        // neighbours of every tie and overflow edge.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(65521).collect();
        for hi in [
            0x0000u32, 0x0001, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7fc0, 0x8000, 0xff7f,
        ] {
            for lo in [0x0000u32, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push((hi << 16) | lo);
                bits.push(((hi | 0x8000) << 16) | lo);
            }
        }
        for b in bits {
            let x = f32::from_bits(b);
            assert_eq!(
                Bf16::from_f32(x).0,
                device_f32_to_bf16(x),
                "f32 bits {b:#010x}"
            );
        }
    }

    #[test]
    fn bf16_to_f32_is_exact_and_keeps_nan() {
        for b in 0..=u16::MAX {
            let y = Bf16(b).to_f32();
            let exact = f32::from_bits((b as u32) << 16);
            if exact.is_nan() {
                // A signalling NaN comes back quiet; the sign and payload stay.
                assert!(y.is_nan());
                assert_eq!(
                    y.to_bits(),
                    exact.to_bits() | 0x0040_0000,
                    "bf16 bits {b:#06x}"
                );
            } else {
                assert_eq!(y.to_bits(), exact.to_bits(), "bf16 bits {b:#06x}");
            }
        }
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
