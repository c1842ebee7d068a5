//! A loaded model on one backend: the model stage, its optimizer state, the training settings
//! and (on a full-model node) the data loader. `Runtime` holds one as `Box<dyn Session>` so the
//! backend is chosen at run time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use neuroshard_proto::engine as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::{DType, Segment, TensorRef};
use neuroshard_shared::tokenizer::Tokenizer;

use super::RuntimeError;
use crate::backend::Backend;
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{DataLoader, DataPosition, DataSource, LoaderConfig, builtin_tokenizer};
use crate::model::generate::Sampling;
use crate::model::{Model, StageInput, StageSpec};
use crate::optim::{AdamState, TrainSettings};

/// Micro-batch id TrainStep uses internally (control's ids never reach it in practice).
const TRAIN_MICRO: u64 = u64::MAX;

/// The commands a loaded model answers (object safe, one implementation per backend).
pub trait Session: Send {
    fn step(&self) -> u64;
    fn parameters(&self) -> u64;
    fn device(&self) -> (String, String, u64, u64);
    fn model_hash(&self) -> Result<String, RuntimeError>;
    fn forward(
        &mut self,
        req: &pb::ForwardRequest,
        seg: &Segment,
    ) -> Result<pb::ForwardReply, RuntimeError>;
    fn backward(
        &mut self,
        req: &pb::BackwardRequest,
        seg: &Segment,
    ) -> Result<pb::BackwardReply, RuntimeError>;
    fn optimizer_step(
        &mut self,
        req: &pb::OptimizerStepRequest,
    ) -> Result<pb::OptimizerStepReply, RuntimeError>;
    fn train_step(&mut self) -> Result<pb::TrainStepReply, RuntimeError>;
    fn export_weights(
        &mut self,
        req: &pb::ExportWeightsRequest,
        seg: Option<&Segment>,
    ) -> Result<pb::ExportWeightsReply, RuntimeError>;
    fn import_weights(
        &mut self,
        req: &pb::ImportWeightsRequest,
        seg: Option<&Segment>,
    ) -> Result<pb::ImportWeightsReply, RuntimeError>;
    fn checkpoint(&mut self, path: &Path) -> Result<pb::CheckpointReply, RuntimeError>;
    fn generate(
        &mut self,
        req: &pb::GenerateRequest,
        emit: &mut dyn FnMut(pb::GenerateReply) -> bool,
    ) -> Result<(), RuntimeError>;
}

pub struct State<B: Backend> {
    pub model: Model<B>,
    pub adam: AdamState<B>,
    pub train: TrainSettings,
    loader: Option<DataLoader>,
    /// A restored position to seek to when the loader opens.
    pending_position: Option<DataPosition>,
    tokenizer: Option<Tokenizer>,
}

impl<B: Backend> State<B> {
    /// A fresh stage from the seed.
    pub fn new(
        be: B,
        cfg: ModelConfig,
        spec: StageSpec,
        seed: u64,
        train: TrainSettings,
    ) -> Result<State<B>, RuntimeError> {
        let model = Model::new(be, cfg, spec, seed)?;
        let adam = AdamState::new(&model)?;
        Ok(State {
            model,
            adam,
            train,
            loader: None,
            pending_position: None,
            tokenizer: None,
        })
    }

