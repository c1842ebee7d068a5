//! What the REST handlers read: the node's live state, shared by reference.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::config::Config;
use crate::resources::Sampler;
use crate::supervisor::Engine;
use crate::trainer::TrainingStats;

/// Shared state of one running node. Cheap to clone (everything behind `Arc`).
#[derive(Clone)]
pub struct AppState {
    pub node_id: String,
    pub started: Instant,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Arc<RwLock<Config>>,
    pub engine: Engine,
    pub resources: Sampler,
    pub training: Arc<Mutex<TrainingStats>>,
    pub network: Arc<crate::peer::PeerState>,
}

impl AppState {
    pub fn config(&self) -> Config {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn training(&self) -> TrainingStats {
        self.training.lock().map(|t| t.clone()).unwrap_or_default()
    }
}
