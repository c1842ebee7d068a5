//! One stage of the pipeline: this node's engine and its layers, and the commands a
//! pipeline step runs on them (batch, forward, backward, norm, apply, snapshot), one at a time
//! under the stage lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use neuroshard_shared::model::ModelConfig;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::error::engine_err;
use super::wire::Wire;
use super::{Assignment, PipeError, infer};
use crate::config::{Config, LiveConfig};
use crate::engine::{EngineHandle, EngineStatus, Forwarded};
use crate::stats::TrainingStats;

/// How far ahead of the local clock a step id may be (clock skew between stages).
const MAX_STEP_AHEAD_MS: u64 = 60_000;

/// Figures of this node's pipeline work.
#[derive(Debug, Default)]
pub struct Counters {
    /// Peer tensors or requests refused as malformed.
    pub refused: AtomicU64,
    /// Driver steps that failed (a stage timed out, died or refused).
    pub failed_steps: AtomicU64,
    /// Driver steps that finished.
    pub steps: AtomicU64,
    /// Tensor payload bytes this stage sent to or received from other stages.
    pub tensor_bytes: AtomicU64,
    /// Times this node changed its layers to cover layers nobody held (takeover).
    pub takeovers: AtomicU64,
    /// Times this node, a replica left off the training route, refreshed its layers from a
    /// holder that had trained them further.
    pub resyncs: AtomicU64,
    /// Generations from this node that went on over another route after a peer stage failed.
    pub failovers: AtomicU64,
    /// Layers loaded (takeover or start) from a peer's weights (GetWeights, hash checked),
    /// from this node's own checkpoint, or from the seed because neither had them.
    pub layers_from_peer: AtomicU64,
    pub layers_from_checkpoint: AtomicU64,
    pub layers_from_init: AtomicU64,
    /// Stage snapshots served to peers (GetWeights with layers).
    pub weights_served: AtomicU64,
}

/// One stage of the pipeline: this node's engine and its layers.
pub struct Stage {
    pub(super) engine: watch::Receiver<EngineStatus>,
    pub(super) config: LiveConfig,
    pub(super) stats: Arc<Mutex<TrainingStats>>,
    pub(super) data_dir: PathBuf,
    pub(super) assignment: RwLock<Option<Assignment>>,
    /// The step id being worked on; the lock serializes engine commands and slot use.
    pub(super) current: tokio::sync::Mutex<u64>,
    pub counters: Arc<Counters>,
    /// Distributed inference on this stage (`infer.rs`).
    pub(super) infer: infer::InferState,
    /// The batch of a driver step that failed before any stage could step on it (the
    /// schedule's requeue): the next step trains on it, so a failure never skips data (and
    /// the steps stay those of one node reading the same data).
    pub(super) retry_batch: Mutex<Option<Batch>>,
    /// Receipts this stage signs for its peers' work and holds for its own (issue #19).
    pub attest: Arc<crate::attest::Attestations>,
}

/// A driver's batch: token ids, labels, and the shard they came from.
pub(super) type Batch = (Wire, Wire, u32);

/// The engine's micro-batch key for micro-batch `mb` of step `step`.
pub(super) fn engine_mb(step: u64, mb: u32) -> u64 {
    (step << 4) | u64::from(mb & 0xf)
}

/// What a stage's forward produced.
pub enum Out {
    Acts(Wire),
    Loss(f32),
}