    /// A stage from a checkpoint file read by `checkpoint::read_tensor_file`; `expect`
    /// (config, stage) must match when given; `train` overrides the recorded settings.
    pub fn from_file(
        be: B,
        file: &checkpoint::TensorFile,
        path: &Path,
        expect: Option<(&ModelConfig, &StageSpec)>,
        train: Option<TrainSettings>,
    ) -> Result<State<B>, RuntimeError> {
        let meta = checkpoint::checkpoint_meta(file, path)?;
        if let Some((cfg, spec)) = expect
            && (cfg != &meta.config || spec != &meta.stage)
        {
            return Err(RuntimeError::Invalid(format!(
                "checkpoint {path:?} holds {:?} layers {}..{} (embedding {}, head {}), not the requested model",
                meta.config,
                meta.stage.layer_start,
                meta.stage.layer_end,
                meta.stage.has_embedding,
                meta.stage.has_head
            )));
        }
        let mut model = Model::new(be, meta.config.clone(), meta.stage, meta.seed)?;
        model.v_live = (meta.v_live as usize).clamp(1, meta.config.vocab_size as usize);
        checkpoint::load_params(&mut model, file, path, true)?;
        let mut adam = AdamState::new(&model)?;
        checkpoint::load_moments(&model, &mut adam, file, path)?;
        adam.step = meta.step;
        let pending_position = match &meta.data_position {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                RuntimeError::Invalid(format!("checkpoint data position {json:?}: {e}"))
            })?),
            None => None,
        };
        let train = train.unwrap_or(meta.train);
        Ok(State {
            model,
            adam,
            train,
            loader: None,
            pending_position,
            tokenizer: None,
        })
    }

    /// Gives the backend back (the model and optimizer state are dropped).
    pub fn into_backend(self) -> B {
        self.model.be
    }

    fn tokenizer(&mut self) -> Result<&Tokenizer, RuntimeError> {
        if self.tokenizer.is_none() {
            let tok = builtin_tokenizer(self.model.cfg.vocab_size)
                .map_err(|e| RuntimeError::Invalid(format!("building the tokenizer: {e}")))?;
            self.tokenizer = Some(tok);
        }
        Ok(self.tokenizer.as_ref().expect("just set"))
    }

    fn loader(&mut self) -> Result<&mut DataLoader, RuntimeError> {
        if self.loader.is_none() {
            let cfg = LoaderConfig {
                batch: self.train.batch_size as usize,
                seq: self.train.seq_len as usize,
                node_id: self.train.node_id.clone(),
                seed: self.model.seed,
            };
            let source = DataSource::from_option(
                (!self.train.data_path.is_empty()).then(|| PathBuf::from(&self.train.data_path)),
            );
            let tok = self.tokenizer()?.clone();
            let mut loader = DataLoader::open(&source, &tok, cfg)?;
            if let Some(pos) = self.pending_position.take() {
                loader.seek(&pos)?;
            }
            self.model.v_live =
                (tok.vocab_size() as usize).clamp(1, self.model.cfg.vocab_size as usize);
            tracing::info!(
                tokens = loader.total_tokens(),
                shards = loader.num_shards(),
                "training data opened"
            );
            self.loader = Some(loader);
        }
        Ok(self.loader.as_mut().expect("just set"))
    }

    fn meta(&self) -> CheckpointMeta {
        let data_position = match (&self.loader, &self.pending_position) {
            (Some(l), _) => Some(l.position()),
            (None, p) => p.clone(),
        };
        CheckpointMeta {
            config: self.model.cfg.clone(),
            stage: self.model.spec,
            seed: self.model.seed,
            step: self.adam.step,
            train: self.train.clone(),
            data_position: data_position
                .map(|p| serde_json::to_string(&p).expect("position serializes")),
            v_live: self.model.v_live as u64,
        }
    }

    /// One local training step on a full model: next batch, forward, backward, AdamW.
    pub fn train_once(&mut self) -> Result<(f32, f32, u64, u64), RuntimeError> {
        if !self.model.spec.is_full(&self.model.cfg) {
            return Err(RuntimeError::Invalid(
                "TrainStep needs the full model on this node".into(),
            ));
        }
        let batch = self.loader()?.next_batch()?;
        let shard = self
            .loader
            .as_ref()
            .map(|l| l.position().shard_id)
            .unwrap_or(0);
        if self.model.accumulated > 0 {
            tracing::warn!(
                micro_batches = self.model.accumulated,
                "dropping pipeline gradients before a local step"
            );
            self.model.zero_grads()?;
        }
        let (b, t) = (batch.batch, batch.seq);
        let loss = self
            .model
            .forward(
                TRAIN_MICRO,
                b,
                t,
                StageInput::Ids(&batch.input_ids),
                Some(&batch.labels),
            )?
            .ok_or_else(|| RuntimeError::Invalid("no loss from the head".into()))?;
        self.model.backward(TRAIN_MICRO, None)?;
        let lr = self.train.optim.lr;
        let norm = self.adam.step(&mut self.model, &self.train.optim, lr)?;
        Ok((loss, norm, (b * t) as u64, shard))
    }
}

