//! The peer network's transport: who a peer is, how it proves it, how nodes find each other
//! without a tracker, and the one table of the peers this node is connected to. It carries
//! the subsystems' services (the ledger's gossip, DiLoCo, the pipeline) without knowing any of
//! them: the daemon plugs them in ([`run`]'s routes) and hands the network narrow readers of
//! what it advertises ([`Advert`]); whoever wants to act on a new connection reads the
//! [`PeerUp`] events.
//!
//! * [`admission`]: the per-address and total connection caps at accept, shared with the
//!   daemon's REST and tracker servers.
//! * [`p2p`]: the peer-to-peer transport (rust-libp2p): one swarm task, the wallet key as
//!   the peer id, `peer.proto` over its streams, admission of incoming connections.
//! * [`auth`]: identities (wallet addresses), the mutual challenge-response handshake and the
//!   signed, timestamped, replay-checked auth every later request carries.
//! * [`score`]: misbehaviour lowers a peer's (or a connection's) score; at zero it is banned.
//! * [`guard`]: a tower layer in front of the services that counts every call, refuses banned
//!   connections before decoding anything and charges refused requests to their connection.
//! * [`service`]: the transport's own service (`Peer`: handshake, ping, peer exchange), the
//!   [`PeerEdge`](service::PeerEdge) every subsystem's service handles its requests through,
//!   and the server.
//! * [`client`]: an authenticated connection to one peer (client side).
//! * [`manager`]: dials seeds and exchanged addresses, pings, measures RTT, drops silent
//!   peers; keeps at most [`Network::max_peers`] peers, the most useful ones.
//! * [`discover`]: the holders of layers through the DHT (`layer_{i}`): this node's records,
//!   lookups of the layers it needs ([`Network::want_layers`], [`Network::find_holders`]).
//! * [`table`]: the connected peers with their info and RTT ([`table::PeerTable`]); the REST
//!   API's peer list and the pipeline's routes are read from it.
//! * [`state`]: the traffic counters the REST API shows ([`PeerState`]).
//!
//! Figures (heartbeat, drop time, limits) are the constants below; ARCHITECTURE.md ("Peer
//! network") explains them.

pub mod admission;
pub mod auth;
pub mod client;
pub mod discover;
pub mod error;
pub mod guard;
pub mod manager;
pub mod p2p;
pub mod score;
pub mod service;
pub mod state;
pub mod table;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use neuroshard_identity::{Address, Wallet};
use neuroshard_proto::peer as pb;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};

pub use error::NetworkError;
pub use state::PeerState;

/// A connected peer is pinged this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// A ping unanswered after this long counts as missed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer without a successful ping for this long is dropped. With the ping interval and
/// timeout above, a vanished peer leaves the table at most 14 s after its last answer.
pub const DROP_AFTER: Duration = Duration::from_secs(10);
/// Upper bound on the time from a peer's last answer to its removal (documented figure).
pub const DROP_BOUND: Duration = Duration::from_secs(15);
/// Peer exchange: each peer is asked for its peers this often (and right after connecting).
pub const PEX_INTERVAL: Duration = Duration::from_secs(5);
/// Deadline of an outgoing request (pings use [`PING_TIMEOUT`]).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a connection to a peer (dial and transport handshake) and of opening a stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline the server puts on every incoming request.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most peers this node keeps connections to by default (`peer.max_peers`).
pub const MAX_PEERS: usize = 32;
/// Most addresses remembered for dialing.
pub const MAX_KNOWN_ADDRESSES: usize = 256;
/// Requests served at once per HTTP/2 connection, one per libp2p stream (more wait:
/// back-pressure on the stream).
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 32;
/// A connection to the peer port must finish its transport handshake (multistream, noise
/// and yamux over TCP; TLS over QUIC) within this, or it is closed and counted. A peer does
/// it in a few round trips; 5 s leaves room for a slow link and a loaded machine, and bounds
/// how long a connection that never speaks holds a descriptor.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// The server pings an established peer connection that has been quiet this long
/// (HTTP/2 keep-alive)...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and drops it when the ping is not answered within this: a vanished peer's incoming
/// connection is closed within 40 s of its last frame.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default cap on the peer-port connections from one address
/// (`peer.max_connections_per_address`). A node keeps one connection to each peer, so a peer
/// holds one of its connections; beyond that, a handshake or a re-check of a known address
/// opens a transient one now and then. 64 leaves room for several nodes behind one address
/// (NAT, one machine) and is far below what a flood needs to exhaust descriptors.
pub const DEFAULT_CONNECTIONS_PER_ADDRESS: u32 = 64;

