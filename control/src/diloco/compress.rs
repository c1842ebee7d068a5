//! Compression of pseudo-gradients for the wire.
//!
//! * `bf16` (default): the upper 16 bits of each f32, rounded to nearest even. Half the
//!   bytes; the exponent range of f32, so no overflow; ~3 significant digits, plenty for an
//!   outer step.
//! * `int8`: one f32 scale per tensor (max |x| / 127) and one signed byte per value, with
//!   **error feedback**: what rounding lost is kept by the sender and added to the next
//!   round's pseudo-gradient, so nothing is lost for good.
//! * `topk`: per chunk of 4096 values only the largest 1-3% travel, at 2 to 4 bits each
//!   with error feedback ([`super::sparse`], SparseLoCo style).
//! * `f32`: raw little-endian, for tests and debugging.
//!
//! The sender aggregates the *decoded* form of its own contribution, like everyone else,
//! so all replicas see the same bits.

use half::bf16;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::sparse::{self, SparseError, TopK};

/// A pseudo-gradient encoding. In the config and on the wire it is a name (`"topk"`); the
/// `topk` parameters come from their own keys (`Config::diloco_settings`), and a receiver
/// reads them from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    F32,
    #[default]
    Bf16,
    Int8,
    Topk(TopK),
}

impl Encoding {
    /// Every name, for messages.
    pub const NAMES: &'static str = "f32, bf16, int8, topk";

    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::Bf16 => "bf16",
            Encoding::Int8 => "int8",
            Encoding::Topk(_) => "topk",
        }
    }

    /// The encoding a name stands for (`topk` with the default parameters).
    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "f32" => Some(Encoding::F32),
            "bf16" => Some(Encoding::Bf16),
            "int8" => Some(Encoding::Int8),
            "topk" => Some(Encoding::Topk(TopK::default())),
            _ => None,
        }
    }

    /// This encoding, with `p` as its parameters when it is `topk`.
    pub fn with_topk(self, p: TopK) -> Encoding {
        match self {
            Encoding::Topk(_) => Encoding::Topk(p),
            other => other,
        }
    }

    /// Bytes an encoded tensor of `n` values takes.
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Encoding::F32 => 4 * n,
            Encoding::Bf16 => 2 * n,
            Encoding::Int8 => 4 + n,
            Encoding::Topk(p) => p.encoded_len(n),
        }
    }
}

impl Serialize for Encoding {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Encoding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Encoding, D::Error> {
        let name = String::deserialize(d)?;
        Encoding::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown encoding {name:?}, expected one of {}",
                Encoding::NAMES
            ))
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{encoding} tensor of {values} values needs {expected} bytes, got {got}")]
    Length {
        encoding: &'static str,
        values: usize,
        expected: usize,
        got: usize,
    },
    #[error("int8 scale {0} is not a finite non-negative number")]
    Scale(f32),
    #[error(transparent)]
    Sparse(#[from] SparseError),
}

