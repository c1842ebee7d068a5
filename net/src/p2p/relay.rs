//! Relays, hole punching and reachability (docs/p2p.md step 4, issue 21 item 2).
//!
//! - **AutoNAT** (v1, client and server on every node): peers dial back the addresses this
//!   node is observed at; a success confirms an external address (the node is public), a
//!   failure makes it private. `--announce-ip`/`--announce-port` add a confirmed address.
//! - **Relay v2 server** on every node, with [`Limits`]; libp2p advertises the hop protocol
//!   only while the node has a confirmed external address, so only public nodes relay.
//! - **Relay client**: a private node reserves on [`RESERVATIONS`] relays among its connected
//!   peers that advertise the hop protocol and that it reached directly, and identify tells
//!   its peers the `/p2p-circuit` addresses; a relay that goes is replaced by another one.
//! - **DCUtR** upgrades a relayed connection to a direct one where the NATs allow; once a
//!   direct connection to a peer is up its relayed ones are closed, so every stream (and
//!   every call) after that runs direct.
//!
//! [`Paths`] keeps the state of all this in the swarm task and in the [`Book`] the handles
//! read: which peers are reached only through a relay, and each peer's circuit addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, identify, relay};

use super::swarm::{Behaviour, BehaviourEvent};
use super::{Book, multiaddrs};

/// Relays a private node holds a reservation on.
pub const RESERVATIONS: usize = 2;

/// How long a heavy call to a peer reached only through a relay waits for hole punching to
/// give a direct connection before it goes through the relay.
pub const DIRECT_WAIT: Duration = Duration::from_secs(5);

/// The relay v2 hop protocol: a peer that advertises it relays for others.
const HOP: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");

/// What this node's relay server accepts (`[peer]` `relay_*` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Reservations held at once, all peers together.
    pub max_reservations: usize,
    /// Reservations one peer may hold at once.
    pub max_reservations_per_peer: usize,
    /// Circuits relayed at once, all peers together.
    pub max_circuits: usize,
    /// Circuits one peer may have relayed at once.
    pub max_circuits_per_peer: usize,
    /// Bytes one circuit may carry (both ways) before the relay closes it.
    pub max_circuit_bytes: u64,
    /// How long one circuit may stay open before the relay closes it.
    pub max_circuit_duration: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_bytes: 1 << 30,
            max_circuit_duration: Duration::from_secs(3600),
        }
    }
}

/// How the swarm reaches and is reached beyond its LAN.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The relay server's limits.
    pub limits: Limits,
    /// Addresses this node is reachable at from outside (a forwarded port:
    /// `--announce-ip`/`--announce-port`), added as confirmed external addresses.
    pub external: Vec<SocketAddr>,
}

/// The relay server behaviour with `limits`.
pub(crate) fn server(peer: PeerId, limits: &Limits) -> relay::Behaviour {
    relay::Behaviour::new(
        peer,
        relay::Config {
            max_reservations: limits.max_reservations,
            max_reservations_per_peer: limits.max_reservations_per_peer,
            max_circuits: limits.max_circuits,
            max_circuits_per_peer: limits.max_circuits_per_peer,
            max_circuit_bytes: limits.max_circuit_bytes,
            max_circuit_duration: limits.max_circuit_duration,
            ..Default::default()
        },
    )
}

/// AutoNAT v1, client and server. Probes start soon after the first connections and are
/// retried often enough that a node knows within a minute whether it is reachable.
pub(crate) fn autonat(peer: PeerId) -> autonat::Behaviour {
    autonat::Behaviour::new(
        peer,
        autonat::Config {
            timeout: Duration::from_secs(15),
            boot_delay: Duration::from_secs(3),
            retry_interval: Duration::from_secs(15),
            throttle_server_period: Duration::from_secs(10),
            // Lab and LAN networks use private address space; dial-backs prove reachability
            // whatever the range.
            only_global_ips: false,
            ..Default::default()
        },
    )
}

/// DCUtR.
pub(crate) fn dcutr(peer: PeerId) -> dcutr::Behaviour {
    dcutr::Behaviour::new(peer)
}

/// Whether `addr` goes through a relay.
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// A circuit address (`.../p2p/<relay>/p2p-circuit/p2p/<peer>`) of `text`, with its peer id,
/// or None when `text` is not one.
pub fn circuit_address(text: &str) -> Option<(Multiaddr, PeerId)> {
    let addr: Multiaddr = text.parse().ok()?;
    if !is_circuit(&addr) {
        return None;
    }
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some((addr, peer)),
        _ => None,
    }
}

/// The state of reachability, reservations and connection paths, owned by the swarm task.
#[derive(Default)]
pub(crate) struct Paths {
    /// AutoNAT said this node is not reachable from outside.
    private: bool,
    /// Peers that relay (identify lists the hop protocol), with the address we dialed them
    /// at (a relay is only used when reached directly by this node).
    relays: HashMap<PeerId, Multiaddr>,
    /// Relays a reservation is held or requested on: the listener of each.
    reserved: HashMap<PeerId, ListenerId>,
    /// Every open connection: its peer and whether it is relayed.
    conns: HashMap<ConnectionId, (PeerId, bool)>,
}

impl Paths {
    /// Adds the configured external addresses (TCP and QUIC of each).
    pub(crate) fn start(swarm: &mut Swarm<Behaviour>, options: &Options) -> Paths {
        for a in &options.external {
            for m in multiaddrs(*a) {
                swarm.add_external_address(m);
            }
        }
        Paths::default()
    }

