//! The `topk` pseudo-gradient encoding (SparseLoCo style): per chunk of [`CHUNK`] values only
//! the largest in magnitude travel, as 12-bit offsets inside the chunk and low-bit values with
//! one f32 scale per chunk; everything not sent (the small values and the quantization error)
//! stays with the sender as error feedback and joins the next round's pseudo-gradient.
//!
//! Wire form of one tensor of `n` values (little-endian throughout):
//!
//! | bytes | what |
//! | --- | --- |
//! | 1 | `bits` per value, 2 to 8 |
//! | 2 | `keep`: values kept in a full chunk, 1 to [`CHUNK`] |
//! | per chunk | f32 `scale`, then `k` offsets of 12 bits, then `k` codes of `bits` bits |
//!
//! Chunks are [`CHUNK`] values, the last one shorter; a chunk of `len` values keeps
//! `k = ceil(keep * len / CHUNK)` (at least one). Offsets are strictly increasing and below
//! the chunk's length. A code's top bit is the sign, the rest a magnitude level `m - 1`
//! (`m` in `1..=2^(bits-1)`); its value is `±m * scale`, `scale` being the chunk's largest
//! kept magnitude over `2^(bits-1)`. The header makes the bytes self-describing: a receiver
//! decodes any valid `keep` and `bits`, whatever its own settings.

use crate::bits::{BitReader, BitWriter};
use thiserror::Error;

/// Values per chunk: offsets inside a chunk fit in 12 bits.
pub const CHUNK: usize = 4096;
const OFFSET_BITS: usize = 12;
const HEADER: usize = 3;

/// Parameters of the `topk` encoding (`training.diloco_topk_ratio` and `diloco_topk_bits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopK {
    /// Values kept per full chunk of [`CHUNK`], 1 to [`CHUNK`].
    pub keep: u16,
    /// Bits per kept value (sign and magnitude level), 2 to 8.
    pub bits: u8,
}

impl Default for TopK {
    /// 1% of the values at 2 bits.
    fn default() -> TopK {
        TopK::new(0.01, 2).expect("valid defaults")
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum TopKError {
    #[error("topk ratio {0} is not in (0, 1]")]
    Ratio(f64),
    #[error("topk bits {0} is not in 2..=8")]
    Bits(u32),
}

/// Why a `topk` tensor's bytes were refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SparseError {
    #[error("topk tensor of {values} values needs at least {HEADER} bytes, got {got}")]
    Header { values: usize, got: usize },
    #[error("topk header: {0}")]
    Params(String),
    #[error(
        "topk tensor of {values} values with keep {keep} and {bits} bits needs {expected} bytes, got {got}"
    )]
    Length {
        values: usize,
        keep: u16,
        bits: u8,
        expected: usize,
        got: usize,
    },
    #[error("topk chunk {chunk}: scale {scale} is not a finite non-negative number")]
    Scale { chunk: usize, scale: f32 },
    #[error(
        "topk chunk {chunk}: offset {offset} after {previous} is not increasing or not below {len}"
    )]
    Offset {
        chunk: usize,
        offset: usize,
        previous: i64,
        len: usize,
    },
}

impl TopK {
    /// Keeps `ratio` of the values (rounded to whole values per chunk, at least one).
    pub fn new(ratio: f64, bits: u32) -> Result<TopK, TopKError> {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(TopKError::Ratio(ratio));
        }
        if !(2..=8).contains(&bits) {
            return Err(TopKError::Bits(bits));
        }
        let keep = (ratio * CHUNK as f64).round().clamp(1.0, CHUNK as f64) as u16;
        Ok(TopK {
            keep,
            bits: bits as u8,
        })
    }

    /// The share of values kept in a full chunk.
    pub fn ratio(self) -> f64 {
        f64::from(self.keep) / CHUNK as f64
    }

    fn check(self) -> Result<(), String> {
        if self.keep == 0 || usize::from(self.keep) > CHUNK {
            return Err(format!("keep {} is not in 1..={CHUNK}", self.keep));
        }
        if !(2..=8).contains(&self.bits) {
            return Err(format!("bits {} is not in 2..=8", self.bits));
        }
        Ok(())
    }

    /// Values kept from a chunk of `len` values.
    fn kept(self, len: usize) -> usize {
        (usize::from(self.keep) * len)
            .div_ceil(CHUNK)
            .clamp(1, len.max(1))
    }

    /// Magnitude levels: 2^(bits-1).
    fn levels(self) -> u32 {
        1 << (self.bits - 1)
    }

    fn chunk_bytes(self, len: usize) -> usize {
        let k = self.kept(len);
        4 + (k * OFFSET_BITS).div_ceil(8) + (k * usize::from(self.bits)).div_ceil(8)
    }

    /// Bytes an encoded tensor of `n` values takes.
    pub fn encoded_len(self, n: usize) -> usize {
        let full = n / CHUNK;
        let rest = n % CHUNK;
        HEADER + full * self.chunk_bytes(CHUNK) + if rest > 0 { self.chunk_bytes(rest) } else { 0 }
    }

    /// The value of `code` in a chunk of `scale`: one function for sender and receivers, so
    /// all decode the same bits.
    fn value(self, code: u32, scale: f32) -> f32 {
        let sign = code >> (self.bits - 1);
        let m = (code & (self.levels() - 1)) + 1;
        let v = m as f32 * scale;
        if sign == 1 { -v } else { v }
    }
}

