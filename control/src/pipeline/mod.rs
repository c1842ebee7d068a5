//! Pipeline training across nodes that each hold some layers (dynamic layer pool).
//!
//! Schedule: GPipe. The driver splits its batch into `training.micro_batches` equal parts and
//! starts every micro-batch's forward at once; each stage runs one engine command at a time
//! (the stage lock), so while the worker runs micro-batch 0 the driver already runs micro-batch
//! 1: the stages work at the same time. When every loss is back, every backward starts at once
//! the same way. Then the optimizer: phase `norm` sums the stages' squared gradient norms,
//! phase `apply` steps every stage's AdamW clipped by that global norm — the same update as one
//! node holding every layer.
//!
//! Calls are chained: a stage runs its part, then calls the next stage of `route` and answers
//! when the rest of the pipeline has answered (forward → the loss comes back; backward → the
//! gradient w.r.t. the receiver's input comes back). Every hop has a deadline
//! (`training.pipeline_timeout_secs`), so a dead or stalled stage fails the step; the driver
//! counts it, logs it and retries with a fresh route; every stage drops what a failed step
//! left the next time it sees a new step id.
//!
//! Tensors between stages are checked (dtype, shape against the model, byte length, finite
//! values, label range) before they reach the engine; a malformed one is refused with
//! INVALID_ARGUMENT and counted in `refused`; so is a call from a peer that is not the stage
//! before this one, or with a step id far ahead of this node's clock.

pub mod assign;
pub mod infer;
pub mod service;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use neuroshard_proto::peer as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::{DType, Tensor};
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::{EngineError, EngineHandle, EngineStatus, Forwarded, TensorIn};
use crate::network::Network;
use crate::network::client::PeerConn;
use crate::trainer::TrainingStats;
pub use assign::Assignment;

/// How far ahead of the local clock a step id may be (clock skew between stages).
const MAX_STEP_AHEAD_MS: u64 = 60_000;
/// Largest batch rows / sequence accepted from a peer.
const MAX_ROWS: u64 = 4096;

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
fn engine_err(e: EngineError) -> PipeError {
    PipeError::Engine(e.message())
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
    engine: watch::Receiver<EngineStatus>,
    config: Arc<RwLock<Config>>,
    stats: Arc<Mutex<TrainingStats>>,
    data_dir: PathBuf,
    assignment: RwLock<Option<Assignment>>,
    /// The step id being worked on; the lock serializes engine commands and slot use.
    current: tokio::sync::Mutex<u64>,
    pub counters: Arc<Counters>,
    /// Distributed inference on this stage (`infer.rs`).
    infer: infer::InferState,
    /// The batch of a driver step that failed: the next step trains on it, so a failure
    /// never skips data (and the steps stay those of one node reading the same data).
    retry_batch: std::sync::Mutex<Option<Batch>>,
}

/// A driver's batch: token ids, labels, and the shard they came from.
type Batch = (Wire, Wire, u32);

/// Puts a driver step's batch back for the next step unless the step finished.
struct Requeue<'a> {
    slot: &'a std::sync::Mutex<Option<Batch>>,
    batch: Option<Batch>,
}

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        if let (Some(b), Ok(mut slot)) = (self.batch.take(), self.slot.lock()) {
            *slot = Some(b);
        }
    }
}

impl From<Tensor> for Wire {
    fn from(t: Tensor) -> Wire {
        Wire {
            dtype: t.dtype,
            shape: t.shape,
            data: t.bytes,
        }
    }
}

/// A tensor as it travels between stages (little-endian bytes, like the shm payload).
#[derive(Debug, Clone)]
pub struct Wire {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl Wire {
    /// The tensor as the engine handle takes it.
    pub fn view(&self) -> TensorIn<'_> {
        TensorIn {
            dtype: self.dtype,
            shape: &self.shape,
            bytes: &self.data,
        }
    }

    pub fn to_pb(&self) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: match self.dtype {
                DType::U32 => "u32",
                _ => "f32",
            }
            .into(),
            shape: self.shape.clone(),
            data: self.data.clone(),
        }
    }
}

