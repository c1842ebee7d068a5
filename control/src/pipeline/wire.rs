//! Tensors as they travel between stages, and the checks a peer's tensor passes before it
//! reaches the engine: dtype, shape against the model, byte length, finite values, labels and
//! token ids inside the vocabulary. Activations and their gradients may travel in bf16 or as
//! rows of 4 to 8-bit integers with one f32 scale each (`training.pipeline_wire`): the
//! receiver widens them to f32 before its engine sees them.

use neuroshard_proto::peer as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::{DType, Tensor};

use super::PipeError;
use crate::bits::{BitReader, BitWriter};
use crate::config::PipeWire;
use crate::engine::TensorIn;

/// Largest batch rows / sequence accepted from a peer.
pub(super) const MAX_ROWS: u64 = 4096;

/// The element type of a pipeline tensor on the wire, where it is a name (`"f32"`, `"bf16"`,
/// `"u32"`): parsed once by the checks of a peer's tensor, named once when a tensor is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    F32,
    /// Activations or gradients rounded to bf16 for the trip (`training.pipeline_wire`).
    Bf16,
    /// Rows of the last dimension as an f32 scale and that many integers of this many bits,
    /// 4 to 8 ([`encode_int_rows`]; named `i4row` ... `i8row`).
    IntRows(u32),
    U32,
}

impl WireDType {
    /// The dtype a wire name stands for; `None` for a name the pipeline does not carry.
    pub fn parse(name: &str) -> Option<WireDType> {
        match name {
            "f32" => Some(WireDType::F32),
            "bf16" => Some(WireDType::Bf16),
            "i4row" => Some(WireDType::IntRows(4)),
            "i5row" => Some(WireDType::IntRows(5)),
            "i6row" => Some(WireDType::IntRows(6)),
            "i7row" => Some(WireDType::IntRows(7)),
            "i8row" => Some(WireDType::IntRows(8)),
            "u32" => Some(WireDType::U32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::Bf16 => "bf16",
            WireDType::IntRows(4) => "i4row",
            WireDType::IntRows(5) => "i5row",
            WireDType::IntRows(6) => "i6row",
            WireDType::IntRows(7) => "i7row",
            WireDType::IntRows(_) => "i8row",
            WireDType::U32 => "u32",
        }
    }

    /// How a tensor of `dtype` is named on the wire when sent as it is: u32 ids and labels,
    /// f32 everything else (activations, gradients, logits).
    pub fn of(dtype: DType) -> WireDType {
        match dtype {
            DType::U32 => WireDType::U32,
            _ => WireDType::F32,
        }
    }

    /// True when `t` carries this dtype (an unknown name carries none).
    pub fn is_of(self, t: &pb::PipelineTensor) -> bool {
        WireDType::parse(&t.dtype) == Some(self)
    }
}

impl From<Tensor> for Wire {
    fn from(t: Tensor) -> Wire {
        Wire {
            dtype: t.dtype,
            shape: t.shape,
            data: t.bytes,
        }
    }
}

/// A tensor as it travels between stages (little-endian bytes, like the shm payload).
#[derive(Debug, Clone, PartialEq)]
pub struct Wire {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl Wire {
    /// The tensor as the engine handle takes it.
    pub fn view(&self) -> TensorIn<'_> {
        TensorIn {
            dtype: self.dtype,
            shape: &self.shape,
            bytes: &self.data,
        }
    }

    pub fn to_pb(&self) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: WireDType::of(self.dtype).name().into(),
            shape: self.shape.clone(),
            data: self.data.clone(),
        }
    }

    /// The tensor as its receiver checks it after [`Wire::to_pb_as`]: an f32 tensor narrowed
    /// as `wire` says and widened back (the bytes the receiver's receipt chains over and its
    /// engine computes with).
    pub fn as_received(&self, wire: PipeWire) -> Wire {
        if wire == PipeWire::F32 || self.dtype != DType::F32 {
            return self.clone();
        }
        let t = self.to_pb_as(wire);
        let data = WireDType::parse(&t.dtype)
            .and_then(|d| widen(&t, d))
            .unwrap_or_else(|| self.data.clone());
        Wire {
            dtype: DType::F32,
            shape: self.shape.clone(),
            data,
        }
    }

    /// As [`Wire::to_pb`], an f32 tensor narrowed as `wire` says (bf16, nearest even; or
    /// integer rows): how training sends activations and gradients. Other dtypes go as they are.
    pub fn to_pb_as(&self, wire: PipeWire) -> pb::PipelineTensor {
        if self.dtype != DType::F32 {
            return self.to_pb();
        }
        let values = || {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        };
        let (dtype, data) = match wire {
            PipeWire::F32 => return self.to_pb(),
            PipeWire::Bf16 => (
                WireDType::Bf16,
                values()
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            PipeWire::Int(bits) => {
                let bits = bits.clamp(4, 8);
                let row = self.shape.last().copied().unwrap_or(1).max(1) as usize;
                let v: Vec<f32> = values().collect();
                (WireDType::IntRows(bits), encode_int_rows(&v, row, bits))
            }
        };
        pb::PipelineTensor {
            dtype: dtype.name().into(),
            shape: self.shape.clone(),
            data,
        }
    }
}

