//! Training steps beyond one local step: the DiLoCo round boundary (decided by
//! `neuroshard_coordination::round`) and the driver's pipeline step (scheduled by
//! `neuroshard_coordination::schedule`), carried out here.

use std::time::{Duration, Instant};

use neuroshard_coordination::round::{Action as RoundAction, Boundary, Event as RoundEvent};
use tokio::sync::watch;

use super::*;

/// This node's pipeline stage, as a DiLoCo round locks it.
impl crate::diloco::stage::StageLock for crate::pipeline::Stage {
    fn exclusive(&self) -> crate::diloco::stage::Held<'_> {
        Box::pin(
            async move { Box::new(crate::pipeline::Stage::exclusive(self).await) as Box<dyn Send> },
        )
    }

    fn quiesced(&self) -> crate::diloco::stage::Held<'_> {
        Box::pin(async move {
            Box::new(crate::pipeline::Stage::quiesced(self, self.busy_wait()).await)
                as Box<dyn Send>
        })
    }
}

/// What the trainer remembers between a stage's round checks.
#[derive(Debug, Default)]
pub(super) struct StageRounds {
    /// The layers the round state was read for.
    pub layers: Option<std::ops::Range<u32>>,
    /// This node's optimizer step when the current round started.
    pub start_step: u64,
}

impl Trainer {
    /// Reads the loaded model into the DiLoCo round state (first start) and catches up with
    /// the replicas if they agree on other weights.
    pub(super) async fn diloco_init(&self, client: &EngineHandle) {
        let dir = self.data_dir.join("diloco");
        *self.diloco.max_norm.lock() = self.config().diloco_settings().max_norm;
        *self.diloco.verifier.spec.lock() = Some(self.replay_spec());
        let settings = self.config().diloco_settings();
        let (fragments, overlap) = (settings.fragments, settings.overlap);
        if let Err(e) =
            crate::diloco::sync::init(&self.diloco, client, &dir, fragments, overlap).await
        {
            tracing::warn!(error = %e, "DiLoCo: could not read the model's weights");
        }
        self.keep_round_start(client).await;
    }

