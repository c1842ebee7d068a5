//! An authenticated connection to one peer: dial, mutual handshake, then signed requests.
//! Every call has one deadline, set per call (a ping's, the RPC default, the pipeline's, a
//! weights transfer's), and is counted in the node's traffic figures. A subsystem whose
//! calls are not here signs and sends them through [`PeerConn::call`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use neuroshard_identity::Address;
use neuroshard_proto::Message as _;
use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::diloco_client::DilocoClient;
use neuroshard_proto::peer::peer_client::PeerClient;
use neuroshard_proto::peer::pipeline_client::PipelineClient;
use tonic::Code;
use tonic::transport::Channel;

use super::auth::{self, Authed};
use super::error::NetworkError;
use super::{MAX_MESSAGE_BYTES, Network, PING_TIMEOUT, RPC_TIMEOUT, now_ms};

/// A handshaken connection. Cheap to clone (one HTTP/2 connection underneath).
#[derive(Clone)]
pub struct PeerConn {
    /// The address this node dialed.
    pub addr: String,
    /// The peer's proven identity.
    pub id: Address,
    /// What the peer said about itself in the handshake.
    pub info: pb::NodeInfo,
    channel: Channel,
    net: Arc<Network>,
}

/// A client of one of the peer port's services over `channel`, with the port's limits.
macro_rules! service_client {
    ($client:ident, $channel:expr) => {
        $client::new($channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerConn({} at {})", self.id, self.addr)
    }
}

/// Opens a channel to the node at `addr` (`host:port`) without handshaking: the peer id
/// there (known, or learned by dialing it), and a channel of streams to that peer id. The
/// channel has no timeout of its own: each call carries its deadline (tonic would cut a call
/// at the shorter of the two, so a channel timeout silently capped longer deadlines).
pub async fn dial(net: &Network, addr: &str) -> Result<(Channel, PeerId), NetworkError> {
    let transport = net.transport()?;
    let peer = transport.resolve(addr).await?;
    let channel = crate::p2p::io::channel(transport, peer, addr).await?;
    Ok((channel, peer))
}

impl PeerConn {
    /// Dials `addr` and runs the handshake: the peer proves it holds the key of the address
    /// it claims by signing our fresh challenge, and we prove ours by signing its challenge.
    pub async fn connect(net: Arc<Network>, addr: &str) -> Result<PeerConn, NetworkError> {
        let (channel, peer) = dial(&net, addr).await?;
        let mut client = service_client!(PeerClient, channel.clone());
        let rpc = |method: &'static str| {
            move |source: tonic::Status| {
                if source.code() == Code::AlreadyExists {
                    NetworkError::SelfConnection { addr: addr.into() }
                } else {
                    NetworkError::Rpc {
                        addr: addr.into(),
                        method,
                        source,
                    }
                }
            }
        };
        let counted = |sent: usize, received: usize| {
            net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
            net.state
                .bytes_sent
                .fetch_add(sent as u64, Ordering::Relaxed);
            net.state
                .bytes_received
                .fetch_add(received as u64, Ordering::Relaxed);
        };
        let server_challenge = client
            .challenge(with_deadline(pb::ChallengeRequest {}, RPC_TIMEOUT))
            .await
            .map_err(rpc("Challenge"))?
            .into_inner()
            .challenge;
        counted(0, server_challenge.len());
        let challenge: [u8; 32] = rand::random();
        let node = net.local_info();
        let digest = auth::client_handshake_digest(&server_challenge, &challenge, &node);
        let request = pb::HandshakeRequest {
            node: Some(node),
            challenge: challenge.to_vec(),
            signature: net.wallet.sign_digest(&digest).0.to_vec(),
            server_challenge,
        };
        let sent = request.encoded_len();
        let reply = client
            .handshake(with_deadline(request, RPC_TIMEOUT))
            .await
            .map_err(rpc("Handshake"))?
            .into_inner();
        counted(sent, reply.encoded_len());
        let bad = |reason: String| NetworkError::Handshake {
            addr: addr.into(),
            reason,
        };
        let info = reply
            .node
            .ok_or_else(|| bad("reply carries no node info".into()))?;
        let id = auth::verify_signer(
            &auth::server_handshake_digest(&challenge, &info),
            &reply.signature,
            &info.node_id,
        )
        .map_err(|e| bad(e.to_string()))?;
        if id == net.id() {
            return Err(NetworkError::SelfConnection { addr: addr.into() });
        }
        // The address must be the one the transport's handshake proved for this connection.
        let proven = crate::p2p::address_of(&peer).map_err(|e| bad(e.to_string()))?;
        if proven != id {
            return Err(bad(format!(
                "{id} is not the address of the connection's peer id ({proven})"
            )));
        }
        Ok(PeerConn {
            addr: addr.into(),
            id,
            info,
            channel,
            net,
        })
    }

    /// Before a heavy call (activations, deltas, weights): while the peer is reached through
    /// a relay only and hole punching may still give a direct path, waits for it a bounded
    /// time ([`crate::p2p::relay::DIRECT_WAIT`]); then the call goes whichever way is open.
    pub async fn prefer_direct(&self) {
        if let Ok(t) = self.net.transport() {
            t.wait_direct_at(&self.addr, crate::p2p::relay::DIRECT_WAIT)
                .await;
        }
    }

    /// Signs `body`, sends it with `call` (given the channel and the request) under
    /// `deadline`, counts the traffic. `method` names the call in errors.
    pub async fn call<T, R, F, Fut>(
        &self,
        method: &'static str,
        body: T,
        deadline: Duration,
        call: F,
    ) -> Result<R, NetworkError>
    where
        T: Authed,
        R: neuroshard_proto::Message,
        F: FnOnce(Channel, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let body = auth::sign_request(&self.net.wallet, body, now_ms());
        let sent = body.encoded_len();
        let state = &self.net.state;
        state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        state.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
        let reply = call(self.channel.clone(), with_deadline(body, deadline))
            .await
            .map_err(|source| NetworkError::Rpc {
                addr: self.addr.clone(),
                method,
                source,
            })?
            .into_inner();
        state
            .bytes_received
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        Ok(reply)
    }

    /// Pings the peer: the measured round-trip time in ms and the peer's current info.
    pub async fn ping(&self) -> Result<(f64, Option<pb::NodeInfo>), NetworkError> {
        let started = Instant::now();
        let witness = self.net.witness();
        let body = pb::PingRequest {
            node_id: self.net.id().to_string(),
            sent_at_ms: now_ms(),
            auth: None,
            receipt: witness
                .as_ref()
                .and_then(|w| w.latest(&self.id))
                .unwrap_or_default(),
        };
        let reply = self
            .call("Ping", body, PING_TIMEOUT, |c, r| async move {
                service_client!(PeerClient, c).ping(r).await
            })
            .await?;
        // The peer answered: it is heard (its receipt goes with the next ping), and its
        // receipt for this node's ping is kept.
        if let Some(w) = witness {
            w.heard(&self.id);
            if !reply.receipt.is_empty() {
                w.keep(&self.id, &reply.receipt);
            }
        }
        Ok((started.elapsed().as_secs_f64() * 1000.0, reply.node))
    }

    /// Peer exchange: the peers the peer is connected to.
    pub async fn get_peers(&self) -> Result<Vec<pb::NodeInfo>, NetworkError> {
        let reply = self
            .call(
                "GetPeers",
                pb::GetPeersRequest::default(),
                RPC_TIMEOUT,
                |c, r| async move { service_client!(PeerClient, c).get_peers(r).await },
            )
            .await?;
        Ok(reply.peers)
    }
}