/// Bytes of `n` values in rows of `row` as `bits`-bit integer rows: a 4-byte scale per row
/// and the row's values packed into whole bytes.
pub fn int_rows_len(n: u64, row: u64, bits: u32) -> u64 {
    n.checked_div(row)
        .map_or(0, |rows| rows * (4 + (row * u64::from(bits)).div_ceil(8)))
}

/// Largest magnitude of a `bits`-bit value: 127 for 8 bits, 7 for 4.
fn int_max(bits: u32) -> u32 {
    (1 << (bits - 1)) - 1
}

/// `values` in rows of `row` (a divisor of their count), each row as its scale (largest
/// magnitude / `2^(bits-1) - 1`, f32 little-endian) and the row's values divided by the scale,
/// rounded to the nearest integer `q` in `-max..=max`, stored as `q + max` in `bits` bits each,
/// least significant first, the row padded to a whole byte. The error of a value is at most
/// half a scale (1/254 of its row's largest magnitude at 8 bits, 1/14 at 4). `bits` is 4 to 8.
pub fn encode_int_rows(values: &[f32], row: usize, bits: u32) -> Vec<u8> {
    let max = int_max(bits);
    let row = row.max(1);
    let mut out = Vec::with_capacity(int_rows_len(values.len() as u64, row as u64, bits) as usize);
    for r in values.chunks(row) {
        let top = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = top / max as f32;
        out.extend_from_slice(&scale.to_le_bytes());
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut w = BitWriter::new(&mut out);
        for v in r {
            let q = (v * inv).round().clamp(-(max as f32), max as f32) as i32 + max as i32;
            w.put(q as u32, bits as usize);
        }
        w.finish();
    }
    out
}

/// The values of [`encode_int_rows`]' bytes; `None` when the length is not whole rows, a
/// scale is negative, NaN or infinite, or a value lies outside `0..=2 max` (a peer's tensor is
/// refused, never widened to garbage).
pub fn decode_int_rows(bytes: &[u8], row: usize, bits: u32) -> Option<Vec<f32>> {
    if row == 0 || !(4..=8).contains(&bits) {
        return None;
    }
    let max = int_max(bits);
    let packed = (row * bits as usize).div_ceil(8);
    if !bytes.len().is_multiple_of(4 + packed) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / (4 + packed) * row);
    for r in bytes.chunks_exact(4 + packed) {
        let scale = f32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return None;
        }
        let mut values = BitReader::new(&r[4..]);
        for _ in 0..row {
            let q = values.get(bits as usize);
            if q > 2 * max {
                return None;
            }
            out.push((q as i32 - max as i32) as f32 * scale);
        }
    }
    Some(out)
}

/// Bytes a pipeline tensor carries on the wire (0 when absent): the traffic counters count
/// these, not the widened f32 the engine gets.
pub fn wire_len(t: Option<&pb::PipelineTensor>) -> u64 {
    t.map_or(0, |t| t.data.len() as u64)
}

