//! Training steps beyond one local step: the DiLoCo round boundary (decided by
//! `neuroshard_coordination::round`) and the driver's pipeline step (scheduled by
//! `neuroshard_coordination::schedule`), carried out here.

use std::time::{Duration, Instant};

use neuroshard_coordination::round::{Action as RoundAction, Boundary, Event as RoundEvent};
use tokio::sync::watch;

use super::*;

impl Trainer {
    /// Reads the loaded model into the DiLoCo round state (first start) and catches up with
    /// the replicas if they agree on other weights.
    pub(super) async fn diloco_init(&self, client: &EngineHandle) {
        let dir = self.data_dir.join("diloco");
        *self.diloco.max_norm.lock() = self.config().diloco_settings().max_norm;
        *self.diloco.verifier.spec.lock() = Some(self.replay_spec());
        if let Err(e) = crate::diloco::sync::init(&self.diloco, client, &dir).await {
            tracing::warn!(error = %e, "DiLoCo: could not read the model's weights");
        }
        self.keep_round_start(client).await;
    }

    /// How this node replays other replicas' rounds (`diloco::verify`).
    fn replay_spec(&self) -> crate::diloco::verify::ReplaySpec {
        let cfg = self.config();
        let n = cfg.training.model.config().layers;
        let whole = crate::pipeline::Assignment::full(n);
        crate::diloco::verify::ReplaySpec {
            binary: if cfg.engine.binary.is_empty() {
                crate::engine::supervisor::default_engine_binary()
            } else {
                cfg.engine.binary.clone().into()
            },
            threads: cfg.resources.cpu_threads,
            load: load_spec(&cfg, "", None, &whole),
            probability: cfg.ledger.verify_probability,
            tolerance: cfg.ledger.verify_tolerance,
            data_id: self.node_id.clone(),
        }
    }

    /// Checkpoints the start of the round this replica is now in, for verifiers.
    async fn keep_round_start(&self, client: &EngineHandle) {
        let dir = self.data_dir.join("diloco");
        if let Err(e) = self
            .diloco
            .verifier
            .keep_start(&self.diloco, client, &dir)
            .await
        {
            tracing::warn!(error = %e, "DiLoCo: could not keep the round's starting checkpoint");
        }
    }

    /// Reports an inner step with `loss` to the round boundary and carries out what it
    /// decides: read the round state in, catch up between boundaries, or finish the round
    /// with the replicas after H inner steps.
    pub(super) async fn diloco_round(
        &self,
        client: &EngineHandle,
        cfg: &Config,
        boundary: &mut Boundary,
        loss: f32,
        stop: &mut watch::Receiver<bool>,
    ) {
        let settings = cfg.diloco_settings();
        let initialized = self.diloco.state.lock().initialized;
        let actions = boundary.on(RoundEvent::InnerStep {
            loss,
            initialized,
            h: settings.steps,
        });
        for action in actions {
            match action {
                RoundAction::CountInnerSteps(n) => {
                    self.diloco.state.lock().inner_step = n;
                }
                RoundAction::InitRound => self.diloco_init(client).await,
                RoundAction::CatchUp => {
                    // Adopts the replicas' agreed state as soon as the peers' figures show
                    // this node is out of step, so it contributes to their round.
                    match self.round(&settings).catch_up(client).await {
                        Ok(Some(_)) => {
                            boundary.on(RoundEvent::CaughtUp);
                            let h = self.diloco.state.lock().start_hash.clone();
                            self.update(|s| s.model_hash = h);
                            self.keep_round_start(client).await;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(error = %e, "DiLoCo catch-up failed; retrying"),
                    }
                }
                RoundAction::FinishRound { loss, batches } => {
                    *self.diloco.max_norm.lock() = settings.max_norm;
                    let round = self.round(&settings);
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
                            self.keep_round_start(client).await;
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
            }
        }
    }

    /// One local training step; an adversary build configured to cheat may skip the engine
    /// and report a step it never computed.
    pub(super) async fn inner_step(
        &self,
        client: &EngineHandle,
        cfg: &Config,
    ) -> Result<crate::engine::TrainStepped, crate::engine::EngineError> {
        let n = self.stats.lock().steps_this_run;
        if cfg!(feature = "adversary") && !cfg.adversary.computes(n) {
            let (step, loss) = {
                let s = self.stats.lock();
                (s.step + 1, s.loss.unwrap_or(5.0))
            };
            return Ok(crate::engine::TrainStepped {
                loss,
                step,
                tokens: u64::from(cfg.training.batch_size) * u64::from(cfg.training.seq_len),
                grad_norm: 1.0,
                shard: 0,
            });
        }
        client.train_step().await
    }

    /// The round with the replicas connected to this node.
    fn round(&self, settings: &crate::diloco::round::Settings) -> crate::diloco::sync::Round<'_> {
        crate::diloco::sync::Round::new(
            &self.net,
            &self.diloco,
            &self.metrics,
            &self.stage.attest,
            *settings,
            self.data_dir.join("diloco"),
        )
    }

    /// One pipeline step driven from here; a failure is logged, counted and retried by the
    /// next call after the schedule's backoff.
    pub(super) async fn pipeline_step(&self, step_id: u64, stop: &mut watch::Receiver<bool>) {
        let stage = &self.stage;
        let started = Instant::now();
        match stage.drive(&self.net, step_id).await {
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
            Err(crate::pipeline::StepFailed { error, retry_after }) => {
                stage
                    .counters
                    .failed_steps
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %error, "pipeline step failed; retrying");
                self.update(|s| s.last_error = Some(error.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(retry_after)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}