    /// Follows one swarm event (the swarm task calls this for each, before its own match).
    pub(crate) fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        book: &Book,
        event: &SwarmEvent<BehaviourEvent>,
    ) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                self.conns.insert(*connection_id, (*peer_id, relayed));
                if let ConnectedPoint::Dialer { address, .. } = endpoint
                    && !relayed
                {
                    // Where a relay candidate is reached (kept if it turns out to relay).
                    self.relays
                        .entry(*peer_id)
                        .or_insert_with(|| address.clone());
                }
                if relayed {
                    tracing::debug!(peer = %peer_id, "relayed connection up");
                } else {
                    // A direct path exists: the relayed ones go, so streams run direct.
                    let relayed: Vec<ConnectionId> = self
                        .conns
                        .iter()
                        .filter(|(_, (p, r))| p == peer_id && *r)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in relayed {
                        tracing::debug!(peer = %peer_id, "direct connection up: closing the relayed one");
                        swarm.close_connection(id);
                    }
                }
                self.publish(book, *peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.conns.remove(connection_id);
                if !self.conns.values().any(|(p, _)| p == peer_id) {
                    self.relays.remove(peer_id);
                    book.circuits.write().remove(peer_id);
                    // Its reservation ends with the connection (its listener closes).
                    if let Some(l) = self.reserved.remove(peer_id) {
                        swarm.remove_listener(l);
                    }
                }
                self.publish(book, *peer_id);
                self.reserve(swarm);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.reserved.retain(|_, l| l != listener_id);
                self.reserve(swarm);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let circuits: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| is_circuit(a))
                    .map(|a| with_peer(a.clone(), *peer_id))
                    .collect();
                if circuits.is_empty() {
                    book.circuits.write().remove(peer_id);
                } else {
                    book.circuits.write().insert(*peer_id, circuits);
                }
                if !info.protocols.contains(&HOP) {
                    self.relays.remove(peer_id);
                    if let Some(l) = self.reserved.remove(peer_id) {
                        swarm.remove_listener(l);
                    }
                } else if !self.relays.contains_key(peer_id) {
                    // A relay that dialed us: reachable at its announced addresses.
                    let usable = |a: &&Multiaddr| {
                        !is_circuit(a)
                            && super::socket_addr(a)
                                .is_some_and(|s| !s.ip().is_loopback() && !s.ip().is_unspecified())
                    };
                    if let Some(a) = info.listen_addrs.iter().find(usable) {
                        self.relays.insert(*peer_id, a.clone());
                    }
                }
                self.reserve(swarm);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let private = matches!(new, autonat::NatStatus::Private);
                tracing::info!(status = ?new, "reachability");
                if private != self.private {
                    self.private = private;
                    if !private {
                        // Reachable: the circuits are not needed any more.
                        for (_, l) in self.reserved.drain() {
                            swarm.remove_listener(l);
                        }
                    }
                }
                self.reserve(swarm);
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => {
                if let relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } = e
                    && self.reserved.contains_key(relay_peer_id)
                    && book.reservations.write().insert(*relay_peer_id)
                {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                tracing::debug!(event = ?e, "relay client");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => {
                tracing::debug!(peer = %e.remote_peer_id, result = ?e.result, "hole punching");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => {
                tracing::debug!(event = ?e, "relay server");
            }
            _ => {}
        }
        // A reservation whose listener is gone (its relay's connection closed, the relay
        // stopped relaying, the node became reachable) is no longer held.
        book.reservations
            .write()
            .retain(|p| self.reserved.contains_key(p));
    }

    /// Requests reservations up to [`RESERVATIONS`] while the node is private.
    fn reserve(&mut self, swarm: &mut Swarm<Behaviour>) {
        if !self.private || self.reserved.len() >= RESERVATIONS {
            return;
        }
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reserved.contains_key(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        candidates.sort_by_key(|(p, _)| *p);
        for (peer, addr) in candidates {
            if self.reserved.len() >= RESERVATIONS {
                break;
            }
            let circuit = with_peer(addr, peer).with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(l) => {
                    tracing::info!(relay = %peer, %circuit, "requesting a relay reservation");
                    self.reserved.insert(peer, l);
                }
                Err(e) => tracing::debug!(relay = %peer, error = %e, "no reservation"),
            }
        }
    }

    /// Updates which peers the book says are reached through a relay only.
    fn publish(&self, book: &Book, peer: PeerId) {
        let mut direct = false;
        let mut relayed = false;
        for (p, r) in self.conns.values() {
            if *p == peer {
                if *r {
                    relayed = true;
                } else {
                    direct = true;
                }
            }
        }
        let mut set = book.relayed.write();
        if relayed && !direct {
            set.entry(peer).or_insert_with(std::time::Instant::now);
        } else {
            set.remove(&peer);
        }
    }
}

/// `addr` ending in `/p2p/<peer>` (added when missing).
fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => addr,
        _ => addr.with(Protocol::P2p(peer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_name_their_peer() {
        let relay = PeerId::random();
        let peer = PeerId::random();
        let text = format!("/ip4/10.0.0.1/udp/9000/quic-v1/p2p/{relay}/p2p-circuit/p2p/{peer}");
        let (addr, id) = circuit_address(&text).unwrap();
        assert_eq!(id, peer);
        assert!(is_circuit(&addr));
        // A direct address, a circuit naming no peer and garbage are not circuit addresses.
        assert!(circuit_address("/ip4/10.0.0.1/tcp/9000").is_none());
        assert!(circuit_address(&format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit")).is_none());
        assert!(circuit_address("10.0.0.1:9000").is_none());
        let bare: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        assert_eq!(
            with_peer(bare.clone(), peer),
            with_peer(with_peer(bare, peer), peer)
        );
    }
}