impl Stage {
    pub fn new(
        engine: watch::Receiver<EngineStatus>,
        config: LiveConfig,
        stats: Arc<Mutex<TrainingStats>>,
        data_dir: PathBuf,
        attest: Arc<crate::attest::Attestations>,
    ) -> Stage {
        Stage {
            engine,
            config,
            stats,
            data_dir,
            assignment: RwLock::new(None),
            current: tokio::sync::Mutex::new(0),
            counters: Arc::new(Counters::default()),
            infer: infer::InferState::default(),
            retry_batch: Mutex::new(None),
            attest,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    pub fn model(&self) -> Result<ModelConfig, PipeError> {
        Ok(self.config().training.model.config().clone())
    }

    pub fn assignment(&self) -> Option<Assignment> {
        self.assignment.read().clone()
    }

    pub fn set_assignment(&self, a: Assignment) {
        *self.assignment.write() = Some(a);
    }

    /// The assignment, when the model is loaded with it.
    pub fn ready(&self) -> Result<Assignment, PipeError> {
        let loaded = self.stats.lock().model_loaded;
        match self.assignment() {
            Some(a) if loaded => Ok(a),
            _ => Err(PipeError::NotReady(
                "no layers loaded yet; retry later".into(),
            )),
        }
    }

    pub(super) fn handle(&self) -> Result<EngineHandle, PipeError> {
        self.engine
            .borrow()
            .handle
            .clone()
            .ok_or_else(|| PipeError::NotReady("engine not running".into()))
    }

    /// Takes the stage lock for `step`: a newer step drops what an older one left (saved
    /// activations, accumulated gradients); an older step is refused.
    pub(super) async fn enter(
        &self,
        step: u64,
        engine: &EngineHandle,
    ) -> Result<tokio::sync::MutexGuard<'_, u64>, PipeError> {
        // Step ids are the driver's clock in milliseconds: one far ahead of ours would make
        // every real step look old until then.
        let ahead = step.saturating_sub(neuroshard_net::now_ms().max(0) as u64);
        if ahead > MAX_STEP_AHEAD_MS {
            return Err(PipeError::Refused(format!(
                "step {step} is {} s ahead of this node's clock",
                ahead / 1000
            )));
        }
        let mut cur = self.current.lock().await;
        if step < *cur {
            return Err(PipeError::Refused(format!(
                "step {step} is older than the current step {}",
                *cur
            )));
        }
        if step > *cur {
            engine.reset_grads().await.map_err(engine_err)?;
            *cur = step;
        }
        Ok(cur)
    }

    /// The driver's next batch (token ids, labels) from its engine's data loader.
    pub async fn next_batch(&self, step: u64) -> Result<(Wire, Wire, u32), PipeError> {
        let engine = self.handle()?;
        let _g = self.enter(step, &engine).await?;
        let (ids, labels, shard) = engine.next_batch().await.map_err(engine_err)?;
        Ok((ids.into(), labels.into(), shard))
    }

    /// This stage's forward of one micro-batch: ids (driver) or activations in.
    pub async fn forward(
        &self,
        step: u64,
        mb: u32,
        input: &Wire,
        labels: Option<&Wire>,
    ) -> Result<Out, PipeError> {
        let engine = self.handle()?;
        let _g = self.enter(step, &engine).await?;
        let r = engine
            .forward(input.view(), labels.map(Wire::view), engine_mb(step, mb))
            .await
            .map_err(engine_err)?;
        match r {
            Forwarded::Loss(l) => Ok(Out::Loss(l)),
            Forwarded::Output(t) => Ok(Out::Acts(t.into())),
        }
    }

    /// This stage's backward of one micro-batch; the gradient w.r.t. its input (none on the
    /// driver).
    pub async fn backward(
        &self,
        step: u64,
        mb: u32,
        grad: Option<&Wire>,
    ) -> Result<Option<Wire>, PipeError> {
        let engine = self.handle()?;
        let g = self.current.lock().await;
        if *g != step {
            return Err(PipeError::Refused(format!(
                "backward for step {step}, but the stage is at {}",
                *g
            )));
        }
        let r = engine
            .backward(grad.map(Wire::view), engine_mb(step, mb))
            .await
            .map_err(engine_err)?;
        Ok(r.map(Wire::from))
    }

    /// Squared norm of this stage's gradients for `step`.
    pub async fn sq_norm(&self, step: u64) -> Result<f64, PipeError> {
        let engine = self.handle()?;
        let g = self.current.lock().await;
        if *g != step {
            return Err(PipeError::Refused(format!(
                "norm for step {step}, but the stage is at {}",
                *g
            )));
        }
        engine.grad_sq_norm().await.map_err(engine_err)
    }

    /// Steps this stage's optimizer clipped by `global_norm`; checkpoints on schedule.
    pub async fn apply(&self, step: u64, global_norm: f32) -> Result<u64, PipeError> {
        let engine = self.handle()?;
        let g = self.current.lock().await;
        if *g != step {
            return Err(PipeError::Refused(format!(
                "apply for step {step}, but the stage is at {}",
                *g
            )));
        }
        if !global_norm.is_finite() || global_norm < 0.0 {
            return Err(PipeError::Refused(format!(
                "global norm {global_norm} is not a norm"
            )));
        }
        let new_step = engine
            .optimizer_step(global_norm)
            .await
            .map_err(engine_err)?;
        let cfg = self.config();
        if new_step % u64::from(cfg.training.checkpoint_every.max(1)) == 0 {
            let path = crate::engine::checkpoint_path(&self.data_dir);
            match engine.checkpoint(&path).await {
                Ok(s) => {
                    self.stats.lock().last_checkpoint_step = Some(s);
                    crate::storage::prune_and_log(&self.data_dir, cfg.resources.max_storage_mb);
                }
                Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
            }
        }
        drop(g);
        {
            let mut s = self.stats.lock();
            s.step = new_step;
            s.steps_this_run += 1;
            s.last_step_at = Some(std::time::Instant::now());
            s.rate.record(std::time::Instant::now());
        }
        Ok(new_step)
    }
}

impl Stage {
    /// Holds the stage lock: no pipeline command runs on the engine until it is dropped (a
    /// layer range being reloaded).
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, u64> {
        self.current.lock().await
    }

    /// A checkpoint of this whole stage (weights, AdamW moments, step) and the hash of its
    /// parameters, for a peer that takes over or joins with some of `layers` (GetWeights).
    pub async fn snapshot(&self, layers: &[u32]) -> Result<(String, Vec<u8>), PipeError> {
        let a = self.ready()?;
        if let Some(l) = layers.iter().find(|l| !a.layers.contains(l)) {
            return Err(PipeError::Refused(format!(
                "layer {l} is not held here (layers {:?})",
                a.layers
            )));
        }
        let engine = self.handle()?;
        let _g = self.current.lock().await;
        let dir = crate::engine::checkpoints_dir(&self.data_dir);
        std::fs::create_dir_all(&dir).map_err(|e| PipeError::Engine(e.to_string()))?;
        let n = SNAPSHOTS.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("serve-{}-{n}.ckpt", std::process::id()));
        let r = async {
            engine.checkpoint(&path).await.map_err(engine_err)?;
            let hash = engine.model_hash().await.map_err(engine_err)?;
            let bytes = std::fs::read(&path).map_err(|e| PipeError::Engine(e.to_string()))?;
            Ok((hash, bytes))
        }
        .await;
        let _ = std::fs::remove_file(&path);
        if r.is_ok() {
            self.counters.weights_served.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// Numbers the snapshot files a node writes for its peers.
static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);
