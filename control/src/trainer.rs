//! Drives local training on the engine: brings the model up after every engine (re)start —
//! restoring the latest checkpoint when there is one — runs training steps while training is
//! enabled, and checkpoints every `training.checkpoint_every` steps and at shutdown.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use neuroshard_proto::engine as pb;
use tokio::sync::watch;

use crate::config::Config;
use crate::supervisor::{Engine, EngineState};

/// Loss samples kept for the status endpoints (and later the training-verification figures).
const HISTORY: usize = 1000;

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
    /// Steps done since this daemon started (for steps per hour).
    pub steps_this_run: u64,
}

pub fn checkpoint_path(data_dir: &Path) -> PathBuf {
    data_dir.join("checkpoints").join("latest.ckpt")
}

/// The transformer layers this node holds: all of the configured model (role `full`).
pub fn held_layers(cfg: &Config) -> std::ops::Range<u32> {
    let n = neuroshard_shared::model::ModelConfig::preset(&cfg.training.model)
        .map(|m| m.layers)
        .unwrap_or(0);
    0..n
}

/// Builds the LoadModel command for the configured model, holding every layer (role `full`).
pub fn load_request(
    cfg: &Config,
    node_id: &str,
    checkpoint: Option<&Path>,
) -> pb::LoadModelRequest {
    let t = &cfg.training;
    let layers = held_layers(cfg);
    pb::LoadModelRequest {
        model: Some(pb::ModelSpec {
            preset: t.model.clone(),
            ..Default::default()
        }),
        layer_start: layers.start,
        layer_end: layers.end,
        has_embedding: true,
        has_head: true,
        seed: t.seed,
        checkpoint_path: checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        train: Some(pb::TrainSpec {
            learning_rate: t.learning_rate as f32,
            weight_decay: t.weight_decay as f32,
            clip_norm: t.clip_norm as f32,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            data_path: t.data_path.clone(),
        }),
        node_id: node_id.to_string(),
        dtype: "f32".into(),
    }
}

pub struct Trainer {
    pub engine: Engine,
    pub config: Arc<RwLock<Config>>,
    pub stats: Arc<Mutex<TrainingStats>>,
    pub data_dir: PathBuf,
    pub node_id: String,
}

impl Trainer {
    fn config(&self) -> Config {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut TrainingStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Runs until `stop` flips to true; then writes a last checkpoint if the engine is up.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut engine = self.engine.subscribe();
        loop {
            // Wait for a live engine.
            let (generation, client) = loop {
                if *stop.borrow() {
                    return;
                }
                {
                    let s = engine.borrow();
                    if let (EngineState::Ok, Some(c)) = (s.state, s.client.clone()) {
                        break (s.generation, c);
                    }
                }
                tokio::select! {
                    _ = engine.changed() => {}
                    _ = stop.changed() => {}
                }
            };
            self.update(|s| s.model_loaded = false);
            let mut client = client;
            if let Err(e) = self.bring_up(&mut client).await {
                tracing::warn!(error = %e, "could not load the model; retrying");
                self.update(|s| s.last_error = Some(e));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            // Train until the engine restarts or we are told to stop.
            loop {
                if *stop.borrow() {
                    self.checkpoint(&mut client).await;
                    return;
                }
                if engine.borrow().generation != generation
                    || engine.borrow().state != EngineState::Ok
                {
                    break;
                }
                let cfg = self.config();
                if !cfg.training.enabled {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                        _ = engine.changed() => {}
                    }
                    continue;
                }
                match client.train_step(pb::TrainStepRequest {}).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        self.update(|s| {
                            s.step = r.step;
                            s.loss = Some(r.loss);
                            s.tokens += r.tokens;
                            s.steps_this_run += 1;
                            s.history.push_back((r.step, r.loss));
                            while s.history.len() > HISTORY {
                                s.history.pop_front();
                            }
                            s.last_error = None;
                        });
                        if r.step % cfg.training.checkpoint_every as u64 == 0 {
                            self.checkpoint(&mut client).await;
                        }
                    }
                    Err(status) => {
                        self.update(|s| s.last_error = Some(status.message().to_string()));
                        tracing::warn!(error = %status.message(), "training step failed");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.changed() => {}
                            _ = engine.changed() => {}
                        }
                    }
                }
            }
        }
    }

    /// Restores the latest checkpoint if there is one, else builds the model from the seed.
    async fn bring_up(&self, client: &mut crate::supervisor::Client) -> Result<(), String> {
        let cfg = self.config();
        let ckpt = checkpoint_path(&self.data_dir);
        let existing = ckpt.exists().then_some(ckpt.as_path());
        let req = load_request(&cfg, &self.node_id, existing);
        let reply = match client.load_model(req).await {
            Ok(r) => r.into_inner(),
            Err(status) if existing.is_some() => {
                // A checkpoint the engine cannot read must not stop the node: keep it aside for
                // inspection and start from the seed.
                tracing::error!(error = %status.message(), path = %ckpt.display(), "checkpoint unreadable; starting from seed");
                let aside = ckpt.with_extension(format!("bad-{}", chrono::Utc::now().timestamp()));
                let _ = std::fs::rename(&ckpt, &aside);
                client
                    .load_model(load_request(&cfg, &self.node_id, None))
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner()
            }
            Err(status) => return Err(status.message().to_string()),
        };
        tracing::info!(step = reply.step, params = reply.parameters, hash = %reply.model_hash, restored = existing.is_some(), "model loaded");
        self.update(|s| {
            s.model_loaded = true;
            s.model_hash = reply.model_hash;
            s.parameters = reply.parameters;
            s.step = reply.step;
            s.started.get_or_insert_with(Instant::now);
            s.last_checkpoint_step = existing.map(|_| reply.step);
        });
        Ok(())
    }

    async fn checkpoint(&self, client: &mut crate::supervisor::Client) {
        let path = checkpoint_path(&self.data_dir);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match client
            .checkpoint(pb::CheckpointRequest {
                path: path.display().to_string(),
            })
            .await
        {
            Ok(r) => {
                let step = r.into_inner().step;
                tracing::debug!(step, "checkpoint written");
                self.update(|s| s.last_checkpoint_step = Some(step));
            }
            Err(status) => tracing::warn!(error = %status.message(), "checkpoint failed"),
        }
    }
}