/// The f32 little-endian bytes of an activation or gradient tensor of wire type `dtype` (its
/// length already checked); `None` for integer rows that do not decode ([`decode_int_rows`]).
fn widen(t: &pb::PipelineTensor, dtype: WireDType) -> Option<Vec<u8>> {
    Some(match dtype {
        WireDType::Bf16 => t
            .data
            .chunks_exact(2)
            .flat_map(|c| {
                half::bf16::from_le_bytes([c[0], c[1]])
                    .to_f32()
                    .to_le_bytes()
            })
            .collect(),
        WireDType::IntRows(bits) => {
            let row = t.shape.last().copied().unwrap_or(0) as usize;
            decode_int_rows(&t.data, row, bits)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        _ => t.data.clone(),
    })
}

/// Checks an activation or gradient tensor from a peer: f32 or bf16, [B, T, hidden], the byte
/// length of that shape, every value finite; `expect_bt` pins B and T when known. A bf16
/// tensor comes back widened to f32.
pub fn check_acts(
    t: Option<&pb::PipelineTensor>,
    what: &str,
    m: &ModelConfig,
    expect_bt: Option<(u64, u64)>,
) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused(format!("{what} missing")))?;
    let dtype = match WireDType::parse(&t.dtype) {
        Some(d @ (WireDType::F32 | WireDType::Bf16 | WireDType::IntRows(_))) => d,
        _ => {
            return Err(PipeError::Refused(format!(
                "{what} must be f32, bf16 or i4row..i8row, got {:?}",
                t.dtype
            )));
        }
    };
    let ok_shape = t.shape.len() == 3
        && (1..=MAX_ROWS).contains(&t.shape[0])
        && (1..=u64::from(m.max_seq)).contains(&t.shape[1])
        && t.shape[2] == u64::from(m.hidden);
    if !ok_shape {
        return Err(PipeError::Refused(format!(
            "{what} has shape {:?}, expected [B, T<={}, {}]",
            t.shape, m.max_seq, m.hidden
        )));
    }
    if let Some((b, tl)) = expect_bt
        && (t.shape[0], t.shape[1]) != (b, tl)
    {
        return Err(PipeError::Refused(format!(
            "{what} has shape {:?}, expected [{b}, {tl}, {}]",
            t.shape, m.hidden
        )));
    }
    let numel = t.shape.iter().product::<u64>();
    let need = match dtype {
        WireDType::Bf16 => numel * 2,
        WireDType::IntRows(bits) => int_rows_len(numel, t.shape[2], bits),
        _ => numel * 4,
    };
    if t.data.len() as u64 != need {
        return Err(PipeError::Refused(format!(
            "{what} carries {} bytes, its {} shape needs {need}",
            t.data.len(),
            t.dtype,
        )));
    }
    let data = widen(t, dtype).ok_or_else(|| {
        PipeError::Refused(format!(
            "{what} has a negative or non-finite row scale or a value out of range"
        ))
    })?;
    if data
        .chunks_exact(4)
        .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
    {
        return Err(PipeError::Refused(format!("{what} has NaN or Inf values")));
    }
    Ok(Wire {
        dtype: DType::F32,
        shape: t.shape.clone(),
        data,
    })
}

/// Checks labels from a peer: u32 [B, T], every id below the vocabulary size.
pub fn check_labels(
    t: Option<&pb::PipelineTensor>,
    m: &ModelConfig,
    b: u64,
    tl: u64,
) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused("labels missing".into()))?;
    if !WireDType::U32.is_of(t) || t.shape != [b, tl] || t.data.len() as u64 != b * tl * 4 {
        return Err(PipeError::Refused(format!(
            "labels must be u32 [{b}, {tl}] ({} bytes), got {:?} {:?} ({} bytes)",
            b * tl * 4,
            t.dtype,
            t.shape,
            t.data.len()
        )));
    }
    u32_below_vocab(t, m, "a label")
}

