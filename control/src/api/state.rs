//! What the REST handlers read: the node's live state, shared by reference. It belongs to the
//! API; background tasks get narrow handles of their own (the proof minter: `work::Minter`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::{Config, ConfigSender, LiveConfig};
use crate::engine::Engine;
use crate::resources::Sampler;
use crate::stats::TrainingStats;

/// Shared state of one running node. Cheap to clone (everything behind `Arc`).
#[derive(Clone)]
pub struct AppState {
    pub node_id: String,
    pub started: Instant,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    /// The live configuration (`config()` reads it).
    pub config: LiveConfig,
    pub engine: Engine,
    pub resources: Sampler,
    pub training: Arc<Mutex<TrainingStats>>,
    pub network: Arc<neuroshard_net::PeerState>,
    /// The node's view of the network ledger.
    pub ledger: Arc<neuroshard_ledger::Ledger>,
    /// The node's own wallet: signs its proofs, receives its rewards.
    pub wallet: Arc<neuroshard_ledger::Wallet>,
    /// Keys of the accounts API tokens act for.
    pub keyring: Arc<crate::wallets::Keyring>,
    pub auth: Arc<crate::auth::Authenticator>,
    pub limits: Arc<super::RateLimits>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Places for inference requests (generating or waiting for the engine).
    pub inference_slots: Arc<tokio::sync::Semaphore>,
    /// The one writer of the live configuration, behind a lock that serializes changes
    /// (validate, save, apply: `PATCH /config`).
    pub config_write: Arc<tokio::sync::Mutex<ConfigSender>>,
    /// The peer network: a node without every layer serves inference through it
    /// (`pipeline/infer.rs`).
    pub net: Arc<neuroshard_net::Network>,
    /// DiLoCo rounds: the figures `/api/training/global` shows.
    pub diloco: Arc<crate::diloco::round::Diloco>,
    /// This node's pipeline stage: its figures, and distributed inference from here.
    pub stage: Arc<crate::pipeline::Stage>,
    /// Throughput and peer count over the last hour (the dashboard's plots).
    pub samples: Arc<crate::samples::Samples>,
    /// What this node keeps of its paid generations for verifiers (issue #19).
    pub evidence: Arc<crate::evidence::Store>,
}

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    pub fn training(&self) -> TrainingStats {
        self.training.lock().clone()
    }
}
