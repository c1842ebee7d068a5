//! The peer network: who a peer is, how it proves it, how nodes find each other without a
//! tracker, and how the ledger spreads until every node holds the same blocks.
//!
//! * [`auth`]: identities (wallet addresses), the mutual challenge-response handshake and the
//!   signed, timestamped, replay-checked auth every later request carries.
//! * [`score`]: misbehaviour lowers a peer's (or a connection's) score; at zero it is banned.
//! * [`guard`]: a tower layer in front of the service that counts every call, refuses banned
//!   connections before decoding anything and charges refused requests to their connection.
//! * [`service`]: the gRPC service (server side).
//! * [`client`]: an authenticated connection to one peer (client side).
//! * [`manager`]: dials seeds and exchanged addresses, pings, measures RTT, drops silent
//!   peers, keeps [`PeerState::peers`] current.
//! * [`gossip`]: pushes newly stored ledger blocks to every peer (flooding; a block is only
//!   forwarded when it was new here) and pulls what a peer holds (anti-entropy).
//!
//! Figures (heartbeat, drop time, limits) are the constants below; ARCHITECTURE.md ("Peer
//! network") explains them.

pub mod auth;
pub mod client;
pub mod error;
pub mod gossip;
pub mod guard;
pub mod manager;
pub mod score;
pub mod service;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use neuroshard_proto::peer as pb;
use tokio::sync::watch;

pub use error::NetworkError;

use crate::ledger::{Address, Ledger, Wallet};
use crate::peer::PeerState;

/// A connected peer is pinged this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// A ping unanswered after this long counts as missed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer without a successful ping for this long is dropped. With the ping interval and
/// timeout above, a vanished peer leaves the table at most 14 s after its last answer.
pub const DROP_AFTER: Duration = Duration::from_secs(10);
/// Upper bound on the time from a peer's last answer to its removal (documented figure).
pub const DROP_BOUND: Duration = Duration::from_secs(15);
/// Anti-entropy: each peer's ledger is pulled this often (and right after connecting).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Peer exchange: each peer is asked for its peers this often (and right after connecting).
pub const PEX_INTERVAL: Duration = Duration::from_secs(5);
/// Newly stored ledger blocks are pushed to peers this often.
pub const PUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Deadline of an outgoing request (pings use [`PING_TIMEOUT`]).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a TCP connect to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline the server puts on every incoming request.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most peers this node keeps connections to.
pub const MAX_PEERS: usize = 32;
/// Most addresses remembered for dialing.
pub const MAX_KNOWN_ADDRESSES: usize = 256;
/// Requests served at once per TCP connection (more wait: back-pressure on the connection).
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 32;
/// Most ledger messages in one gossip request.
pub const MAX_GOSSIP_MESSAGES: usize = 1024;
/// Largest single ledger message accepted.
pub const MAX_LEDGER_MESSAGE_BYTES: usize = 64 * 1024;
/// Most messages in one anti-entropy page (and one push).
pub const SYNC_PAGE: u32 = 512;

/// What a node tells its peers of its DiLoCo round: (round, starting hash). The subsystem
/// that knows it hands the network this narrow reader; the network names no subsystem.
pub type Advert = Box<dyn Fn() -> (u64, String) + Send + Sync>;

/// The advert of a node that runs no DiLoCo rounds.
pub fn no_advert() -> Advert {
    Box::new(|| (0, String::new()))
}

/// Largest peer message accepted (the original's limit; pipeline tensors need it).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The node's own figures as peers see them.
#[derive(Debug, Clone)]
pub struct LocalRole {
    pub role: String,
    pub layers: Vec<u32>,
}