/// Encodes `values` plus the carried `residual` (same length, or empty to start); the
/// residual becomes what this round did not send.
pub fn encode(p: TopK, values: &[f32], residual: &mut Vec<f32>) -> Vec<u8> {
    if residual.len() != values.len() {
        *residual = vec![0.0; values.len()];
    }
    for (r, v) in residual.iter_mut().zip(values) {
        *r += v;
    }
    // From here `residual` holds x = values + residual; the sent part is subtracted below.
    let mut out = Vec::with_capacity(p.encoded_len(values.len()));
    out.push(p.bits);
    out.extend_from_slice(&p.keep.to_le_bytes());
    let levels = p.levels();
    let mut order: Vec<usize> = Vec::with_capacity(CHUNK);
    for x in residual.chunks_mut(CHUNK) {
        let k = p.kept(x.len());
        // A non-finite value is never chosen (it stays in the residual).
        let mag = |i: usize| {
            if x[i].is_finite() { x[i].abs() } else { -1.0 }
        };
        order.clear();
        order.extend(0..x.len());
        if k < x.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| mag(b).total_cmp(&mag(a)).then(a.cmp(&b)));
            order.truncate(k);
        }
        order.sort_unstable();
        let max = order.iter().fold(0.0f32, |m, &i| m.max(mag(i)));
        let scale = max / levels as f32;
        out.extend_from_slice(&scale.to_le_bytes());
        let mut w = BitWriter::new(&mut out);
        for &i in &order {
            w.put(i as u32, OFFSET_BITS);
        }
        w.finish();
        let mut w = BitWriter::new(&mut out);
        for &i in &order {
            let code = if scale > 0.0 && x[i].is_finite() {
                let m = (x[i].abs() / scale).round().clamp(1.0, levels as f32) as u32;
                (u32::from(x[i].is_sign_negative()) << (p.bits - 1)) | (m - 1)
            } else {
                0
            };
            x[i] -= p.value(code, scale);
            w.put(code, usize::from(p.bits));
        }
        w.finish();
    }
    out
}

/// Decodes a tensor of `values` values, checking every length, scale and offset.
pub fn decode(bytes: &[u8], values: usize) -> Result<Vec<f32>, SparseError> {
    if bytes.len() < HEADER {
        return Err(SparseError::Header {
            values,
            got: bytes.len(),
        });
    }
    let p = TopK {
        bits: bytes[0],
        keep: u16::from_le_bytes([bytes[1], bytes[2]]),
    };
    p.check().map_err(SparseError::Params)?;
    let expected = p.encoded_len(values);
    if bytes.len() != expected {
        return Err(SparseError::Length {
            values,
            keep: p.keep,
            bits: p.bits,
            expected,
            got: bytes.len(),
        });
    }
    let mut out = vec![0.0f32; values];
    let mut pos = HEADER;
    for (chunk, x) in out.chunks_mut(CHUNK).enumerate() {
        let k = p.kept(x.len());
        let scale =
            f32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(SparseError::Scale { chunk, scale });
        }
        pos += 4;
        let off_len = (k * OFFSET_BITS).div_ceil(8);
        let mut offsets = BitReader::new(&bytes[pos..pos + off_len]);
        pos += off_len;
        let code_len = (k * usize::from(p.bits)).div_ceil(8);
        let mut codes = BitReader::new(&bytes[pos..pos + code_len]);
        pos += code_len;
        let mut previous = -1i64;
        for _ in 0..k {
            let offset = offsets.get(OFFSET_BITS) as usize;
            if offset as i64 <= previous || offset >= x.len() {
                return Err(SparseError::Offset {
                    chunk,
                    offset,
                    previous,
                    len: x.len(),
                });
            }
            previous = offset as i64;
            x[offset] = p.value(codes.get(usize::from(p.bits)), scale);
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;