impl PeerConn {
    /// Sends this node's pseudo-gradient for a DiLoCo round.
    pub async fn push_delta(&self, body: pb::DeltaMessage) -> Result<pb::DeltaAck, NetworkError> {
        self.prefer_direct().await;
        self.call("PushDelta", body, RPC_TIMEOUT, |c, r| async move {
            service_client!(DilocoClient, c).push_delta(r).await
        })
        .await
    }

    /// The peer's current DiLoCo round, its starting hash and the snapshot bytes (weights and
    /// momentum, safetensors), at most `max_bytes`.
    pub async fn get_weights(
        &self,
        max_bytes: usize,
    ) -> Result<(u64, String, Vec<u8>), NetworkError> {
        self.prefer_direct().await;
        let body = auth::sign_request(
            &self.net.wallet,
            pb::GetWeightsRequest { auth: None },
            now_ms(),
        );
        self.net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        let stream = service_client!(DilocoClient, self.channel.clone())
            .get_weights(with_deadline(body, WEIGHTS_TIMEOUT))
            .await;
        self.collect_weights("GetWeights", stream, max_bytes).await
    }

    /// The checkpoint the peer started DiLoCo round `round` from (what a verifier replays),
    /// and its sha256 as the peer states it; at most `max_bytes`.
    pub async fn get_round_checkpoint(
        &self,
        round: u64,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), NetworkError> {
        self.round_checkpoint(round, 0, 0, WEIGHTS_TIMEOUT, max_bytes)
            .await
    }