/// Encodes `values`. For `int8` and `topk`, `residual` (same length, or empty to start)
/// carries the error feedback: it is added before quantizing and replaced by what was lost.
pub fn encode(encoding: Encoding, values: &[f32], residual: &mut Vec<f32>) -> Vec<u8> {
    match encoding {
        Encoding::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // Round to nearest even; a NaN stays NaN (quiet).
        Encoding::Bf16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Encoding::Int8 => {
            if residual.len() != values.len() {
                *residual = vec![0.0; values.len()];
            }
            let x: Vec<f32> = values
                .iter()
                .zip(residual.iter())
                .map(|(v, r)| v + r)
                .collect();
            let max = x
                .iter()
                .filter(|v| v.is_finite())
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let mut out = Vec::with_capacity(4 + x.len());
            out.extend_from_slice(&scale.to_le_bytes());
            for (xi, r) in x.iter().zip(residual.iter_mut()) {
                let q = if scale > 0.0 {
                    (xi / scale).round().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                *r = xi - f32::from(q) * scale;
                out.push(q as u8);
            }
            out
        }
        Encoding::Topk(p) => sparse::encode(p, values, residual),
    }
}

/// Decodes `values` values; the length must match exactly. A `topk` tensor carries its own
/// parameters (the ones in `encoding` are not used).
pub fn decode(encoding: Encoding, bytes: &[u8], values: usize) -> Result<Vec<f32>, DecodeError> {
    let expected = encoding.encoded_len(values);
    let length = || DecodeError::Length {
        encoding: encoding.name(),
        values,
        expected,
        got: bytes.len(),
    };
    match encoding {
        Encoding::Topk(_) => Ok(sparse::decode(bytes, values)?),
        _ if bytes.len() != expected => Err(length()),
        Encoding::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Encoding::Bf16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Encoding::Int8 => {
            let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(DecodeError::Scale(scale));
            }
            Ok(bytes[4..]
                .iter()
                .map(|&b| f32::from(b as i8) * scale)
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.731).sin() * 0.02).collect()
    }

    #[test]
    fn bf16_round_trip_is_close_and_halves_the_bytes() {
        let x = sample(1000);
        let bytes = encode(Encoding::Bf16, &x, &mut Vec::new());
        assert_eq!(bytes.len(), 2000);
        let y = decode(Encoding::Bf16, &bytes, 1000).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= a.abs() * 1.0 / 256.0, "{a} vs {b}");
        }
    }

    /// One value through the bf16 wire encoding and back.
    fn bf16_round_trip(v: f32) -> f32 {
        decode(
            Encoding::Bf16,
            &encode(Encoding::Bf16, &[v], &mut Vec::new()),
            1,
        )
        .unwrap()[0]
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(bf16_round_trip(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(bf16_round_trip(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round_trip(1.0 + 3.0 / 512.0), 1.0 + 1.0 / 128.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to the even.
        assert_eq!(bf16_round_trip(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert!(bf16_round_trip(f32::NAN).is_nan());
        assert!(bf16_round_trip(-f32::NAN).is_nan());
        assert_eq!(bf16_round_trip(f32::INFINITY), f32::INFINITY);
        assert_eq!(bf16_round_trip(f32::NEG_INFINITY), f32::NEG_INFINITY);
        // The largest finite f32 rounds up to infinity, as round to nearest even does.
        assert_eq!(bf16_round_trip(f32::MAX), f32::INFINITY);
        assert_eq!(bf16_round_trip(-0.0).to_bits(), (-0.0f32).to_bits());
        // Subnormals round like any other value (the smallest one to +0).
        assert_eq!(bf16_round_trip(f32::from_bits(1)).to_bits(), 0);
        assert_eq!(
            bf16_round_trip(f32::from_bits(0x0001_8000)).to_bits(),
            0x0002_0000
        );
        // Little-endian on the wire: 1.0 is 0x3f80.
        assert_eq!(
            encode(Encoding::Bf16, &[1.0], &mut Vec::new()),
            [0x80, 0x3f]
        );
    }

    #[test]
    fn decoding_is_a_function_of_the_bytes() {
        // The sender uses decode(encode(x)) for itself, so every node sees the same values.
        let x = sample(257);
        let bytes = encode(Encoding::Bf16, &x, &mut Vec::new());
        let a = decode(Encoding::Bf16, &bytes, 257).unwrap();
        let b = decode(Encoding::Bf16, &bytes, 257).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn int8_with_error_feedback_loses_nothing_over_rounds() {
        // Sending the same pseudo-gradient many times: with error feedback the sum of what
        // was received tracks the sum of what was meant to within one quantum.
        let x = sample(300);
        let mut residual = Vec::new();
        let mut sent = vec![0.0f64; 300];
        let rounds = 50;
        for _ in 0..rounds {
            let bytes = encode(Encoding::Int8, &x, &mut residual);
            assert_eq!(bytes.len(), 304);
            let y = decode(Encoding::Int8, &bytes, 300).unwrap();
            for (s, v) in sent.iter_mut().zip(&y) {
                *s += *v as f64;
            }
        }
        let quantum = 0.02 / 127.0 * 2.0;
        for (s, v) in sent.iter().zip(&x) {
            assert!(
                (s - rounds as f64 * *v as f64).abs() <= quantum,
                "{s} vs {v}"
            );
        }
    }

    #[test]
    fn bad_lengths_and_scales_are_errors_not_panics() {
        assert!(decode(Encoding::Bf16, &[1, 2, 3], 2).is_err());
        assert!(decode(Encoding::F32, &[0; 7], 2).is_err());
        assert!(decode(Encoding::Int8, &[0; 3], 0).is_err());
        let mut bad = f32::NAN.to_le_bytes().to_vec();
        bad.push(1);
        assert_eq!(
            decode(Encoding::Int8, &bad, 1).unwrap_err().to_string(),
            "int8 scale NaN is not a finite non-negative number"
        );
        assert_eq!(Encoding::parse("zip"), None);
    }
}
