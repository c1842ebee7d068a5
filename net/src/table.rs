//! The one peer table: the connected peers by identity, each with its connection, its latest
//! info (from the handshake or its last ping) and the RTT of its last answered ping. The peer
//! manager writes it; peer exchange, the REST API's peer list, the pipeline's routes and the
//! layer pool read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use neuroshard_identity::Address;
use neuroshard_proto::peer as pb;
use parking_lot::{Mutex, MutexGuard};

use crate::client::PeerConn;

/// A connected peer.
#[derive(Debug, Clone)]
pub struct Connected {
    pub conn: PeerConn,
    pub info: pb::NodeInfo,
    pub since: chrono::DateTime<chrono::Utc>,
    /// RTT of the last answered ping (ms); 0 until the first ping is answered.
    pub rtt_ms: f64,
    pub last_ok: Instant,
    /// Distinguishes this connection from a later one to the same node.
    pub generation: u64,
}

/// A connected peer as the REST API shows it.
#[derive(Debug, Clone)]
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

/// The connected peers, by identity.
#[derive(Debug, Default)]
pub struct PeerTable {
    inner: Mutex<HashMap<Address, Connected>>,
    next_generation: AtomicU64,
}

impl PeerTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<Address, Connected>> {
        self.inner.lock()
    }

    /// Adds a fresh connection; `None` when the node is already connected.
    pub(crate) fn insert(&self, conn: PeerConn, rtt_ms: f64) -> Option<u64> {
        let mut g = self.lock();
        if g.contains_key(&conn.id) {
            return None;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        g.insert(
            conn.id,
            Connected {
                info: conn.info.clone(),
                conn,
                since: chrono::Utc::now(),
                rtt_ms,
                last_ok: Instant::now(),
                generation,
            },
        );
        Some(generation)
    }

    pub(crate) fn remove(&self, id: &Address, generation: u64) -> bool {
        let mut g = self.lock();
        if g.get(id).is_some_and(|c| c.generation == generation) {
            g.remove(id);
            return true;
        }
        false
    }

    pub(crate) fn answered(
        &self,
        id: &Address,
        generation: u64,
        rtt_ms: f64,
        info: Option<pb::NodeInfo>,
    ) {
        if let Some(c) = self
            .lock()
            .get_mut(id)
            .filter(|c| c.generation == generation)
        {
            c.rtt_ms = rtt_ms;
            c.last_ok = Instant::now();
            if let Some(info) = info.filter(|i| i.node_id == c.info.node_id) {
                c.info = info;
            }
        }
    }

    /// Removes a node's entry whatever its generation (its tasks end at their next check).
    pub(crate) fn evict(&self, id: &Address) -> bool {
        self.lock().remove(id).is_some()
    }

    /// When the connection last answered; `None` when it is no longer in the table.
    pub(crate) fn last_ok(&self, id: &Address, generation: u64) -> Option<Instant> {
        self.lock()
            .get(id)
            .filter(|c| c.generation == generation)
            .map(|c| c.last_ok)
    }

    /// The connection of this generation is still the node's entry in the table.
    pub fn is_current(&self, id: &Address, generation: u64) -> bool {
        self.last_ok(id, generation).is_some()
    }

    pub fn contains(&self, id: &Address) -> bool {
        self.lock().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connection (to push gossip over).
    pub fn conns(&self) -> Vec<PeerConn> {
        self.lock().values().map(|c| c.conn.clone()).collect()
    }

    /// The table as peer exchange shows it: addresses are the ones this node dials.
    pub fn node_infos(&self) -> Vec<pb::NodeInfo> {
        self.lock()
            .values()
            .map(|c| pb::NodeInfo {
                node_id: c.conn.id.to_string(),
                address: c.conn.addr.clone(),
                role: c.info.role.clone(),
                layers: c.info.layers.clone(),
                public_key: Vec::new(),
                http_port: c.info.http_port,
                diloco_round: c.info.diloco_round,
                round_hash: c.info.round_hash.clone(),
                capacity: c.info.capacity,
                train_step: c.info.train_step,
                serve_only: c.info.serve_only,
                train_compute: c.info.train_compute,
                pipeline_load: c.info.pipeline_load,
            })
            .collect()
    }

    /// Each connection with the peer's latest info (from the handshake or its last ping).
    pub fn conns_with_info(&self) -> Vec<(PeerConn, pb::NodeInfo)> {
        self.lock()
            .values()
            .map(|c| (c.conn.clone(), c.info.clone()))
            .collect()
    }

    /// Each connection with the peer's latest info and the RTT of its last answered ping (ms).
    pub fn conns_with_rtt(&self) -> Vec<(PeerConn, pb::NodeInfo, f64)> {
        self.lock()
            .values()
            .map(|c| (c.conn.clone(), c.info.clone(), c.rtt_ms))
            .collect()
    }

    /// The connected peers as the REST API shows them, by id.
    pub fn peer_infos(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .lock()
            .values()
            .map(|c| PeerInfo {
                id: c.conn.id.to_string(),
                address: c.conn.addr.clone(),
                role: c.info.role.clone(),
                layers: c.info.layers.clone(),
                latency_ms: c.rtt_ms,
                connected_since: c.since,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}
