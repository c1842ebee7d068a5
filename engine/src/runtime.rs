//! The model state the engine commands act on. The server (`server.rs`) is the RPC edge: it
//! resolves shared-memory references and calls one method here per command, on a blocking
//! thread, one command at a time.
//!
//! Behaviour per command (see `proto/engine.proto`):
//! - LoadModel builds the stage from the seed, or from `checkpoint_path` (whose config and
//!   stage must match the request). A request with `layer_end == 0` and neither embedding nor
//!   head means the full model. TrainSpec zeros take the defaults (lr 1e-4, wd 0.01, clip 1.0,
//!   batch 4, seq min(256, max_seq), built-in corpus).
//! - Forward / Backward go through shm slots and are keyed by micro-batch (see `model`).
//! - OptimizerStep averages gradients over the backwards since the last step, clips and steps.
//! - TrainStep runs a whole local step with the data loader (full model only).
//! - Checkpoint writes atomically; Restore replaces the loaded model (or loads one).

mod generate;
mod stage;
mod state;
mod train;
mod weights;

use std::path::{Path, PathBuf};

use neuroshard_proto::engine as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::{Segment, ShmError};

use crate::backend::BackendError;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, DeviceRequest, open_device};
use crate::checkpoint::{CheckpointError, CheckpointMeta, TensorFile};
use crate::data::DataError;
use crate::export::ExportError;
use crate::model::serve::ServeWeights;
use crate::model::{ModelError, StageSpec};
use crate::optim::TrainSettings;
pub use generate::Prepared;
pub use state::State;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no model loaded: call LoadModel or Restore first")]
    NoModel,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no shared-memory segment attached: call Attach first")]
    NotAttached,
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error("{op} is not available in this build: {why}")]
    Unavailable { op: &'static str, why: &'static str },
    #[error("device fault in {op}: {message}")]
    DeviceFault { op: &'static str, message: String },
    #[error(transparent)]
    Model(ModelError),
    #[error(transparent)]
    Checkpoint(CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Export(ExportError),
    /// At capacity right now (inference sessions): retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// An inference session this engine no longer holds (ended, expired, or the model was
    /// reloaded): not the caller's fault.
    #[error("{0}")]
    SessionGone(String),
}

impl From<ModelError> for RuntimeError {
    fn from(e: ModelError) -> RuntimeError {
        match e {
            ModelError::Backend(BackendError::Device { op, message }) => {
                RuntimeError::DeviceFault { op, message }
            }
            other => RuntimeError::Model(other),
        }
    }
}

impl From<CheckpointError> for RuntimeError {
    fn from(e: CheckpointError) -> RuntimeError {
        match e {
            CheckpointError::Model(m) => m.into(),
            other => RuntimeError::Checkpoint(other),
        }
    }
}

impl From<ExportError> for RuntimeError {
    fn from(e: ExportError) -> RuntimeError {
        match e {
            ExportError::Checkpoint(c) => c.into(),
            ExportError::Model(m) => m.into(),
            other => RuntimeError::Export(other),
        }
    }
}

impl From<RuntimeError> for tonic::Status {
    fn from(e: RuntimeError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            RuntimeError::NoModel | RuntimeError::NotAttached => {
                tonic::Status::failed_precondition(msg)
            }
            RuntimeError::Invalid(_) | RuntimeError::Shm(_) => tonic::Status::invalid_argument(msg),
            RuntimeError::Unavailable { .. } => tonic::Status::unimplemented(msg),
            RuntimeError::DeviceFault { .. } => tonic::Status::internal(msg),
            RuntimeError::Model(ModelError::NoActivations { .. }) => {
                tonic::Status::failed_precondition(msg)
            }
            RuntimeError::Model(ModelError::TooManyOutstanding { .. }) => {
                tonic::Status::resource_exhausted(msg)
            }
            RuntimeError::Model(_) => tonic::Status::invalid_argument(msg),
            RuntimeError::Checkpoint(CheckpointError::Io { .. }) => tonic::Status::unavailable(msg),
            RuntimeError::Checkpoint(_) => tonic::Status::invalid_argument(msg),
            RuntimeError::Data(_) => tonic::Status::failed_precondition(msg),
            RuntimeError::Export(ExportError::Write { .. }) => tonic::Status::unavailable(msg),
            RuntimeError::Export(_) => tonic::Status::invalid_argument(msg),
            RuntimeError::Busy(_) => tonic::Status::unavailable(msg),
            RuntimeError::SessionGone(_) => tonic::Status::failed_precondition(msg),
        }
    }
}