    /// A replay window of the peer's DiLoCo round `round` (`GetRoundCheckpointRequest`'s
    /// window): the step root as the peer states it and the served bundle; at most
    /// `max_bytes`.
    pub async fn get_round_window(
        &self,
        round: u64,
        window_start: u64,
        window_len: u32,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), NetworkError> {
        self.round_checkpoint(round, window_start, window_len, WINDOW_TIMEOUT, max_bytes)
            .await
    }

    /// `GetRoundCheckpoint`: the whole round start (`window_len` 0) or a window; the digest
    /// the peer states (sha256 or step root) and the bytes.
    async fn round_checkpoint(
        &self,
        round: u64,
        window_start: u64,
        window_len: u32,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), NetworkError> {
        self.prefer_direct().await;
        let body = auth::sign_request(
            &self.net.wallet,
            pb::GetRoundCheckpointRequest {
                auth: None,
                round,
                window_start,
                window_len,
            },
            now_ms(),
        );
        self.net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        let stream = service_client!(DilocoClient, self.channel.clone())
            .get_round_checkpoint(with_deadline(body, timeout))
            .await;
        let (_, digest, bytes) = self
            .collect_weights("GetRoundCheckpoint", stream, max_bytes)
            .await?;
        Ok((digest, bytes))
    }

    /// The segment of the peer's stage operation log that covers unix time `at_ms` (or, when
    /// `after_segment` is not 0, the one after that segment): (segment id, checkpoint sha256
    /// as the peer states it, the served bytes); at most `max_bytes`.
    pub async fn get_stage_log(
        &self,
        at_ms: i64,
        after_segment: u64,
        max_bytes: usize,
    ) -> Result<(u64, String, Vec<u8>), NetworkError> {
        let body = auth::sign_request(
            &self.net.wallet,
            pb::GetStageLogRequest {
                auth: None,
                at_ms,
                after_segment,
            },
            now_ms(),
        );
        self.net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        let stream = service_client!(PipelineClient, self.channel.clone())
            .get_stage_log(with_deadline(body, WEIGHTS_TIMEOUT))
            .await;
        self.collect_weights("GetStageLog", stream, max_bytes).await
    }

    /// A checkpoint of the peer's pipeline stage, which holds every one of `layers`, and the
    /// hash of that stage's parameters; at most `max_bytes`.
    pub async fn get_stage_weights(
        &self,
        layers: Vec<u32>,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), NetworkError> {
        self.prefer_direct().await;
        let body = auth::sign_request(
            &self.net.wallet,
            pb::GetStageWeightsRequest { auth: None, layers },
            now_ms(),
        );
        self.net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        let stream = service_client!(PipelineClient, self.channel.clone())
            .get_stage_weights(with_deadline(body, WEIGHTS_TIMEOUT))
            .await;
        let (_, hash, bytes) = self
            .collect_weights("GetStageWeights", stream, max_bytes)
            .await?;
        Ok((hash, bytes))
    }

    /// Reads a weights transfer to its last chunk: (round, hash, bytes), at most `max_bytes`,
    /// every chunk naming the same round and hash.
    async fn collect_weights(
        &self,
        method: &'static str,
        stream: Result<tonic::Response<tonic::Streaming<pb::WeightsChunk>>, tonic::Status>,
        max_bytes: usize,
    ) -> Result<(u64, String, Vec<u8>), NetworkError> {
        let addr = self.addr.clone();
        let rpc = |source: tonic::Status| NetworkError::Rpc {
            addr: addr.clone(),
            method,
            source,
        };
        let mut stream = stream.map_err(rpc)?.into_inner();
        let mut data = Vec::new();
        let mut head: Option<(u64, String)> = None;
        while let Some(chunk) = stream.message().await.map_err(rpc)? {
            self.net
                .state
                .bytes_received
                .fetch_add(chunk.encoded_len() as u64, Ordering::Relaxed);
            let key = (chunk.diloco_round, chunk.model_hash.clone());
            if head.get_or_insert_with(|| key.clone()) != &key
                || data.len() + chunk.data.len() > max_bytes
            {
                return Err(NetworkError::Malformed {
                    what: "weights transfer",
                    reason: "inconsistent chunks or too large".into(),
                });
            }
            data.extend_from_slice(&chunk.data);
            if chunk.last {
                let (round, hash) = key;
                return Ok((round, hash, data));
            }
        }
        Err(NetworkError::Malformed {
            what: "weights transfer",
            reason: "stream ended before the last chunk".into(),
        })
    }
}

