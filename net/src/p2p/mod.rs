//! The peer-to-peer transport (issue 21, docs/p2p.md): one rust-libp2p swarm, driven by one
//! task ([`swarm`]), carries every connection to a peer. TCP and QUIC on the peer port, noise
//! (TCP) and libp2p-tls (QUIC) for encryption and the peer's key, yamux streams, identify,
//! and libp2p-stream for the raw `/neuroshard/peer/1` streams `peer.proto` runs over.
//!
//! The swarm is keyed by the wallet's secp256k1 key, so a peer id and a wallet address are
//! two views of one key ([`address_of`]): the transport's handshake proves the address.
//!
//! [`Transport`] is the handle the rest of the crate uses: dial a `host:port` (the peer id is
//! learned from the connection), open a stream to a peer id (on the connection that exists,
//! whichever side opened it), and the remote address of a peer's connection.

pub mod admit;
pub mod gossip;
pub mod io;
pub mod kad;
pub mod relay;
pub mod swarm;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use neuroshard_identity::{Address, Wallet};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use super::NetworkError;

/// The protocol `peer.proto` (HTTP/2, tonic) runs over: one HTTP/2 connection per stream.
pub const PEER_PROTOCOL: StreamProtocol = StreamProtocol::new("/neuroshard/peer/1");

/// What identify tells peers this node runs.
pub const AGENT_PROTOCOL: &str = "/neuroshard/1";

/// The libp2p key of `wallet`: its secp256k1 secret, so the peer id is the wallet's key.
pub fn keypair(wallet: &Wallet) -> Result<libp2p::identity::Keypair, NetworkError> {
    let mut secret = wallet.secret_bytes();
    let key = libp2p::identity::secp256k1::SecretKey::try_from_bytes(&mut secret)
        .map_err(|e| NetworkError::Transport(format!("wallet key: {e}")))?;
    Ok(libp2p::identity::secp256k1::Keypair::from(key).into())
}

/// The wallet address of a peer id: defined for secp256k1 peer ids only (what every node
/// uses); any other key type is refused.
pub fn address_of(peer: &PeerId) -> Result<Address, NetworkError> {
    let bad = |reason: String| NetworkError::Malformed {
        what: "peer id",
        reason,
    };
    // A secp256k1 key is short enough to be inlined in the peer id (identity multihash).
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if hash.code() != 0 {
        return Err(bad(format!("{peer} does not carry its public key")));
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(hash.digest())
        .map_err(|e| bad(format!("{peer}: {e}")))?;
    let key = key
        .try_into_secp256k1()
        .map_err(|_| bad(format!("{peer} is not a secp256k1 key")))?;
    Address::from_sec1_public_key(&key.to_bytes()).map_err(|e| bad(e.to_string()))
}

/// The IP and port of a TCP or QUIC multiaddr (None for a relayed or DNS one).
pub fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(port) | Protocol::Udp(port) => {
                return ip.map(|ip| SocketAddr::new(ip, port));
            }
            _ => {}
        }
    }
    None
}

/// The multiaddrs to dial for `addr` (`ip:port`): TCP first (a closed port answers at once,
/// where a QUIC dial to nothing waits out its handshake timeout), then QUIC.
pub fn multiaddrs(addr: SocketAddr) -> Vec<Multiaddr> {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let base = Multiaddr::empty().with(ip);
    vec![
        base.clone().with(Protocol::Tcp(addr.port())),
        base.with(Protocol::Udp(addr.port())).with(Protocol::QuicV1),
    ]
}

/// A request to the swarm task.
pub(crate) enum Command {
    /// Dial `addrs` (one peer, its peer id unknown) in turn; the reply is the peer id of the
    /// first connection that comes up.
    Dial {
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<PeerId, DialFailure>>,
    },
    /// Close every connection to a peer.
    Disconnect(PeerId),
    /// A DHT request (provide layers, find holders).
    Kad(kad::KadCommand),
    /// Join a gossip topic.
    Subscribe(String),
    /// Publish a message on a gossip topic.
    Publish { topic: String, data: Vec<u8> },
    /// The verdict on a received gossip message.
    Report {
        id: libp2p::gossipsub::MessageId,
        from: PeerId,
        verdict: gossip::Verdict,
    },
}