fn read(
    seg: &Segment,
    r: Option<pb::TensorRef>,
    what: &str,
) -> Result<Option<neuroshard_shared::shm::Tensor>, RuntimeError> {
    match r {
        None => Ok(None),
        Some(r) => {
            let t = seg.read(TensorRef {
                slot: r.slot,
                seq: r.seq,
            })?;
            if t.shape.contains(&0) && what != "grad_output" {
                return Err(RuntimeError::Invalid(format!(
                    "{what} is empty: shape {:?}",
                    t.shape
                )));
            }
            Ok(Some(t))
        }
    }
}

fn pbref(r: TensorRef) -> pb::TensorRef {
    pb::TensorRef {
        slot: r.slot,
        seq: r.seq,
    }
}

fn bt_of(shape: &[u64], what: &str, inner: Option<u64>) -> Result<(usize, usize), RuntimeError> {
    let ok = match inner {
        None => shape.len() == 2,
        Some(c) => shape.len() == 3 && shape[2] == c,
    };
    if !ok {
        return Err(RuntimeError::Invalid(format!(
            "{what} has shape {shape:?}, expected [B, T{}]",
            inner.map(|c| format!(", {c}")).unwrap_or_default()
        )));
    }
    Ok((shape[0] as usize, shape[1] as usize))
}

impl<B: Backend> Session for State<B> {
    fn step(&self) -> u64 {
        self.adam.step
    }

    fn parameters(&self) -> u64 {
        self.model.parameter_count()
    }

    fn device(&self) -> (String, String, u64, u64) {
        let (used, total) = self.model.be.memory();
        (
            self.model.be.kind().to_string(),
            self.model.be.device_name(),
            used,
            total,
        )
    }

    fn model_hash(&self) -> Result<String, RuntimeError> {
        Ok(self.model.hash()?)
    }

