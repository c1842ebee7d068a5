//! The network's traffic counters, as the REST API and `/metrics` show them. The peers
//! themselves are in the one peer table ([`crate::table::PeerTable`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::admission::ConnStats;

/// Live network counters, shared with the REST handlers.
#[derive(Debug, Default)]
pub struct PeerState {
    /// The peer port is being served.
    pub listening: AtomicBool,
    /// Requests served plus requests made.
    pub rpc_calls: AtomicU64,
    /// Encoded message bytes received, as server and as client.
    pub bytes_received: AtomicU64,
    /// Encoded message bytes sent, as server and as client.
    pub bytes_sent: AtomicU64,
    /// Incoming requests refused (unauthenticated, malformed, oversized, banned, busy).
    pub refused_requests: AtomicU64,
    /// Gossiped ledger messages and DiLoCo deltas that failed verification.
    pub rejected_messages: AtomicU64,
    /// Connections to the peer port: admitted, refused once up, open
    /// ([`crate::p2p::swarm::Admission`]).
    pub connections: Arc<ConnStats>,
    /// Peer-port connections that failed their transport handshake (multistream, noise or
    /// TLS: garbage, a wrong key, or not finished in time).
    pub handshake_timeouts: AtomicU64,
}
