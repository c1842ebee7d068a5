//! Training steps beyond one local step: the DiLoCo round boundary and the driver's
//! pipeline step.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::*;

impl Trainer {
    /// Reads the loaded model into the DiLoCo round state (first start) and catches up with
    /// the replicas if they agree on other weights.
    pub(super) async fn diloco_init(&self, client: &EngineHandle) {
        if self.net.is_none() {
            return;
        }
        let dir = self.data_dir.join("diloco");
        *self.diloco.max_norm.lock() = self.config().diloco_settings().max_norm;
        if let Err(e) = crate::diloco::sync::init(&self.diloco, client, &dir).await {
            tracing::warn!(error = %e, "DiLoCo: could not read the model's weights");
        }
    }

    /// Counts an inner step; after H of them runs the round boundary with the replicas.
    pub(super) async fn diloco_round(
        &self,
        client: &EngineHandle,
        cfg: &Config,
        losses: &mut Vec<f32>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let Some(net) = &self.net else { return };
        let settings = cfg.diloco_settings();
        let initialized = {
            let mut s = self.diloco.state.lock();
            s.inner_step = u32::try_from(losses.len()).unwrap_or(u32::MAX);
            s.initialized
        };
        if !initialized {
            self.diloco_init(client).await;
            return;
        }
        let round = crate::diloco::sync::Round::new(
            net,
            &self.diloco,
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
                    let h = self.diloco.state.lock().start_hash.clone();
                    self.update(|s| s.model_hash = h);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "DiLoCo catch-up failed; retrying"),
            }
            return;
        }
        *self.diloco.max_norm.lock() = settings.max_norm;
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

    /// One pipeline step driven from here; a failure is logged, counted and retried by the
    /// next call.
    pub(super) async fn pipeline_step(&self, step_id: u64, stop: &mut watch::Receiver<bool>) {
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
}
