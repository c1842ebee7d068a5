//! The `[peer]` section: the peer port's connection caps at accept (the REST port's are in
//! `[api]`). Both take effect at the next start.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// Most connections one address may hold open to the peer port at once (more are refused
    /// at accept). A node keeps one connection per peer plus a few transient ones.
    pub max_connections_per_address: u32,
    /// Most peer-port connections open at once from other machines (loopback is not
    /// counted); lowered at start when the descriptor limit leaves less room.
    pub max_connections: u32,
    /// New connections one address may open to the peer port per second (bursts of 4 s
    /// worth); more are refused at accept. 127.0.0.1 and ::1 are exempt.
    pub connection_rate_per_address: u32,
    /// Relay v2 (served only while the node is reachable from outside): reservations held
    /// at once for NAT'd peers, all together.
    pub relay_max_reservations: u32,
    /// Relay reservations one peer may hold at once.
    pub relay_max_reservations_per_peer: u32,
    /// Circuits relayed at once, all peers together.
    pub relay_max_circuits: u32,
    /// Circuits relayed at once for one peer.
    pub relay_max_circuits_per_peer: u32,
    /// Bytes (MiB, both ways) one relayed circuit may carry before it is closed.
    pub relay_max_circuit_mib: u64,
    /// Seconds one relayed circuit may stay open before it is closed.
    pub relay_max_circuit_secs: u64,
    /// Most peers this node keeps in its peer table (pings, routes, anti-entropy): the most
    /// useful ones (holders of layers a stage needs, neighbour stages, replicas of its own
    /// layers); the DHT finds the rest when needed. Not a cap on incoming connections
    /// (that is `max_connections`).
    pub max_peers: u32,
}

impl PeerConfig {
    /// The peer port's caps; `total_cap` is the remote-connection cap after the descriptor
    /// limit (see [`neuroshard_net::admission::total_cap`]).
    pub fn caps(&self, total_cap: usize) -> neuroshard_net::admission::Caps {
        neuroshard_net::admission::Caps {
            per_address: self.max_connections_per_address as usize,
            total: total_cap,
            new_per_second: self.connection_rate_per_address,
        }
    }

    /// The relay server's limits.
    pub fn relay_limits(&self) -> neuroshard_net::p2p::relay::Limits {
        neuroshard_net::p2p::relay::Limits {
            max_reservations: self.relay_max_reservations as usize,
            max_reservations_per_peer: self.relay_max_reservations_per_peer as usize,
            max_circuits: self.relay_max_circuits as usize,
            max_circuits_per_peer: self.relay_max_circuits_per_peer as usize,
            max_circuit_bytes: self.relay_max_circuit_mib.saturating_mul(1 << 20),
            max_circuit_duration: std::time::Duration::from_secs(self.relay_max_circuit_secs),
        }
    }
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            max_connections_per_address: neuroshard_net::DEFAULT_CONNECTIONS_PER_ADDRESS,
            max_connections: 4096,
            connection_rate_per_address: neuroshard_net::DEFAULT_NEW_CONNECTIONS_PER_SECOND,
            relay_max_reservations: 128,
            relay_max_reservations_per_peer: 4,
            relay_max_circuits: 64,
            relay_max_circuits_per_peer: 8,
            relay_max_circuit_mib: 1024,
            relay_max_circuit_secs: 3600,
            max_peers: neuroshard_net::MAX_PEERS as u32,
        }
    }
}
