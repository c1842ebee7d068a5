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
use super::oplog::{Op, Sent};
use super::wire::Wire;
use super::{Assignment, PipeError, infer};
use crate::config::{Config, LiveConfig};
use crate::engine::{EngineHandle, EngineStatus, Forwarded};
use crate::stats::TrainingStats;

/// How far ahead of the local clock a step id may be (clock skew between stages).
const MAX_STEP_AHEAD_MS: u64 = 60_000;

/// One pipeline step as a stage knows it: the driver (first stage) whose step it is and the
/// driver's step id. Several drivers' pipelines may pass through one stage; the step-id rule
/// ("a newer step drops what an older one left, an older one is refused") holds per driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepKey {
    pub driver: String,
    pub step: u64,
}

impl StepKey {
    pub fn new(driver: impl Into<String>, step: u64) -> StepKey {
        StepKey {
            driver: driver.into(),
            step,
        }
    }
}

/// The step that holds this stage's gradients (and saved activations) now.
///
/// Two pipelines through one stage are serialized, not summed: between ResetGrads and the
/// optimizer step the engine accumulates exactly one step's micro-batches. Each pipeline's
/// `apply` then steps the stage on its own gradients, clipped by its own global norm (gathered
/// over its own route), so every pipeline step equals one node's TrainStep on its batch, as
/// with a single pipeline. Summing several pipelines' gradients would need one global norm
/// and one apply agreed between drivers that do not know of each other (and stages of
/// different routes would step on different sums). Another driver's step waits until the
/// step holding the stage is applied, replaced by its driver's next step, or idle for the
/// pipeline timeout (its driver gone); past [`Stage::busy_wait`] it is refused as busy, and
/// its driver tries another route.
#[derive(Debug)]
pub struct InFlight {
    pub key: StepKey,
    /// The step was applied: the stage is free for any driver.
    pub done: bool,
    /// When the step last ran a command here.
    pub last: std::time::Instant,
}

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
    /// Times this node moved to another stage to even out the stages' training throughput.
    pub rebalances: AtomicU64,
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
    /// The step being worked on; the lock serializes engine commands and slot use.
    pub(super) current: tokio::sync::Mutex<InFlight>,
    /// Wakes steps of other drivers waiting for the stage (a step applied).
    pub(super) freed: tokio::sync::Notify,
    /// Callers (steps of other drivers) waiting for the stage now.
    pub(super) waiting: AtomicU64,
    /// Parameter-tokens and seconds of this stage's engine forwards and backwards (its
    /// measured training compute, advertised for the layer balance).
    pub(super) compute: Mutex<Meter>,
    pub counters: Arc<Counters>,
    /// Distributed inference on this stage (`infer.rs`).
    pub(super) infer: infer::InferState,
    /// The batch of a driver step that failed before any stage could step on it (the
    /// schedule's requeue): the next step trains on it, so a failure never skips data (and
    /// the steps stay those of one node reading the same data).
    pub(super) retry_batch: Mutex<Option<Batch>>,
    /// Receipts this stage signs for its peers' work and holds for its own (issue #19).
    pub attest: Arc<crate::attest::Attestations>,
    /// An adversary build cheating with garbage: the input shape of each micro-batch it
    /// answered, for the garbage gradient of its backward.
    garbage_shapes: Mutex<std::collections::BTreeMap<u64, Vec<u64>>>,
    /// An adversary build spoofing its log: the digest of the made-up input it logged for
    /// each micro-batch, logged as received in place of the real one.
    spoofed_inputs: Mutex<std::collections::BTreeMap<u64, neuroshard_ledger::keys::Hash32>>,
    /// The engine commands of the last segments, for verifiers (`oplog.rs`).
    pub oplog: super::oplog::OpLog,
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
        let oplog = super::oplog::OpLog::new(data_dir.join("pipeline").join("oplog"));
        Stage {
            engine,
            config,
            stats,
            data_dir,
            assignment: RwLock::new(None),
            current: tokio::sync::Mutex::new(InFlight {
                key: StepKey::default(),
                done: true,
                last: std::time::Instant::now(),
            }),
            freed: tokio::sync::Notify::new(),
            waiting: AtomicU64::new(0),
            compute: Mutex::new(Meter::default()),
            counters: Arc::new(Counters::default()),
            infer: infer::InferState::default(),
            retry_batch: Mutex::new(None),
            attest,
            garbage_shapes: Mutex::new(std::collections::BTreeMap::new()),
            spoofed_inputs: Mutex::new(std::collections::BTreeMap::new()),
            oplog,
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

    /// Takes the stage lock for `key`'s step: a newer step of the same driver drops what an
    /// older one left (saved activations, accumulated gradients), an older one is refused;
    /// another driver's step waits until the stage is free (see [`InFlight`]).
    pub(super) async fn enter(
        &self,
        key: &StepKey,
        engine: &EngineHandle,
    ) -> Result<tokio::sync::MutexGuard<'_, InFlight>, PipeError> {
        // Step ids are the driver's clock in milliseconds: one far ahead of ours would make
        // every real step look old until then.
        let step = key.step;
        let ahead = step.saturating_sub(neuroshard_net::now_ms().max(0) as u64);
        if ahead > MAX_STEP_AHEAD_MS {
            return Err(PipeError::Refused(format!(
                "step {step} is {} s ahead of this node's clock",
                ahead / 1000
            )));
        }
        let stale = std::time::Duration::from_secs(u64::from(
            self.config().training.pipeline_timeout_secs.max(1),
        ));
        let deadline = tokio::time::Instant::now() + self.busy_wait();
        loop {
            let freed = self.freed.notified();
            let mut cur = self.current.lock().await;
            let free = cur.done || cur.last.elapsed() >= stale;
            if cur.key.driver == key.driver {
                if step < cur.key.step {
                    return Err(PipeError::Refused(format!(
                        "step {step} is older than the current step {}",
                        cur.key.step
                    )));
                }
                if step > cur.key.step {
                    self.step_starts(engine).await?;
                    cur.key.step = step;
                    cur.done = false;
                }
            } else if free {
                self.step_starts(engine).await?;
                cur.key = key.clone();
                cur.done = false;
            } else {
                drop(cur);
                if tokio::time::Instant::now() >= deadline {
                    return Err(PipeError::NotReady(
                        "this stage is busy with another pipeline's step".into(),
                    ));
                }
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::time::timeout_at(
                    deadline
                        .min(tokio::time::Instant::now() + std::time::Duration::from_millis(500)),
                    freed,
                )
                .await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            cur.last = std::time::Instant::now();
            return Ok(cur);
        }
    }

    /// A new step takes the stage: starts a new segment of the operation log first when one is
    /// due (a checkpoint taken here, between steps, under the stage lock), then drops what the
    /// previous step left.
    async fn step_starts(&self, engine: &EngineHandle) -> Result<(), PipeError> {
        let round_secs = u64::from(self.config().training.stage_round_secs.max(1));
        let round = neuroshard_net::now_ms().max(0) as u64 / 1000 / round_secs;
        if self.oplog.needs_segment(round) {
            let path = self.oplog.next_checkpoint_path();
            let begun = async {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                engine.checkpoint(&path).await.map_err(|e| e.to_string())?;
                if self.spoof() {
                    super::spoof::zero_checkpoint(&path).map_err(|e| e.to_string())?;
                }
                self.oplog.begin(round, &path).map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = begun {
                // Training goes on, logged in the old segment (if any); the next step tries
                // again.
                tracing::warn!(error = %e, "could not start an operation log segment");
            }
        }
        engine.reset_grads().await.map_err(engine_err)?;
        self.oplog.record(&Op::Reset);
        Ok(())
    }

    /// Whether this node answers pipeline commands with garbage instead of running its engine
    /// (an adversary build's cheat, for the tests of checked work).
    fn garbage(&self) -> bool {
        cfg!(feature = "adversary") && self.config().adversary.garbage_activations()
    }

    /// Whether this node sends what zero weights would and logs a forgery to match (an
    /// adversary build's cheat, `pipeline/spoof.rs`).
    fn spoof(&self) -> bool {
        cfg!(feature = "adversary") && self.config().adversary.spoofs_stage_log()
    }

    /// The sender this stage logs for a tensor received from `from`: `from`, or an address of
    /// no node for the `made_up_sender` cheat (`pipeline/senders.rs` catches it).
    pub(super) fn logged_sender(
        &self,
        from: neuroshard_ledger::Address,
    ) -> neuroshard_ledger::Address {
        if cfg!(feature = "adversary") && self.config().adversary.names_made_up_sender() {
            neuroshard_ledger::Address([0x5e; 20])
        } else {
            from
        }
    }

    /// The digest this stage logs as received for micro-batch `mb` of `key`'s step in
    /// direction `dir`: that of `tensor`, or of the made-up input a spoofing cheat logged.
    pub(super) fn logged_digest(
        &self,
        dir: super::oplog::Dir,
        key: &StepKey,
        mb: u32,
        tensor: &Wire,
    ) -> neuroshard_ledger::keys::Hash32 {
        let spoofed = match dir {
            super::oplog::Dir::Forward => {
                self.spoofed_inputs.lock().remove(&engine_mb(key.step, mb))
            }
            super::oplog::Dir::Backward => None,
        };
        spoofed.unwrap_or_else(|| neuroshard_ledger::receipt::Receipt::tensor_digest(&tensor.data))
    }

    /// Longest a step of another driver waits for this stage: half the pipeline timeout, so
    /// its driver hears "busy" before its own deadline and tries another route.
    pub fn busy_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            u64::from(self.config().training.pipeline_timeout_secs) * 500,
        )
    }

    /// The stage lock for a command of `key`'s step after its forwards (backward, norm,
    /// apply): refused unless that step holds the stage.
    async fn holding(
        &self,
        key: &StepKey,
        what: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, InFlight>, PipeError> {
        let mut g = self.current.lock().await;
        if g.key != *key || g.done {
            return Err(PipeError::Refused(format!(
                "{what} for step {} of {}, but the stage is at step {} of {}",
                key.step, key.driver, g.key.step, g.key.driver
            )));
        }
        g.last = std::time::Instant::now();
        Ok(g)
    }

    /// Pipeline steps running here or waiting for this stage (0: idle), as peers see it.
    pub fn load(&self) -> u32 {
        let waiting = self.waiting.load(Ordering::Relaxed) as u32;
        let running = self.current.try_lock().map_or(1, |c| {
            let stale = std::time::Duration::from_secs(u64::from(
                self.config().training.pipeline_timeout_secs.max(1),
            ));
            u32::from(!c.done && c.last.elapsed() < stale)
        });
        running + waiting
    }

    /// Counts `tokens` trained through this node's layers in `secs` of engine time (a
    /// stage's forward, a full replica's TrainStep), weighed by the parameters a token passes
    /// through here, so that the rate is the node's, not its stage's.
    pub fn record_compute(&self, tokens: u64, secs: f64) {
        let per_token = match (self.assignment(), self.model()) {
            (Some(a), Ok(m)) => {
                neuroshard_coordination::pool::params_per_token(&m, &a.layers, a.total)
            }
            _ => 0,
        };
        self.compute
            .lock()
            .add(tokens.saturating_mul(per_token), secs);
    }

    /// This node's measured training compute: parameter-tokens per second of its engine's
    /// training work (0 until measured).
    pub fn compute_rate(&self) -> f64 {
        self.compute.lock().rate()
    }

    /// The driver's next batch (token ids, labels) from its engine's data loader.
    pub async fn next_batch(&self, key: &StepKey) -> Result<(Wire, Wire, u32), PipeError> {
        let engine = self.handle()?;
        let _g = self.enter(key, &engine).await?;
        let (ids, labels, shard) = engine.next_batch().await.map_err(engine_err)?;
        Ok((ids.into(), labels.into(), shard))
    }

    /// This stage's forward of one micro-batch: ids (driver) or activations in.
    pub async fn forward(
        &self,
        key: &StepKey,
        mb: u32,
        input: &Wire,
        labels: Option<&Wire>,
    ) -> Result<Out, PipeError> {
        let engine = self.handle()?;
        let _g = self.enter(key, &engine).await?;
        let t0 = std::time::Instant::now();
        let out = if self.garbage() || self.spoof() {
            // A cheat answers without its engine: remember the micro-batch's [B, T] for its
            // backward, and answer with activations of the stage's width.
            let m = self.model()?;
            let mut shape = input.shape.iter().take(2).copied().collect::<Vec<_>>();
            self.garbage_shapes
                .lock()
                .insert(engine_mb(key.step, mb), shape.clone());
            shape.push(u64::from(m.hidden));
            match labels {
                // What a stage of zero weights computes: ln(vocabulary) on uniform logits.
                Some(_) if self.spoof() => Out::Loss((m.vocab_size as f32).ln()),
                Some(_) => Out::Loss(2.0 + 6.0 * rand::random::<f32>()),
                None => Out::Acts(random_wire(shape)),
            }
        } else {
            let r = engine
                .forward(
                    input.view(),
                    labels.map(Wire::view),
                    engine_mb(key.step, mb),
                )
                .await
                .map_err(engine_err)?;
            match r {
                Forwarded::Loss(l) => Out::Loss(l),
                Forwarded::Output(t) => Out::Acts(t.into()),
            }
        };
        let tokens = input.shape.iter().take(2).product::<u64>();
        self.record_compute(tokens, t0.elapsed().as_secs_f64());
        let wire = self.config().training.pipeline_wire;
        // The spoofing cheat logs inputs made up to fit zero weights: a middle stage's equal
        // to what it sent, the last stage's zero.
        let logged = match (&out, self.spoof()) {
            (_, false) => input.clone(),
            (Out::Acts(a), true) => a.as_received(wire),
            (Out::Loss(_), true) => Wire {
                data: vec![0; input.data.len()],
                ..input.clone()
            },
        };
        if self.spoof() {
            self.spoofed_inputs.lock().insert(
                engine_mb(key.step, mb),
                neuroshard_ledger::receipt::Receipt::tensor_digest(&logged.data),
            );
        }
        self.oplog.record(&Op::Forward {
            at_ms: neuroshard_net::now_ms(),
            driver: key.driver.clone(),
            step: key.step,
            mb,
            input: logged,
            labels: labels.cloned(),
            sent: match &out {
                Out::Acts(a) => Sent::Acts(a.as_received(wire)),
                Out::Loss(l) => Sent::Loss(*l),
            },
        });
        Ok(out)
    }

    /// This stage's backward of one micro-batch; the gradient w.r.t. its input (none on the
    /// driver).
    pub async fn backward(
        &self,
        key: &StepKey,
        mb: u32,
        grad: Option<&Wire>,
    ) -> Result<Option<Wire>, PipeError> {
        let engine = self.handle()?;
        let _g = self.holding(key, "backward").await?;
        let t0 = std::time::Instant::now();
        let out = if self.garbage() {
            let shape = self.garbage_shapes.lock().remove(&engine_mb(key.step, mb));
            match (self.assignment(), shape) {
                (Some(a), Some(mut shape)) if !a.has_embedding() => {
                    shape.push(u64::from(self.model()?.hidden));
                    Some(random_wire(shape))
                }
                _ => None,
            }
        } else if self.spoof() {
            // Zero weights pass a middle stage's output gradient through unchanged and give
            // the last stage's input a zero one.
            let shape = self.garbage_shapes.lock().remove(&engine_mb(key.step, mb));
            match (self.assignment(), shape, grad) {
                (Some(a), _, _) if a.has_embedding() => None,
                (_, _, Some(g)) => Some(g.clone()),
                (_, Some(mut shape), None) => {
                    shape.push(u64::from(self.model()?.hidden));
                    let n = shape.iter().product::<u64>() as usize;
                    Some(Wire {
                        dtype: neuroshard_shared::shm::DType::F32,
                        shape,
                        data: vec![0; n * 4],
                    })
                }
                _ => None,
            }
        } else {
            engine
                .backward(grad.map(Wire::view), engine_mb(key.step, mb))
                .await
                .map_err(engine_err)?
                .map(Wire::from)
        };
        self.compute.lock().add(0, t0.elapsed().as_secs_f64());
        let wire = self.config().training.pipeline_wire;
        self.oplog.record(&Op::Backward {
            at_ms: neuroshard_net::now_ms(),
            driver: key.driver.clone(),
            step: key.step,
            mb,
            grad: grad.cloned(),
            sent: out.as_ref().map(|g| g.as_received(wire)),
        });
        Ok(out)
    }

    /// Squared norm of this stage's gradients for `step`.
    pub async fn sq_norm(&self, key: &StepKey) -> Result<f64, PipeError> {
        let engine = self.handle()?;
        let _g = self.holding(key, "norm").await?;
        if self.garbage() {
            // A plausible norm: the engine ran no backward and would refuse.
            return Ok(1e-4 * f64::from(rand::random::<f32>()));
        }
        if self.spoof() {
            // Zero weights have zero gradients.
            return Ok(0.0);
        }
        engine.grad_sq_norm().await.map_err(engine_err)
    }

    /// Steps this stage's optimizer clipped by `global_norm`; checkpoints on schedule.
    pub async fn apply(&self, key: &StepKey, global_norm: f32) -> Result<u64, PipeError> {
        let engine = self.handle()?;
        let mut g = self.holding(key, "apply").await?;
        if !global_norm.is_finite() || global_norm < 0.0 {
            return Err(PipeError::Refused(format!(
                "global norm {global_norm} is not a norm"
            )));
        }
        // The garbage cheat has no gradients to step on (its engine ran no backward).
        let garbage = self.garbage() || self.spoof();
        let new_step = if garbage {
            self.stats.lock().step + 1
        } else {
            engine
                .optimizer_step(global_norm)
                .await
                .map_err(engine_err)?
        };
        self.oplog.record(&Op::Apply { global_norm });
        let cfg = self.config();
        if !garbage && new_step % u64::from(cfg.training.checkpoint_every.max(1)) == 0 {
            let path = crate::engine::checkpoint_path(&self.data_dir);
            match engine.checkpoint(&path).await {
                Ok(s) => {
                    self.stats.lock().last_checkpoint_step = Some(s);
                    crate::storage::prune_and_log(&self.data_dir, cfg.resources.max_storage_mb);
                }
                Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
            }
        }
        // Applied: the stage is free for the next step of any pipeline.
        g.done = true;
        drop(g);
        self.freed.notify_waiters();
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
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, InFlight> {
        let g = self.current.lock().await;
        // The engine may be reloaded meanwhile: the log's segment ends here.
        self.oplog.touched();
        g
    }

    /// Holds the stage lock once no pipeline step is between its first forward and its apply
    /// (or the step holding the stage went stale, or `wait` passed): weights replaced now
    /// (a DiLoCo outer step) lose no applied step and mix no step's gradients.
    pub async fn quiesced(
        &self,
        wait: std::time::Duration,
    ) -> tokio::sync::MutexGuard<'_, InFlight> {
        let stale = std::time::Duration::from_secs(u64::from(
            self.config().training.pipeline_timeout_secs.max(1),
        ));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            let g = self.current.lock().await;
            if g.done || g.last.elapsed() >= stale || tokio::time::Instant::now() >= deadline {
                // Weights are replaced meanwhile: the log's segment ends here.
                self.oplog.touched();
                return g;
            }
            drop(g);
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(500)),
                freed,
            )
            .await;
        }
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