/// `t` (u32, shape and length already checked) as a [`Wire`] when every value is below the
/// vocabulary size; `what` names one value in the refusal.
pub(crate) fn u32_below_vocab(
    t: &pb::PipelineTensor,
    m: &ModelConfig,
    what: &str,
) -> Result<Wire, PipeError> {
    if t.data
        .chunks_exact(4)
        .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >= m.vocab_size)
    {
        return Err(PipeError::Refused(format!(
            "{what} is not below the vocabulary size {}",
            m.vocab_size
        )));
    }
    Ok(Wire {
        dtype: DType::U32,
        shape: t.shape.clone(),
        data: t.data.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    fn acts(shape: Vec<u64>, data: Vec<u8>) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: "f32".into(),
            shape,
            data,
        }
    }

    #[test]
    fn malformed_peer_tensors_are_refused() {
        let m = model();
        let h = u64::from(m.hidden);
        let good = acts(vec![2, 3, h], vec![0; (2 * 3 * h * 4) as usize]);
        assert!(check_acts(Some(&good), "x", &m, None).is_ok());
        assert!(check_acts(Some(&good), "x", &m, Some((2, 3))).is_ok());
        assert!(check_acts(Some(&good), "x", &m, Some((1, 3))).is_err());
        assert!(check_acts(None, "x", &m, None).is_err());
        let short = acts(vec![2, 3, h], vec![0; 7]);
        assert!(check_acts(Some(&short), "x", &m, None).is_err());
        let wide = acts(vec![2, 3, h + 1], vec![0; (2 * 3 * (h + 1) * 4) as usize]);
        assert!(check_acts(Some(&wide), "x", &m, None).is_err());
        let long = acts(
            vec![1, u64::from(m.max_seq) + 1, h],
            vec![0; ((u64::from(m.max_seq) + 1) * h * 4) as usize],
        );
        assert!(check_acts(Some(&long), "x", &m, None).is_err());
        let mut nan = good.clone();
        nan.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(check_acts(Some(&nan), "x", &m, None).is_err());
        let mut u32s = good.clone();
        u32s.dtype = "u32".into();
        assert!(check_acts(Some(&u32s), "x", &m, None).is_err());
        let huge = acts(vec![u64::MAX, u64::MAX, h], vec![]);
        assert!(check_acts(Some(&huge), "x", &m, None).is_err());
    }

    #[test]
    fn wire_dtype_names_round_trip_and_unknown_names_are_none() {
        for d in [
            WireDType::F32,
            WireDType::Bf16,
            WireDType::IntRows(4),
            WireDType::IntRows(6),
            WireDType::IntRows(8),
            WireDType::U32,
        ] {
            assert_eq!(WireDType::parse(d.name()), Some(d));
        }
        assert_eq!(WireDType::parse("f16"), None);
        assert_eq!(WireDType::parse("i3row"), None);
        assert_eq!(WireDType::parse("i9row"), None);
        assert_eq!(WireDType::parse("F32"), None);
        assert_eq!(WireDType::of(DType::U32), WireDType::U32);
        assert_eq!(WireDType::of(DType::F32), WireDType::F32);
    }

    #[test]
    fn bf16_activations_halve_the_bytes_and_come_back_as_f32() {
        let m = model();
        let h = u64::from(m.hidden);
        let n = (2 * 3 * h) as usize;
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w = Wire {
            dtype: DType::F32,
            shape: vec![2, 3, h],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        assert_eq!(w.to_pb_as(PipeWire::F32), w.to_pb());
        let t = w.to_pb_as(PipeWire::Bf16);
        assert_eq!(t.dtype, "bf16");
        assert_eq!(t.data.len(), n * 2);
        assert_eq!(wire_len(Some(&t)), (n * 2) as u64);
        let back = check_acts(Some(&t), "x", &m, Some((2, 3))).unwrap();
        assert_eq!(back.dtype, DType::F32);
        assert_eq!(back.data.len(), n * 4);
        for (c, v) in back.data.chunks_exact(4).zip(&values) {
            let got = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            // bf16 keeps 8 significant bits: relative error at most half an ulp, 2^-8.
            assert!((got - v).abs() <= v.abs() / 256.0, "{got} vs {v}");
        }
        // Labels stay u32 whatever the setting.
        let labels = Wire {
            dtype: DType::U32,
            shape: vec![1, 2],
            data: vec![0; 8],
        };
        assert_eq!(labels.to_pb_as(PipeWire::Bf16).dtype, "u32");
        // A hostile bf16 tensor: wrong length, infinities, NaN.
        let mut short = t.clone();
        short.data.pop();
        assert!(check_acts(Some(&short), "x", &m, None).is_err());
        let mut inf = t.clone();
        inf.data[0..2].copy_from_slice(&half::bf16::INFINITY.to_le_bytes());
        assert!(check_acts(Some(&inf), "x", &m, None).is_err());
        let mut nan = t.clone();
        nan.data[2..4].copy_from_slice(&half::bf16::NAN.to_le_bytes());
        assert!(check_acts(Some(&nan), "x", &m, None).is_err());
        // An f32-sized payload named bf16 is refused (and the reverse).
        let mut mislabeled = w.to_pb();
        mislabeled.dtype = "bf16".into();
        assert!(check_acts(Some(&mislabeled), "x", &m, None).is_err());
        let mut mislabeled = t.clone();
        mislabeled.dtype = "f32".into();
        assert!(check_acts(Some(&mislabeled), "x", &m, None).is_err());
    }

    #[test]
    fn integer_rows_shrink_the_bytes_and_come_back_within_half_a_scale() {
        let m = model();
        let h = u64::from(m.hidden);
        let n = (2 * 3 * h) as usize;
        // Rows of very different magnitudes, one all zero: each row has its own scale.
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let row = i / h as usize;
                if row == 1 {
                    0.0
                } else {
                    (i as f32 * 0.37).sin() * 10f32.powi(row as i32 - 3)
                }
            })
            .collect();
        let w = Wire {
            dtype: DType::F32,
            shape: vec![2, 3, h],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        for bits in 4..=8u32 {
            let t = w.to_pb_as(PipeWire::Int(bits));
            assert_eq!(t.dtype, format!("i{bits}row"));
            assert_eq!(
                t.data.len() as u64,
                6 * (4 + (h * u64::from(bits)).div_ceil(8))
            );
            assert_eq!(t.data.len() as u64, int_rows_len(n as u64, h, bits));
            let back = check_acts(Some(&t), "x", &m, Some((2, 3))).unwrap();
            assert_eq!(back.data.len(), n * 4);
            // What the sender logs as received is what the receiver's check widened.
            assert_eq!(w.as_received(PipeWire::Int(bits)).data, back.data);
            let half_step = 0.5 / int_max(bits) as f32 * 1.0001;
            for (row, (got, want)) in back
                .data
                .chunks_exact(4 * h as usize)
                .zip(values.chunks_exact(h as usize))
                .enumerate()
            {
                let top = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (c, v) in got.chunks_exact(4).zip(want) {
                    let g = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    assert!(
                        (g - v).abs() <= top * half_step,
                        "{bits} bits, row {row}: {g} vs {v}"
                    );
                }
                // A row's largest value comes back exactly (to the scale's rounding).
                let i = want.iter().position(|v| v.abs() == top).unwrap();
                let g = f32::from_le_bytes(got[4 * i..4 * i + 4].try_into().unwrap());
                assert!((g.abs() - top).abs() <= top * 1e-6, "{g} vs {top}");
            }
            // Hostile tensors: a partial row, a NaN, infinite or negative scale.
            let mut short = t.clone();
            short.data.pop();
            assert!(check_acts(Some(&short), "x", &m, None).is_err());
            for bad in [f32::NAN, f32::INFINITY, -1.0] {
                let mut b = t.clone();
                b.data[0..4].copy_from_slice(&bad.to_le_bytes());
                assert!(check_acts(Some(&b), "x", &m, None).is_err(), "scale {bad}");
            }
            // A value above 2 max (all ones) is refused.
            let mut high = t.clone();
            high.data[4] = 0xff;
            high.data[5] = 0xff;
            assert!(
                check_acts(Some(&high), "x", &m, None).is_err(),
                "{bits} bits"
            );
        }
        // 8 bits: about a quarter of f32 (a 4-byte scale per row); 4 bits: about an eighth.
        assert_eq!(int_rows_len(n as u64, h, 8), 6 * (4 + h));
        assert_eq!(int_rows_len(n as u64, h, 4), 6 * (4 + h / 2));
        // An f32 payload named i8row is refused.
        let mut mislabeled = w.to_pb();
        mislabeled.dtype = "i8row".into();
        assert!(check_acts(Some(&mislabeled), "x", &m, None).is_err());
        assert_eq!(decode_int_rows(&[0; 5], 0, 8), None);
        assert_eq!(decode_int_rows(&[0; 5], 1, 9), None);
        assert_eq!(
            decode_int_rows(&encode_int_rows(&[], 4, 6), 4, 6),
            Some(vec![])
        );
    }

    #[test]
    fn labels_are_checked_against_shape_and_vocabulary() {
        let m = model();
        let ok = pb::PipelineTensor {
            dtype: "u32".into(),
            shape: vec![1, 2],
            data: [5u32, 6].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        assert!(check_labels(Some(&ok), &m, 1, 2).is_ok());
        assert!(check_labels(Some(&ok), &m, 2, 1).is_err());
        let mut big = ok.clone();
        big.data[0..4].copy_from_slice(&m.vocab_size.to_le_bytes());
        assert!(check_labels(Some(&big), &m, 1, 2).is_err());
    }
}