/// Figures for `Health`.
#[derive(Debug, Clone, Default)]
pub struct RuntimeHealth {
    pub device: String,
    pub device_name: String,
    pub memory_used: u64,
    pub memory_total: u64,
    pub model_loaded: bool,
    pub step: u64,
    /// Distributed inference sessions open here and their KV cache bytes.
    pub stage_sessions: u32,
    pub stage_kv_bytes: u64,
}

/// Which device the engine runs on, as asked on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

/// A loaded model on the backend it runs on.
enum Loaded {
    Cpu(Box<State<CpuBackend>>),
    Cuda(Box<State<CudaBackend>>),
}

/// Runs `$body` with `$s` bound to the `State` inside `$loaded` (a `Loaded`, `&Loaded` or
/// `&mut Loaded`), whichever backend it is on: one line per command instead of a trait object.
macro_rules! with_state {
    ($loaded:expr, |$s:ident| $body:expr) => {
        match $loaded {
            Loaded::Cpu($s) => $body,
            Loaded::Cuda($s) => $body,
        }
    };
}

pub struct Runtime {
    device: DeviceChoice,
    /// Whether models run on CUDA (decided once at start-up by `--device`).
    use_cuda: bool,
    /// The CUDA backend while no model holds it (a model owns its backend).
    idle_cuda: Option<CudaBackend>,
    /// The model, once LoadModel or Restore built one.
    loaded: Option<Loaded>,
    /// Bumps whenever the loaded model is replaced or dropped: generation state (KV caches)
    /// belongs to one model and ends with it.
    epoch: u64,
    /// The training dtype of the last LoadModel (a Restore keeps it); before one, the
    /// device's default (bf16 where it has native bf16 arithmetic).
    dtype: crate::backend::Dtype,
    /// Decode weights of every model this runtime loads (`--weights`).
    serve_weights: ServeWeights,
    /// Serving skips the middle layers (`Serving::truncated`, the adversary tests' cheat).
    serve_truncated: bool,
}

/// The model config a LoadModel request asks for: the preset with non-zero fields overriding.
pub fn model_config(spec: Option<&pb::ModelSpec>) -> Result<ModelConfig, RuntimeError> {
    let s = spec.cloned().unwrap_or_default();
    let preset = if s.preset.is_empty() {
        "default"
    } else {
        s.preset.as_str()
    };
    let mut cfg = ModelConfig::preset(preset).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    let set = |field: &mut u32, v: u32| {
        if v != 0 {
            *field = v;
        }
    };
    set(&mut cfg.vocab_size, s.vocab_size);
    set(&mut cfg.hidden, s.hidden);
    set(&mut cfg.layers, s.layers);
    set(&mut cfg.heads, s.heads);
    set(&mut cfg.kv_heads, s.kv_heads);
    set(&mut cfg.ffn, s.ffn);
    set(&mut cfg.max_seq, s.max_seq);
    cfg.validate()
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    Ok(cfg)
}

/// The stage a LoadModel request asks for (`layer_end == 0` and no embedding/head: all).
/// Reads and checks checkpoints of other stages (LoadModel's and ExportWeights' `sources`):
/// each must be a verified checkpoint of the model `cfg`, whose weights hash to the expected
/// `model_hash` when one is given.
pub fn read_sources(
    sources: &[pb::WeightSource],
    cfg: &ModelConfig,
) -> Result<Vec<(TensorFile, PathBuf, CheckpointMeta)>, RuntimeError> {
    let mut files = Vec::with_capacity(sources.len());
    for src in sources {
        let path = Path::new(&src.path);
        let file = crate::checkpoint::read_tensor_file(path)?;
        let meta = crate::checkpoint::checkpoint_meta(&file, path)?;
        if &meta.config != cfg {
            return Err(RuntimeError::Invalid(format!(
                "source {path:?} holds another model ({:?})",
                meta.config
            )));
        }
        if !src.model_hash.is_empty() {
            let got = crate::checkpoint::file_model_hash(&file, path)?;
            if got != src.model_hash {
                return Err(RuntimeError::Invalid(format!(
                    "source {path:?}: its weights hash to {got}, not the expected {}",
                    src.model_hash
                )));
            }
        }
        files.push((file, path.to_path_buf(), meta));
    }
    Ok(files)
}

pub fn stage_spec(req: &pb::LoadModelRequest, cfg: &ModelConfig) -> StageSpec {
    if req.layer_end == 0 && req.layer_start == 0 && !req.has_embedding && !req.has_head {
        return StageSpec::full(cfg);
    }
    StageSpec {
        layer_start: req.layer_start,
        layer_end: req.layer_end,
        has_embedding: req.has_embedding,
        has_head: req.has_head,
    }
}

