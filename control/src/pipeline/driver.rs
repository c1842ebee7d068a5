//! The driver's step: the batch split into micro-batches, GPipe forwards and backwards over
//! the route, then the global-norm clipped optimizer step on every stage.

use std::sync::atomic::Ordering;
use std::time::Duration;

use neuroshard_proto::peer as pb;

use super::stage::Requeue;
use super::{Out, PipeError, Stage, Wire, check_acts, peer_err, plan_route, within};
use neuroshard_net::Network;

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
    (neuroshard_net::now_ms().max(0) as u64).max(last + 1)
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

    #[test]
    fn micro_batches_divide_the_batch() {
        assert_eq!(micro_batches(8, 4), 4);
        assert_eq!(micro_batches(6, 4), 3);
        assert_eq!(micro_batches(7, 4), 1);
        assert_eq!(micro_batches(2, 0), 1);
    }
}