/// New connections one address may open to the peer port per second by default (a node
/// dials a peer once and keeps the connection).
pub const DEFAULT_NEW_CONNECTIONS_PER_SECOND: u32 = 10;

/// What a node tells its peers of its DiLoCo round: (round, starting hash). The subsystem
/// that knows it hands the network this narrow reader; the network names no subsystem.
pub type Advert = Box<dyn Fn() -> (u64, String) + Send + Sync>;

/// The advert of a node that runs no DiLoCo rounds.
pub fn no_advert() -> Advert {
    Box::new(|| (0, String::new()))
}

/// Heartbeat receipts (issue #19): the network carries them on its pings without reading
/// them; the daemon plugs in what signs and keeps them ([`Network::set_witness`]). A node
/// that answers a ping or pings is heard; each side signs a receipt for the other and hands
/// it over on the next ping or pong, so receipts add one small field to traffic that exists.
pub trait Witness: Send + Sync {
    /// `peer` was heard now (it pinged this node, or answered its ping): the receipt to hand
    /// it, if any.
    fn heard(&self, peer: &Address) -> Option<Vec<u8>>;
    /// The latest receipt this node signed for `peer`, to send with the next ping.
    fn latest(&self, peer: &Address) -> Option<Vec<u8>>;
    /// `peer` handed this node a receipt for its own heartbeats (checked and kept or refused
    /// by the witness, never trusted by the network).
    fn keep(&self, peer: &Address, receipt: &[u8]);
}

/// Largest peer message accepted (the original's limit; pipeline tensors need it).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The node's own figures as peers see them.
#[derive(Debug, Clone)]
pub struct LocalRole {
    pub role: String,
    pub layers: Vec<u32>,
    /// Serve-only (`--no-training`): the layers are for inference, not training coverage.
    pub serve_only: bool,
}

/// A peer that just connected: its connection and the generation that tells this
/// connection from a later one to the same node ([`table::PeerTable::is_current`]). The
/// daemon hands [`Network::new`] the sender; the ledger's anti-entropy reads the events and
/// pulls the new peer's ledger at once, so the network names no subsystem.
#[derive(Debug, Clone)]
pub struct PeerUp {
    pub conn: client::PeerConn,
    pub generation: u64,
}

/// Everything the network tasks share.
pub struct Network {
    /// The node's identity key.
    pub wallet: Arc<Wallet>,
    /// Traffic figures the REST API shows.
    pub state: Arc<PeerState>,
    grpc_port: u16,
    http_port: u16,
    local: RwLock<LocalRole>,
    /// The most layers this node may hold (pipeline takeover); 0 until the layer pool sets it.
    capacity: AtomicU32,
    /// The optimizer step of this node's layers, as peers see it (pipeline resync).
    train_step: AtomicU64,
    /// Measured training compute (parameter-tokens/s, f64 bits), as peers see it (balance).
    train_compute: AtomicU64,
    /// Pipeline steps this stage runs or has callers waiting for, as peers see it.
    pipeline_load: AtomicU32,
    pub auth: auth::Authenticator,
    pub scores: score::Scores,
    /// The connected peers: the one peer table.
    pub peers: table::PeerTable,
    pub(crate) known: Mutex<HashMap<String, manager::Known>>,
    /// This node's DiLoCo (round, starting hash) as its peers see it, read at each ping.
    advert: Advert,
    /// Told of every new connection (a closed receiver is ignored).
    connected: mpsc::UnboundedSender<PeerUp>,
    /// The address peers and the tracker are told to dial (`--announce-ip`/`--announce-port`):
    /// a host (None: the address connections come from) and a port (the peer port when unset).
    announced: RwLock<(Option<String>, u16)>,
    /// The peer-to-peer transport every peer call runs over ([`Network::attach`]).
    transport: std::sync::OnceLock<p2p::Transport>,
    /// Signs and keeps heartbeat receipts; none until the daemon sets it.
    witness: RwLock<Option<Arc<dyn Witness>>>,
    /// Most peers kept in the table ([`Network::set_max_peers`]).
    max_peers: std::sync::atomic::AtomicUsize,
    /// Layers a stage needs holders of and found none connected, with when they were asked
    /// for: the peer manager looks them up in the DHT ([`discover`]).
    pub(crate) wanted: Mutex<HashMap<u32, std::time::Instant>>,
}