/// Everything the network tasks share.
pub struct Network {
    /// The node's identity key.
    pub wallet: Arc<Wallet>,
    pub ledger: Arc<Ledger>,
    /// Figures the REST API shows.
    pub state: Arc<PeerState>,
    grpc_port: u16,
    http_port: u16,
    local: RwLock<LocalRole>,
    /// The most layers this node may hold (pipeline takeover); 0 until the layer pool sets it.
    capacity: std::sync::atomic::AtomicU32,
    /// The optimizer step of this node's layers, as peers see it (pipeline resync).
    train_step: std::sync::atomic::AtomicU64,
    pub(crate) auth: auth::Authenticator,
    pub(crate) scores: score::Scores,
    pub(crate) peers: manager::PeerTable,
    pub(crate) known: Mutex<HashMap<String, manager::Known>>,
    pub(crate) origins: gossip::Origins,
    /// This node's DiLoCo (round, starting hash) as its peers see it, read at each ping.
    advert: Advert,
}

impl Network {
    pub fn new(
        wallet: Arc<Wallet>,
        ledger: Arc<Ledger>,
        state: Arc<PeerState>,
        http_port: u16,
        grpc_port: u16,
        local: LocalRole,
        advert: Advert,
    ) -> Arc<Network> {
        Arc::new(Network {
            advert,
            wallet,
            ledger,
            state,
            grpc_port,
            http_port,
            local: RwLock::new(local),
            capacity: std::sync::atomic::AtomicU32::new(0),
            train_step: std::sync::atomic::AtomicU64::new(0),
            auth: auth::Authenticator::default(),
            scores: score::Scores::default(),
            peers: manager::PeerTable::default(),
            known: Mutex::new(HashMap::new()),
            origins: gossip::Origins::default(),
        })
    }

    /// (REST API port, peer service port).
    pub fn ports(&self) -> (u16, u16) {
        (self.http_port, self.grpc_port)
    }

    /// This node's identity.
    pub fn id(&self) -> Address {
        self.wallet.address()
    }

    /// Changes the role and layers peers see (the layer pool calls this).
    pub fn set_local_role(&self, role: LocalRole) {
        if let Ok(mut g) = self.local.write() {
            *g = role;
        }
    }

    /// The optimizer step of this node's layers, as peers see it.
    pub fn set_train_step(&self, step: u64) {
        self.train_step
            .store(step, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most layers this node may hold, as peers see it.
    pub fn set_capacity(&self, layers: u32) {
        self.capacity
            .store(layers, std::sync::atomic::Ordering::Relaxed);
    }

    /// This node as its peers see it. The address carries only the port: a receiver pairs it
    /// with the IP the connection came from.
    pub fn local_info(&self) -> pb::NodeInfo {
        let local = self
            .local
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let (diloco_round, round_hash) = (self.advert)();
        pb::NodeInfo {
            node_id: self.id().to_string(),
            address: format!("0.0.0.0:{}", self.grpc_port),
            role: local.role,
            layers: local.layers,
            public_key: Vec::new(),
            http_port: u64::from(self.http_port),
            diloco_round,
            round_hash,
            capacity: self.capacity.load(std::sync::atomic::Ordering::Relaxed),
            train_step: self.train_step.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// The ledger's root hash (hex) and block count, for `GET /api/v1/network`.
pub async fn ledger_summary(ledger: &Ledger) -> (String, usize) {
    let root = ledger.root_hash().await.to_hex();
    let blocks = ledger.with_state(|s| s.block_count()).await;
    (root, blocks)
}

/// Serves the peer service on `listener` and runs the peer manager and the gossip push
/// until `shutdown` turns true. `seeds` are `host:port` of peer services.
pub async fn run(
    net: Arc<Network>,
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    seeds: Vec<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    manager::add_seeds(&net, &seeds);
    let manager = tokio::spawn(manager::run(net.clone(), shutdown.clone()));
    let push = tokio::spawn(gossip::push_loop(net.clone(), shutdown.clone()));
    let result = service::serve(net.clone(), routes, listener, wait_true(shutdown)).await;
    let _ = manager.await;
    let _ = push.await;
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
