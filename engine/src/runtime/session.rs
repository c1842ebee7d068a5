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
use crate::model::batch::{BatchScratch, Emitted, Sequence, kv_cache_bytes, reserved_rows};
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
    fn next_batch(
        &mut self,
        req: &pb::NextBatchRequest,
        seg: &Segment,
    ) -> Result<pb::NextBatchReply, RuntimeError>;
    fn grad_norm(&mut self) -> Result<pb::GradNormReply, RuntimeError>;
    fn reset_grads(&mut self) -> Result<(), RuntimeError>;
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
    /// Tokenizes and checks a Generate request, and says how much KV cache it reserves; the
    /// batch is untouched.
    fn gen_prepare(&mut self, req: &pb::GenerateRequest) -> Result<Prepared, RuntimeError>;
    /// Admits a prepared request into the batch under `id`: prefill and first token. A request
    /// whose first token is its last is not kept.
    fn gen_admit(&mut self, id: u64, p: &Prepared) -> Result<pb::GenerateReply, RuntimeError>;
    /// One decode step of every sequence in the batch: a reply per sequence; finished ones
    /// leave. On an error the batch is emptied.
    fn gen_step(&mut self) -> Result<Vec<(u64, pb::GenerateReply)>, RuntimeError>;
    /// Drops a sequence (its client went away), freeing its KV cache.
    fn gen_cancel(&mut self, id: u64);
    /// Distributed inference (`stage.rs`): the requester's front end of a session.
    fn stage_start(
        &mut self,
        req: &pb::StageStartRequest,
    ) -> Result<pb::StageStartReply, RuntimeError>;
    /// This stage's layers for one step of a session.
    fn stage_forward(
        &mut self,
        req: &pb::StageForwardRequest,
        seg: &Segment,
    ) -> Result<pb::StageForwardReply, RuntimeError>;
    /// The next token of a session from the last stage's logits.
    fn stage_sample(
        &mut self,
        req: &pb::StageSampleRequest,
        seg: &Segment,
    ) -> Result<pb::StageSampleReply, RuntimeError>;
    /// Frees a session; false when it was not open.
    fn stage_end(&mut self, session: u64) -> bool;
    /// Drops idle sessions.
    fn stage_prune(&mut self);
    /// Open sessions and their KV cache bytes.
    fn stage_stats(&self) -> (u32, u64);
}

/// A Generate request checked and tokenized, waiting for a place in the batch.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// KV cache bytes the request reserves for its whole length.
    pub kv_bytes: u64,
}

/// A sequence in the batch with the bytes of a character its text has not completed yet.
struct Active<B: Backend> {
    id: u64,
    seq: Sequence<B>,
    pending_text: Vec<u8>,
}

