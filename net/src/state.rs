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
    /// Bytes of the `/neuroshard/peer/1` streams (HTTP/2 frames inside the encrypted
    /// transport, both directions, as client and as server), by the path the peer was on
    /// when the stream opened: direct, or through a relay only ([`PathBytes`]).
    pub stream_bytes: PathBytes,
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

/// Stream bytes sent and received on direct and on relayed paths.
#[derive(Debug, Default)]
pub struct PathBytes {
    pub direct_sent: AtomicU64,
    pub direct_received: AtomicU64,
    pub relayed_sent: AtomicU64,
    pub relayed_received: AtomicU64,
}

impl PathBytes {
    /// The (sent, received) counters of the direct or the relayed path.
    pub fn of(&self, relayed: bool) -> (&AtomicU64, &AtomicU64) {
        if relayed {
            (&self.relayed_sent, &self.relayed_received)
        } else {
            (&self.direct_sent, &self.direct_received)
        }
    }
}