impl PeerConn {
    /// Pipeline forward to this stage (and the stages after it); the loss comes back.
    pub async fn pipeline_forward(
        &self,
        body: pb::PipelineForwardRequest,
        deadline: Duration,
    ) -> Result<pb::PipelineForwardReply, NetworkError> {
        self.prefer_direct().await;
        self.call("PipelineForward", body, deadline, |c, r| async move {
            service_client!(PipelineClient, c).pipeline_forward(r).await
        })
        .await
    }

    /// Pipeline backward; the gradient w.r.t. this stage's input comes back.
    pub async fn pipeline_backward(
        &self,
        body: pb::PipelineBackwardRequest,
        deadline: Duration,
    ) -> Result<pb::PipelineBackwardReply, NetworkError> {
        self.prefer_direct().await;
        self.call("PipelineBackward", body, deadline, |c, r| async move {
            service_client!(PipelineClient, c)
                .pipeline_backward(r)
                .await
        })
        .await
    }

    /// Pipeline optimizer phase ("norm" or "apply") on this stage and those after it.
    pub async fn pipeline_step(
        &self,
        body: pb::PipelineStepRequest,
        deadline: Duration,
    ) -> Result<pb::PipelineStepReply, NetworkError> {
        self.call("PipelineStep", body, deadline, |c, r| async move {
            service_client!(PipelineClient, c).pipeline_step(r).await
        })
        .await
    }

    /// Distributed inference: this stage's layers for one generation step.
    pub async fn infer_forward(
        &self,
        body: pb::InferForwardRequest,
        deadline: Duration,
    ) -> Result<pb::InferForwardReply, NetworkError> {
        self.prefer_direct().await;
        self.call("InferForward", body, deadline, |c, r| async move {
            service_client!(PipelineClient, c).infer_forward(r).await
        })
        .await
    }

    /// What the peer kept of paid generation `request_id` (issue #19), at most
    /// [`MAX_EVIDENCE_BYTES`].
    pub async fn get_inference_evidence(
        &self,
        request_id: &str,
        deadline: Duration,
    ) -> Result<pb::InferenceEvidence, NetworkError> {
        let body = pb::GetInferenceEvidenceRequest {
            auth: None,
            request_id: request_id.to_string(),
        };
        let reply = self
            .call("GetInferenceEvidence", body, deadline, |c, r| async move {
                service_client!(PipelineClient, c)
                    .get_inference_evidence(r)
                    .await
            })
            .await?;
        if reply.encoded_len() > MAX_EVIDENCE_BYTES {
            return Err(NetworkError::Malformed {
                what: "inference evidence",
                reason: format!(
                    "{} bytes, more than {MAX_EVIDENCE_BYTES}",
                    reply.encoded_len()
                ),
            });
        }
        Ok(reply)
    }

    /// Distributed inference: frees a session on this stage.
    pub async fn infer_end(
        &self,
        body: pb::InferEndRequest,
        deadline: Duration,
    ) -> Result<pb::InferEndReply, NetworkError> {
        self.call("InferEnd", body, deadline, |c, r| async move {
            service_client!(PipelineClient, c).infer_end(r).await
        })
        .await
    }
}

/// Deadline of a whole weights transfer.
const WEIGHTS_TIMEOUT: Duration = Duration::from_secs(60);
/// A DiLoCo replay window: the claimant recomputes up to a round's inner steps first.
const WINDOW_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest inference evidence a verifier accepts: a generation at the longest context of the
/// largest preset (ids and a commitment of 6 bytes per entry and chunk) fits many times.
pub const MAX_EVIDENCE_BYTES: usize = 4 << 20;

fn with_deadline<T>(body: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.set_timeout(deadline);
    r
}