pub struct State<B: Backend> {
    pub model: Model<B>,
    pub adam: AdamState<B>,
    pub train: TrainSettings,
    loader: Option<DataLoader>,
    /// A restored position to seek to when the loader opens.
    pending_position: Option<DataPosition>,
    tokenizer: Option<Tokenizer>,
    /// The sequences being generated together (continuous batching).
    active: Vec<Active<B>>,
    batch_scratch: Option<BatchScratch<B>>,
    /// Distributed inference sessions (`stage.rs`).
    pub(super) stage_sessions: super::stage::StageSessions<B>,
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
            active: Vec::new(),
            batch_scratch: None,
            stage_sessions: Default::default(),
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
            active: Vec::new(),
            batch_scratch: None,
            stage_sessions: Default::default(),
        })
    }

    /// A stage from the seed whose held parameters (weights and AdamW moments) are then taken
    /// from `sources`, checkpoints of other stages of the same model (see
    /// `checkpoint::overlay_sources`); the optimizer step and data position are the first
    /// source's. Also returns the held layers no source covered.
    pub fn from_sources(
        be: B,
        cfg: ModelConfig,
        spec: StageSpec,
        seed: u64,
        train: TrainSettings,
        sources: &[(&checkpoint::TensorFile, &Path, &CheckpointMeta)],
    ) -> Result<(State<B>, Vec<u32>), RuntimeError> {
        let mut state = State::new(be, cfg, spec, seed, train)?;
        let files: Vec<(&checkpoint::TensorFile, &Path)> =
            sources.iter().map(|(f, p, _)| (*f, *p)).collect();
        let seeded = checkpoint::overlay_sources(&mut state.model, &mut state.adam, &files)?;
        if let Some((_, _, first)) = sources.first() {
            state.adam.step = first.step;
            if spec.has_embedding && first.stage.has_embedding {
                state.pending_position = match &first.data_position {
                    Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                        RuntimeError::Invalid(format!("checkpoint data position {json:?}: {e}"))
                    })?),
                    None => None,
                };
            }
            if first.stage.has_embedding || first.stage.has_head {
                state.model.v_live =
                    (first.v_live as usize).clamp(1, state.model.cfg.vocab_size as usize);
            }
        }
        Ok((state, seeded))
    }

    /// Gives the backend back (the model and optimizer state are dropped).
    pub fn into_backend(self) -> B {
        self.model.be
    }

    pub(super) fn tokenizer(&mut self) -> Result<&Tokenizer, RuntimeError> {
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
        let global = req.global_norm.filter(|n| n.is_finite() && *n >= 0.0);
        let norm = self
            .adam
            .step_clipped_by(&mut self.model, &self.train.optim, lr, global)?;
        Ok(pb::OptimizerStepReply {
            step: self.adam.step,
            grad_norm: norm,
        })
    }

    fn next_batch(
        &mut self,
        req: &pb::NextBatchRequest,
        seg: &Segment,
    ) -> Result<pb::NextBatchReply, RuntimeError> {
        if !self.model.spec.has_embedding {
            return Err(RuntimeError::Invalid(
                "NextBatch needs the embedding (the first pipeline stage)".into(),
            ));
        }
        if req.ids_slot == req.labels_slot {
            return Err(RuntimeError::Invalid(
                "ids and labels need two different slots".into(),
            ));
        }
        let batch = self.loader()?.next_batch()?;
        let shard = self
            .loader
            .as_ref()
            .map(|l| l.position().shard_id)
            .unwrap_or(0);
        let shape = [batch.batch as u64, batch.seq as u64];
        let ids = neuroshard_shared::shm::Tensor::from_u32(&shape, &batch.input_ids);
        let ids = seg.write(req.ids_slot, ids.dtype, &ids.shape, &ids.bytes)?;
        let labels = neuroshard_shared::shm::Tensor::from_u32(&shape, &batch.labels);
        let labels = seg.write(req.labels_slot, labels.dtype, &labels.shape, &labels.bytes)?;
        Ok(pb::NextBatchReply {
            ids: Some(pbref(ids)),
            labels: Some(pbref(labels)),
            shard: shard as u32,
        })
    }

    fn grad_norm(&mut self) -> Result<pb::GradNormReply, RuntimeError> {
        Ok(pb::GradNormReply {
            sq_norm: AdamState::sq_grad_norm(&self.model)?,
            micro_batches: self.model.accumulated,
        })
    }

    fn reset_grads(&mut self) -> Result<(), RuntimeError> {
        self.model.clear_activations();
        self.model.zero_grads()?;
        Ok(())
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
        let p = self.gen_prepare(req)?;
        let tokenizer = self.tokenizer.as_ref().expect("loaded by gen_prepare");
        let prompt_tokens = p.prompt_ids.len() as u32;
        let mut decode = tokenizer.decode_stream();
        self.model.generate(
            &p.prompt_ids,
            p.max_tokens,
            p.sampling,
            &mut |token, index, finish| {
                emit(pb::GenerateReply {
                    token_id: token,
                    index,
                    finish_reason: finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
                    text: decode.step(token),
                    prompt_tokens: if index == 0 { prompt_tokens } else { 0 },
                    queue_us: 0,
                })
            },
        )?;
        Ok(())
    }

    fn gen_prepare(&mut self, req: &pb::GenerateRequest) -> Result<Prepared, RuntimeError> {
        let (prompt_ids, max_tokens, sampling) =
            self.gen_prepare_parts(&req.prompt, &req.prompt_ids, req.max_tokens, req.sampling)?;
        let rows = reserved_rows(&self.model.cfg, prompt_ids.len(), max_tokens);
        Ok(Prepared {
            kv_bytes: kv_cache_bytes(&self.model.cfg, rows),
            prompt_ids,
            max_tokens,
            sampling,
        })
    }

    fn gen_admit(&mut self, id: u64, p: &Prepared) -> Result<pb::GenerateReply, RuntimeError> {
        let (seq, first) = self
            .model
            .start_sequence(&p.prompt_ids, p.max_tokens, p.sampling)?;
        let mut active = Active {
            id,
            seq,
            pending_text: Vec::new(),
        };
        let mut reply = self.reply(&mut active, first)?;
        reply.prompt_tokens = p.prompt_ids.len() as u32;
        if first.finish.is_none() {
            self.active.retain(|a| a.id != id);
            self.active.push(active);
        }
        Ok(reply)
    }

    fn gen_step(&mut self) -> Result<Vec<(u64, pb::GenerateReply)>, RuntimeError> {
        let mut refs: Vec<&mut Sequence<B>> = self.active.iter_mut().map(|a| &mut a.seq).collect();
        let emitted = match self.model.decode_batch(&mut refs, &mut self.batch_scratch) {
            Ok(e) => e,
            Err(e) => {
                self.active.clear();
                return Err(e.into());
            }
        };
        let mut active = std::mem::take(&mut self.active);
        let mut out = Vec::with_capacity(active.len());
        for (a, e) in active.iter_mut().zip(emitted) {
            out.push((a.id, self.reply(a, e)?));
        }
        active.retain(|a| !a.seq.finished());
        self.active = active;
        Ok(out)
    }

    fn gen_cancel(&mut self, id: u64) {
        self.active.retain(|a| a.id != id);
    }

    fn stage_start(
        &mut self,
        req: &pb::StageStartRequest,
    ) -> Result<pb::StageStartReply, RuntimeError> {
        State::stage_start(self, req)
    }

    fn stage_forward(
        &mut self,
        req: &pb::StageForwardRequest,
        seg: &Segment,
    ) -> Result<pb::StageForwardReply, RuntimeError> {
        State::stage_forward(self, req, seg)
    }

    fn stage_sample(
        &mut self,
        req: &pb::StageSampleRequest,
        seg: &Segment,
    ) -> Result<pb::StageSampleReply, RuntimeError> {
        State::stage_sample(self, req, seg)
    }

    fn stage_end(&mut self, session: u64) -> bool {
        State::stage_end(self, session)
    }

    fn stage_prune(&mut self) {
        State::stage_prune(self)
    }

    fn stage_stats(&self) -> (u32, u64) {
        (self.stage_sessions.len() as u32, self.stage_kv_bytes())
    }
}