impl Network {
    pub fn new(
        wallet: Arc<Wallet>,
        state: Arc<PeerState>,
        http_port: u16,
        grpc_port: u16,
        local: LocalRole,
        advert: Advert,
        connected: mpsc::UnboundedSender<PeerUp>,
    ) -> Arc<Network> {
        Arc::new(Network {
            advert,
            wallet,
            state,
            grpc_port,
            http_port,
            local: RwLock::new(local),
            capacity: AtomicU32::new(0),
            train_step: AtomicU64::new(0),
            train_compute: AtomicU64::new(0),
            pipeline_load: AtomicU32::new(0),
            auth: auth::Authenticator::default(),
            scores: score::Scores::default(),
            peers: table::PeerTable::default(),
            known: Mutex::new(HashMap::new()),
            connected,
            announced: RwLock::new((None, grpc_port)),
            transport: std::sync::OnceLock::new(),
            witness: RwLock::new(None),
            max_peers: std::sync::atomic::AtomicUsize::new(MAX_PEERS),
            wanted: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the network its transport (once; a second one is ignored).
    pub fn attach(&self, transport: p2p::Transport) {
        let _ = self.transport.set(transport);
    }

    /// Starts a transport keyed by this node's wallet that only dials (a client such as a
    /// test's observer) and attaches it. Runs until `shutdown` turns true.
    pub async fn start_client(&self, shutdown: watch::Receiver<bool>) -> Result<(), NetworkError> {
        // It listens nowhere: nothing arrives to admit.
        let admission = p2p::swarm::Admission {
            caps: admission::Caps {
                per_address: 0,
                total: 0,
                new_per_second: 0,
            },
            state: self.state.clone(),
        };
        let transport = p2p::swarm::start(
            &self.wallet,
            None,
            admission,
            p2p::relay::Options::default(),
            shutdown,
        )
        .await?;
        self.attach(transport);
        Ok(())
    }

    /// The transport peer calls run over.
    pub fn transport(&self) -> Result<&p2p::Transport, NetworkError> {
        self.transport
            .get()
            .ok_or_else(|| NetworkError::Transport("not started".into()))
    }

    /// Whether the connection to the peer at `addr` goes through a relay only (false when
    /// direct or unknown).
    pub fn is_relayed(&self, addr: &str) -> bool {
        self.transport()
            .is_ok_and(|t| t.relayed_at(addr).unwrap_or(false))
    }

    /// The relays (libp2p peer ids, as circuit addresses name them) holding a reservation
    /// for this node; empty for a node reachable directly.
    pub fn relays(&self) -> Vec<String> {
        self.transport()
            .map(|t| t.reservations().iter().map(|p| p.to_string()).collect())
            .unwrap_or_default()
    }

    /// Connected peers reached through a relay only.
    pub fn relayed_peer_count(&self) -> usize {
        self.peers
            .conns_with_info()
            .iter()
            .filter(|(c, _)| self.is_relayed(&c.addr))
            .count()
    }

    /// Tells whoever listens that `conn` just connected.
    pub(crate) fn announce(&self, conn: client::PeerConn, generation: u64) {
        // Nobody listening (a node without gossip, a test's observer) is fine.
        let _ = self.connected.send(PeerUp { conn, generation });
    }

    /// (REST API port, peer service port).
    pub fn ports(&self) -> (u16, u16) {
        (self.http_port, self.grpc_port)
    }

    /// Sets what signs and keeps heartbeat receipts on this node's pings.
    pub fn set_witness(&self, witness: Arc<dyn Witness>) {
        *self.witness.write() = Some(witness);
    }

    /// What signs and keeps heartbeat receipts, if set.
    pub(crate) fn witness(&self) -> Option<Arc<dyn Witness>> {
        self.witness.read().clone()
    }

    /// Sets the address peers and the tracker are told to dial: `host` (None: the address
    /// the connections come from) and `port` (None: the peer port).
    pub fn set_announced(&self, host: Option<String>, port: Option<u16>) {
        *self.announced.write() = (host, port.unwrap_or(self.grpc_port));
    }

    /// The address peers and the tracker are told to dial: (host if set, peer port).
    pub fn announced(&self) -> (Option<String>, u16) {
        self.announced.read().clone()
    }

    /// This node's identity.
    pub fn id(&self) -> Address {
        self.wallet.address()
    }

    /// Changes the role and layers peers see (the layer pool calls this), and the layers
    /// this node provides in the DHT.
    pub fn set_local_role(&self, role: LocalRole) {
        let layers = role.layers.clone();
        *self.local.write() = role;
        self.provide(layers);
    }

    /// Most peers kept in the table (at least 1).
    pub fn set_max_peers(&self, n: usize) {
        self.max_peers.store(n.max(1), Ordering::Relaxed);
    }

    /// Most peers kept in the table.
    pub fn max_peers(&self) -> usize {
        self.max_peers.load(Ordering::Relaxed)
    }

    /// The role and layers peers see now.
    pub fn local_role(&self) -> LocalRole {
        self.local.read().clone()
    }

    /// The optimizer step of this node's layers, as peers see it.
    pub fn set_train_step(&self, step: u64) {
        self.train_step.store(step, Ordering::Relaxed);
    }

    /// The measured training compute (parameter-tokens per second), as peers see it (0: not
    /// measured).
    pub fn set_train_compute(&self, rate: f64) {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            0.0
        };
        self.train_compute.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// The pipeline steps this stage runs or holds callers waiting for, as peers see it.
    pub fn set_pipeline_load(&self, load: u32) {
        self.pipeline_load.store(load, Ordering::Relaxed);
    }

    /// The most layers this node may hold, as peers see it.
    pub fn set_capacity(&self, layers: u32) {
        self.capacity.store(layers, Ordering::Relaxed);
    }

    /// This node as its peers see it. A receiver pairs the address's port with the IP the
    /// connection came from (what a peer says of its own host is not trusted); the host is
    /// the announced one when set, for display.
    pub fn local_info(&self) -> pb::NodeInfo {
        let local = self.local.read().clone();
        let (diloco_round, round_hash) = (self.advert)();
        let (host, port) = self.announced();
        pb::NodeInfo {
            node_id: self.id().to_string(),
            address: manager::join_host_port_str(host.as_deref().unwrap_or("0.0.0.0"), port),
            role: local.role,
            layers: local.layers,
            public_key: Vec::new(),
            http_port: u64::from(self.http_port),
            diloco_round,
            round_hash,
            capacity: self.capacity.load(Ordering::Relaxed),
            train_step: self.train_step.load(Ordering::Relaxed),
            serve_only: local.serve_only,
            train_compute: f64::from_bits(self.train_compute.load(Ordering::Relaxed)),
            pipeline_load: self.pipeline_load.load(Ordering::Relaxed),
        }
    }
}

/// Serves the peer port over `transport` (the `Peer` service and the subsystems' services
/// in `routes`, on the streams peers open) and runs the peer manager until `shutdown` turns
/// true. `seeds` are `host:port` of peer services.
pub async fn run(
    net: Arc<Network>,
    routes: tonic::service::Routes,
    transport: p2p::Transport,
    seeds: Vec<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NetworkError> {
    net.attach(transport.clone());
    net.provide(net.local_role().layers);
    manager::add_seeds(&net, &seeds);
    let manager = tokio::spawn(manager::run(net.clone(), shutdown.clone()));
    let lookups = tokio::spawn(discover::run(net.clone(), shutdown.clone()));
    let result = service::serve(net.clone(), routes, &transport, wait_true(shutdown)).await;
    let _ = manager.await;
    let _ = lookups.await;
    result
}

/// Resolves when the watch turns true (or its sender is gone).
pub async fn wait_true(mut rx: watch::Receiver<bool>) {
    stopped(&mut rx).await;
}

/// Resolves when the watch turns true (or its sender is gone); usable in `select!` loops.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The peer port's bind address: every interface, `port`.
pub fn bind_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