/// An f32 tensor of `shape` with values uniform in [-1, 1) (the garbage cheat's answer).
fn random_wire(shape: Vec<u64>) -> Wire {
    let n = shape.iter().product::<u64>() as usize;
    Wire {
        dtype: neuroshard_shared::shm::DType::F32,
        shape,
        data: (0..n)
            .flat_map(|_| (rand::random::<f32>() * 2.0 - 1.0).to_le_bytes())
            .collect(),
    }
}

/// Numbers the snapshot files a node writes for its peers.
static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);

/// Tokens and engine seconds of a stage's training commands, as an exponential moving sum
/// (each new sample weighs in; old ones fade with factor 0.98 per command), so the rate
/// follows a change of layers or load within some tens of steps.
#[derive(Debug, Default)]
pub struct Meter {
    tokens: f64,
    secs: f64,
}

impl Meter {
    pub fn add(&mut self, tokens: u64, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        self.tokens = self.tokens * 0.98 + tokens as f64;
        self.secs = self.secs * 0.98 + secs;
    }

    /// Tokens per second (0 before any measurement).
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 && self.tokens > 0.0 {
            self.tokens / self.secs
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Meter;

    #[test]
    fn the_meter_counts_forward_tokens_over_forward_and_backward_time() {
        let mut m = Meter::default();
        assert_eq!(m.rate(), 0.0);
        m.add(100, 0.5);
        m.add(0, 0.5);
        assert!((m.rate() - 98.0 / (0.5 * 0.98 + 0.5)).abs() < 1e-9);
        m.add(5, f64::NAN);
        assert!(m.rate().is_finite());
    }
}
