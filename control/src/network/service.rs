//! The peer gRPC service (server side). Every handler counts its bytes, verifies the signed
//! auth (except the two handshake calls), and refuses with a clear status; none panics on
//! peer input.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use neuroshard_proto::Message as _;
use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::peer_server::{Peer, PeerServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::auth::{self, Authed, Verified};
use super::error::NetworkError;
use super::score::node_key;
use super::{
    MAX_CONCURRENT_PER_CONNECTION, MAX_GOSSIP_MESSAGES, MAX_LEDGER_MESSAGE_BYTES, Network,
    SERVER_TIMEOUT, SYNC_PAGE, gossip, manager, now_ms,
};
use crate::peer::MAX_MESSAGE_BYTES;

/// Longest role name, address and layer list accepted in a peer's node info.
const MAX_ROLE_CHARS: usize = 32;
const MAX_ADDRESS_CHARS: usize = 256;
const MAX_LAYERS: usize = 4096;
const MAX_HASH_CHARS: usize = 128;
/// Bytes per chunk of a weights transfer.
const WEIGHTS_CHUNK: usize = 4 << 20;

pub struct PeerService {
    net: Arc<Network>,
}

impl PeerService {
    pub fn new(net: Arc<Network>) -> PeerService {
        PeerService { net }
    }

    fn received<T: neuroshard_proto::Message>(&self, req: &Request<T>) {
        self.net
            .state
            .bytes_received
            .fetch_add(req.get_ref().encoded_len() as u64, Ordering::Relaxed);
    }

    fn sent<T: neuroshard_proto::Message>(&self, reply: T) -> Response<T> {
        self.net
            .state
            .bytes_sent
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        Response::new(reply)
    }

    /// Verifies a signed request: a known, unbanned node, in the window, not replayed.
    fn verify<T: Authed>(&self, req: Request<T>) -> Result<(T, Verified), NetworkError> {
        self.received(&req);
        let now = Instant::now();
        let (body, verified) = self.net.auth.verify(req.into_inner(), now_ms(), now)?;
        if let Some(seconds_left) = self.net.scores.banned(&node_key(&verified.peer), now) {
            return Err(NetworkError::Banned {
                who: verified.peer.to_string(),
                seconds_left,
            });
        }
        Ok((body, verified))
    }
}

/// Checks the fields of a peer's node info.
fn check_node_info(node: &pb::NodeInfo) -> Result<(), NetworkError> {
    let malformed = |reason: String| NetworkError::Malformed {
        what: "node info",
        reason,
    };
    if node.role.chars().count() > MAX_ROLE_CHARS {
        return Err(malformed(format!(
            "role longer than {MAX_ROLE_CHARS} characters"
        )));
    }
    if node.address.chars().count() > MAX_ADDRESS_CHARS {
        return Err(malformed(format!(
            "address longer than {MAX_ADDRESS_CHARS} characters"
        )));
    }
    if node.round_hash.len() > MAX_HASH_CHARS {
        return Err(malformed(format!(
            "round hash longer than {MAX_HASH_CHARS} characters"
        )));
    }
    if node.layers.len() > MAX_LAYERS {
        return Err(malformed(format!("more than {MAX_LAYERS} layers")));
    }
    manager::port_of(&node.address)
        .ok_or_else(|| malformed(format!("address {:?} is not host:port", node.address)))?;
    Ok(())
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn challenge(
        &self,
        req: Request<pb::ChallengeRequest>,
    ) -> Result<Response<pb::ChallengeReply>, Status> {
        self.received(&req);
        let challenge = self.net.auth.issue_challenge(Instant::now()).to_vec();
        Ok(self.sent(pb::ChallengeReply { challenge }))
    }

    async fn handshake(
        &self,
        req: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeReply>, Status> {
        self.received(&req);
        let remote = req.remote_addr();
        let body = req.into_inner();
        let node = body.node.ok_or(NetworkError::Malformed {
            what: "handshake",
            reason: "no node info".into(),
        })?;
        check_node_info(&node)?;
        if body.challenge.len() != 32 {
            return Err(NetworkError::Malformed {
                what: "handshake",
                reason: format!("challenge is {} bytes, 32 expected", body.challenge.len()),
            }
            .into());
        }
        let now = Instant::now();
        if !self.net.auth.take_challenge(&body.server_challenge, now) {
            return Err(NetworkError::Handshake {
                addr: remote.map(|a| a.to_string()).unwrap_or_default(),
                reason: "unknown, used or expired challenge".into(),
            }
            .into());
        }
        let digest = auth::client_handshake_digest(&body.server_challenge, &body.challenge, &node);
        let peer = auth::verify_signer(&digest, &body.signature, &node.node_id)?;
        if peer == self.net.id() {
            return Err(NetworkError::SelfConnection {
                addr: remote.map(|a| a.to_string()).unwrap_or_default(),
            }
            .into());
        }
        if let Some(seconds_left) = self.net.scores.banned(&node_key(&peer), now) {
            return Err(NetworkError::Banned {
                who: peer.to_string(),
                seconds_left,
            }
            .into());
        }
        // The peer's service address: the IP its connection came from, the port it announced.
        if let (Some(remote), Some(port)) = (remote, manager::port_of(&node.address)) {
            manager::learn_address(&self.net, &manager::join_host_port(remote.ip(), port));
        }
        self.net
            .auth
            .open_session(peer, remote.map(|a| a.ip()), node, now);
        tracing::debug!(%peer, ?remote, "peer handshake accepted");
        let mine = self.net.local_info();
        let signature = self
            .net
            .wallet
            .sign_digest(&auth::server_handshake_digest(&body.challenge, &mine))
            .0
            .to_vec();
        Ok(self.sent(pb::HandshakeReply {
            node: Some(mine),
            signature,
        }))
    }

    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        let (body, _v) = self.verify(req)?;
        Ok(self.sent(pb::PingReply {
            node_id: self.net.id().to_string(),
            sent_at_ms: body.sent_at_ms,
            received_at_ms: now_ms(),
            node: Some(self.net.local_info()),
        }))
    }

    async fn get_peers(
        &self,
        req: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersReply>, Status> {
        let (_, v) = self.verify(req)?;
        let peers = self
            .net
            .peers
            .node_infos()
            .into_iter()
            .filter(|p| p.node_id != v.peer.to_string())
            .collect();
        Ok(self.sent(pb::GetPeersReply { peers }))
    }

    async fn gossip(
        &self,
        req: Request<pb::GossipRequest>,
    ) -> Result<Response<pb::GossipReply>, Status> {
        let (body, v) = self.verify(req)?;
        match body.kind.as_str() {
            "ledger" => {}
            "proof" | "gradient" => {
                return Err(NetworkError::NotServed {
                    what: "proof and gradient gossip",
                }
                .into());
            }
            other => {
                return Err(NetworkError::Malformed {
                    what: "gossip",
                    reason: format!(
                        "unknown kind {:?}",
                        other.chars().take(32).collect::<String>()
                    ),
                }
                .into());
            }
        }
        if body.messages.len() > MAX_GOSSIP_MESSAGES {
            return Err(NetworkError::TooMany {
                what: "gossip messages",
                count: body.messages.len(),
                max: MAX_GOSSIP_MESSAGES,
            }
            .into());
        }
        if let Some(big) = body
            .messages
            .iter()
            .find(|m| m.len() > MAX_LEDGER_MESSAGE_BYTES)
        {
            return Err(NetworkError::TooLarge {
                what: "ledger message",
                size: big.len(),
                max: MAX_LEDGER_MESSAGE_BYTES,
            }
            .into());
        }
        let tally = gossip::receive(&self.net, v.peer, &body.messages).await?;
        Ok(self.sent(pb::GossipReply {
            accepted: tally.accepted,
            rejected: tally.rejected,
            duplicates: tally.duplicates,
        }))
    }

    async fn sync_ledger(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncReply>, Status> {
        let (body, _v) = self.verify(req)?;
        if body.after_seq < 0 {
            return Err(NetworkError::Malformed {
                what: "sync request",
                reason: format!("after_seq {} is negative", body.after_seq),
            }
            .into());
        }
        let limit = body.limit.clamp(1, SYNC_PAGE);
        let page = self
            .net
            .ledger
            .messages_since(body.after_seq, i64::from(limit))
            .await
            .map_err(NetworkError::from)?;
        let next_seq = page.last().map(|(s, _)| *s).unwrap_or(body.after_seq);
        let (seqs, messages) = page.into_iter().map(|(s, m)| (s, m.to_bytes())).unzip();
        Ok(self.sent(pb::SyncReply {
            messages,
            seqs,
            next_seq,
        }))
    }

    type GetWeightsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WeightsChunk, Status>>;

    async fn get_weights(
        &self,
        req: Request<pb::GetWeightsRequest>,
    ) -> Result<Response<Self::GetWeightsStream>, Status> {
        let (body, _) = self.verify(req)?;
        let (round, hash, bytes) = if body.layers.is_empty() {
            // The weights and outer momentum the current DiLoCo round started from: what a
            // replica that fell behind adopts.
            let Some(snap) = self.net.diloco.snapshot() else {
                return Err(Status::unavailable("no model loaded yet; retry later"));
            };
            snap
        } else {
            // A pipeline stage's current checkpoint, for a node taking over or joining with
            // some of its layers.
            if body.layers.len() > 4096 {
                return Err(Status::invalid_argument("too many layers requested"));
            }
            let stage = self.stage()?;
            let (hash, bytes) = stage.snapshot(&body.layers).await?;
            (0, hash, bytes)
        };
        let chunks: Vec<pb::WeightsChunk> = {
            let parts: Vec<&[u8]> = bytes.chunks(WEIGHTS_CHUNK).collect();
            let n = parts.len();
            parts
                .into_iter()
                .enumerate()
                .map(|(i, data)| pb::WeightsChunk {
                    model_hash: hash.clone(),
                    data: data.to_vec(),
                    last: i + 1 == n,
                    diloco_round: round,
                })
                .collect()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let state = self.net.state.clone();
        tokio::spawn(async move {
            for c in chunks {
                state
                    .bytes_sent
                    .fetch_add(c.encoded_len() as u64, Ordering::Relaxed);
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn push_delta(
        &self,
        req: Request<pb::DeltaMessage>,
    ) -> Result<Response<pb::DeltaAck>, Status> {
        let (body, v) = self.verify(req)?;
        let msg = crate::diloco::validate::WireDelta {
            sender: v.peer.to_string(),
            round: body.round,
            model_hash: body.model_hash,
            loss: body.loss,
            batches: body.batches,
            encoding: body.encoding,
            tensors: body
                .tensors
                .into_iter()
                .map(|t| crate::diloco::validate::WireTensor {
                    name: t.name,
                    shape: t.shape,
                    data: t.data,
                })
                .collect(),
        };
        use crate::diloco::validate::Reject;
        match self.net.diloco.receive(&msg) {
            Ok(()) => Ok(self.sent(pb::DeltaAck {
                accepted: true,
                reason: String::new(),
            })),
            Err(reason) => {
                self.net
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
                ) && self.net.scores.penalize(
                    &node_key(&v.peer),
                    super::score::Offence::BadLedgerMessage,
                    1,
                    Instant::now(),
                ) {
                    tracing::warn!(peer = %v.peer, "peer banned after sending bad pseudo-gradients");
                }
                tracing::debug!(peer = %v.peer, round = msg.round, reason = reason.name(), "pseudo-gradient refused");
                Ok(self.sent(pb::DeltaAck {
                    accepted: false,
                    reason: reason.name().into(),
                }))
            }
        }
    }

    async fn pipeline_forward(
        &self,
        req: Request<pb::PipelineForwardRequest>,
    ) -> Result<Response<pb::PipelineForwardReply>, Status> {
        let (body, v) = self.verify(req)?;
        let stage = self.stage()?;
        stage.check_upstream(&self.net, &v.peer)?;
        let reply = stage.serve_forward(&self.net, body).await?;
        Ok(self.sent(reply))
    }

    async fn pipeline_backward(
        &self,
        req: Request<pb::PipelineBackwardRequest>,
    ) -> Result<Response<pb::PipelineBackwardReply>, Status> {
        let (body, v) = self.verify(req)?;
        let stage = self.stage()?;
        stage.check_upstream(&self.net, &v.peer)?;
        let reply = stage.serve_backward(&self.net, body).await?;
        Ok(self.sent(reply))
    }

    async fn pipeline_step(
        &self,
        req: Request<pb::PipelineStepRequest>,
    ) -> Result<Response<pb::PipelineStepReply>, Status> {
        let (body, v) = self.verify(req)?;
        let stage = self.stage()?;
        stage.check_upstream(&self.net, &v.peer)?;
        let reply = stage.serve_step(&self.net, body).await?;
        Ok(self.sent(reply))
    }

    async fn infer_forward(
        &self,
        req: Request<pb::InferForwardRequest>,
    ) -> Result<Response<pb::InferForwardReply>, Status> {
        let (body, _) = self.verify(req)?;
        let stage = self.stage()?;
        let reply = stage.serve_infer(body).await?;
        Ok(self.sent(reply))
    }

    async fn infer_end(
        &self,
        req: Request<pb::InferEndRequest>,
    ) -> Result<Response<pb::InferEndReply>, Status> {
        let (body, _) = self.verify(req)?;
        let stage = self.stage()?;
        let reply = stage.serve_infer_end(body).await;
        Ok(self.sent(reply))
    }
}

impl PeerService {
    fn stage(&self) -> Result<std::sync::Arc<crate::pipeline::Stage>, Status> {
        self.net
            .pipeline
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("no pipeline stage on this node"))
    }
}

/// Serves the peer service on `listener` until `shutdown` resolves.
pub async fn serve(
    net: Arc<Network>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let state = net.state.clone();
    state.listening.store(true, Ordering::Relaxed);
    // The builder's tcp_nodelay only reaches sockets tonic accepts itself: set it on ours, or
    // Nagle holds small replies back until the caller's delayed ACK (tens of ms per call).
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let result = tonic::transport::Server::builder()
        .timeout(SERVER_TIMEOUT)
        .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
        .tcp_nodelay(true)
        .layer(super::guard::GuardLayer::new(net.clone()))
        .add_service(
            PeerServer::new(PeerService::new(net))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    state.listening.store(false, Ordering::Relaxed);
    result
}