/// Why a dial found no peer.
#[derive(Debug)]
pub(crate) enum DialFailure {
    /// The address is this node's own.
    Itself,
    /// Refused or unreachable over TCP: nothing listens there (not worth a QUIC dial).
    Refused(String),
    Failed(String),
}

/// What the swarm task shares with the handles: the peers it is connected to.
#[derive(Default)]
pub(crate) struct Book {
    /// Remote address of the latest open connection of each connected peer.
    pub(crate) remote: RwLock<HashMap<PeerId, Multiaddr>>,
    /// `host:port` dialed or announced -> the peer id that answered there.
    pub(crate) by_addr: RwLock<HashMap<String, PeerId>>,
    /// Connected peers whose every open connection goes through a relay, and since when.
    pub(crate) relayed: RwLock<HashMap<PeerId, std::time::Instant>>,
    /// The circuit addresses each connected peer listens on (identify), `/p2p/<peer>` last.
    pub(crate) circuits: RwLock<HashMap<PeerId, Vec<Multiaddr>>>,
    /// The listen addresses each connected peer reported (identify).
    pub(crate) listen: RwLock<HashMap<PeerId, Vec<Multiaddr>>>,
    /// The relays holding an accepted reservation for this node (behind a NAT).
    pub(crate) reservations: RwLock<std::collections::BTreeSet<PeerId>>,
    /// The node's traffic counters (the streams' bytes by path, [`crate::PeerState`]).
    pub(crate) state: Arc<crate::PeerState>,
}

/// A handle to the swarm task. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::UnboundedSender<Command>,
    book: Arc<Book>,
    /// The gossip messages received, for the one reader that takes them.
    gossip_in: Arc<parking_lot::Mutex<Option<mpsc::Receiver<gossip::Inbound>>>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport({})", self.peer_id)
    }
}

impl Transport {
    /// This node's peer id (its wallet key).
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The peer id at `addr` (`host:port`): the one already known there, or the one a new
    /// connection (TCP, then QUIC) reports.
    pub async fn resolve(&self, addr: &str) -> Result<PeerId, NetworkError> {
        let known = self.book.by_addr.read().get(addr).copied();
        if let Some(peer) = known
            && self.is_connected(&peer)
        {
            return Ok(peer);
        }
        // A node behind a NAT is known by a circuit address: dialed through its relay.
        let addrs = match relay::circuit_address(addr) {
            Some((_, peer)) if self.is_connected(&peer) => {
                self.learn(addr, peer);
                return Ok(peer);
            }
            Some((circuit, _)) => vec![circuit],
            None => {
                let target = tokio::net::lookup_host(addr)
                    .await
                    .map_err(|_| NetworkError::BadAddress { addr: addr.into() })?
                    .next()
                    .ok_or_else(|| NetworkError::BadAddress { addr: addr.into() })?;
                multiaddrs(target)
            }
        };
        let peer = self.dial(addr, addrs).await?;
        self.learn(addr, peer);
        Ok(peer)
    }

