//! Drives local training on the engine: brings the model up after every engine (re)start —
//! restoring the latest checkpoint when there is one — runs training steps while training is
//! enabled, and checkpoints every `training.checkpoint_every` steps and at shutdown.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::engine::{
    Engine, EngineError, EngineHandle, EngineState, LoadSpec, Loaded, TrainSettings,
    checkpoint_path,
};

/// Longest a node with too little room for the whole model waits for its seed peers before
/// choosing its layers.
const ASSIGN_WAIT: Duration = Duration::from_secs(10);

/// How often a pipeline stage looks for layers nobody holds (a gap must be seen on two checks
/// in a row before a node takes it over).
const TAKEOVER_CHECK: Duration = Duration::from_secs(1);

/// A replica left off the training route (its step unchanged this long) refreshes its layers
/// from a holder that has trained them at least `RESYNC_LAG` steps further. The wait doubles
/// after each refresh up to `RESYNC_MAX_IDLE` (a standby replica of a large stage should not
/// pull it every few seconds), and is back to `RESYNC_IDLE` once the node trains again.
const RESYNC_IDLE: Duration = Duration::from_secs(10);
const RESYNC_MAX_IDLE: Duration = Duration::from_secs(300);
const RESYNC_LAG: u64 = 10;

/// Longest a stage snapshot transfer from a peer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Steps done since this daemon started.
    pub steps_this_run: u64,
    /// The layers this node holds (dynamic layer pool), once decided.
    pub assignment: Option<crate::pipeline::Assignment>,
    /// Data shards this node has trained on.
    pub shards: std::collections::BTreeSet<u32>,
    /// When the latest step finished.
    pub last_step_at: Option<Instant>,
    /// Steps per minute over the last hour (for steps per hour).
    pub rate: crate::metrics::StepRate,
}

/// The transformer layers this node holds: all of the configured model (role `full`).
pub fn held_layers(cfg: &Config) -> std::ops::Range<u32> {
    let n = neuroshard_shared::model::ModelConfig::preset(&cfg.training.model)
        .map(|m| m.layers)
        .unwrap_or(0);
    0..n
}

/// The layers held now: the live assignment once decided, else every layer.
pub fn live_layers(cfg: &Config, stats: &TrainingStats) -> std::ops::Range<u32> {
    match &stats.assignment {
        Some(a) => a.layers.clone(),
        None => held_layers(cfg),
    }
}

/// What LoadModel builds for the layers of `a` of the configured model.
pub fn load_spec(
    cfg: &Config,
    node_id: &str,
    checkpoint: Option<&Path>,
    a: &crate::pipeline::Assignment,
) -> LoadSpec {
    LoadSpec {
        preset: cfg.training.model.clone(),
        layers: a.layers.clone(),
        has_embedding: a.has_embedding(),
        has_head: a.has_head(),
        seed: cfg.training.seed,
        checkpoint: checkpoint.map(Path::to_path_buf),
        train: train_settings(cfg),
        node_id: node_id.to_string(),
        sources: Vec::new(),
    }
}

/// The settings a loaded model trains with (all applied live by a reload).
fn train_settings(cfg: &Config) -> TrainSettings {
    let t = &cfg.training;
    TrainSettings {
        learning_rate: t.learning_rate as f32,
        weight_decay: t.weight_decay as f32,
        clip_norm: t.clip_norm as f32,
        batch_size: t.batch_size,
        seq_len: t.seq_len,
        data_path: t.data_path.clone(),
    }
}