impl<B: Backend> State<B> {
    /// A generation request's prompt ids (a text prompt tokenized after a document
    /// separator), max_tokens (0: the model's context) and sampling (no seed: from the clock).
    pub(super) fn gen_prepare_parts(
        &mut self,
        prompt: &str,
        prompt_ids: &[u32],
        max_tokens: u32,
        sampling: Option<pb::SamplingParams>,
    ) -> Result<(Vec<u32>, u32, Sampling), RuntimeError> {
        let s = sampling.unwrap_or_default();
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
        let max_tokens = if max_tokens == 0 {
            self.model.cfg.max_seq
        } else {
            max_tokens
        };
        let tokenizer = self.tokenizer()?;
        // A text prompt starts a new document, as documents start after EOS in training.
        let prompt_ids: Vec<u32> = if prompt.is_empty() {
            prompt_ids.to_vec()
        } else {
            std::iter::once(neuroshard_shared::tokenizer::EOS_ID)
                .chain(tokenizer.encode(prompt))
                .collect()
        };
        Ok((prompt_ids, max_tokens, sampling))
    }

    /// The reply carrying one produced token of `a`, with the text it completes.
    fn reply(&mut self, a: &mut Active<B>, e: Emitted) -> Result<pb::GenerateReply, RuntimeError> {
        let tokenizer = self.tokenizer()?;
        let mut decode = neuroshard_shared::tokenizer::DecodeStream::resume(
            tokenizer,
            std::mem::take(&mut a.pending_text),
        );
        let text = decode.step(e.token);
        a.pending_text = decode.into_pending();
        Ok(pb::GenerateReply {
            token_id: e.token,
            index: e.index,
            finish_reason: e.finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
            text,
            prompt_tokens: 0,
            queue_us: 0,
        })
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
