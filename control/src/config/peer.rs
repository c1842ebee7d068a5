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
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            max_connections_per_address: neuroshard_net::DEFAULT_CONNECTIONS_PER_ADDRESS,
            max_connections: 4096,
            connection_rate_per_address: neuroshard_net::DEFAULT_NEW_CONNECTIONS_PER_SECOND,
            max_peers: neuroshard_net::MAX_PEERS as u32,
        }
    }
}