pub struct Trainer {
    pub engine: Engine,
    pub config: Arc<RwLock<Config>>,
    pub stats: Arc<Mutex<TrainingStats>>,
    pub data_dir: PathBuf,
    pub node_id: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The peer network; DiLoCo rounds run with the replicas connected there.
    pub net: Option<Arc<crate::network::Network>>,
    /// This node's pipeline stage (layers fewer than the model: pipeline training).
    pub stage: Option<Arc<crate::pipeline::Stage>>,
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
        let Some(mut assignment) = self.assign(&mut stop).await else {
            return;
        };
        let pipelined = !assignment.is_full();
        let mut last_step_id = 0u64;
        // Takeover: when the coverage was last checked, and the gap seen then.
        let mut last_check = Instant::now();
        let mut seen_gap: Option<std::ops::Range<u32>> = None;
        // Resync: this stage's step when last seen to change, since when, and the wait.
        let mut unchanged: (u64, Instant) = (0, Instant::now());
        let mut resync_wait = RESYNC_IDLE;
        loop {
            // Wait for a live engine.
            let (generation, client) = loop {
                if *stop.borrow() {
                    return;
                }
                {
                    let s = engine.borrow();
                    if let (EngineState::Ok, Some(c)) = (s.state, s.handle.clone()) {
                        break (s.generation, c);
                    }
                }
                tokio::select! {
                    _ = engine.changed() => {}
                    _ = stop.changed() => {}
                }
            };
            self.update(|s| s.model_loaded = false);
            let mut applied = train_settings(&self.config());
            if let Err(e) = self.bring_up(&client, &assignment).await {
                tracing::warn!(error = %e, "could not load the model; retrying");
                self.update(|s| s.last_error = Some(e));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            if !pipelined {
                self.diloco_init(&client).await;
            }
            // Losses of the current DiLoCo round's inner steps.
            let mut round_losses: Vec<f32> = Vec::new();
            // Train until the engine restarts or we are told to stop.
            loop {
                if *stop.borrow() {
                    self.checkpoint(&client).await;
                    return;
                }
                if engine.borrow().generation != generation
                    || engine.borrow().state != EngineState::Ok
                {
                    break;
                }
                let cfg = self.config();
                // Training settings changed (PATCH /config): checkpoint, then reload from that
                // checkpoint with the new settings, so nothing learned is lost.
                if train_settings(&cfg) != applied {
                    tracing::info!("training settings changed; reloading the model with them");
                    self.checkpoint(&client).await;
                    applied = train_settings(&cfg);
                    if let Err(e) = self.bring_up(&client, &assignment).await {
                        tracing::warn!(error = %e, "could not reload with the new settings");
                        self.update(|s| s.last_error = Some(e));
                        break;
                    }
                    continue;
                }
                // Dynamic layer pool: layers nobody holds any more are taken over.
                if pipelined && last_check.elapsed() >= TAKEOVER_CHECK {
                    last_check = Instant::now();
                    let step = self.stats.lock().map(|s| s.step).unwrap_or(0);
                    if let Some(net) = &self.net {
                        net.set_train_step(step);
                    }
                    if step != unchanged.0 {
                        unchanged = (step, Instant::now());
                        resync_wait = RESYNC_IDLE;
                    }
                    if let Some(a) = self.rebalance(&client, &assignment, &mut seen_gap).await {
                        assignment = a;
                    } else if unchanged.1.elapsed() >= resync_wait
                        && self.resync(&client, &assignment, step).await
                    {
                        let step = self.stats.lock().map(|s| s.step).unwrap_or(0);
                        unchanged = (step, Instant::now());
                        resync_wait = (resync_wait * 2).min(RESYNC_MAX_IDLE);
                    }
                }
                let done = cfg.training.max_steps > 0
                    && self.stats.lock().map(|s| s.step).unwrap_or(0) >= cfg.training.max_steps;
                // Only the driver starts pipeline steps; the other stages serve them.
                let idle = pipelined && assignment.role() != "driver";
                if !cfg.training.enabled || done || idle {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                        _ = engine.changed() => {}
                    }
                    continue;
                }
                if pipelined {
                    last_step_id = crate::pipeline::new_step_id(last_step_id);
                    self.pipeline_step(last_step_id, &mut stop).await;
                    continue;
                }
                match client.train_step().await {
                    Ok(r) => {
                        self.update(|s| {
                            s.step = r.step;
                            s.loss = Some(r.loss);
                            s.tokens += r.tokens;
                            s.steps_this_run += 1;
                            s.rate.record(Instant::now());
                            s.last_step_at = Some(Instant::now());
                            s.shards.insert(r.shard);
                            s.history.push_back((r.step, r.loss));
                            while s.history.len() > HISTORY {
                                s.history.pop_front();
                            }
                            s.last_error = None;
                        });
                        if r.step % cfg.training.checkpoint_every as u64 == 0 {
                            self.checkpoint(&client).await;
                        }
                        round_losses.push(r.loss);
                        self.diloco_round(&client, &cfg, &mut round_losses, &mut stop)
                            .await;
                    }
                    Err(e) => {
                        self.update(|s| s.last_error = Some(e.message()));
                        tracing::warn!(error = %e, "training step failed");
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

    /// Reads the loaded model into the DiLoCo round state (first start) and catches up with
    /// the replicas if they agree on other weights.
    async fn diloco_init(&self, client: &EngineHandle) {
        let Some(net) = &self.net else { return };
        let dir = self.data_dir.join("diloco");
        if let Ok(mut m) = net.diloco.max_norm.lock() {
            *m = crate::diloco::round::Settings::from_config(&self.config()).max_norm;
        }
        if let Err(e) = crate::diloco::sync::init(&net.diloco, client, &dir).await {
            tracing::warn!(error = %e, "DiLoCo: could not read the model's weights");
        }
    }

    /// Counts an inner step; after H of them runs the round boundary with the replicas.
    async fn diloco_round(
        &self,
        client: &EngineHandle,
        cfg: &Config,
        losses: &mut Vec<f32>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let Some(net) = &self.net else { return };
        let settings = crate::diloco::round::Settings::from_config(cfg);
        let initialized = {
            let mut s = net.diloco.state.lock().unwrap_or_else(|p| p.into_inner());
            s.inner_step = u32::try_from(losses.len()).unwrap_or(u32::MAX);
            s.initialized
        };
        if !initialized {
            self.diloco_init(client).await;
            return;
        }
        let round = crate::diloco::sync::Round::new(
            net,
            &self.metrics,
            settings,
            self.data_dir.join("diloco"),
        );
        if losses.len() < settings.steps as usize {
            // Between boundaries: adopt the replicas' agreed state as soon as the peers'
            // figures show this node is out of step, so it contributes to their round.
            match round.catch_up(client).await {
                Ok(Some(_)) => {
                    losses.clear();
                    if let Ok(h) = net.diloco.state.lock().map(|s| s.start_hash.clone()) {
                        self.update(|s| s.model_hash = h);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "DiLoCo catch-up failed; retrying"),
            }
            return;
        }
        if let Ok(mut m) = net.diloco.max_norm.lock() {
            *m = settings.max_norm;
        }
        let loss = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
        let batches = losses.len() as u64;
        losses.clear();
        let result = tokio::select! {
            r = round.finish(client, loss, batches) => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(outcome) => {
                let hash = match outcome {
                    crate::diloco::sync::Outcome::Stepped { hash, .. }
                    | crate::diloco::sync::Outcome::CaughtUp { hash, .. } => hash,
                };
                self.update(|s| s.model_hash = hash);
            }
            Err(e) => {
                tracing::warn!(error = %e, "DiLoCo round failed");
                self.metrics
                    .syncs_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.update(|s| s.last_error = Some(e));
            }
        }
    }

    /// Decides which layers this node holds (dynamic layer pool): all of them when its
    /// capacity covers the model; else, once the seed peers are connected (or 10 s passed),
    /// the first layers nobody holds. Tells peers and the API. None when stopped meanwhile.
    async fn assign(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<crate::pipeline::Assignment> {
        let cfg = self.config();
        let total = held_layers(&cfg).end;
        let model = neuroshard_shared::model::ModelConfig::preset(&cfg.training.model).ok();
        let capacity = model
            .as_ref()
            .map_or(total, |m| crate::pipeline::assign::capacity(&cfg, m));
        let a = match (&self.net, capacity >= total) {
            (Some(net), false) => {
                let wanted = cfg.seed_peers.len().min(crate::network::MAX_PEERS);
                let deadline = Instant::now() + ASSIGN_WAIT;
                while net.peers.len() < wanted && Instant::now() < deadline {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = stop.changed() => {}
                    }
                    if *stop.borrow() {
                        return None;
                    }
                }
                let held: Vec<Vec<u32>> = net
                    .peers
                    .node_infos()
                    .into_iter()
                    .map(|i| i.layers)
                    .collect();
                crate::pipeline::assign::choose(total, capacity, &held)
            }
            _ => crate::pipeline::Assignment::full(total),
        };
        tracing::info!(layers = ?a.layers, role = a.role(), capacity, "layers assigned");
        if let Some(net) = &self.net {
            net.set_capacity(capacity);
        }
        self.publish(&a);
        Some(a)
    }

    /// Tells peers, the pipeline stage and the API which layers this node holds.
    fn publish(&self, a: &crate::pipeline::Assignment) {
        if let Some(net) = &self.net {
            net.set_local_role(crate::network::LocalRole {
                role: a.role().into(),
                layers: a.layers.clone().collect(),
            });
        }
        if let Some(stage) = &self.stage {
            stage.set_assignment(a.clone());
        }
        self.update(|s| s.assignment = Some(a.clone()));
    }

    /// (layers of the model, layers this node may hold).
    fn capacity(&self) -> (u32, u32) {
        let cfg = self.config();
        let total = held_layers(&cfg).end;
        let capacity = neuroshard_shared::model::ModelConfig::preset(&cfg.training.model)
            .ok()
            .map_or(total, |m| crate::pipeline::assign::capacity(&cfg, &m));
        (total, capacity)
    }

    /// Looks for layers nobody holds; when the takeover rule picks this node (the same gap
    /// seen on two checks in a row), reloads the engine with the new range and tells the
    /// network. The new assignment when it changed.
    async fn rebalance(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        seen: &mut Option<std::ops::Range<u32>>,
    ) -> Option<crate::pipeline::Assignment> {
        use crate::pipeline::assign::{Holder, first_gap, takeover};
        let net = self.net.as_ref()?;
        if !self.stats.lock().map(|s| s.model_loaded).unwrap_or(false) {
            return None;
        }
        let (total, capacity) = self.capacity();
        let me = Holder {
            id: net.id().to_string(),
            layers: a.layers.clone().collect(),
            capacity,
        };
        let peers: Vec<Holder> = net
            .peers
            .node_infos()
            .into_iter()
            .map(|i| Holder {
                id: i.node_id,
                layers: i.layers,
                capacity: i.capacity,
            })
            .collect();
        let gap = first_gap(total, std::iter::once(&me).chain(&peers));
        let confirmed = gap.is_some() && *seen == gap;
        *seen = gap.clone();
        if !confirmed {
            return None;
        }
        let layers = takeover(total, &me, &peers).filter(|r| *r != a.layers)?;
        let new = crate::pipeline::Assignment { layers, total };
        tracing::warn!(uncovered = ?gap, from = ?a.layers, to = ?new.layers, "layers uncovered; taking them over");
        match self.reload(client, a, &new, None).await {
            Ok(()) => {
                if let Some(stage) = &self.stage {
                    stage
                        .counters
                        .takeovers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                *seen = None;
                Some(new)
            }
            Err(e) => {
                tracing::warn!(error = %e, "takeover failed; retrying");
                self.update(|s| s.last_error = Some(e));
                None
            }
        }
    }

    /// A replica left off the training route trains nothing while the route's holder of its
    /// layers goes on; should the route switch to it (that holder gone), training would step
    /// back to stale weights. So when a peer holding some of this node's layers has trained
    /// them `RESYNC_LAG` steps further, this node reloads them from such peers (weights, AdamW
    /// moments and step; its own state for layers they lack). True when it tried.
    async fn resync(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        step: u64,
    ) -> bool {
        let Some(net) = &self.net else {
            return false;
        };
        if !self.stats.lock().map(|s| s.model_loaded).unwrap_or(false) {
            return false;
        }
        let min_step = step.saturating_add(RESYNC_LAG);
        let ahead =
            net.peers.node_infos().into_iter().find(|i| {
                i.train_step >= min_step && i.layers.iter().any(|l| a.layers.contains(l))
            });
        let Some(ahead) = ahead else {
            return false;
        };
        tracing::info!(step, peer = %ahead.node_id, peer_step = ahead.train_step, layers = ?a.layers, "replica behind another holder of its layers; fetching their weights");
        match self.reload(client, a, a, Some(min_step)).await {
            Ok(()) => {
                if let Some(stage) = &self.stage {
                    stage
                        .counters
                        .resyncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "resync failed; keeping this node's weights"),
        }
        true
    }

    /// Fetches from connected peers whose layers are at step `min_step` or later a checkpoint
    /// of each stage that holds some of `needed` (GetWeights with layers; its hash is checked
    /// by the engine when loading). Returns the files written, with the stage hash each peer
    /// claimed and the needed layers each covers.
    async fn fetch_layers(
        &self,
        needed: std::ops::Range<u32>,
        min_step: u64,
    ) -> Vec<(PathBuf, String, Vec<u32>)> {
        let Some(net) = &self.net else {
            return Vec::new();
        };
        let cfg = self.config();
        let Ok(model) = neuroshard_shared::model::ModelConfig::preset(&cfg.training.model) else {
            return Vec::new();
        };
        // Weights and two moments in f32, plus the header.
        let max_bytes = usize::try_from(model.total_params())
            .unwrap_or(usize::MAX / 16)
            .saturating_mul(12)
            .saturating_add(16 << 20);
        let mut left: std::collections::BTreeSet<u32> = needed.collect();
        let mut peers = net.peers.conns_with_info();
        // The holders that trained furthest first (a stale replica is the last resort).
        peers.retain(|p| p.1.train_step >= min_step);
        peers.sort_by_key(|p| (std::cmp::Reverse(p.1.train_step), p.0.id.to_string()));
        let dir = self.data_dir.join("checkpoints");
        let _ = std::fs::create_dir_all(&dir);
        let mut out = Vec::new();
        for (conn, info) in peers {
            let mut want: Vec<u32> = info
                .layers
                .iter()
                .copied()
                .filter(|l| left.contains(l))
                .collect();
            want.sort_unstable();
            want.dedup();
            if want.is_empty() {
                continue;
            }
            let got = tokio::time::timeout(
                FETCH_TIMEOUT,
                conn.get_stage_weights(want.clone(), max_bytes),
            )
            .await;
            let (hash, bytes) = match got {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %conn.id, error = %e, "could not fetch layer weights");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(peer = %conn.id, "layer weights transfer timed out");
                    continue;
                }
            };
            let path = dir.join(format!("from-{}.ckpt", conn.id));
            if let Err(e) = std::fs::write(&path, &bytes) {
                tracing::warn!(error = %e, path = %path.display(), "could not keep fetched weights");
                continue;
            }
            tracing::info!(peer = %conn.id, layers = ?want, hash = %hash, bytes = bytes.len(), "fetched layer weights");
            for l in &want {
                left.remove(l);
            }
            out.push((path, hash, want));
            if left.is_empty() {
                break;
            }
        }
        out
    }

    /// LoadModel for `a` from checkpoints of stages (`sources`: path, expected hash).
    async fn load_from(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        sources: &[(PathBuf, String)],
    ) -> Result<Loaded, String> {
        let mut spec = load_spec(&self.config(), &self.node_id, None, a);
        spec.sources = sources.to_vec();
        client.load_model(&spec).await.map_err(|e| e.message())
    }

    /// Counts where the layers `new` (those not in `kept`) came from after a load with
    /// sources, warns about those that start from the seed, and records the loaded model.
    fn record_load(
        &self,
        reply: &Loaded,
        a: &crate::pipeline::Assignment,
        kept: &std::ops::Range<u32>,
        from_peers: &[u32],
    ) {
        let new: Vec<u32> = a.layers.clone().filter(|l| !kept.contains(l)).collect();
        let seeded: Vec<u32> = reply
            .seeded_layers
            .iter()
            .copied()
            .filter(|l| new.contains(l))
            .collect();
        let peer = new
            .iter()
            .filter(|l| from_peers.contains(l) && !seeded.contains(l))
            .count();
        let ckpt = new.len() - peer - seeded.len();
        if !seeded.is_empty() {
            tracing::warn!(layers = ?seeded, "no replica and no checkpoint holds these layers; they start from the seed");
        }
        if let Some(stage) = &self.stage {
            use std::sync::atomic::Ordering::Relaxed;
            stage
                .counters
                .layers_from_peer
                .fetch_add(peer as u64, Relaxed);
            stage
                .counters
                .layers_from_checkpoint
                .fetch_add(ckpt as u64, Relaxed);
            stage
                .counters
                .layers_from_init
                .fetch_add(seeded.len() as u64, Relaxed);
        }
        tracing::info!(layers = ?a.layers, step = reply.step, hash = %reply.model_hash, from_peers = peer, from_checkpoint = ckpt, from_seed = seeded.len(), "model loaded");
        self.update(|s| {
            s.model_loaded = true;
            s.model_hash = reply.model_hash.clone();
            s.parameters = reply.parameters;
            s.step = reply.step;
            s.started.get_or_insert_with(Instant::now);
        });
    }

    /// Changes the engine's layers from `old` to `new` under the stage lock: the layers kept
    /// from this node's current state, the new ones from a peer holding them, else from this
    /// node's latest checkpoint, else from the seed. With `refresh` (resync, `new` == `old`)
    /// every layer comes from peers whose layers are at that step or later where they hold
    /// it, the optimizer step with them. On failure the old range is back.
    async fn reload(
        &self,
        client: &EngineHandle,
        old: &crate::pipeline::Assignment,
        new: &crate::pipeline::Assignment,
        refresh: Option<u64>,
    ) -> Result<(), String> {
        let stage = self.stage.as_ref().ok_or("no pipeline stage")?;
        // Fetched before the stage lock is taken: a peer fetching from this node meanwhile
        // must not wait for it.
        let fetched = match refresh {
            Some(min_step) => {
                let fetched = self.fetch_layers(new.layers.clone(), min_step).await;
                if fetched.is_empty() {
                    return Err("no peer ahead served its weights".into());
                }
                fetched
            }
            None => {
                let needed = new.layers.start.max(old.layers.end)..new.layers.end;
                let below = new.layers.start..new.layers.end.min(old.layers.start);
                let mut fetched = self.fetch_layers(needed, 0).await;
                fetched.extend(self.fetch_layers(below, 0).await);
                fetched
            }
        };
        let _lock = stage.exclusive().await;
        let own = crate::engine::checkpoints_dir(&self.data_dir).join("takeover.ckpt");
        if let Err(e) = client.checkpoint(&own).await {
            for (p, _, _) in &fetched {
                let _ = std::fs::remove_file(p);
            }
            return Err(format!("checkpoint before the reload: {e}"));
        }
        self.update(|s| s.model_loaded = false);
        let from_peers: Vec<u32> = fetched.iter().flat_map(|f| f.2.clone()).collect();
        // A layer comes from the first source that holds it, the optimizer step from the
        // first source: this node's own state first, unless refreshing from peers ahead.
        let own_source = (own.clone(), String::new());
        let peer_sources = fetched.iter().map(|(p, h, _)| (p.clone(), h.clone()));
        let mut sources: Vec<(PathBuf, String)> = match refresh {
            Some(_) => peer_sources.chain(std::iter::once(own_source)).collect(),
            None => std::iter::once(own_source).chain(peer_sources).collect(),
        };
        let latest = checkpoint_path(&self.data_dir);
        if latest.exists() {
            sources.push((latest.clone(), String::new()));
        }
        let result = match self.load_from(client, new, &sources).await {
            Ok(r) => Ok((r, from_peers)),
            Err(e) => {
                tracing::warn!(error = %e, "loading the new layers with the fetched weights failed; without them");
                self.load_from(client, new, &[(own.clone(), String::new())])
                    .await
                    .map(|r| (r, Vec::new()))
            }
        };
        for (p, _, _) in &fetched {
            let _ = std::fs::remove_file(p);
        }
        match result {
            Ok((reply, from_peers)) => {
                let kept = if refresh.is_some() {
                    0..0
                } else {
                    old.layers.clone()
                };
                self.record_load(&reply, new, &kept, &from_peers);
                self.publish(new);
                // The latest checkpoint is of the new range from now on.
                self.checkpoint(client).await;
                let _ = std::fs::remove_file(&own);
                Ok(())
            }
            Err(e) => {
                // Back to the old range from the state saved a moment ago.
                let back = client
                    .load_model(&load_spec(&self.config(), &self.node_id, Some(&own), old))
                    .await;
                if back.is_ok() {
                    self.update(|s| s.model_loaded = true);
                }
                Err(format!("loading layers {:?}: {e}", new.layers))
            }
        }
    }

    /// One pipeline step driven from here; a failure is logged, counted and retried by the
    /// next call.
    async fn pipeline_step(&self, step_id: u64, stop: &mut watch::Receiver<bool>) {
        let (Some(stage), Some(net)) = (&self.stage, &self.net) else {
            return;
        };
        let started = Instant::now();
        match stage.drive(net, step_id).await {
            Ok(r) => {
                stage
                    .counters
                    .steps
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(
                    step = r.optimizer_step,
                    loss = r.loss,
                    stages = r.stages,
                    micro_batches = r.micro_batches,
                    ms = started.elapsed().as_millis() as u64,
                    "pipeline step"
                );
                self.update(|s| {
                    s.loss = Some(r.loss);
                    s.tokens += r.tokens;
                    s.shards.insert(r.shard);
                    s.history.push_back((r.optimizer_step, r.loss));
                    while s.history.len() > HISTORY {
                        s.history.pop_front();
                    }
                    s.last_error = None;
                });
            }
            Err(e) => {
                stage
                    .counters
                    .failed_steps
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "pipeline step failed; retrying");
                self.update(|s| s.last_error = Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Restores the latest checkpoint if there is one, else builds the model from the seed.
    async fn bring_up(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
    ) -> Result<(), String> {
        let cfg = self.config();
        let ckpt = checkpoint_path(&self.data_dir);
        // A stage whose layers peers hold (a late joiner, a redundant replica) starts from
        // their current weights, step and moments; what they lack comes from this node's
        // checkpoint, else the seed.
        if !a.is_full() {
            let fetched = self.fetch_layers(a.layers.clone(), 0).await;
            if !fetched.is_empty() {
                let mut sources: Vec<(PathBuf, String)> = fetched
                    .iter()
                    .map(|(p, h, _)| (p.clone(), h.clone()))
                    .collect();
                if ckpt.exists() {
                    sources.push((ckpt.clone(), String::new()));
                }
                let from_peers: Vec<u32> = fetched.iter().flat_map(|f| f.2.clone()).collect();
                let r = self.load_from(client, a, &sources).await;
                for (p, _, _) in &fetched {
                    let _ = std::fs::remove_file(p);
                }
                match r {
                    Ok(reply) => {
                        self.record_load(&reply, a, &(0..0), &from_peers);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not load the peers' weights; starting from this node's checkpoint or the seed");
                    }
                }
            }
        }
        let existing = ckpt.exists().then_some(ckpt.as_path());
        let spec = load_spec(&cfg, &self.node_id, existing, a);
        let reply = match client.load_model(&spec).await {
            Ok(r) => r,
            // Only the engine's verdict on the file (invalid argument) condemns a checkpoint; a
            // transport error (the engine died while loading) is retried with the same file.
            Err(EngineError::Invalid(why)) if existing.is_some() => {
                // A checkpoint the engine cannot read must not stop the node: keep it aside for
                // inspection and start from the seed.
                tracing::error!(error = %why, path = %ckpt.display(), "checkpoint unreadable; starting from seed");
                let aside = ckpt.with_extension(format!("bad-{}", chrono::Utc::now().timestamp()));
                let _ = std::fs::rename(&ckpt, &aside);
                client
                    .load_model(&load_spec(&cfg, &self.node_id, None, a))
                    .await
                    .map_err(|e| e.message())?
            }
            Err(e) => return Err(e.message()),
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

    async fn checkpoint(&self, client: &EngineHandle) {
        let path = checkpoint_path(&self.data_dir);
        match client.checkpoint(&path).await {
            Ok(step) => {
                tracing::debug!(step, "checkpoint written");
                self.update(|s| s.last_checkpoint_step = Some(step));
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
    }
}
