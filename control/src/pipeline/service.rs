//! The receiving side of the pipeline RPCs (the `Pipeline` peer service): check the peer's
//! tensors, run this stage on the engine, call the next stage of the route, answer with what
//! came back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::pipeline_server::{Pipeline as PipelineRpc, PipelineServer};
use tonic::{Request, Response, Status};

use super::oplog::{Dir, Op};
use super::phase::Phase;
use super::stage::StepKey;
use super::{Hop, Out, PipeError, Stage, check_acts, check_labels, peer_err, wire_len, within};
use neuroshard_ledger::Address;
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_net::MAX_MESSAGE_BYTES;
use neuroshard_net::Network;
use neuroshard_net::service::{PeerEdge, WeightsStream};

/// Most stages a route may name.
const MAX_ROUTE: usize = 64;

impl Stage {
    /// Pipeline training calls come from the stage before this one: a connected peer whose
    /// layers end where this stage's begin. Anyone else (a peer holding other layers, a
    /// stranger) could otherwise inject micro-batches into this stage's gradients or move its
    /// step id on.
    pub fn check_upstream(&self, net: &Network, caller: &Address) -> Result<(), PipeError> {
        let a = self.ready()?;
        let upstream = net
            .peers
            .conns_with_info()
            .into_iter()
            .find(|(c, _)| &c.id == caller)
            .and_then(|(_, info)| info.layers.iter().max().map(|l| l + 1));
        if upstream == Some(a.layers.start) {
            return Ok(());
        }
        Err(self.refused(PipeError::Refused(format!(
            "{caller} is not a stage before this one (layers from {})",
            a.layers.start
        ))))
    }

