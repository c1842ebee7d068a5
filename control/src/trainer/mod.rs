//! Drives local training on the engine: brings the model up after every engine (re)start —
//! restoring the latest checkpoint when there is one — runs training steps while training is
//! enabled, and checkpoints every `training.checkpoint_every` steps and at shutdown.
//!
//! `mod.rs` holds the stats and the run loop; `pool.rs` the layers this node holds (pool
//! membership, takeover, resync), `load.rs` bringing the model up and reloading it,
//! `steps.rs` the DiLoCo round boundary and the driver's pipeline step. The decisions (when
//! to take over or resync, when a round ends, the GPipe schedule and the retry of a failed
//! step) are `neuroshard_coordination`'s state machines; the trainer carries them out.

mod load;
mod pool;
mod stagecheck;
mod steps;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_coordination::upkeep::{Action, Event, Upkeep};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::pipeline::assign::Role;

use crate::config::{Config, LiveConfig};
use crate::engine::{
    Engine, EngineError, EngineHandle, EngineState, LoadSpec, Loaded, TrainSettings,
    checkpoint_path,
};
pub use crate::stats::{TrainingStats, held_layers, live_layers};

/// Longest a node with too little room for the whole model waits for its seed peers before
/// choosing its layers.
const ASSIGN_WAIT: Duration = Duration::from_secs(10);

/// A replica left off the training route refreshes its layers from a holder that has trained
/// them at least this many steps further (when: `neuroshard_coordination::upkeep`).
const RESYNC_LAG: u64 = 10;

/// Loss samples kept for the status endpoints (and later the training-verification figures).
const HISTORY: usize = 1000;

/// What LoadModel builds for the layers of `a` of the configured model.
pub fn load_spec(
    cfg: &Config,
    node_id: &str,
    checkpoint: Option<&Path>,
    a: &crate::pipeline::Assignment,
) -> LoadSpec {
    LoadSpec {
        preset: cfg.training.model.to_string(),
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
        dtype: t.dtype.as_str().into(),
    }
}

pub struct Trainer {
    pub engine: Engine,
    pub config: LiveConfig,
    pub stats: Arc<Mutex<TrainingStats>>,
    pub data_dir: PathBuf,
    pub node_id: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The peer network; DiLoCo rounds run with the replicas connected there.
    pub net: Arc<neuroshard_net::Network>,
    /// DiLoCo rounds of this node: the state the `Diloco` peer service files contributions in.
    pub diloco: Arc<crate::diloco::round::Diloco>,
    /// This node's pipeline stage (it trains when it holds fewer layers than the model).
    pub stage: Arc<crate::pipeline::Stage>,
}

impl Trainer {
    fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    fn update(&self, f: impl FnOnce(&mut TrainingStats)) {
        f(&mut self.stats.lock());
    }

