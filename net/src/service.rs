//! The peer port's server side: the transport's own service (`Peer`: handshake, liveness,
//! peer exchange), the [`PeerEdge`] every subsystem's service handles its requests through
//! (byte accounting, signed-auth verification, bans), and [`serve`], which runs the services
//! the daemon plugs in (`Ledger`, `Diloco`, `Pipeline`) behind the one guard layer. Every
//! handler counts its bytes, verifies the signed auth (except the two handshake calls), and
//! refuses with a clear status; none panics on peer input.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use neuroshard_proto::Message as _;
use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::peer_server::{Peer, PeerServer};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::auth::{self, Authed, Verified};
use super::error::NetworkError;
use super::p2p::Transport;
use super::p2p::io::PeerConnectInfo;
use super::score::node_key;
use super::{
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_CONCURRENT_PER_CONNECTION, MAX_MESSAGE_BYTES,
    Network, SERVER_TIMEOUT, manager, now_ms,
};

/// Longest role name, address and layer list accepted in a peer's node info.
const MAX_ROLE_CHARS: usize = 32;
const MAX_ADDRESS_CHARS: usize = 256;
const MAX_LAYERS: usize = 4096;
const MAX_HASH_CHARS: usize = 128;
/// Bytes per chunk of a weights transfer.
const WEIGHTS_CHUNK: usize = 4 << 20;

/// What every peer service handles its requests through: the node's traffic figures, the
/// signed-auth check and the ban list. Cheap to clone.
#[derive(Clone)]
pub struct PeerEdge {
    pub net: Arc<Network>,
}

impl PeerEdge {
    pub fn new(net: Arc<Network>) -> PeerEdge {
        PeerEdge { net }
    }

    /// Counts a request's bytes as received.
    pub fn received<T: neuroshard_proto::Message>(&self, req: &Request<T>) {
        self.net
            .state
            .bytes_received
            .fetch_add(req.get_ref().encoded_len() as u64, Ordering::Relaxed);
    }

    /// Counts a reply's bytes as sent and wraps it.
    pub fn sent<T: neuroshard_proto::Message>(&self, reply: T) -> Response<T> {
        self.net
            .state
            .bytes_sent
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        Response::new(reply)
    }

    /// Verifies a signed request: a known, unbanned node, in the window, not replayed.
    pub fn verify<T: Authed>(&self, req: Request<T>) -> Result<(T, Verified), NetworkError> {
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

    /// Streams `bytes` as weight chunks (each counted as sent), all naming `hash` and `round`.
    pub fn weights_stream(&self, round: u64, hash: String, bytes: Vec<u8>) -> WeightsStream {
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
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A weights transfer as it streams to the caller.
pub type WeightsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WeightsChunk, Status>>;

/// The transport's own service: handshake, ping, peer exchange.
pub struct PeerService {
    edge: PeerEdge,
    net: Arc<Network>,
}

impl PeerService {
    pub fn new(edge: PeerEdge) -> PeerService {
        PeerService {
            net: edge.net.clone(),
            edge,
        }
    }

    fn received<T: neuroshard_proto::Message>(&self, req: &Request<T>) {
        self.edge.received(req)
    }

    fn sent<T: neuroshard_proto::Message>(&self, reply: T) -> Response<T> {
        self.edge.sent(reply)
    }

    fn verify<T: Authed>(&self, req: Request<T>) -> Result<(T, Verified), NetworkError> {
        self.edge.verify(req)
    }

    /// The `Peer` service with the peer port's message limits; the daemon adds the
    /// subsystems' services to these routes.
    pub fn routes(edge: PeerEdge) -> Routes {
        Routes::new(
            PeerServer::new(PeerService::new(edge))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
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
        let transport_peer = req.extensions().get::<PeerConnectInfo>().map(|i| i.peer);
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
        // The address must be the one the connection's transport handshake proved (noise or
        // TLS with the peer id's key): a node cannot speak for another's wallet.
        let proven = transport_peer.map(|p| crate::p2p::address_of(&p));
        if !matches!(proven, Some(Ok(a)) if a == peer) {
            return Err(NetworkError::Handshake {
                addr: remote.map(|a| a.to_string()).unwrap_or_default(),
                reason: format!("{peer} is not the address of this connection's peer id"),
            }
            .into());
        }
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
        // Calls to that address go over the connection the peer opened (a NAT'd peer is
        // reachable on no other).
        if let (Some(remote), Some(port)) = (remote, manager::port_of(&node.address)) {
            let addr = manager::join_host_port(remote.ip(), port);
            if let (Ok(t), Some(p)) = (self.net.transport(), transport_peer) {
                t.learn(&addr, p);
            }
            manager::learn_address(&self.net, &addr);
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
        let (body, v) = self.verify(req)?;
        // The caller pinged: it is heard, and its receipt for this node is kept.
        let receipt = match self.net.witness() {
            Some(w) => {
                if !body.receipt.is_empty() {
                    w.keep(&v.peer, &body.receipt);
                }
                w.heard(&v.peer).unwrap_or_default()
            }
            None => Vec::new(),
        };
        Ok(self.sent(pb::PingReply {
            node_id: self.net.id().to_string(),
            sent_at_ms: body.sent_at_ms,
            received_at_ms: now_ms(),
            node: Some(self.net.local_info()),
            receipt,
        }))
    }

    async fn get_peers(
        &self,
        req: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersReply>, Status> {
        let (_, v) = self.verify(req)?;
        let transport = self.net.transport().ok();
        let peers = self
            .net
            .peers
            .node_infos()
            .into_iter()
            .filter(|p| p.node_id != v.peer.to_string())
            .map(|mut p| {
                // A peer that listens through a relay is reachable at its circuit address
                // only (the address its connection came from is its NAT's).
                if let Some(c) = transport.and_then(|t| t.circuit_of(&p.address)) {
                    p.address = c;
                }
                p
            })
            .collect();
        Ok(self.sent(pb::GetPeersReply { peers }))
    }
}

/// Serves `routes` (the `Peer` service and the subsystems' services) on the
/// `/neuroshard/peer/1` streams peers open over `transport`, all behind the guard layer, until
/// `shutdown` resolves. Connections were admitted by the swarm task
/// ([`crate::p2p::swarm::Admission`]); an HTTP/2 connection that stops answering keep-alive
/// pings is dropped.
pub async fn serve(
    net: Arc<Network>,
    routes: Routes,
    transport: &Transport,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NetworkError> {
    let state = net.state.clone();
    let incoming = crate::p2p::io::incoming(transport)?;
    state.listening.store(true, Ordering::Relaxed);
    let result = tonic::transport::Server::builder()
        .timeout(SERVER_TIMEOUT)
        .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(super::guard::GuardLayer::new(net.clone()))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    state.listening.store(false, Ordering::Relaxed);
    result.map_err(|e| NetworkError::Transport(format!("peer service: {e}")))
}
