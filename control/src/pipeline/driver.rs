//! The driver's step, carried out as `neuroshard_coordination::schedule` decides it: the batch
//! split into micro-batches, GPipe forwards and backwards over the route, then the
//! global-norm clipped optimizer step on every stage; after a failure the batch is requeued or
//! given up and the trainer waits the backoff the schedule gives.

use std::sync::atomic::Ordering;
use std::time::Duration;

use neuroshard_coordination::Millis;
use neuroshard_coordination::schedule::{Action, Event, Schedule, Summary};
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_proto::peer as pb;
use neuroshard_shared::model::ModelConfig;

use super::phase::Phase;
use super::route::Hop;
use super::stage::{Batch, StepKey};
use super::{Out, PipeError, Stage, Wire, check_acts, peer_err, plan_route, wire_len, within};
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

/// A driver step that failed, and how long to wait before the next (the schedule's choice).
#[derive(Debug)]
pub struct StepFailed {
    pub error: PipeError,
    pub retry_after: Millis,
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

/// What every hop of one driven step shares.
struct Hops {
    /// This driver's id and the step id.
    key: StepKey,
    /// The first stage after the driver, and the ids of the stages after it.
    first: Hop,
    rest: Vec<String>,
    secs: u32,
}

impl Hops {
    fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.secs))
    }

    /// Phase `phase` of the optimizer down the route.
    /// `receipt`: this node's backward receipt for the first stage, as the wire carries it.
    async fn optimizer(
        &self,
        phase: Phase,
        global_norm: f32,
        receipt: Vec<u8>,
    ) -> Result<pb::PipelineStepReply, PipeError> {
        let first = &self.first;
        within(self.secs, &first.conn.id.to_string(), async {
            first
                .conn
                .pipeline_step(
                    pb::PipelineStepRequest {
                        auth: None,
                        step: self.key.step,
                        phase: phase.as_str().into(),
                        global_norm,
                        route: self.rest.clone(),
                        receipt,
                        driver: self.key.driver.clone(),
                    },
                    self.timeout(),
                )
                .await
                .map_err(|e| peer_err(first, e))
        })
        .await
    }
}

impl Stage {
    /// One pipeline step from the driver: batch, GPipe forwards and backwards, global-norm
    /// clipped optimizer step on every stage. A failed step's batch is kept for the next
    /// step when the schedule says so.
    pub async fn drive(&self, net: &Network, step: u64) -> Result<StepReport, StepFailed> {
        let mut schedule = Schedule::new();
        let mut batch = None;
        match self
            .run_schedule(net, step, &mut schedule, &mut batch)
            .await
        {
            Ok(report) => Ok(report),
            Err(error) => {
                let retry = schedule.failed();
                if let (true, Some(b)) = (retry.requeue, batch) {
                    *self.retry_batch.lock() = Some(b);
                }
                Err(StepFailed {
                    error,
                    retry_after: retry.after,
                })
            }
        }
    }

    /// Takes the batch (into `batch`, for the caller to requeue) and carries the schedule's
    /// actions out until it is done.
    async fn run_schedule(
        &self,
        net: &Network,
        step: u64,
        schedule: &mut Schedule,
        batch: &mut Option<Batch>,
    ) -> Result<StepReport, PipeError> {
        let a = self.ready()?;
        if !a.has_embedding() || a.has_head() {
            return Err(PipeError::NotReady(format!(
                "role {} does not drive",
                a.role()
            )));
        }
        let cfg = self.config();
        let route = plan_route(net, a.layers.end, a.total)?;
        let key = StepKey::new(net.id().to_string(), step);
        let first = route
            .first()
            .cloned()
            .ok_or_else(|| PipeError::NoRoute("no stage after the driver".into()))?;
        let hops = Hops {
            key: key.clone(),
            first,
            rest: route[1..].iter().map(|h| h.conn.id.to_string()).collect(),
            secs: cfg.training.pipeline_timeout_secs,
        };
        let pending = self.retry_batch.lock().take();
        let (ids, labels, shard) = match pending {
            Some(batch) => batch,
            None => self.next_batch(&key).await?,
        };
        let (b, t) = (ids.shape[0], ids.shape[1]);
        let (ids, labels, _) = &*batch.insert((ids, labels, shard));
        let mut actions = schedule.on(Event::Started {
            rows: b,
            want: cfg.training.micro_batches,
        });
        // The schedule answers every event of a step it is waiting for until `Done`; an empty
        // answer would be a bug there, which fails the step rather than spinning.
        while !actions.is_empty() {
            // The actions of one answer run at once (GPipe: every micro-batch's forward, then
            // every backward); their events come back in the order of the actions.
            let mut forwards = Vec::new();
            let mut backwards = Vec::new();
            let mut events = Vec::new();
            for action in actions {
                match action {
                    Action::Forward { mb, rows: r } => forwards.push(self.forward_hop(
                        &hops,
                        mb,
                        rows(ids, r.start, r.end),
                        rows(labels, r.start, r.end),
                    )),
                    Action::Backward { mb, rows: r } => {
                        let model = self.model()?;
                        backwards.push(self.backward_hop(&hops, mb, model, (r.end - r.start, t)));
                    }
                    Action::GatherNorm => events.push(self.gather_norm(&hops).await?),
                    Action::Apply { global_norm } => {
                        events.push(self.apply_all(&hops, global_norm).await?)
                    }
                    Action::Done(Summary {
                        loss,
                        optimizer_step,
                        micro_batches,
                    }) => {
                        return Ok(StepReport {
                            loss,
                            optimizer_step,
                            tokens: b * t,
                            shard,
                            micro_batches,
                            stages: route.len() + 1,
                        });
                    }
                }
            }
            events.extend(futures_util::future::try_join_all(forwards).await?);
            events.extend(futures_util::future::try_join_all(backwards).await?);
            actions = events.into_iter().flat_map(|e| schedule.on(e)).collect();
        }
        Err(PipeError::Engine(
            "the step's schedule stopped before it was done".into(),
        ))
    }

