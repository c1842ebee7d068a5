//! The model state the engine commands act on. The server (`server.rs`) is the RPC edge: it
//! resolves shared-memory references and calls one method here per command, on a blocking
//! thread, one command at a time.

use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::{Segment, ShmError};

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
}

impl From<RuntimeError> for tonic::Status {
    fn from(e: RuntimeError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            RuntimeError::NoModel | RuntimeError::NotAttached => tonic::Status::failed_precondition(msg),
            RuntimeError::Invalid(_) | RuntimeError::Shm(_) => tonic::Status::invalid_argument(msg),
            RuntimeError::Unavailable { .. } => tonic::Status::unimplemented(msg),
            RuntimeError::DeviceFault { .. } => tonic::Status::internal(msg),
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
}

/// Which device the engine runs on, as asked on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

pub struct Runtime {
    device: DeviceChoice,
}

impl Runtime {
    pub fn new(device: DeviceChoice) -> Result<Runtime, RuntimeError> {
        if device == DeviceChoice::Cuda {
            return Err(RuntimeError::Unavailable {
                op: "cuda device",
                why: "the CUDA backend is not built yet",
            });
        }
        Ok(Runtime { device })
    }

    pub fn health(&self) -> RuntimeHealth {
        let _ = self.device;
        RuntimeHealth {
            device: "cpu".into(),
            device_name: "cpu".into(),
            memory_used: 0,
            memory_total: 0,
            model_loaded: false,
            step: 0,
        }
    }

    pub fn load_model(&mut self, _req: &pb::LoadModelRequest) -> Result<pb::LoadModelReply, RuntimeError> {
        Err(self.unavailable("LoadModel"))
    }

    pub fn forward(&mut self, _req: &pb::ForwardRequest, _shm: &Segment) -> Result<pb::ForwardReply, RuntimeError> {
        Err(self.unavailable("Forward"))
    }

    pub fn backward(&mut self, _req: &pb::BackwardRequest, _shm: &Segment) -> Result<pb::BackwardReply, RuntimeError> {
        Err(self.unavailable("Backward"))
    }

    pub fn optimizer_step(&mut self, _req: &pb::OptimizerStepRequest) -> Result<pb::OptimizerStepReply, RuntimeError> {
        Err(self.unavailable("OptimizerStep"))
    }

    pub fn train_step(&mut self, _req: &pb::TrainStepRequest) -> Result<pb::TrainStepReply, RuntimeError> {
        Err(self.unavailable("TrainStep"))
    }

    pub fn export_weights(
        &mut self,
        _req: &pb::ExportWeightsRequest,
        _shm: Option<&Segment>,
    ) -> Result<pb::ExportWeightsReply, RuntimeError> {
        Err(self.unavailable("ExportWeights"))
    }

    pub fn import_weights(
        &mut self,
        _req: &pb::ImportWeightsRequest,
        _shm: Option<&Segment>,
    ) -> Result<pb::ImportWeightsReply, RuntimeError> {
        Err(self.unavailable("ImportWeights"))
    }

    pub fn checkpoint(&mut self, _req: &pb::CheckpointRequest) -> Result<pb::CheckpointReply, RuntimeError> {
        Err(self.unavailable("Checkpoint"))
    }

    pub fn restore(&mut self, _req: &pb::RestoreRequest) -> Result<pb::RestoreReply, RuntimeError> {
        Err(self.unavailable("Restore"))
    }

    pub fn model_hash(&mut self) -> Result<pb::ModelHashReply, RuntimeError> {
        Err(RuntimeError::NoModel)
    }

    /// Generates tokens, handing each to `emit` as it is produced; stops early when `emit`
    /// returns false (the client went away).
    pub fn generate(
        &mut self,
        _req: &pb::GenerateRequest,
        _emit: &mut dyn FnMut(pb::GenerateReply) -> bool,
    ) -> Result<(), RuntimeError> {
        Err(self.unavailable("Generate"))
    }

    fn unavailable(&self, op: &'static str) -> RuntimeError {
        RuntimeError::Unavailable {
            op,
            why: "the model numerics are not built yet",
        }
    }
}
