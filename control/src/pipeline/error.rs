//! What a pipeline step or a stage command can end in, and how each maps to the peer wire.

use std::time::Duration;

use super::route::Hop;
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("stage {stage}: {message}")]
    Peer { stage: String, message: String },
    #[error("stage {0} did not answer in time")]
    Timeout(String),
    #[error("no route: {0}")]
    NoRoute(String),
}

impl PipeError {
    /// The peer stage that failed (died, stalled, refused or answered wrong), if one did.
    pub fn failed_stage(&self) -> Option<&str> {
        match self {
            PipeError::Peer { stage, .. } | PipeError::Timeout(stage) if stage != "local" => {
                Some(stage)
            }
            _ => None,
        }
    }
}

impl From<PipeError> for tonic::Status {
    fn from(e: PipeError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            PipeError::Refused(_) => tonic::Status::invalid_argument(msg),
            PipeError::NotReady(_) | PipeError::NoRoute(_) => tonic::Status::unavailable(msg),
            PipeError::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            PipeError::Engine(_) | PipeError::Peer { .. } => tonic::Status::aborted(msg),
        }
    }
}

/// An engine failure of a training command: whatever the engine said, the step failed.
pub(crate) fn engine_err(e: EngineError) -> PipeError {
    PipeError::Engine(e.message())
}

/// Waits for `fut` at most `secs`; a late stage becomes [`PipeError::Timeout`].
pub async fn within<T>(
    secs: u32,
    stage: &str,
    fut: impl std::future::Future<Output = Result<T, PipeError>>,
) -> Result<T, PipeError> {
    match tokio::time::timeout(Duration::from_secs(u64::from(secs)), fut).await {
        Ok(r) => r,
        Err(_) => Err(PipeError::Timeout(stage.to_string())),
    }
}

pub fn peer_err(stage: &Hop, e: neuroshard_net::error::NetworkError) -> PipeError {
    PipeError::Peer {
        stage: stage.conn.id.to_string(),
        message: e.to_string(),
    }
}