    fn refused(&self, e: PipeError) -> PipeError {
        if matches!(e, PipeError::Refused(_)) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "pipeline request refused");
        }
        e
    }

    /// Fails a step whose request was checked against layers this stage no longer holds (a
    /// takeover reloaded the engine meanwhile): its result is not the route's.
    fn same_layers(&self, checked: &super::Assignment) -> Result<(), PipeError> {
        match self.assignment() {
            Some(now) if &now == checked => Ok(()),
            _ => Err(PipeError::NotReady(
                "this stage's layers changed during the step".into(),
            )),
        }
    }

    /// The connection to the next stage of `route`, and the rest of the route after it.
    fn next_hop(&self, net: &Network, route: &[String]) -> Result<(Hop, Vec<String>), PipeError> {
        if route.len() > MAX_ROUTE {
            return Err(PipeError::Refused(format!(
                "route names {} stages (at most {MAX_ROUTE})",
                route.len()
            )));
        }
        let id = route
            .first()
            .ok_or_else(|| PipeError::Refused("route ends before the head".into()))?;
        let (conn, info) = net
            .peers
            .conns_with_info()
            .into_iter()
            .find(|(c, _)| &c.id.to_string() == id)
            .ok_or_else(|| PipeError::NoRoute(format!("not connected to stage {id}")))?;
        let first = info.layers.iter().min().copied().unwrap_or(0);
        let last = info.layers.iter().max().copied().unwrap_or(0);
        Ok((
            Hop {
                conn,
                layers: first..last + 1,
            },
            route[1..].to_vec(),
        ))
    }

    /// PipelineForward: activations in, this stage's layers, then the next stage; the loss back.
    pub async fn serve_forward(
        &self,
        net: &Network,
        caller: &Address,
        req: pb::PipelineForwardRequest,
    ) -> Result<pb::PipelineForwardReply, PipeError> {
        let a = self.ready()?;
        let m = self.model()?;
        let checked = (|| {
            if a.has_embedding() {
                return Err(PipeError::Refused(
                    "this node is the first stage; it takes no activations".into(),
                ));
            }
            if req.layer_start != a.layers.start {
                return Err(PipeError::Refused(format!(
                    "activations for layer {}, this stage starts at {}",
                    req.layer_start, a.layers.start
                )));
            }
            if a.has_head() != req.route.is_empty() {
                return Err(PipeError::Refused(
                    "the route must end at the stage that holds the head".into(),
                ));
            }
            let acts = check_acts(req.activations.as_ref(), "activations", &m, None)?;
            let labels = check_labels(req.labels.as_ref(), &m, acts.shape[0], acts.shape[1])?;
            Ok((acts, labels))
        })();
        let (acts, labels) = checked.map_err(|e| self.refused(e))?;
        self.counters.tensor_bytes.fetch_add(
            wire_len(req.activations.as_ref()) + wire_len(req.labels.as_ref()),
            Ordering::Relaxed,
        );
        let secs = self.config().training.pipeline_timeout_secs;
        let key = StepKey::new(req.driver.clone(), req.step);
        let out = self
            .forward(
                &key,
                req.micro_batch,
                &acts,
                a.has_head().then_some(&labels),
            )
            .await
            .map_err(|e| self.refused(e))?;
        // The caller's forward work, attested: these activations reached this stage. Every
        // logged forward is receipted and logged as received (a verifier checks the logged
        // input against this receipt), so it is signed before anything else can fail.
        let receipt = crate::attest::to_bytes(&self.received(
            *caller,
            &key,
            req.micro_batch,
            &acts,
            (Dir::Forward, a.layers.start),
        ));
        self.same_layers(&a)?;
        match out {
            Out::Loss(loss) => {
                self.stats.lock().loss = Some(loss);
                Ok(pb::PipelineForwardReply { loss, receipt })
            }
            Out::Acts(out) => {
                let (hop, rest) = self
                    .next_hop(net, &req.route)
                    .map_err(|e| self.refused(e))?;
                self.oplog.record(&Op::Route {
                    dir: Dir::Forward,
                    driver: req.driver.clone(),
                    step: req.step,
                    mb: req.micro_batch,
                    to: hop.conn.id,
                });
                let next = pb::PipelineForwardRequest {
                    auth: None,
                    step: req.step,
                    micro_batch: req.micro_batch,
                    activations: Some(out.to_pb_as(self.config().training.pipeline_wire)),
                    labels: Some(labels.to_pb()),
                    layer_start: a.layers.end,
                    route: rest,
                    driver: req.driver.clone(),
                };
                self.counters.tensor_bytes.fetch_add(
                    wire_len(next.activations.as_ref()) + wire_len(next.labels.as_ref()),
                    Ordering::Relaxed,
                );
                let reply = within(secs, &hop.conn.id.to_string(), async {
                    hop.conn
                        .pipeline_forward(next, Duration::from_secs(u64::from(secs)))
                        .await
                        .map_err(|e| peer_err(&hop, e))
                })
                .await?;
                // The next stage's receipt is for this stage's work; the caller gets ours.
                self.keep_receipt(&hop, ReceiptKind::Forward, &reply.receipt);
                // The route's loss is this stage's training loss too (a middle stage computes
                // none; without one its proofs could not claim its training).
                if reply.loss.is_finite() && reply.loss > 0.0 {
                    self.stats.lock().loss = Some(reply.loss);
                }
                Ok(pb::PipelineForwardReply {
                    loss: reply.loss,
                    receipt,
                })
            }
        }
    }

    /// Signs this stage's receipt for `tensor` (micro-batch `mb` of `key`'s step), received
    /// from `from` in direction `dir` at layer boundary `boundary`, and logs it as received
    /// (`oplog::Op::Received`): the log's inputs are then bound to receipts its senders hold.
    pub(super) fn received(
        &self,
        from: Address,
        key: &StepKey,
        mb: u32,
        tensor: &super::Wire,
        (dir, boundary): (Dir, u32),
    ) -> neuroshard_ledger::receipt::SignedReceipt {
        self.oplog.record(&Op::Received {
            at_ms: neuroshard_net::now_ms(),
            dir,
            driver: key.driver.clone(),
            step: key.step,
            mb,
            from: self.logged_sender(from),
            digest: self.logged_digest(dir, key, mb, tensor),
        });
        let kind = match dir {
            Dir::Forward => ReceiptKind::Forward,
            Dir::Backward => ReceiptKind::Backward,
        };
        self.attest
            .receive(from, kind, boundary, key.step, mb, &tensor.data)
    }

    /// This node's latest backward receipt for `subject`, as the wire carries it (empty when
    /// there is none this epoch).
    pub(super) fn backward_receipt(&self, subject: &Address) -> Vec<u8> {
        self.attest
            .latest(subject, ReceiptKind::Backward)
            .map(|r| crate::attest::to_bytes(&r))
            .unwrap_or_default()
    }

    /// Keeps a receipt the stage `hop` signed for this node's work; a bad one is counted as a
    /// refused peer message and changes nothing (the step itself went through).
    pub(super) fn keep_receipt(&self, hop: &Hop, kind: ReceiptKind, bytes: &[u8]) {
        if let Err(e) = self.attest.keep(&hop.conn.id, kind, bytes) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(stage = %hop.conn.id, error = %e, "receipt refused");
        }
    }

    /// PipelineBackward: the next stage's gradient (or the loss on the last stage), this
    /// stage's backward, the gradient w.r.t. this stage's input back.
    pub async fn serve_backward(
        &self,
        net: &Network,
        caller: &Address,
        req: pb::PipelineBackwardRequest,
    ) -> Result<pb::PipelineBackwardReply, PipeError> {
        let a = self.ready()?;
        if a.has_embedding() {
            return Err(self.refused(PipeError::Refused(
                "the first stage takes no backward from a peer".into(),
            )));
        }
        let grad = if a.has_head() {
            if !req.route.is_empty() {
                return Err(self.refused(PipeError::Refused(
                    "the route must end at the stage that holds the head".into(),
                )));
            }
            None
        } else {
            let m = self.model()?;
            let secs = self.config().training.pipeline_timeout_secs;
            let (hop, rest) = self
                .next_hop(net, &req.route)
                .map_err(|e| self.refused(e))?;
            let next = pb::PipelineBackwardRequest {
                auth: None,
                step: req.step,
                micro_batch: req.micro_batch,
                route: rest,
                driver: req.driver.clone(),
            };
            let r = within(secs, &hop.conn.id.to_string(), async {
                hop.conn
                    .pipeline_backward(next, Duration::from_secs(u64::from(secs)))
                    .await
                    .map_err(|e| peer_err(&hop, e))
            })
            .await?;
            let g = check_acts(r.grad_input.as_ref(), "grad_input", &m, None)
                .map_err(|e| self.refused(e))?;
            // The next stage's backward work, attested (and logged as received); it gets the
            // receipt with the next optimizer request.
            let key = StepKey::new(req.driver.clone(), req.step);
            self.received(
                hop.conn.id,
                &key,
                req.micro_batch,
                &g,
                (Dir::Backward, a.layers.end),
            );
            self.counters
                .tensor_bytes
                .fetch_add(wire_len(r.grad_input.as_ref()), Ordering::Relaxed);
            Some(g)
        };
        let gi = self
            .backward(
                &StepKey::new(req.driver.clone(), req.step),
                req.micro_batch,
                grad.as_ref(),
            )
            .await
            .map_err(|e| self.refused(e))?
            .ok_or_else(|| PipeError::Engine("no input gradient from the engine".into()))?;
        self.same_layers(&a)?;
        self.oplog.record(&Op::Route {
            dir: Dir::Backward,
            driver: req.driver.clone(),
            step: req.step,
            mb: req.micro_batch,
            to: *caller,
        });
        let grad_input = gi.to_pb_as(self.config().training.pipeline_wire);
        self.counters
            .tensor_bytes
            .fetch_add(wire_len(Some(&grad_input)), Ordering::Relaxed);
        Ok(pb::PipelineBackwardReply {
            grad_input: Some(grad_input),
        })
    }

    /// PipelineStep: "norm" sums squared gradient norms down the route; "apply" steps every
    /// stage's optimizer with the global norm.
    pub async fn serve_step(
        &self,
        net: &Network,
        caller: &Address,
        req: pb::PipelineStepRequest,
    ) -> Result<pb::PipelineStepReply, PipeError> {
        let a = self.ready()?;
        if !req.receipt.is_empty()
            && let Err(e) = self
                .attest
                .keep(caller, ReceiptKind::Backward, &req.receipt)
        {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(stage = %caller, error = %e, "receipt refused");
        }
        if a.has_embedding() {
            return Err(self.refused(PipeError::Refused(
                "the first stage takes no optimizer step from a peer".into(),
            )));
        }
        if a.has_head() != req.route.is_empty() {
            return Err(self.refused(PipeError::Refused(
                "the route must end at the stage that holds the head".into(),
            )));
        }
        let secs = self.config().training.pipeline_timeout_secs;
        let next = if req.route.is_empty() {
            None
        } else {
            Some(
                self.next_hop(net, &req.route)
                    .map_err(|e| self.refused(e))?,
            )
        };
        let key = StepKey::new(req.driver.clone(), req.step);
        let forward = |phase: Phase, norm: f32| {
            let next = next.clone();
            let step = req.step;
            let driver = req.driver.clone();
            let receipt = next
                .as_ref()
                .map_or_else(Vec::new, |(hop, _)| self.backward_receipt(&hop.conn.id));
            async move {
                match next {
                    None => Ok(pb::PipelineStepReply::default()),
                    Some((hop, rest)) => {
                        within(secs, &hop.conn.id.to_string(), async {
                            hop.conn
                                .pipeline_step(
                                    pb::PipelineStepRequest {
                                        auth: None,
                                        step,
                                        phase: phase.as_str().into(),
                                        global_norm: norm,
                                        route: rest,
                                        receipt,
                                        driver,
                                    },
                                    Duration::from_secs(u64::from(secs)),
                                )
                                .await
                                .map_err(|e| peer_err(&hop, e))
                        })
                        .await
                    }
                }
            }
        };
        let Some(phase) = Phase::parse(&req.phase) else {
            return Err(self.refused(PipeError::Refused(format!(
                "unknown phase {:?} (norm or apply)",
                req.phase
            ))));
        };
        match phase {
            Phase::Norm => {
                let local = self.sq_norm(&key).await.map_err(|e| self.refused(e))?;
                let rest = forward(Phase::Norm, 0.0).await?.sq_norm;
                if !(rest.is_finite() && rest >= 0.0) {
                    return Err(PipeError::Peer {
                        stage: "next".into(),
                        message: format!("squared norm {rest}"),
                    });
                }
                Ok(pb::PipelineStepReply {
                    sq_norm: local + rest,
                    optimizer_step: 0,
                })
            }
            Phase::Apply => {
                let (local, _) = tokio::try_join!(
                    async {
                        self.apply(&key, req.global_norm)
                            .await
                            .map_err(|e| self.refused(e))
                    },
                    forward(Phase::Apply, req.global_norm)
                )?;
                Ok(pb::PipelineStepReply {
                    sq_norm: 0.0,
                    optimizer_step: local,
                })
            }
        }
    }
}

