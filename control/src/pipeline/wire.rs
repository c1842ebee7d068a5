//! Tensors as they travel between stages, and the checks a peer's tensor passes before it
//! reaches the engine: dtype, shape against the model, byte length, finite values, labels and
//! token ids inside the vocabulary. Activations and their gradients may travel in bf16
//! (`training.pipeline_wire`): the receiver widens them to f32 before its engine sees them.

use neuroshard_proto::peer as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::{DType, Tensor};

use super::PipeError;
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
    U32,
}

impl WireDType {
    /// The dtype a wire name stands for; `None` for a name the pipeline does not carry.
    pub fn parse(name: &str) -> Option<WireDType> {
        match name {
            "f32" => Some(WireDType::F32),
            "bf16" => Some(WireDType::Bf16),
            "u32" => Some(WireDType::U32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::Bf16 => "bf16",
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

    /// The tensor as its receiver checks it after [`Wire::to_pb_as`]: an f32 tensor rounded
    /// to bf16 and widened back when `wire` says bf16 (the bytes the receiver's receipt
    /// chains over and its engine computes with).
    pub fn as_received(&self, wire: PipeWire) -> Wire {
        if wire != PipeWire::Bf16 || self.dtype != DType::F32 {
            return self.clone();
        }
        Wire {
            dtype: DType::F32,
            shape: self.shape.clone(),
            data: self
                .data
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .to_f32()
                        .to_le_bytes()
                })
                .collect(),
        }
    }

    /// As [`Wire::to_pb`], an f32 tensor rounded to bf16 (nearest even) when `wire` says so:
    /// how training sends activations and gradients. Other dtypes go as they are.
    pub fn to_pb_as(&self, wire: PipeWire) -> pb::PipelineTensor {
        if wire != PipeWire::Bf16 || self.dtype != DType::F32 {
            return self.to_pb();
        }
        pb::PipelineTensor {
            dtype: WireDType::Bf16.name().into(),
            shape: self.shape.clone(),
            data: self
                .data
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect(),
        }
    }
}

/// Bytes a pipeline tensor carries on the wire (0 when absent): the traffic counters count
/// these, not the widened f32 the engine gets.
pub fn wire_len(t: Option<&pb::PipelineTensor>) -> u64 {
    t.map_or(0, |t| t.data.len() as u64)
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
    let size = match WireDType::parse(&t.dtype) {
        Some(WireDType::F32) => 4,
        Some(WireDType::Bf16) => 2,
        _ => {
            return Err(PipeError::Refused(format!(
                "{what} must be f32 or bf16, got {:?}",
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
    if t.data.len() as u64 != numel * size {
        return Err(PipeError::Refused(format!(
            "{what} carries {} bytes, its {} shape needs {}",
            t.data.len(),
            t.dtype,
            numel * size
        )));
    }
    let data: Vec<u8> = if size == 2 {
        t.data
            .chunks_exact(2)
            .flat_map(|c| {
                half::bf16::from_le_bytes([c[0], c[1]])
                    .to_f32()
                    .to_le_bytes()
            })
            .collect()
    } else {
        t.data.clone()
    };
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
        for d in [WireDType::F32, WireDType::Bf16, WireDType::U32] {
            assert_eq!(WireDType::parse(d.name()), Some(d));
        }
        assert_eq!(WireDType::parse("f16"), None);
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