impl Runtime {
    /// Picks the device: `cpu`; `cuda` (an error when CUDA is unusable); `auto` (CUDA when the
    /// driver, a device and the kernels are there, else the CPU with one log line).
    pub fn new(device: DeviceChoice) -> Result<Runtime, RuntimeError> {
        let request = match device {
            DeviceChoice::Auto => DeviceRequest::Auto,
            DeviceChoice::Cpu => DeviceRequest::Cpu,
            DeviceChoice::Cuda => DeviceRequest::Cuda,
        };
        let cuda = open_device(request).map_err(|e| match e {
            BackendError::Device { op, message } => RuntimeError::DeviceFault { op, message },
            other => RuntimeError::Invalid(other.to_string()),
        })?;
        let dtype = if cuda.is_some() || CpuBackend::native_bf16() {
            crate::backend::Dtype::Bf16
        } else {
            crate::backend::Dtype::F32
        };
        Ok(Runtime {
            device,
            use_cuda: cuda.is_some(),
            idle_cuda: cuda,
            loaded: None,
            epoch: 0,
            dtype,
            serve_weights: ServeWeights::F32,
            serve_truncated: false,
        })
    }

    /// Serves every model loaded from now on with `weights` (quantized at its first
    /// generation). int8 has CPU kernels only: refused on CUDA.
    pub fn with_serve_weights(mut self, weights: ServeWeights) -> Result<Runtime, RuntimeError> {
        if weights == ServeWeights::Int8 && self.use_cuda {
            return Err(RuntimeError::Invalid(
                "int8 decode weights have CPU kernels only; serve f32 on CUDA".into(),
            ));
        }
        self.serve_weights = weights;
        Ok(self)
    }

    /// Serves every model loaded from now on truncated (`Serving::truncated`): only for the
    /// adversary tests of checked inference (issue #19).
    pub fn with_serve_truncated(mut self, truncated: bool) -> Runtime {
        self.serve_truncated = truncated;
        self
    }

    fn loaded(&mut self) -> Result<&mut Loaded, RuntimeError> {
        self.loaded.as_mut().ok_or(RuntimeError::NoModel)
    }

    /// Drops the loaded model, keeping its CUDA backend for the next one.
    fn unload(&mut self) {
        self.epoch += 1;
        if let Some(Loaded::Cuda(state)) = self.loaded.take() {
            self.idle_cuda = Some((*state).into_backend());
        }
    }

    fn cuda_backend(&mut self) -> Result<CudaBackend, RuntimeError> {
        match self.idle_cuda.take() {
            Some(b) => Ok(b),
            // The previous one went down with a model that failed to build: open it again.
            None => CudaBackend::new(0)
                .map_err(|e| RuntimeError::from(crate::model::ModelError::from(e))),
        }
    }

    /// Builds a model on the runtime's device with `build`.
    fn build(
        &mut self,
        build_cpu: impl FnOnce(CpuBackend) -> Result<State<CpuBackend>, RuntimeError>,
        build_cuda: impl FnOnce(CudaBackend) -> Result<State<CudaBackend>, RuntimeError>,
    ) -> Result<(), RuntimeError> {
        self.unload();
        let loaded = if self.use_cuda {
            let mut be = self.cuda_backend()?;
            be.set_dtype(self.dtype);
            Loaded::Cuda(Box::new(build_cuda(be)?))
        } else {
            Loaded::Cpu(Box::new(build_cpu(CpuBackend::with_dtype(self.dtype))?))
        };
        let mut loaded = loaded;
        with_state!(&mut loaded, |s| {
            s.model.serving.mode = self.serve_weights;
            s.model.serving.truncated = self.serve_truncated;
        });
        self.loaded = Some(loaded);
        Ok(())
    }

    pub fn health(&self) -> RuntimeHealth {
        match &self.loaded {
            Some(loaded) => with_state!(loaded, |s| s.health()),
            None => RuntimeHealth {
                device: if self.use_cuda {
                    "cuda".into()
                } else {
                    "cpu".into()
                },
                device_name: match &self.idle_cuda {
                    Some(b) => crate::backend::Backend::device_name(b),
                    None => format!("cpu ({:?} requested)", self.device).to_lowercase(),
                },
                ..RuntimeHealth::default()
            },
        }
    }