/// The `Pipeline` peer service: a stage's part of training steps and of generations, and its
/// snapshot for a node taking its layers over.
pub struct PipelineService {
    edge: PeerEdge,
    stage: Arc<Stage>,
    /// What this node kept of its paid generations, for verifiers (issue #19).
    evidence: Arc<crate::evidence::Store>,
}

impl PipelineService {
    /// The service with the peer port's message limits, for the daemon to plug in.
    pub fn server(
        edge: PeerEdge,
        stage: Arc<Stage>,
        evidence: Arc<crate::evidence::Store>,
    ) -> PipelineServer<PipelineService> {
        PipelineServer::new(PipelineService {
            edge,
            stage,
            evidence,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl PipelineRpc for PipelineService {
    type GetStageWeightsStream = WeightsStream;
    type GetStageLogStream = WeightsStream;

    async fn get_stage_log(
        &self,
        req: Request<pb::GetStageLogRequest>,
    ) -> Result<Response<Self::GetStageLogStream>, Status> {
        let (body, _) = self.edge.verify(req)?;
        // A segment of this stage's operation log, for a verifier recomputing our work.
        let log = &self.stage.oplog;
        let not_kept = || {
            Status::not_found(format!(
                "no operation log segment kept for {} ms",
                body.at_ms
            ))
        };
        let id = if body.after_segment > 0 {
            log.after(body.after_segment)
        } else {
            log.covering(body.at_ms)
        }
        .ok_or_else(not_kept)?;
        match log.read(id) {
            Ok(Some((info, checkpoint, ops))) => Ok(Response::new(self.edge.weights_stream(
                id,
                info.checkpoint_sha256,
                super::oplog::pack(info.started_ms, &checkpoint, &ops),
            ))),
            Ok(None) => Err(not_kept()),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn get_inference_evidence(
        &self,
        req: Request<pb::GetInferenceEvidenceRequest>,
    ) -> Result<Response<pb::InferenceEvidence>, Status> {
        let (body, _) = self.edge.verify(req)?;
        let id = body.request_id;
        if !crate::evidence::valid_id(&id) {
            return Err(Status::invalid_argument(format!(
                "request id {:?} is not 1 to {} letters, digits, '_' or '-'",
                id.chars().take(80).collect::<String>(),
                crate::evidence::MAX_ID_LEN
            )));
        }
        match self.evidence.get(&id) {
            Ok(Some(ev)) => Ok(Response::new(ev.into())),
            Ok(None) => Err(Status::not_found(format!(
                "no evidence kept for request {id}"
            ))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn get_stage_weights(
        &self,
        req: Request<pb::GetStageWeightsRequest>,
    ) -> Result<Response<Self::GetStageWeightsStream>, Status> {
        let (body, _) = self.edge.verify(req)?;
        // A pipeline stage's current checkpoint, for a node taking over or joining with some
        // of its layers.
        if body.layers.len() > 4096 {
            return Err(Status::invalid_argument("too many layers requested"));
        }
        let (hash, bytes) = self.stage.snapshot(&body.layers).await?;
        Ok(Response::new(self.edge.weights_stream(0, hash, bytes)))
    }

    async fn pipeline_forward(
        &self,
        req: Request<pb::PipelineForwardRequest>,
    ) -> Result<Response<pb::PipelineForwardReply>, Status> {
        let (body, v) = self.edge.verify(req)?;
        let stage = &self.stage;
        stage.check_upstream(&self.edge.net, &v.peer)?;
        let reply = stage.serve_forward(&self.edge.net, &v.peer, body).await?;
        Ok(self.edge.sent(reply))
    }

    async fn pipeline_backward(
        &self,
        req: Request<pb::PipelineBackwardRequest>,
    ) -> Result<Response<pb::PipelineBackwardReply>, Status> {
        let (body, v) = self.edge.verify(req)?;
        let stage = &self.stage;
        stage.check_upstream(&self.edge.net, &v.peer)?;
        let reply = stage.serve_backward(&self.edge.net, &v.peer, body).await?;
        Ok(self.edge.sent(reply))
    }

    async fn pipeline_step(
        &self,
        req: Request<pb::PipelineStepRequest>,
    ) -> Result<Response<pb::PipelineStepReply>, Status> {
        let (body, v) = self.edge.verify(req)?;
        let stage = &self.stage;
        stage.check_upstream(&self.edge.net, &v.peer)?;
        let reply = stage.serve_step(&self.edge.net, &v.peer, body).await?;
        Ok(self.edge.sent(reply))
    }

    async fn infer_forward(
        &self,
        req: Request<pb::InferForwardRequest>,
    ) -> Result<Response<pb::InferForwardReply>, Status> {
        let (body, _) = self.edge.verify(req)?;
        let stage = &self.stage;
        let reply = stage.serve_infer(body).await?;
        Ok(self.edge.sent(reply))
    }

    async fn infer_end(
        &self,
        req: Request<pb::InferEndRequest>,
    ) -> Result<Response<pb::InferEndReply>, Status> {
        let (body, _) = self.edge.verify(req)?;
        let stage = &self.stage;
        let reply = stage.serve_infer_end(body).await;
        Ok(self.edge.sent(reply))
    }
}
