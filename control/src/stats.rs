//! What the node's training is doing, as the trainer, the pipeline stage, the proofs and the
//! API read it: one record behind one lock, written by the trainer and the stage.

use std::collections::VecDeque;
use std::time::Instant;

use crate::config::Config;

/// The node's training figures.
#[derive(Debug, Clone, Default)]
pub struct TrainingStats {
    pub model_loaded: bool,
    pub model_hash: String,
    pub parameters: u64,
    pub step: u64,
    pub loss: Option<f32>,
    pub tokens: u64,
    pub history: VecDeque<(u64, f32)>,
    pub last_checkpoint_step: Option<u64>,
    pub last_error: Option<String>,
    pub started: Option<Instant>,
    /// Steps done since this daemon started.
    pub steps_this_run: u64,
    /// The layers this node holds (dynamic layer pool), once decided.
    pub assignment: Option<neuroshard_coordination::pool::Assignment>,
    /// Data shards this node has trained on.
    pub shards: std::collections::BTreeSet<u32>,
    /// When the latest step finished.
    pub last_step_at: Option<Instant>,
    /// Steps per minute over the last hour (for steps per hour).
    pub rate: crate::metrics::StepRate,
}

/// The transformer layers this node holds: all of the configured model (role `full`).
pub fn held_layers(cfg: &Config) -> std::ops::Range<u32> {
    0..cfg.training.model.config().layers
}

/// The layers held now: none for an observer, the live assignment once decided, else every
/// layer.
pub fn live_layers(cfg: &Config, stats: &TrainingStats) -> std::ops::Range<u32> {
    if cfg.node.observer {
        return 0..0;
    }
    match &stats.assignment {
        Some(a) => a.layers.clone(),
        None => held_layers(cfg),
    }
}