    pub fn load_model(
        &mut self,
        req: &pb::LoadModelRequest,
    ) -> Result<pb::LoadModelReply, RuntimeError> {
        let cfg = model_config(req.model.as_ref())?;
        let spec = stage_spec(req, &cfg);
        spec.validate(&cfg)?;
        let native = if self.use_cuda {
            // CudaBackend::new refuses devices below sm_80: every one it opens has bf16 mma.
            true
        } else {
            CpuBackend::native_bf16()
        };
        let device = if self.use_cuda { "cuda" } else { "cpu" };
        self.dtype = crate::backend::resolve_dtype(&req.dtype, native, device)
            .map_err(RuntimeError::Invalid)?;
        let train = TrainSettings::from_spec(req.train.as_ref(), &cfg, &req.node_id);
        // The old model goes first so two never coexist in memory.
        let mut seeded_layers = Vec::new();
        if req.checkpoint_path.is_empty() && !req.sources.is_empty() {
            let files = read_sources(&req.sources, &cfg)?;
            let refs: Vec<_> = files.iter().map(|(f, p, m)| (f, p.as_path(), m)).collect();
            let (c2, t2) = (cfg.clone(), train.clone());
            let mut seeded = None;
            let mut seeded2 = None;
            self.build(
                |be| {
                    let (s, l) = State::from_sources(be, cfg, spec, req.seed, train, &refs)?;
                    seeded = Some(l);
                    Ok(s)
                },
                |be| {
                    let (s, l) = State::from_sources(be, c2, spec, req.seed, t2, &refs)?;
                    seeded2 = Some(l);
                    Ok(s)
                },
            )?;
            seeded_layers = seeded.or(seeded2).unwrap_or_default();
        } else if req.checkpoint_path.is_empty() {
            let (c2, t2) = (cfg.clone(), train.clone());
            self.build(
                |be| State::new(be, cfg, spec, req.seed, train),
                |be| State::new(be, c2, spec, req.seed, t2),
            )?;
        } else {
            let path = Path::new(&req.checkpoint_path);
            let file = crate::checkpoint::read_tensor_file(path)?;
            let t2 = train.clone();
            self.build(
                |be| State::from_file(be, &file, path, Some((&cfg, &spec)), Some(train)),
                |be| State::from_file(be, &file, path, Some((&cfg, &spec)), Some(t2)),
            )?;
        }
        let dtype = self.dtype;
        let reply = with_state!(self.loaded()?, |s| pb::LoadModelReply {
            parameters: s.parameters(),
            model_hash: s.model_hash()?,
            step: s.step(),
            seeded_layers,
            replay_class: crate::backend::replay_class(
                &if device == "cuda" {
                    crate::backend::Backend::device_name(&s.model.be)
                } else {
                    device.to_string()
                },
                device == "cuda",
                dtype,
            ),
            state_hash: s.state_hash()?,
        });
        tracing::info!(
            parameters = reply.parameters,
            layers = ?(spec.layer_start..spec.layer_end),
            embedding = spec.has_embedding,
            head = spec.has_head,
            step = reply.step,
            dtype = self.dtype.as_str(),
            "model loaded"
        );
        Ok(reply)
    }

