//! The engine boundary: everything control knows about its engine process. The supervisor
//! keeps one connected and publishes its status; [`EngineHandle`] is the one way to send it a
//! command (one typed method per command of `engine.proto`); [`EngineError`] is the one error
//! those commands end in; `slots` says which shared-memory slot each command uses; and the
//! files the engine reads and writes for control (checkpoints) are named here. No other
//! module builds an engine request, reads an engine reply or maps a `tonic::Status` of the
//! engine.

mod error;
mod handle;
pub mod scratch;
pub mod slots;
pub mod supervisor;
mod types;

use std::path::{Path, PathBuf};

pub use error::EngineError;
pub use handle::{EngineHandle, Forwarded, TokenStream};
pub use slots::Slots;
pub use supervisor::{Engine, EngineMode, EngineState, EngineStatus, SupervisorConfig};
pub use types::{
    EngineHealth, LoadSpec, Loaded, Sampling, StageStarted, TensorIn, Token, TrainSettings,
    TrainStepped,
};

/// The node's latest checkpoint: restored after every engine start.
pub fn checkpoint_path(data_dir: &Path) -> PathBuf {
    checkpoints_dir(data_dir).join("latest.ckpt")
}

/// The folder of the node's checkpoints and of the temporary ones it serves or fetches.
pub fn checkpoints_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("checkpoints")
}

/// The engine's gRPC protocol as it is, for tests and tools that speak `engine.proto`
/// directly (the integration tests drive an engine with it). Product code uses
/// [`EngineHandle`].
pub mod raw {
    use neuroshard_proto::engine as pb;

    /// A gRPC client of the engine.
    pub type Client = pb::engine_client::EngineClient<tonic::transport::Channel>;

    /// Connects to the engine listening on the Unix socket `socket`.
    pub async fn connect(socket: std::path::PathBuf) -> Result<Client, super::EngineError> {
        super::handle::connect(socket).await
    }

    /// The LoadModel request `spec` describes.
    pub fn load_request(spec: &super::LoadSpec) -> pb::LoadModelRequest {
        spec.into()
    }
}