/// Checks an activation or gradient tensor from a peer: f32, [B, T, hidden], the byte length
/// of that shape, every value finite; `expect_bt` pins B and T when known.
pub fn check_acts(
    t: Option<&pb::PipelineTensor>,
    what: &str,
    m: &ModelConfig,
    expect_bt: Option<(u64, u64)>,
) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused(format!("{what} missing")))?;
    if t.dtype != "f32" {
        return Err(PipeError::Refused(format!(
            "{what} must be f32, got {:?}",
            t.dtype
        )));
    }
    let ok_shape = t.shape.len() == 3
        && (1..=MAX_ROWS).contains(&t.shape[0])
        && (1..=u64::from(m.max_seq)).contains(&t.shape[1])
        && t.shape[2] == u64::from(m.hidden);
    if !ok_shape {
        return Err(PipeError::Refused(format!(
            "{what} has shape {:?}, expected [B, T<={}, {}]",
            t.shape, m.max_seq, m.hidden
        )));
    }
    if let Some((b, tl)) = expect_bt
        && (t.shape[0], t.shape[1]) != (b, tl)
    {
        return Err(PipeError::Refused(format!(
            "{what} has shape {:?}, expected [{b}, {tl}, {}]",
            t.shape, m.hidden
        )));
    }
    let numel = t.shape.iter().product::<u64>();
    if t.data.len() as u64 != numel * 4 {
        return Err(PipeError::Refused(format!(
            "{what} carries {} bytes, its shape needs {}",
            t.data.len(),
            numel * 4
        )));
    }
    if t.data
        .chunks_exact(4)
        .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
    {
        return Err(PipeError::Refused(format!("{what} has NaN or Inf values")));
    }
    Ok(Wire {
        dtype: DType::F32,
        shape: t.shape.clone(),
        data: t.data.clone(),
    })
}

/// Checks labels from a peer: u32 [B, T], every id below the vocabulary size.
pub fn check_labels(
    t: Option<&pb::PipelineTensor>,
    m: &ModelConfig,
    b: u64,
    tl: u64,
) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused("labels missing".into()))?;
    if t.dtype != "u32" || t.shape != [b, tl] || t.data.len() as u64 != b * tl * 4 {
        return Err(PipeError::Refused(format!(
            "labels must be u32 [{b}, {tl}] ({} bytes), got {:?} {:?} ({} bytes)",
            b * tl * 4,
            t.dtype,
            t.shape,
            t.data.len()
        )));
    }
    u32_below_vocab(t, m, "a label")
}

/// `t` (u32, shape and length already checked) as a [`Wire`] when every value is below the
/// vocabulary size; `what` names one value in the refusal.
pub(crate) fn u32_below_vocab(
    t: &pb::PipelineTensor,
    m: &ModelConfig,
    what: &str,
) -> Result<Wire, PipeError> {
    if t.data
        .chunks_exact(4)
        .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >= m.vocab_size)
    {
        return Err(PipeError::Refused(format!(
            "{what} is not below the vocabulary size {}",
            m.vocab_size
        )));
    }
    Ok(Wire {
        dtype: DType::U32,
        shape: t.shape.clone(),
        data: t.data.clone(),
    })
}