    fn forward(
        &mut self,
        req: &pb::ForwardRequest,
        seg: &Segment,
    ) -> Result<pb::ForwardReply, RuntimeError> {
        let input = read(seg, req.input, "input")?
            .ok_or_else(|| RuntimeError::Invalid("missing tensor reference `input`".into()))?;
        let labels = read(seg, req.labels, "labels")?;
        let c = self.model.cfg.hidden as u64;
        let (b, t, loss) = if self.model.spec.has_embedding {
            let ids = input.to_u32().ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "input of the first stage must be u32 token ids, got {:?}",
                    input.dtype
                ))
            })?;
            let (b, t) = bt_of(&input.shape, "input", None)?;
            let labels = labels_of(labels.as_ref(), b, t)?;
            (
                b,
                t,
                self.model.forward(
                    req.micro_batch,
                    b,
                    t,
                    StageInput::Ids(&ids),
                    labels.as_deref(),
                )?,
            )
        } else {
            let x = input.to_f32().ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "input activations must be f32, got {:?}",
                    input.dtype
                ))
            })?;
            let (b, t) = bt_of(&input.shape, "input", Some(c))?;
            let labels = labels_of(labels.as_ref(), b, t)?;
            (
                b,
                t,
                self.model.forward(
                    req.micro_batch,
                    b,
                    t,
                    StageInput::Acts(&x),
                    labels.as_deref(),
                )?,
            )
        };
        let _ = (b, t);
        let output = if loss.is_some() {
            None
        } else {
            let written = self.model.with_output(req.micro_batch, |v, shape| {
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                seg.write_f32(req.output_slot, &shape, v)
            })?;
            match written {
                Ok(r) => Some(pbref(r)),
                Err(e) => {
                    // The activations stay saved: control may retry with a bigger slot.
                    return Err(e.into());
                }
            }
        };
        Ok(pb::ForwardReply { output, loss })
    }

    fn backward(
        &mut self,
        req: &pb::BackwardRequest,
        seg: &Segment,
    ) -> Result<pb::BackwardReply, RuntimeError> {
        let g = read(seg, req.grad_output, "grad_output")?;
        let grad = match &g {
            Some(t) => {
                let (b, t_len) = self.model.micro_batch_shape(req.micro_batch).ok_or(
                    crate::model::ModelError::NoActivations {
                        micro_batch: req.micro_batch,
                    },
                )?;
                let width = if self.model.spec.has_head {
                    self.model.cfg.vocab_size
                } else {
                    self.model.cfg.hidden
                } as u64;
                if t.shape != [b as u64, t_len as u64, width] {
                    return Err(RuntimeError::Invalid(format!(
                        "grad_output has shape {:?}, expected [{b}, {t_len}, {width}]",
                        t.shape
                    )));
                }
                Some(
                    t.to_f32()
                        .ok_or_else(|| RuntimeError::Invalid("grad_output must be f32".into()))?,
                )
            }
            None => None,
        };
        let shape = self.model.micro_batch_shape(req.micro_batch);
        self.model.backward(req.micro_batch, grad.as_deref())?;
        if self.model.spec.has_embedding {
            return Ok(pb::BackwardReply { grad_input: None });
        }
        let (b, t) = shape.expect("backward succeeded, so the micro-batch existed");
        let c = self.model.cfg.hidden as u64;
        let r = self.model.with_grad_input(|gi| {
            seg.write_f32(req.grad_input_slot, &[b as u64, t as u64, c], gi)
        })??;
        Ok(pb::BackwardReply {
            grad_input: Some(pbref(r)),
        })
    }

    fn optimizer_step(
        &mut self,
        req: &pb::OptimizerStepRequest,
    ) -> Result<pb::OptimizerStepReply, RuntimeError> {
        let lr = if req.learning_rate > 0.0 && req.learning_rate.is_finite() {
            req.learning_rate
        } else {
            self.train.optim.lr
        };
        let norm = self.adam.step(&mut self.model, &self.train.optim, lr)?;
        Ok(pb::OptimizerStepReply {
            step: self.adam.step,
            grad_norm: norm,
        })
    }

    fn train_step(&mut self) -> Result<pb::TrainStepReply, RuntimeError> {
        let (loss, grad_norm, tokens, shard) = self.train_once()?;
        Ok(pb::TrainStepReply {
            loss,
            step: self.adam.step,
            tokens,
            grad_norm,
            shard: shard as u32,
        })
    }

    fn export_weights(
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
            ("hf-llama", Some(Dest::Path(p))) => {
                let tok = self.tokenizer()?.clone();
                let bytes = crate::export::export_hf_llama(&self.model, Path::new(p), Some(&tok))?;
                Ok(pb::ExportWeightsReply {
                    path: p.clone(),
                    tensor: None,
                    model_hash: hash,
                    bytes,
                })
            }
            ("hf-llama", _) => Err(RuntimeError::Invalid(
                "hf-llama export needs a folder path".into(),
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
                "unknown export format {other:?} (safetensors, hf-llama)"
            ))),
        }
    }

    fn import_weights(
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

    fn checkpoint(&mut self, path: &Path) -> Result<pb::CheckpointReply, RuntimeError> {
        let bytes = checkpoint::save_checkpoint(path, &self.model, &self.adam, &self.meta())?;
        Ok(pb::CheckpointReply {
            path: path.display().to_string(),
            step: self.adam.step,
            bytes,
        })
    }

    fn generate(
        &mut self,
        req: &pb::GenerateRequest,
        emit: &mut dyn FnMut(pb::GenerateReply) -> bool,
    ) -> Result<(), RuntimeError> {
        let s = req.sampling.unwrap_or_default();
        let seed = s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let sampling = Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed,
        };
        let max_tokens = if req.max_tokens == 0 {
            self.model.cfg.max_seq
        } else {
            req.max_tokens
        };
        self.model.generate(
            &req.prompt_ids,
            max_tokens,
            sampling,
            &mut |token, index, finish| {
                emit(pb::GenerateReply {
                    token_id: token,
                    index,
                    finish_reason: finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
                })
            },
        )?;
        Ok(())
    }
}

fn labels_of(
    t: Option<&neuroshard_shared::shm::Tensor>,
    b: usize,
    tl: usize,
) -> Result<Option<Vec<u32>>, RuntimeError> {
    match t {
        None => Ok(None),
        Some(t) => {
            let v = t.to_u32().ok_or_else(|| {
                RuntimeError::Invalid(format!("labels must be u32, got {:?}", t.dtype))
            })?;
            if t.shape != [b as u64, tl as u64] {
                return Err(RuntimeError::Invalid(format!(
                    "labels have shape {:?}, expected [{b}, {tl}]",
                    t.shape
                )));
            }
            Ok(Some(v))
        }
    }
}
