//! The `Diloco` peer service: a replica's pseudo-gradient for a round (PushDelta, checked and
//! filed for the round's aggregation) and the weights a round started from (GetWeights, for
//! a replica that fell behind).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::diloco_server::{Diloco as DilocoRpc, DilocoServer};
use tonic::{Request, Response, Status};

use super::round::Diloco;
use neuroshard_net::MAX_MESSAGE_BYTES;
use neuroshard_net::score::node_key;
use neuroshard_net::service::{PeerEdge, WeightsStream};

pub struct DilocoService {
    edge: PeerEdge,
    diloco: Arc<Diloco>,
}

impl DilocoService {
    /// The service with the peer port's message limits, for the daemon to plug in.
    pub fn server(edge: PeerEdge, diloco: Arc<Diloco>) -> DilocoServer<DilocoService> {
        DilocoServer::new(DilocoService { edge, diloco })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The receipt of `sender`'s aggregated contributions waiting for it, if any.
    fn receipt_for(&self, sender: &str) -> Vec<u8> {
        self.diloco
            .receipts
            .lock()
            .remove(sender)
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl DilocoRpc for DilocoService {
    type GetWeightsStream = WeightsStream;
    type GetRoundCheckpointStream = WeightsStream;

    async fn get_round_checkpoint(
        &self,
        req: Request<pb::GetRoundCheckpointRequest>,
    ) -> Result<Response<Self::GetRoundCheckpointStream>, Status> {
        let (body, _) = self.edge.verify(req)?;
        if body.window_len > 0 {
            // A replay window of a recent round (`diloco::window`), recomputed for the
            // verifier that drew it.
            use super::window::WindowError as W;
            let (root, bytes) = self
                .diloco
                .verifier
                .serve_window(body.round, body.window_start, body.window_len)
                .await
                .map_err(|e| match e {
                    W::NotKept(_) => Status::not_found(e.to_string()),
                    W::Invalid(_) => Status::invalid_argument(e.to_string()),
                    W::Busy => Status::resource_exhausted(e.to_string()),
                    W::Failed(_) => Status::internal(e.to_string()),
                })?;
            return Ok(Response::new(
                self.edge.weights_stream(body.round, root, bytes),
            ));
        }
        // A recent round's starting checkpoint, for a verifier replaying our contribution.
        let Some((sha, bytes)) = self.diloco.verifier.start_file(body.round) else {
            return Err(Status::not_found(format!(
                "no checkpoint kept for round {}",
                body.round
            )));
        };
        Ok(Response::new(
            self.edge.weights_stream(body.round, sha, bytes),
        ))
    }

    async fn get_weights(
        &self,
        req: Request<pb::GetWeightsRequest>,
    ) -> Result<Response<Self::GetWeightsStream>, Status> {
        self.edge.verify(req)?;
        // The weights and outer momentum the current DiLoCo round started from: what a
        // replica that fell behind adopts.
        let Some((round, hash, bytes)) = self.diloco.snapshot() else {
            return Err(Status::unavailable("no model loaded yet; retry later"));
        };
        Ok(Response::new(self.edge.weights_stream(round, hash, bytes)))
    }

    async fn push_delta(
        &self,
        req: Request<pb::DeltaMessage>,
    ) -> Result<Response<pb::DeltaAck>, Status> {
        let (body, v) = self.edge.verify(req)?;
        let commitment = super::verify::Commitment {
            start_checkpoint: body.start_checkpoint.clone(),
            data_id: body.data_id.clone(),
            replay_class: body.replay_class.clone(),
            step_root: body.step_root.clone(),
        };
        let msg = super::validate::WireDelta {
            sender: v.peer.to_string(),
            round: body.round,
            model_hash: body.model_hash,
            loss: body.loss,
            batches: body.batches,
            encoding: super::compress::Encoding::parse(&body.encoding),
            tensors: body
                .tensors
                .into_iter()
                .map(|t| super::validate::WireTensor {
                    name: t.name,
                    shape: t.shape,
                    data: t.data,
                })
                .collect(),
        };
        use super::validate::Reject;
        match self.diloco.receive(&msg) {
            Ok(()) => {
                self.diloco
                    .verifier
                    .committed(&msg.sender, msg.round, commitment);
                Ok(self.edge.sent(pb::DeltaAck {
                    accepted: true,
                    reason: String::new(),
                    receipt: self.receipt_for(&msg.sender),
                }))
            }
            Err(reason) => {
                self.edge
                    .net
                    .state
                    .rejected_messages
                    .fetch_add(1, Ordering::Relaxed);
                // Lagging or early honest replicas send stale, future or duplicate deltas;
                // only a delta no honest replica sends costs the sender score.
                if matches!(
                    reason,
                    Reject::Malformed
                        | Reject::WrongShape
                        | Reject::NonFinite
                        | Reject::NormTooLarge
                ) && self.edge.net.scores.penalize(
                    &node_key(&v.peer),
                    neuroshard_net::score::Offence::BadLedgerMessage,
                    1,
                    Instant::now(),
                ) {
                    tracing::warn!(peer = %v.peer, "peer banned after sending bad pseudo-gradients");
                }
                tracing::debug!(peer = %v.peer, round = msg.round, reason = reason.name(), "pseudo-gradient refused");
                Ok(self.edge.sent(pb::DeltaAck {
                    accepted: false,
                    reason: reason.name().into(),
                    receipt: self.receipt_for(&msg.sender),
                }))
            }
        }
    }
}
