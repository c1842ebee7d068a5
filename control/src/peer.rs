//! What the node knows of its peers, as the REST API shows it. The peer gRPC service, the
//! handshake, discovery and gossip live in [`crate::network`].

use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// A peer as the REST API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerInfo {
    /// The peer's wallet address: its identity, proven in the handshake.
    pub id: String,
    /// `host:port` of its peer service, as this node dials it.
    pub address: String,
    pub role: String,
    pub layers: Vec<u32>,
    /// Round-trip time of the last answered ping.
    pub latency_ms: f64,
    pub connected_since: chrono::DateTime<chrono::Utc>,
}

/// Live network figures, shared with the REST handlers.
#[derive(Debug, Default)]
pub struct PeerState {
    pub listening: AtomicBool,
    /// Requests served plus requests made.
    pub rpc_calls: AtomicU64,
    /// Encoded message bytes received, as server and as client.
    pub bytes_received: AtomicU64,
    /// Encoded message bytes sent, as server and as client.
    pub bytes_sent: AtomicU64,
    /// Peers with a live, handshaken connection (the length of `peers`).
    pub active_connections: AtomicU64,
    /// Incoming requests refused (unauthenticated, malformed, oversized, banned, busy).
    pub refused_requests: AtomicU64,
    /// Gossiped ledger messages that failed verification.
    pub rejected_messages: AtomicU64,
    pub peers: RwLock<Vec<PeerInfo>>,
}

impl PeerState {
    pub fn peer_count(&self) -> usize {
        self.peers.read().map(|p| p.len()).unwrap_or(0)
    }
}

pub fn bind_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