    /// How this node replays other replicas' rounds (`diloco::verify`).
    pub(super) fn replay_spec(&self) -> crate::diloco::verify::ReplaySpec {
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
            window: cfg.ledger.verify_window_steps,
            data_id: self.node_id.clone(),
        }
    }

    /// Checkpoints the start of the round this replica is now in, for verifiers (none with
    /// Streaming DiLoCo: its rounds are not replayed, `diloco::verify`).
    async fn keep_round_start(&self, client: &EngineHandle) {
        if self.diloco.state.lock().streaming() {
            return;
        }
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
    /// with the replicas after H inner steps. With Streaming DiLoCo's overlap τ the round is
    /// sent at the boundary and kept in `pending`, and its outer step is taken τ inner steps
    /// later, while the replicas' contributions arrived meanwhile.
    pub(super) async fn diloco_round(
        &self,
        client: &EngineHandle,
        cfg: &Config,
        boundary: &mut Boundary,
        pending: &mut Option<crate::diloco::sync::Sent>,
        loss: f32,
        stop: &mut watch::Receiver<bool>,
    ) {
        let settings = cfg.diloco_settings();
        if let Some(sent) = pending.as_mut() {
            sent.steps_after += 1;
        }
        if pending
            .as_ref()
            .is_some_and(|s| s.steps_after >= settings.overlap)
            && let Some(sent) = pending.take()
        {
            self.complete_round(client, &settings, boundary, sent, stop)
                .await;
        }
        let (initialized, round, fragments) = {
            let s = self.diloco.state.lock();
            // A round still in its overlap: these steps belong to the next one.
            (
                s.initialized,
                s.round + u64::from(pending.is_some()),
                s.fragments,
            )
        };
        // With fragments, round r syncs fragment r mod P after its share of H steps.
        let h = crate::diloco::streaming::round_steps(settings.steps, fragments, round);
        let actions = boundary.on(RoundEvent::InnerStep {
            loss,
            initialized,
            h,
        });
        for action in actions {
            match action {
                RoundAction::CountInnerSteps(n) => {
                    self.diloco.state.lock().inner_step = n;
                }
                RoundAction::InitRound => self.diloco_init(client).await,
                // Not while a round's exchange is in flight: its end catches up if need be.
                RoundAction::CatchUp if pending.is_some() => {}
                RoundAction::CatchUp => {
                    // Adopts the replicas' agreed state as soon as the peers' figures show
                    // this node is out of step, so it contributes to their round.
                    match self.round(&settings, false).catch_up(client).await {
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
                    // An overlap no shorter than a round (the config refuses it) ends here.
                    if let Some(sent) = pending.take() {
                        self.complete_round(client, &settings, boundary, sent, stop)
                            .await;
                    }
                    *self.diloco.max_norm.lock() = settings.max_norm;
                    let dir = self.data_dir.join("diloco");
                    let streaming = self.diloco.state.lock().streaming();
                    if !streaming
                        && let Err(e) = self
                            .diloco
                            .verifier
                            .keep_end(&self.diloco, client, &dir)
                            .await
                    {
                        tracing::warn!(error = %e, "DiLoCo: no step commitment for this round");
                    }
                    let round = self.round(&settings, false);
                    if settings.overlap > 0 {
                        let sent = tokio::select! {
                            r = round.send(client, loss, batches) => r,
                            _ = stop.changed() => return,
                        };
                        match sent {
                            Ok(crate::diloco::sync::Sending::Sent(s)) => *pending = Some(s),
                            Ok(crate::diloco::sync::Sending::CaughtUp(o)) => {
                                self.round_done(Ok(o));
                            }
                            Err(e) => {
                                self.round_done(Err(e));
                            }
                        }
                        continue;
                    }
                    let result = tokio::select! {
                        r = round.finish(client, loss, batches) => r,
                        _ = stop.changed() => return,
                    };
                    if self.round_done(result) {
                        self.keep_round_start(client).await;
                    }
                }
            }
        }
    }

    /// The outer step of a round sent `sent.steps_after` inner steps ago (Streaming DiLoCo's
    /// overlap); a catch-up instead restarts the boundary's count.
    async fn complete_round(
        &self,
        client: &EngineHandle,
        settings: &crate::diloco::round::Settings,
        boundary: &mut Boundary,
        sent: crate::diloco::sync::Sent,
        stop: &mut watch::Receiver<bool>,
    ) {
        let round = self.round(settings, false);
        let result = tokio::select! {
            r = round.complete(client, sent) => r,
            _ = stop.changed() => return,
        };
        if matches!(result, Ok(crate::diloco::sync::Outcome::CaughtUp { .. })) {
            boundary.on(RoundEvent::CaughtUp);
        }
        self.round_done(result);
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
                // Its state did not change: it commits the same state again.
                state_hash: self.diloco.verifier.last_step_hash(),
            });
        }
        // The state hash is this replica's per-step commitment (`diloco::window`); rounds of
        // Streaming DiLoCo's commit to none (they are not replayed).
        let commit = !self.diloco.state.lock().streaming();
        client.train_step(commit).await
    }

    /// The round with the replicas connected to this node (the holders of its layer range
    /// when `stage`).
    fn round(
        &self,
        settings: &crate::diloco::round::Settings,
        stage: bool,
    ) -> crate::diloco::sync::Round<'_> {
        crate::diloco::sync::Round::new(
            &self.net,
            &self.diloco,
            &self.metrics,
            &self.stage.attest,
            *settings,
            self.data_dir.join("diloco"),
            stage.then_some(&*self.stage as &dyn crate::diloco::stage::StageLock),
        )
    }

    /// A pipeline stage's DiLoCo round (`diloco::stage`): (re)reads the round state when this
    /// node's layers changed, and finishes the round with the stage's other holders once the
    /// clock has passed its end. `rounds` is the trainer's bookkeeping across calls.
    pub(super) async fn stage_round(
        &self,
        client: &EngineHandle,
        cfg: &Config,
        layers: &std::ops::Range<u32>,
        rounds: &mut StageRounds,
        stop: &mut watch::Receiver<bool>,
    ) {
        use crate::diloco::stage;
        let epoch = stage::current_epoch(cfg.training.stage_round_secs);
        let step = self.stats.lock().step;
        if rounds.layers.as_ref() != Some(layers) || !self.diloco.state.lock().initialized {
            *self.diloco.state.lock() = Default::default();
            *self.diloco.max_norm.lock() = cfg.diloco_settings().max_norm;
            let dir = self.data_dir.join("diloco");
            match stage::init(&self.diloco, client, &*self.stage, &dir, epoch).await {
                Ok(()) => {
                    rounds.layers = Some(layers.clone());
                    rounds.start_step = step;
                    self.keep_agreed();
                }
                Err(e) => tracing::warn!(error = %e, "DiLoCo: could not read the stage's weights"),
            }
            return;
        }
        let batches = step.saturating_sub(rounds.start_step);
        let round = {
            let mut s = self.diloco.state.lock();
            s.inner_step = u32::try_from(batches).unwrap_or(u32::MAX);
            s.round
        };
        if epoch <= round {
            return;
        }
        // Alone in its stage: nothing to agree on, and no outer step either (a lone pipeline
        // trains exactly as one node would); the round just starts again from here.
        if crate::diloco::sync::replicas(&self.net, &self.diloco).is_empty() {
            let dir = self.data_dir.join("diloco");
            if let Err(e) = stage::init(&self.diloco, client, &*self.stage, &dir, epoch).await {
                tracing::warn!(error = %e, "DiLoCo: could not read the stage's weights");
            }
            rounds.start_step = step;
            return;
        }
        let settings = cfg.diloco_settings();
        let loss = self.stats.lock().loss.unwrap_or(0.0);
        let round = self.round(&settings, true);
        let result = tokio::select! {
            r = round.finish(client, loss, batches) => r,
            _ = stop.changed() => return,
        };
        // Steps applied while the round waited count in the next one (their drift was kept).
        rounds.start_step = step;
        if self.round_done(result) {
            self.keep_agreed();
        }
    }

    /// Keeps the stage round's agreed weights for the checks of the other holders' segment
    /// checkpoints (`trainer/stagecheck.rs`).
    fn keep_agreed(&self) {
        let s = self.diloco.state.lock();
        if s.initialized {
            self.diloco
                .verifier
                .keep_agreed(s.round, s.layout.clone(), s.theta_start.clone());
        }
    }

    /// Records a finished round boundary: the new start hash, or the failure (logged and
    /// counted). True when the round stepped or caught up.
    fn round_done(&self, result: Result<crate::diloco::sync::Outcome, String>) -> bool {
        match result {
            Ok(outcome) => {
                let hash = match outcome {
                    crate::diloco::sync::Outcome::Stepped { hash, .. }
                    | crate::diloco::sync::Outcome::CaughtUp { hash, .. } => hash,
                };
                self.update(|s| s.model_hash = hash);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "DiLoCo round failed");
                self.metrics
                    .syncs_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.update(|s| s.last_error = Some(e));
                false
            }
        }
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