    /// Dials `addrs` (one peer, `addr` in errors) in turn, on a new connection: the peer id
    /// of the first that comes up. A bench pins the transport with it (TCP or QUIC only).
    pub async fn dial(&self, addr: &str, addrs: Vec<Multiaddr>) -> Result<PeerId, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Dial { addrs, reply })
            .map_err(|_| NetworkError::Transport("the swarm task has stopped".into()))?;
        let peer = tokio::time::timeout(super::CONNECT_TIMEOUT, answer)
            .await
            .map_err(|_| NetworkError::Transport(format!("dialing {addr}: timed out")))?
            .map_err(|_| NetworkError::Transport("the swarm task has stopped".into()))?
            .map_err(|e| match e {
                DialFailure::Itself => NetworkError::SelfConnection { addr: addr.into() },
                DialFailure::Refused(reason) => NetworkError::PeerDown {
                    addr: addr.into(),
                    reason,
                },
                DialFailure::Failed(e) => NetworkError::Transport(format!("dialing {addr}: {e}")),
            })?;
        Ok(peer)
    }

    /// Closes the connections to the node at `addr` (`host:port`), if it is known: the next
    /// call dials it again, on a new connection.
    pub fn disconnect(&self, addr: &str) {
        let Some(peer) = self.book.by_addr.write().remove(addr) else {
            return;
        };
        self.book.remote.write().remove(&peer);
        // A stopped swarm has no connection left to close.
        let _ = self.commands.send(Command::Disconnect(peer));
    }

    /// Records that `peer` answers at `addr` (`host:port`).
    pub fn learn(&self, addr: &str, peer: PeerId) {
        self.book.by_addr.write().insert(addr.to_string(), peer);
    }

    /// Whether a connection to `peer` is open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.book.remote.read().contains_key(peer)
    }

    /// The IP and port `peer`'s open connection comes from (None when it is relayed or
    /// there is none).
    pub fn remote_of(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.book.remote.read().get(peer).and_then(socket_addr)
    }

    /// The relays holding an accepted reservation for this node: its circuit addresses go
    /// through them (none for a node reachable directly).
    pub fn reservations(&self) -> Vec<PeerId> {
        self.book.reservations.read().iter().copied().collect()
    }

    /// Whether every open connection to `peer` goes through a relay.
    pub fn is_relayed(&self, peer: &PeerId) -> bool {
        self.book.relayed.read().contains_key(peer)
    }

    /// Whether the node at `addr` (as dialed or learned) is connected through a relay only
    /// (None: no connection to it is known).
    pub fn relayed_at(&self, addr: &str) -> Option<bool> {
        let peer = self.book.by_addr.read().get(addr).copied()?;
        self.is_connected(&peer).then(|| self.is_relayed(&peer))
    }

    /// The address to tell others for the node known at `addr`: its first circuit address
    /// when it listens through a relay (it said so in identify: it is not reachable
    /// directly), else None.
    pub fn circuit_of(&self, addr: &str) -> Option<String> {
        let peer = self.book.by_addr.read().get(addr).copied()?;
        let circuits = self.book.circuits.read();
        circuits.get(&peer)?.first().map(|a| a.to_string())
    }

    /// Waits for a direct connection to `peer` while it is reached through a relay only and
    /// its relayed connection is younger than `max` (hole punching may still succeed); true
    /// when the path is direct. A peer relayed for longer is used through the relay at once.
    pub async fn wait_direct(&self, peer: &PeerId, max: std::time::Duration) -> bool {
        loop {
            let since = self.book.relayed.read().get(peer).copied();
            match since {
                None => return true,
                Some(t) if t.elapsed() >= max => return false,
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }

    /// [`Transport::wait_direct`] for the peer known at `addr`.
    pub async fn wait_direct_at(&self, addr: &str, max: std::time::Duration) -> bool {
        let peer = self.book.by_addr.read().get(addr).copied();
        match peer {
            Some(p) => self.wait_direct(&p, max).await,
            None => false,
        }
    }

    /// Opens a `/neuroshard/peer/1` stream to `peer`, on its open connection (dialing it
    /// when there is none and its address is known to the swarm).
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetworkError> {
        self.control
            .clone()
            .open_stream(peer, PEER_PROTOCOL)
            .await
            .map_err(|e| NetworkError::Transport(format!("opening a stream to {peer}: {e}")))
    }

    /// The number of peers with an open connection.
    pub fn connections(&self) -> usize {
        self.book.remote.read().len()
    }

    /// The peer-port `host:port` of a connected peer: the IP its connection comes from and
    /// the TCP port it listens on (None until identify reported it, or for a relayed one).
    pub fn peer_port_address(&self, peer: &PeerId) -> Option<String> {
        let ip = self.remote_of(peer)?.ip();
        kad::peer_port_address(ip, self.book.listen.read().get(peer)?)
    }

    fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.commands
            .send(command)
            .map_err(|_| NetworkError::Transport("the swarm task has stopped".into()))
    }

    /// Publishes provider records in the DHT for exactly `layers` (`layer_{i}`), withdrawing
    /// those of the layers no longer held.
    pub fn provide(&self, layers: Vec<u32>) -> Result<(), NetworkError> {
        self.send(Command::Kad(kad::KadCommand::Provide(layers)))
    }

    /// Looks up the holders of `layer` in the DHT; the swarm dials those it finds. Answers
    /// the peer ids found (this node's excluded), none when nobody holds it.
    pub async fn find_holders(&self, layer: u32) -> Result<Vec<PeerId>, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Kad(kad::KadCommand::Find { layer, reply }))?;
        tokio::time::timeout(kad::LOOKUP_TIMEOUT + super::CONNECT_TIMEOUT, answer)
            .await
            .map_err(|_| NetworkError::Transport(format!("looking up layer {layer}: timed out")))?
            .map_err(|_| NetworkError::Transport("the swarm task has stopped".into()))
    }

    /// Joins the gossip topic `topic`.
    pub fn subscribe(&self, topic: &str) -> Result<(), NetworkError> {
        self.send(Command::Subscribe(topic.to_string()))
    }

    /// Publishes `data` on the gossip topic `topic` (to its mesh; a message already seen is
    /// not sent again).
    pub fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), NetworkError> {
        self.send(Command::Publish {
            topic: topic.to_string(),
            data,
        })
    }

    /// Reports the verdict on a received gossip message (see [`gossip::Verdict`]).
    pub fn report(&self, message: &gossip::Inbound, verdict: gossip::Verdict) {
        // A stopped swarm forwards nothing anyway.
        let _ = self.send(Command::Report {
            id: message.id.clone(),
            from: message.from,
            verdict,
        });
    }

    /// The gossip messages received on the subscribed topics: the first caller gets them,
    /// later ones None.
    pub fn take_gossip(&self) -> Option<mpsc::Receiver<gossip::Inbound>> {
        self.gossip_in.lock().take()
    }

    /// The streams peers open to this node.
    pub fn accept(&self) -> Result<libp2p_stream::IncomingStreams, NetworkError> {
        self.control
            .clone()
            .accept(PEER_PROTOCOL)
            .map_err(|e| NetworkError::Transport(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_id_is_the_wallet_address() {
        let wallet = Wallet::from_seed(3);
        let peer = keypair(&wallet).unwrap().public().to_peer_id();
        assert_eq!(address_of(&peer).unwrap(), wallet.address());
        let other = keypair(&Wallet::from_seed(4))
            .unwrap()
            .public()
            .to_peer_id();
        assert_ne!(address_of(&other).unwrap(), wallet.address());
        // An ed25519 peer id names no wallet.
        let ed = libp2p::identity::Keypair::generate_ed25519();
        assert!(address_of(&ed.public().to_peer_id()).is_err());
        // Random bytes are no key.
        assert!(address_of(&PeerId::random()).is_err());
    }

    /// A dial of a closed peer port fails at once, as a dead peer's must: the refused TCP
    /// dial ends it (no QUIC dial waits out its handshake timeout after it).
    #[tokio::test]
    async fn a_dial_of_a_closed_port_fails_at_once() {
        let admission = admit::Admission {
            caps: crate::admission::Caps {
                per_address: 8,
                total: 8,
                new_per_second: 0,
            },
            state: Arc::new(crate::PeerState::default()),
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let options = relay::Options::default();
        let t = swarm::start(&Wallet::from_seed(5), None, admission, options, shutdown)
            .await
            .unwrap();
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let e = t.resolve(&format!("127.0.0.1:{port}")).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, NetworkError::PeerDown { .. }), "{e}");
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn socket_addresses_of_multiaddrs() {
        let addr: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        for m in multiaddrs(addr) {
            assert_eq!(socket_addr(&m), Some(addr));
        }
        let relayed: Multiaddr = "/ip4/10.0.0.1/tcp/4001/p2p-circuit".parse().unwrap();
        assert_eq!(socket_addr(&relayed), None);
    }
}
