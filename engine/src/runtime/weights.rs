//! Weights and checkpoints: ExportWeights (safetensors to a file or a slot, or the full model
//! as a Hugging Face Llama folder or a GGUF file, the layers not held here taken from
//! checkpoints of other stages), ImportWeights (from a file or a slot) and Checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::{DType, Segment, TensorRef};

use super::RuntimeError;
use super::state::State;
use super::train::pbref;
use crate::backend::Backend;
use crate::checkpoint;

impl<B: Backend> State<B> {
    pub(super) fn export_weights(
        &mut self,
        req: &pb::ExportWeightsRequest,
        seg: Option<&Segment>,
    ) -> Result<pb::ExportWeightsReply, RuntimeError> {
        use pb::export_weights_request::Dest;
        let hash = self.model.hash()?;
        let mut extra = HashMap::new();
        extra.insert("model_hash".to_string(), hash.clone());
        extra.insert("step".to_string(), self.adam.step.to_string());
        match (req.format.as_str(), &req.dest) {
            (format @ ("hf-llama" | "gguf"), Some(Dest::Path(p))) => {
                let files = super::read_sources(&req.sources, &self.model.cfg)?;
                let refs: Vec<_> = files.iter().map(|(f, p, _)| (f, p.as_path())).collect();
                let full = crate::export::gather(&self.model, self.adam.step, &refs)?;
                drop(files);
                let tok = self.tokenizer()?.clone();
                let bytes = if format == "gguf" {
                    crate::export::gguf::write_llama(&full, Path::new(p), &tok)?
                } else {
                    crate::export::write_hf_llama(&full, Path::new(p), Some(&tok))?
                };
                Ok(pb::ExportWeightsReply {
                    path: p.clone(),
                    tensor: None,
                    model_hash: full.hash(),
                    bytes,
                })
            }
            ("hf-llama" | "gguf", _) => Err(RuntimeError::Invalid(
                "hf-llama and gguf exports need a path".into(),
            )),
            ("" | "safetensors", Some(Dest::Path(p))) => {
                let bytes = checkpoint::save_weights(Path::new(p), &self.model, extra)?;
                Ok(pb::ExportWeightsReply {
                    path: p.clone(),
                    tensor: None,
                    model_hash: hash,
                    bytes,
                })
            }
            ("" | "safetensors", Some(Dest::Slot(slot))) => {
                let seg = seg.ok_or(RuntimeError::NotAttached)?;
                let bytes = checkpoint::weights_bytes(&self.model, extra)?;
                let r = seg.write(*slot, DType::U8, &[bytes.len() as u64], &bytes)?;
                Ok(pb::ExportWeightsReply {
                    path: String::new(),
                    tensor: Some(pbref(r)),
                    model_hash: hash,
                    bytes: bytes.len() as u64,
                })
            }
            (_, None) => Err(RuntimeError::Invalid(
                "ExportWeights needs a path or a slot".into(),
            )),
            (other, _) => Err(RuntimeError::Invalid(format!(
                "unknown export format {other:?} (safetensors, hf-llama, gguf)"
            ))),
        }
    }

    pub(super) fn import_weights(
        &mut self,
        req: &pb::ImportWeightsRequest,
        seg: Option<&Segment>,
    ) -> Result<pb::ImportWeightsReply, RuntimeError> {
        use pb::import_weights_request::Src;
        let (file, origin) = match &req.src {
            Some(Src::Path(p)) => (
                checkpoint::read_tensor_file(Path::new(p))?,
                PathBuf::from(p),
            ),
            Some(Src::Tensor(r)) => {
                let seg = seg.ok_or(RuntimeError::NotAttached)?;
                let t = seg.read(TensorRef {
                    slot: r.slot,
                    seq: r.seq,
                })?;
                if t.dtype != DType::U8 {
                    return Err(RuntimeError::Invalid(format!(
                        "weights in a slot are u8 safetensors bytes, got {:?}",
                        t.dtype
                    )));
                }
                let origin = PathBuf::from(format!("<slot {}>", r.slot));
                (checkpoint::parse_tensors(&t.bytes, &origin)?, origin)
            }
            None => {
                return Err(RuntimeError::Invalid(
                    "ImportWeights needs a path or a tensor".into(),
                ));
            }
        };
        checkpoint::load_params(&mut self.model, &file, &origin, true)?;
        Ok(pb::ImportWeightsReply {
            model_hash: self.model.hash()?,
        })
    }

    pub(super) fn checkpoint(&mut self, path: &Path) -> Result<pb::CheckpointReply, RuntimeError> {
        let meta = self.meta();
        let bytes = checkpoint::save_checkpoint(path, &self.model, &self.adam, &meta)?;
        Ok(pb::CheckpointReply {
            path: path.display().to_string(),
            step: self.adam.step,
            bytes,
            state_hash: checkpoint::state_hash(&self.model, &self.adam, &meta)?,
        })
    }
}