    /// Runs until `stop` flips to true; then writes a last checkpoint if the engine is up.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut engine = self.engine.subscribe();
        // Wakes an idle trainer when PATCH /config changes something (training enabled again,
        // new settings to reload with), instead of at its next poll.
        let mut config_changes = self.config.clone();
        let Some(mut assignment) = self.assign(&mut stop).await else {
            return;
        };
        let pipelined = !assignment.is_full();
        let mut last_step_id = 0u64;
        // Takeover and resync decisions (coordination); this loop carries them out.
        let clock = Instant::now();
        let now_ms = || clock.elapsed().as_millis() as u64;
        let mut upkeep = Upkeep::new(now_ms());
        // A pipeline stage's DiLoCo rounds with the other holders of its layers.
        let mut stage_rounds: steps::StageRounds;
        // Sampled checks of the other holders of this stage's layers (issue #19).
        let mut stage_checks = stagecheck::StageChecks::default();
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
            // Weights (re)loaded: the stage's round state is read again from them.
            stage_rounds = steps::StageRounds::default();
            // The inner steps of the current DiLoCo round (coordination decides the boundary).
            let mut boundary = neuroshard_coordination::round::Boundary::new();
            // A round sent and in its overlap (Streaming DiLoCo), dropped with the engine.
            let mut pending = None;
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
                if pipelined {
                    let step = self.stats.lock().step;
                    let mut todo: VecDeque<Action> =
                        upkeep.on(Event::Tick { step }, now_ms()).into();
                    while let Some(action) = todo.pop_front() {
                        let outcome = match action {
                            Action::PublishStep(step) => {
                                self.net.set_train_step(step);
                                self.net.set_train_compute(self.stage.compute_rate());
                                self.net.set_pipeline_load(self.stage.load());
                                None
                            }
                            Action::CheckCoverage => {
                                let coverage = self.coverage(&assignment);
                                // No gap: the balance rule's turn (the upkeep machine takes
                                // its proposal after the coverage).
                                if matches!(coverage, Event::Coverage { gap: None, .. }) {
                                    todo.extend(upkeep.on(coverage, now_ms()));
                                    Some(self.balance(&assignment))
                                } else {
                                    Some(coverage)
                                }
                            }
                            Action::Rebalance(layers) => {
                                let new = crate::pipeline::Assignment {
                                    layers,
                                    total: assignment.total,
                                };
                                Some(
                                    match self.move_for_balance(&client, &assignment, &new).await {
                                        true => {
                                            assignment = new;
                                            Event::TookOver
                                        }
                                        false => Event::TakeoverFailed,
                                    },
                                )
                            }
                            Action::TakeOver(layers) => {
                                let new = crate::pipeline::Assignment {
                                    layers,
                                    total: assignment.total,
                                };
                                Some(match self.take_over(&client, &assignment, &new).await {
                                    true => {
                                        assignment = new;
                                        Event::TookOver
                                    }
                                    false => Event::TakeoverFailed,
                                })
                            }
                            Action::Resync => {
                                // Holders of the same layers agree every stage round
                                // (`diloco::stage`): a copy of one of them would count its
                                // progress as ours. Resync is for a holder with none.
                                let replicas =
                                    crate::diloco::sync::replicas(&self.net, &self.diloco);
                                let tried = replicas.is_empty()
                                    && self.resync(&client, &assignment, step).await;
                                if tried {
                                    // A holder's weights replaced ours: the round state is
                                    // read again (their progress must not count as ours).
                                    stage_rounds = steps::StageRounds::default();
                                }
                                let step = self.stats.lock().step;
                                Some(Event::Resynced { tried, step })
                            }
                        };
                        if let Some(event) = outcome {
                            todo.extend(upkeep.on(event, now_ms()));
                        }
                    }
                }
                // Every holder of a stage, driver or not, agrees its layers with the others.
                if pipelined && cfg.training.enabled {
                    self.stage_round(
                        &client,
                        &cfg,
                        &assignment.layers,
                        &mut stage_rounds,
                        &mut stop,
                    )
                    .await;
                    self.stage_check(&mut stage_checks, &assignment);
                }
                let done =
                    cfg.training.max_steps > 0 && self.stats.lock().step >= cfg.training.max_steps;
                // Only the driver starts pipeline steps; the other stages serve them.
                let idle = pipelined && assignment.role() != Role::Driver;
                if !cfg.training.enabled || done || idle {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                        _ = engine.changed() => {}
                        _ = config_changes.changed() => {}
                    }
                    continue;
                }
                if pipelined {
                    last_step_id = crate::pipeline::new_step_id(last_step_id);
                    self.pipeline_step(last_step_id, &mut stop).await;
                    continue;
                }
                let t0 = Instant::now();
                match self.inner_step(&client, &cfg).await {
                    Ok(r) => {
                        self.diloco.verifier.step_done(&r.state_hash);
                        // A full replica's measured training throughput (the layer balance
                        // weighs holders by it).
                        self.stage
                            .record_compute(r.tokens, t0.elapsed().as_secs_f64());
                        self.net.set_train_compute(self.stage.compute_rate());
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
                        self.diloco_round(
                            &client,
                            &cfg,
                            &mut boundary,
                            &mut pending,
                            r.loss,
                            &mut stop,
                        )
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
}
