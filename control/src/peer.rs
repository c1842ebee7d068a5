//! The node-to-node gRPC service on HTTP port + 1000, and what the node knows of its peers.

use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::peer_server::{Peer, PeerServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Largest peer message accepted (the original's limit).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A peer as the REST API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerInfo {
    pub id: String,
    pub address: String,
    pub role: String,
    pub layers: Vec<u32>,
    pub latency_ms: f64,
    pub connected_since: chrono::DateTime<chrono::Utc>,
}

/// Live network figures, shared with the REST handlers.
#[derive(Debug, Default)]
pub struct PeerState {
    pub listening: AtomicBool,
    pub rpc_calls: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub peers: RwLock<Vec<PeerInfo>>,
}

impl PeerState {
    pub fn peer_count(&self) -> usize {
        self.peers.read().map(|p| p.len()).unwrap_or(0)
    }
}

pub struct PeerService {
    node_id: String,
    state: std::sync::Arc<PeerState>,
}

impl PeerService {
    pub fn new(node_id: String, state: std::sync::Arc<PeerState>) -> PeerService {
        PeerService { node_id, state }
    }

    fn count<T: neuroshard_proto::Message>(&self, req: &Request<T>) {
        self.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        self.state
            .bytes_received
            .fetch_add(req.get_ref().encoded_len() as u64, Ordering::Relaxed);
    }

    fn sent<T: neuroshard_proto::Message>(&self, reply: T) -> Response<T> {
        self.state
            .bytes_sent
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        Response::new(reply)
    }
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not served by this node version"))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn handshake(
        &self,
        req: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeReply>, Status> {
        self.count(&req);
        Err(not_yet("handshake"))
    }

    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        self.count(&req);
        let sent_at_ms = req.into_inner().sent_at_ms;
        Ok(self.sent(pb::PingReply {
            node_id: self.node_id.clone(),
            sent_at_ms,
            received_at_ms: chrono::Utc::now().timestamp_millis(),
        }))
    }

    async fn get_peers(
        &self,
        req: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersReply>, Status> {
        self.count(&req);
        let peers = self
            .state
            .peers
            .read()
            .map_err(|_| Status::internal("peer table lock poisoned"))?
            .iter()
            .map(|p| pb::NodeInfo {
                node_id: p.id.clone(),
                address: p.address.clone(),
                role: p.role.clone(),
                layers: p.layers.clone(),
                ..Default::default()
            })
            .collect();
        Ok(self.sent(pb::GetPeersReply { peers }))
    }

    async fn gossip(
        &self,
        req: Request<pb::GossipRequest>,
    ) -> Result<Response<pb::GossipReply>, Status> {
        self.count(&req);
        Err(not_yet("gossip"))
    }

    type GetWeightsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WeightsChunk, Status>>;

    async fn get_weights(
        &self,
        req: Request<pb::GetWeightsRequest>,
    ) -> Result<Response<Self::GetWeightsStream>, Status> {
        self.count(&req);
        Err(not_yet("weight transfer"))
    }

    async fn pipeline_forward(
        &self,
        req: Request<pb::PipelineTensor>,
    ) -> Result<Response<pb::PipelineAck>, Status> {
        self.count(&req);
        Err(not_yet("pipeline forward"))
    }

    async fn pipeline_backward(
        &self,
        req: Request<pb::PipelineTensor>,
    ) -> Result<Response<pb::PipelineAck>, Status> {
        self.count(&req);
        Err(not_yet("pipeline backward"))
    }
}

/// Serves the peer service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: PeerService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let state = service.state.clone();
    state.listening.store(true, Ordering::Relaxed);
    let result = tonic::transport::Server::builder()
        .timeout(std::time::Duration::from_secs(30))
        .add_service(
            PeerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    state.listening.store(false, Ordering::Relaxed);
    result
}

pub fn bind_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