    pub fn forward(
        &mut self,
        req: &pb::ForwardRequest,
        shm: &Segment,
    ) -> Result<pb::ForwardReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.forward(req, shm))
    }

    pub fn backward(
        &mut self,
        req: &pb::BackwardRequest,
        shm: &Segment,
    ) -> Result<pb::BackwardReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.backward(req, shm))
    }

    pub fn optimizer_step(
        &mut self,
        req: &pb::OptimizerStepRequest,
    ) -> Result<pb::OptimizerStepReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.optimizer_step(req))
    }

    pub fn next_batch(
        &mut self,
        req: &pb::NextBatchRequest,
        shm: &Segment,
    ) -> Result<pb::NextBatchReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.next_batch(req, shm))
    }

    pub fn grad_norm(&mut self) -> Result<pb::GradNormReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.grad_norm())
    }

    pub fn reset_grads(&mut self) -> Result<pb::ResetGradsReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.reset_grads())?;
        Ok(pb::ResetGradsReply {})
    }

    pub fn train_step(
        &mut self,
        req: &pb::TrainStepRequest,
    ) -> Result<pb::TrainStepReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.train_step(req))
    }

    pub fn export_weights(
        &mut self,
        req: &pb::ExportWeightsRequest,
        shm: Option<&Segment>,
    ) -> Result<pb::ExportWeightsReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.export_weights(req, shm))
    }

    pub fn import_weights(
        &mut self,
        req: &pb::ImportWeightsRequest,
        shm: Option<&Segment>,
    ) -> Result<pb::ImportWeightsReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.import_weights(req, shm))
    }

    pub fn checkpoint(
        &mut self,
        req: &pb::CheckpointRequest,
    ) -> Result<pb::CheckpointReply, RuntimeError> {
        if req.path.is_empty() {
            return Err(RuntimeError::Invalid("Checkpoint needs a path".into()));
        }
        with_state!(self.loaded()?, |s| s.checkpoint(Path::new(&req.path)))
    }

    pub fn restore(&mut self, req: &pb::RestoreRequest) -> Result<pb::RestoreReply, RuntimeError> {
        if req.path.is_empty() {
            return Err(RuntimeError::Invalid("Restore needs a path".into()));
        }
        // Read and verify the whole file before touching the running model: a bad file changes
        // nothing.
        let path = Path::new(&req.path);
        let file = crate::checkpoint::read_tensor_file(path)?;
        crate::checkpoint::checkpoint_meta(&file, path)?;
        self.build(
            |be| State::from_file(be, &file, path, None, None),
            |be| State::from_file(be, &file, path, None, None),
        )?;
        let reply = with_state!(self.loaded()?, |s| pb::RestoreReply {
            step: s.step(),
            model_hash: s.model_hash()?,
            state_hash: s.state_hash()?,
        });
        tracing::info!(path = %req.path, step = reply.step, "checkpoint restored");
        Ok(reply)
    }

    pub fn model_hash(&mut self) -> Result<pb::ModelHashReply, RuntimeError> {
        Ok(pb::ModelHashReply {
            model_hash: with_state!(self.loaded()?, |s| s.model_hash())?,
        })
    }

    /// Generates tokens, handing each to `emit` as it is produced; stops early when `emit`
    /// returns false (the client went away).
    pub fn generate(
        &mut self,
        req: &pb::GenerateRequest,
        emit: &mut dyn FnMut(pb::GenerateReply) -> bool,
    ) -> Result<(), RuntimeError> {
        with_state!(self.loaded()?, |s| s.generate(req, emit))
    }

    /// Which model generation state belongs to (see `epoch`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Continuous batching, driven by `batcher.rs`: see `State::gen_prepare` (`runtime/generate.rs`).
    pub fn gen_prepare(&mut self, req: &pb::GenerateRequest) -> Result<Prepared, RuntimeError> {
        with_state!(self.loaded()?, |s| s.gen_prepare(req))
    }

    pub fn gen_admit(&mut self, id: u64, p: &Prepared) -> Result<pb::GenerateReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.gen_admit(id, p))
    }

    pub fn gen_step(&mut self) -> Result<Vec<(u64, pb::GenerateReply)>, RuntimeError> {
        with_state!(self.loaded()?, |s| s.gen_step())
    }

    pub fn gen_cancel(&mut self, id: u64) {
        if let Ok(loaded) = self.loaded() {
            with_state!(loaded, |s| s.gen_cancel(id));
        }
    }

    /// Distributed inference: see `runtime/stage.rs`.
    pub fn stage_start(
        &mut self,
        req: &pb::StageStartRequest,
    ) -> Result<pb::StageStartReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.stage_start(req))
    }

    pub fn stage_forward(
        &mut self,
        req: &pb::StageForwardRequest,
        shm: &Segment,
    ) -> Result<pb::StageForwardReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.stage_forward(req, shm))
    }

    pub fn stage_sample(
        &mut self,
        req: &pb::StageSampleRequest,
        shm: &Segment,
    ) -> Result<pb::StageSampleReply, RuntimeError> {
        with_state!(self.loaded()?, |s| s.stage_sample(req, shm))
    }

    pub fn stage_end(
        &mut self,
        req: &pb::StageEndRequest,
    ) -> Result<pb::StageEndReply, RuntimeError> {
        Ok(pb::StageEndReply {
            ended: with_state!(self.loaded()?, |s| s.stage_end(req.session)),
        })
    }

    /// Drops idle inference sessions (called from Health when the runtime is free).
    pub fn stage_prune(&mut self) {
        if let Ok(loaded) = self.loaded() {
            with_state!(loaded, |s| s.stage_prune());
        }
    }
}

#[cfg(test)]
mod tests;

/// Exit code after a device fault: tells the supervisor to restart us.
pub const EXIT_DEVICE_FAULT: i32 = 70;

/// Converts a runtime error to a status; a device fault also schedules the process exit (on
/// a plain thread, so the scheduler thread can call this too).
pub(crate) fn fault_exits(e: RuntimeError) -> tonic::Status {
    if let RuntimeError::DeviceFault { op, message } = &e {
        tracing::error!(op, %message, "device fault: exiting so the supervisor restarts the engine");
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::process::exit(EXIT_DEVICE_FAULT);
        });
    }
    e.into()
}