/// The engine's micro-batch key for micro-batch `mb` of step `step`.
fn engine_mb(step: u64, mb: u32) -> u64 {
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
        config: Arc<RwLock<Config>>,
        stats: Arc<Mutex<TrainingStats>>,
        data_dir: PathBuf,
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
            retry_batch: std::sync::Mutex::new(None),
        }
    }

    pub fn config(&self) -> Config {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn model(&self) -> Result<ModelConfig, PipeError> {
        ModelConfig::preset(&self.config().training.model)
            .map_err(|e| PipeError::NotReady(e.to_string()))
    }

    pub fn assignment(&self) -> Option<Assignment> {
        self.assignment.read().ok().and_then(|a| a.clone())
    }

    pub fn set_assignment(&self, a: Assignment) {
        if let Ok(mut g) = self.assignment.write() {
            *g = Some(a);
        }
    }

    /// The assignment, when the model is loaded with it.
    pub fn ready(&self) -> Result<Assignment, PipeError> {
        let loaded = self.stats.lock().map(|s| s.model_loaded).unwrap_or(false);
        match self.assignment() {
            Some(a) if loaded => Ok(a),
            _ => Err(PipeError::NotReady(
                "no layers loaded yet; retry later".into(),
            )),
        }
    }

    fn handle(&self) -> Result<EngineHandle, PipeError> {
        self.engine
            .borrow()
            .handle
            .clone()
            .ok_or_else(|| PipeError::NotReady("engine not running".into()))
    }

    /// Takes the stage lock for `step`: a newer step drops what an older one left (saved
    /// activations, accumulated gradients); an older step is refused.
    async fn enter(
        &self,
        step: u64,
        engine: &EngineHandle,
    ) -> Result<tokio::sync::MutexGuard<'_, u64>, PipeError> {
        // Step ids are the driver's clock in milliseconds: one far ahead of ours would make
        // every real step look old until then.
        let ahead = step.saturating_sub(crate::network::now_ms().max(0) as u64);
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
                    if let Ok(mut st) = self.stats.lock() {
                        st.last_checkpoint_step = Some(s);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
            }
        }
        drop(g);
        if let Ok(mut s) = self.stats.lock() {
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

/// A stage after this one: its connection and the layers it runs.
#[derive(Clone)]
pub struct Hop {
    pub conn: PeerConn,
    pub layers: std::ops::Range<u32>,
}

/// The connected peers whose advertised layers are one contiguous range inside the model
/// (`..total`), lowest measured latency first, then id: the candidate stages of a route.
pub(crate) fn candidate_hops(net: &Network, total: u32) -> Vec<Hop> {
    let rtts: Vec<(String, f64)> = net
        .state
        .peers
        .read()
        .map(|ps| ps.iter().map(|p| (p.id.clone(), p.latency_ms)).collect())
        .unwrap_or_default();
    let mut hops: Vec<(Hop, f64)> = net
        .peers
        .conns_with_info()
        .into_iter()
        .filter_map(|(c, info)| {
            let first = *info.layers.iter().min()?;
            let last = *info.layers.iter().max()?;
            let contiguous = info.layers.len() as u32 == last - first + 1;
            let id = c.id.to_string();
            let rtt = rtts
                .iter()
                .find(|(p, _)| *p == id)
                .map_or(f64::MAX, |(_, r)| *r);
            (contiguous && last < total).then(|| {
                (
                    Hop {
                        conn: c,
                        layers: first..last + 1,
                    },
                    rtt,
                )
            })
        })
        .collect();
    hops.sort_by(|a, b| {
        a.1.partial_cmp(&b.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.conn.id.to_string().cmp(&b.0.conn.id.to_string()))
    });
    hops.into_iter().map(|(h, _)| h).collect()
}

/// The best chain of `stages` (layer ranges, in order of preference) that covers
/// `from..total`, each stage starting where the previous one ends: the fewest stages that
/// cost a peer call (`remote`), then the fewest stages, then the earliest candidates. Indexes
/// into `stages`; None when they do not cover the range.
///
/// A greedy walk (take the first candidate that starts at the next layer) is not enough: when
/// a stage that stalled past the drop time comes back after a neighbour took its layers over,
/// the stale holder of layer `i` alone may be preferred while only the neighbour (`i..j`)
/// reaches the head.
pub(crate) fn shortest_route(
    stages: &[std::ops::Range<u32>],
    remote: impl Fn(usize) -> bool,
    from: u32,
    total: u32,
) -> Option<Vec<usize>> {
    if from >= total {
        return Some(Vec::new());
    }
    let span = (total - from) as usize;
    // best[p]: cost (peer stages, stages) of the best chain ending at layer from + p, the stage
    // that ends it and where that stage starts. Every stage goes forward, so positions in
    // increasing order are final when reached.
    type Reached = ((u32, u32), usize, u32);
    let mut best: Vec<Option<Reached>> = vec![None; span + 1];
    best[0] = Some(((0, 0), usize::MAX, from));
    for pos in from..total {
        let Some((cost, _, _)) = best[(pos - from) as usize] else {
            continue;
        };
        for (i, r) in stages.iter().enumerate() {
            if r.start != pos || r.end <= pos || r.end > total {
                continue;
            }
            let c = (cost.0 + u32::from(remote(i)), cost.1 + 1);
            let slot = &mut best[(r.end - from) as usize];
            if slot.is_none_or(|(old, _, _)| c < old) {
                *slot = Some((c, i, pos));
            }
        }
    }
    let mut route = Vec::new();
    let mut at = total;
    while at > from {
        let (_, i, start) = best[(at - from) as usize]?;
        route.push(i);
        at = start;
    }
    route.reverse();
    Some(route)
}

/// The stages after `from` to the end of the model over the connected peers (see
/// [`shortest_route`]); the last one holds the head.
pub fn plan_route(net: &Network, from: u32, total: u32) -> Result<Vec<Hop>, PipeError> {
    let hops = candidate_hops(net, total);
    let ranges: Vec<_> = hops.iter().map(|h| h.layers.clone()).collect();
    let route = shortest_route(&ranges, |_| true, from, total).ok_or_else(|| {
        PipeError::NoRoute(format!(
            "the connected peers do not cover layers {from}..{total}"
        ))
    })?;
    Ok(route.into_iter().map(|i| hops[i].clone()).collect())
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

pub fn peer_err(stage: &Hop, e: crate::network::error::NetworkError) -> PipeError {
    PipeError::Peer {
        stage: stage.conn.id.to_string(),
        message: e.to_string(),
    }
}

/// The outcome of one driver step.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub loss: f32,
    pub optimizer_step: u64,
    pub tokens: u64,
    pub shard: u32,
    pub micro_batches: u32,
    pub stages: usize,
}

/// Largest divisor of `rows` not above `want` (at least 1).
pub fn micro_batches(rows: u64, want: u32) -> u32 {
    (1..=want.max(1))
        .rev()
        .find(|m| rows.is_multiple_of(u64::from(*m)))
        .unwrap_or(1)
}

/// Rows `[lo, hi)` of a [B, ...] tensor.
fn rows(w: &Wire, lo: u64, hi: u64) -> Wire {
    let row_bytes = (w.data.len() as u64 / w.shape[0].max(1)) as usize;
    let mut shape = w.shape.clone();
    shape[0] = hi - lo;
    Wire {
        dtype: w.dtype,
        shape,
        data: w.data[lo as usize * row_bytes..hi as usize * row_bytes].to_vec(),
    }
}

/// A fresh step id: later than any earlier one, also across restarts (milliseconds).
pub fn new_step_id(last: u64) -> u64 {
    (crate::network::now_ms().max(0) as u64).max(last + 1)
}

impl Stage {
    /// One pipeline step from the driver: batch, GPipe forwards and backwards, global-norm
    /// clipped optimizer step on every stage.
    pub async fn drive(&self, net: &Network, step: u64) -> Result<StepReport, PipeError> {
        let a = self.ready()?;
        if !a.has_embedding() || a.has_head() {
            return Err(PipeError::NotReady(format!(
                "role {} does not drive",
                a.role()
            )));
        }
        let cfg = self.config();
        let secs = cfg.training.pipeline_timeout_secs;
        let route = plan_route(net, a.layers.end, a.total)?;
        let first = route
            .first()
            .cloned()
            .ok_or_else(|| PipeError::NoRoute("no stage after the driver".into()))?;
        let rest: Vec<String> = route[1..].iter().map(|h| h.conn.id.to_string()).collect();
        let pending = self.retry_batch.lock().ok().and_then(|mut b| b.take());
        let (ids, labels, shard) = match pending {
            Some(batch) => batch,
            None => self.next_batch(step).await?,
        };
        let mut requeue = Requeue {
            slot: &self.retry_batch,
            batch: Some((ids.clone(), labels.clone(), shard)),
        };
        let (b, t) = (ids.shape[0], ids.shape[1]);
        let m = micro_batches(b, cfg.training.micro_batches);
        let per = b / u64::from(m);

        // Forwards of every micro-batch at once (GPipe).
        let forwards = (0..m).map(|i| {
            let (first, rest) = (first.clone(), rest.clone());
            let ids = rows(&ids, u64::from(i) * per, u64::from(i + 1) * per);
            let labels = rows(&labels, u64::from(i) * per, u64::from(i + 1) * per);
            async move {
                let acts = match self.forward(step, i, &ids, None).await? {
                    Out::Acts(w) => w,
                    Out::Loss(_) => return Err(PipeError::Engine("driver computed a loss".into())),
                };
                let req = pb::PipelineForwardRequest {
                    auth: None,
                    step,
                    micro_batch: i,
                    activations: Some(acts.to_pb()),
                    labels: Some(labels.to_pb()),
                    layer_start: first.layers.start,
                    route: rest,
                };
                self.counters.tensor_bytes.fetch_add(
                    (acts.data.len() + labels.data.len()) as u64,
                    Ordering::Relaxed,
                );
                let stage = first.conn.id.to_string();
                let r = within(secs, &stage, async {
                    first
                        .conn
                        .pipeline_forward(req, Duration::from_secs(u64::from(secs)))
                        .await
                        .map_err(|e| peer_err(&first, e))
                })
                .await?;
                if !r.loss.is_finite() {
                    return Err(PipeError::Peer {
                        stage,
                        message: format!("loss {}", r.loss),
                    });
                }
                Ok(r.loss)
            }
        });
        let losses = futures_util::future::try_join_all(forwards).await?;

        // Backwards of every micro-batch at once.
        let model = self.model()?;
        let backwards = (0..m).map(|i| {
            let (first, rest) = (first.clone(), rest.clone());
            let model = model.clone();
            async move {
                let req = pb::PipelineBackwardRequest {
                    auth: None,
                    step,
                    micro_batch: i,
                    route: rest,
                };
                let stage = first.conn.id.to_string();
                let r = within(secs, &stage, async {
                    first
                        .conn
                        .pipeline_backward(req, Duration::from_secs(u64::from(secs)))
                        .await
                        .map_err(|e| peer_err(&first, e))
                })
                .await?;
                let grad = check_acts(r.grad_input.as_ref(), "grad_input", &model, Some((per, t)))
                    .inspect_err(|_| {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    })?;
                self.counters
                    .tensor_bytes
                    .fetch_add(grad.data.len() as u64, Ordering::Relaxed);
                self.backward(step, i, Some(&grad)).await?;
                Ok::<(), PipeError>(())
            }
        });
        futures_util::future::try_join_all(backwards).await?;

        // Optimizer: the global gradient norm over every stage, then every stage steps.
        let stage = first.conn.id.to_string();
        let local = self.sq_norm(step).await?;
        let remote = within(secs, &stage, async {
            first
                .conn
                .pipeline_step(
                    pb::PipelineStepRequest {
                        auth: None,
                        step,
                        phase: "norm".into(),
                        global_norm: 0.0,
                        route: rest.clone(),
                    },
                    Duration::from_secs(u64::from(secs)),
                )
                .await
                .map_err(|e| peer_err(&first, e))
        })
        .await?
        .sq_norm;
        if !(remote.is_finite() && remote >= 0.0) {
            return Err(PipeError::Peer {
                stage,
                message: format!("squared norm {remote}"),
            });
        }
        let global = (local + remote).sqrt() as f32;
        let remote_apply = within(secs, &stage, async {
            first
                .conn
                .pipeline_step(
                    pb::PipelineStepRequest {
                        auth: None,
                        step,
                        phase: "apply".into(),
                        global_norm: global,
                        route: rest.clone(),
                    },
                    Duration::from_secs(u64::from(secs)),
                )
                .await
                .map_err(|e| peer_err(&first, e))
        });
        // From here a stage may have stepped on the batch: it is not trained on again.
        requeue.batch = None;
        let (local_step, _) = tokio::try_join!(self.apply(step, global), remote_apply)?;
        let loss = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
        Ok(StepReport {
            loss,
            optimizer_step: local_step,
            tokens: b * t,
            shard,
            micro_batches: m,
            stages: route.len() + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    fn acts(shape: Vec<u64>, data: Vec<u8>) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: "f32".into(),
            shape,
            data,
        }
    }

    #[test]
    fn routes_take_the_fewest_stages_that_reach_the_head() {
        let all = |_: usize| true;
        // A stale holder of layer 2 alone, listed first, and a neighbour holding 2..4: only the
        // neighbour reaches the head (a greedy walk took the first and found no stage at 3).
        assert_eq!(shortest_route(&[2..3, 2..4], all, 2, 4), Some(vec![1]));
        // With a holder of layer 3 too, one stage still beats two.
        assert_eq!(
            shortest_route(&[2..3, 3..4, 2..4], all, 2, 4),
            Some(vec![2])
        );
        assert_eq!(shortest_route(&[3..4, 2..3], all, 2, 4), Some(vec![1, 0]));
        // Ties go to the earlier candidate (lower latency).
        assert_eq!(shortest_route(&[2..4, 2..4], all, 2, 4), Some(vec![0]));
        assert_eq!(shortest_route(&[0..2, 2..3], all, 0, 4), None);
        assert_eq!(shortest_route(&[2..3, 4..5], all, 2, 5), None);
        // Empty ranges and ranges past the model never count.
        assert_eq!(
            shortest_route(&[2..2, 2..5, 2..4], all, 2, 4),
            Some(vec![2])
        );
        assert_eq!(shortest_route(&[], all, 4, 4), Some(vec![]));
        // Local stages cost no peer call: the node's own layers plus one peer beat two peers.
        let remote = |i: usize| i != 0;
        assert_eq!(
            shortest_route(&[0..2, 0..1, 1..4, 2..4], remote, 0, 4),
            Some(vec![0, 3])
        );
        // A single peer holding everything still beats own layers plus a peer.
        assert_eq!(
            shortest_route(&[0..2, 2..4, 0..4], remote, 0, 4),
            Some(vec![2])
        );
    }

    #[test]
    fn malformed_peer_tensors_are_refused() {
        let m = model();
        let h = u64::from(m.hidden);
        let good = acts(vec![2, 3, h], vec![0; (2 * 3 * h * 4) as usize]);
        assert!(check_acts(Some(&good), "x", &m, None).is_ok());
        assert!(check_acts(Some(&good), "x", &m, Some((2, 3))).is_ok());
        assert!(check_acts(Some(&good), "x", &m, Some((1, 3))).is_err());
        assert!(check_acts(None, "x", &m, None).is_err());
        let short = acts(vec![2, 3, h], vec![0; 7]);
        assert!(check_acts(Some(&short), "x", &m, None).is_err());
        let wide = acts(vec![2, 3, h + 1], vec![0; (2 * 3 * (h + 1) * 4) as usize]);
        assert!(check_acts(Some(&wide), "x", &m, None).is_err());
        let long = acts(
            vec![1, u64::from(m.max_seq) + 1, h],
            vec![0; ((u64::from(m.max_seq) + 1) * h * 4) as usize],
        );
        assert!(check_acts(Some(&long), "x", &m, None).is_err());
        let mut nan = good.clone();
        nan.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(check_acts(Some(&nan), "x", &m, None).is_err());
        let mut u32s = good.clone();
        u32s.dtype = "u32".into();
        assert!(check_acts(Some(&u32s), "x", &m, None).is_err());
        let huge = acts(vec![u64::MAX, u64::MAX, h], vec![]);
        assert!(check_acts(Some(&huge), "x", &m, None).is_err());
    }

    #[test]
    fn labels_are_checked_against_shape_and_vocabulary() {
        let m = model();
        let ok = pb::PipelineTensor {
            dtype: "u32".into(),
            shape: vec![1, 2],
            data: [5u32, 6].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        assert!(check_labels(Some(&ok), &m, 1, 2).is_ok());
        assert!(check_labels(Some(&ok), &m, 2, 1).is_err());
        let mut big = ok.clone();
        big.data[0..4].copy_from_slice(&m.vocab_size.to_le_bytes());
        assert!(check_labels(Some(&big), &m, 1, 2).is_err());
    }

    #[test]
    fn micro_batches_divide_the_batch() {
        assert_eq!(micro_batches(8, 4), 4);
        assert_eq!(micro_batches(6, 4), 3);
        assert_eq!(micro_batches(7, 4), 1);
        assert_eq!(micro_batches(2, 0), 1);
    }
}