    /// This stage's forward of micro-batch `mb`, then the rest of the route's: its loss.
    async fn forward_hop(
        &self,
        hops: &Hops,
        mb: u32,
        ids: Wire,
        labels: Wire,
    ) -> Result<Event, PipeError> {
        let acts = match self.forward(&hops.key, mb, &ids, None).await? {
            Out::Acts(w) => w,
            Out::Loss(_) => return Err(PipeError::Engine("driver computed a loss".into())),
        };
        let pipe_wire = self.config().training.pipeline_wire;
        self.oplog.record(&super::oplog::Op::Route {
            dir: super::oplog::Dir::Forward,
            driver: hops.key.driver.clone(),
            step: hops.key.step,
            mb,
            to: hops.first.conn.id,
        });
        let req = pb::PipelineForwardRequest {
            auth: None,
            step: hops.key.step,
            micro_batch: mb,
            activations: Some(acts.to_pb_as(pipe_wire)),
            labels: Some(labels.to_pb()),
            layer_start: hops.first.layers.start,
            route: hops.rest.clone(),
            driver: hops.key.driver.clone(),
        };
        self.counters.tensor_bytes.fetch_add(
            wire_len(req.activations.as_ref()) + wire_len(req.labels.as_ref()),
            Ordering::Relaxed,
        );
        let first = &hops.first;
        let stage = first.conn.id.to_string();
        let r = within(hops.secs, &stage, async {
            first
                .conn
                .pipeline_forward(req, hops.timeout())
                .await
                .map_err(|e| peer_err(first, e))
        })
        .await?;
        if !r.loss.is_finite() {
            return Err(PipeError::Peer {
                stage,
                message: format!("loss {}", r.loss),
            });
        }
        self.keep_receipt(first, ReceiptKind::Forward, &r.receipt);
        Ok(Event::Forwarded { mb, loss: r.loss })
    }

    /// The backward of micro-batch `mb` down the route, then this stage's with the gradient
    /// that came back (`shape`: the micro-batch's rows and sequence length).
    async fn backward_hop(
        &self,
        hops: &Hops,
        mb: u32,
        model: ModelConfig,
        shape: (u64, u64),
    ) -> Result<Event, PipeError> {
        let req = pb::PipelineBackwardRequest {
            auth: None,
            step: hops.key.step,
            micro_batch: mb,
            route: hops.rest.clone(),
            driver: hops.key.driver.clone(),
        };
        let first = &hops.first;
        let stage = first.conn.id.to_string();
        let r = within(hops.secs, &stage, async {
            first
                .conn
                .pipeline_backward(req, hops.timeout())
                .await
                .map_err(|e| peer_err(first, e))
        })
        .await?;
        let grad = check_acts(r.grad_input.as_ref(), "grad_input", &model, Some(shape))
            .inspect_err(|_| {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
            })?;
        self.counters
            .tensor_bytes
            .fetch_add(wire_len(r.grad_input.as_ref()), Ordering::Relaxed);
        // The first stage's backward work, attested (and logged as received); it gets the
        // receipt with the optimizer request.
        self.received(
            first.conn.id,
            &hops.key,
            mb,
            &grad,
            (super::oplog::Dir::Backward, first.layers.start),
        );
        self.backward(&hops.key, mb, Some(&grad)).await?;
        Ok(Event::BackwardDone { mb })
    }

    /// Phase `norm`: this stage's squared gradient norm, then the route's (checked).
    async fn gather_norm(&self, hops: &Hops) -> Result<Event, PipeError> {
        let local = self.sq_norm(&hops.key).await?;
        let receipt = self.backward_receipt(&hops.first.conn.id);
        let remote = hops.optimizer(Phase::Norm, 0.0, receipt).await?.sq_norm;
        if !(remote.is_finite() && remote >= 0.0) {
            return Err(PipeError::Peer {
                stage: hops.first.conn.id.to_string(),
                message: format!("squared norm {remote}"),
            });
        }
        Ok(Event::NormGathered { local, remote })
    }

    /// Phase `apply`: this stage and the route step their optimizers at the same time.
    async fn apply_all(&self, hops: &Hops, global_norm: f32) -> Result<Event, PipeError> {
        let (optimizer_step, _) = tokio::try_join!(
            self.apply(&hops.key, global_norm),
            hops.optimizer(Phase::Apply, global_norm, Vec::new())
        )?;
        Ok(Event::Applied { optimizer_step })
    }
}
