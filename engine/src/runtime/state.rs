//! A loaded model on one backend: the model stage, its optimizer state, the training settings
//! and (on a full-model node) the data loader. `Runtime` holds one in its `Loaded` enum, so
//! the backend is chosen at run time and every command is a plain method of `State<B>`:
//! training in `train.rs`, weights and checkpoints in `weights.rs`, generation in
//! `generate.rs`, distributed inference in `stage.rs`.

use std::path::{Path, PathBuf};

use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::tokenizer::Tokenizer;

use super::generate::Active;
use super::{RuntimeError, RuntimeHealth};
use crate::backend::Backend;
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{DataLoader, DataPosition, DataSource, LoaderConfig, builtin_tokenizer};
use crate::model::batch::BatchScratch;
use crate::model::{Model, StageSpec};
use crate::optim::{AdamState, TrainSettings};

pub struct State<B: Backend> {
    pub model: Model<B>,
    pub adam: AdamState<B>,
    pub train: TrainSettings,
    pub(super) loader: Option<DataLoader>,
    /// A restored position to seek to when the loader opens.
    pub(super) pending_position: Option<DataPosition>,
    pub(super) tokenizer: Option<Tokenizer>,
    /// The sequences being generated together (continuous batching).
    pub(super) active: Vec<Active<B>>,
    pub(super) batch_scratch: Option<BatchScratch<B>>,
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

    pub(super) fn loader(&mut self) -> Result<&mut DataLoader, RuntimeError> {
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

    pub(super) fn meta(&self) -> CheckpointMeta {
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

    /// The optimizer step (the number of AdamW steps taken).
    pub(super) fn step(&self) -> u64 {
        self.adam.step
    }

    pub(super) fn parameters(&self) -> u64 {
        self.model.parameter_count()
    }

    pub(super) fn model_hash(&self) -> Result<String, RuntimeError> {
        Ok(self.model.hash()?)
    }

    /// The whole training state's hash (`checkpoint::state_hash`).
    pub(super) fn state_hash(&self) -> Result<String, RuntimeError> {
        Ok(checkpoint::state_hash(
            &self.model,
            &self.adam,
            &self.meta(),
        )?)
    }

    /// `Health` with a model loaded: the device, its memory and the open inference sessions.
    pub(super) fn health(&self) -> RuntimeHealth {
        let (memory_used, memory_total) = self.model.be.memory();
        RuntimeHealth {
            device: self.model.be.kind().to_string(),
            device_name: self.model.be.device_name(),
            memory_used,
            memory_total,
            model_loaded: true,
            step: self.step(),
            stage_sessions: self.stage_sessions.len() as u32,
            stage_kv_bytes: self.stage_kv_bytes(),
        }
    }
}
