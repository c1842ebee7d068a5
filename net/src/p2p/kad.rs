//! Discovery (docs/p2p.md step 5): a Kademlia DHT on `/neuroshard/kad/1` maps each layer to
//! its holders under the original's keys, `layer_{i}`. A node that holds layers publishes a
//! provider record for each ([`Discovery::provide`], again whenever its layers change and
//! whenever its routing table gains peers while it is small, so records made before the
//! node knew anyone still spread); a node that needs holders looks them up
//! ([`Discovery::find`]: O(log N) queries) and the swarm dials the holders found while the
//! query still knows their addresses.
//!
//! The routing table is fed by identify (a peer's listen addresses) and by the connections
//! this node dials; the tracker and `--seed-peers` stay the bootstrap: the first connections
//! come from them. Every node that listens is a DHT server; a dial-only client (a test's
//! observer) only asks.
//!
//! Nothing here touches the swarm task's loop beyond [`Discovery::on_event`],
//! [`Discovery::tick`] and [`Discovery::command`] (the relay helper shares that loop).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey, store::MemoryStore};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::oneshot;

/// The DHT's protocol.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/neuroshard/kad/1");

/// A lookup gives up after this long (it answers with the holders found so far).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Provider records live this long on the nodes that store them...
pub const PROVIDER_TTL: Duration = Duration::from_secs(600);
/// ...and their holder publishes them again this often (well inside the TTL, so a holder's
/// records never lapse while it runs; a holder that leaves is forgotten within the TTL).
pub const REPUBLISH_INTERVAL: Duration = Duration::from_secs(120);

/// While the routing table has fewer peers than a Kademlia bucket (K = 20), each new peer
/// in it makes the node publish its records again, at most this often: a record published
/// when the node knew nobody reaches the nodes closest to its key once it knows them.
const REPROVIDE_DEBOUNCE: Duration = Duration::from_secs(2);

/// The DHT key of the holders of `layer`: `layer_{i}`, as in the original.
pub fn layer_key(layer: u32) -> RecordKey {
    RecordKey::new(&format!("layer_{layer}"))
}

/// The Kademlia behaviour: server mode when the node listens (`server`), client otherwise.
pub(crate) fn behaviour(peer: PeerId, server: bool) -> kad::Behaviour<MemoryStore> {
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config
        .set_query_timeout(LOOKUP_TIMEOUT)
        .set_provider_record_ttl(Some(PROVIDER_TTL))
        .set_provider_publication_interval(Some(REPUBLISH_INTERVAL));
    let mut kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), config);
    kad.set_mode(Some(if server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    kad
}

/// A request to the DHT, sent to the swarm task.
pub(crate) enum KadCommand {
    /// Hold provider records for exactly these layers (withdrawing the others).
    Provide(Vec<u32>),
    /// Find the holders of a layer: the reply is their peer ids (this node's excluded).
    Find {
        layer: u32,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// A lookup in flight.
struct Lookup {
    found: HashSet<PeerId>,
    reply: oneshot::Sender<Vec<PeerId>>,
}

/// The DHT state the swarm task keeps: the layers this node provides and the lookups in
/// flight.
#[derive(Default)]
pub(crate) struct Discovery {
    provided: BTreeSet<u32>,
    lookups: HashMap<QueryId, Lookup>,
    /// When the records are to be published again (new peers in a small routing table).
    reprovide_at: Option<Instant>,
}

impl Discovery {
    /// Handles a command; `connected` tells whether a peer has an open connection (a holder
    /// found is dialed when it has none).
    pub(crate) fn command(&mut self, kad: &mut kad::Behaviour<MemoryStore>, command: KadCommand) {
        match command {
            KadCommand::Provide(layers) => self.provide(kad, layers),
            KadCommand::Find { layer, reply } => {
                let id = kad.get_providers(layer_key(layer));
                self.lookups.insert(
                    id,
                    Lookup {
                        found: HashSet::new(),
                        reply,
                    },
                );
            }
        }
    }

    /// Publishes a record for each layer in `layers` not provided yet, withdraws the rest.
    fn provide(&mut self, kad: &mut kad::Behaviour<MemoryStore>, layers: Vec<u32>) {
        let wanted: BTreeSet<u32> = layers.into_iter().collect();
        for gone in self.provided.difference(&wanted) {
            kad.stop_providing(&layer_key(*gone));
        }
        for new in wanted.difference(&self.provided) {
            if let Err(e) = kad.start_providing(layer_key(*new)) {
                tracing::warn!(layer = new, error = %e, "cannot store a provider record");
            }
        }
        if wanted != self.provided {
            tracing::debug!(layers = ?wanted, "providing layers in the DHT");
        }
        self.provided = wanted;
    }

    /// Publishes every record again if a reprovide is due.
    pub(crate) fn tick(&mut self, kad: &mut kad::Behaviour<MemoryStore>, now: Instant) {
        if self.reprovide_at.is_some_and(|at| at <= now) {
            self.reprovide_at = None;
            for layer in &self.provided {
                if let Err(e) = kad.start_providing(layer_key(*layer)) {
                    tracing::debug!(layer, error = %e, "cannot store a provider record");
                }
            }
        }
    }

    /// Handles an event of the Kademlia behaviour. Returns the holders to dial (found by a
    /// lookup, not connected): the dial must happen now, while the query knows their
    /// addresses.
    pub(crate) fn on_event(
        &mut self,
        kad: &mut kad::Behaviour<MemoryStore>,
        event: kad::Event,
        local: PeerId,
    ) -> Vec<DialOpts> {
        let mut dials = Vec::new();
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                    providers, ..
                })) => {
                    if let Some(lookup) = self.lookups.get_mut(&id) {
                        for p in providers {
                            if p != local && lookup.found.insert(p) {
                                dials.push(
                                    DialOpts::peer_id(p)
                                        .condition(PeerCondition::DisconnectedAndNotDialing)
                                        .build(),
                                );
                            }
                        }
                    }
                    if step.last {
                        self.finish(id);
                    }
                }
                QueryResult::GetProviders(_) if step.last => self.finish(id),
                _ => {}
            },
            kad::Event::RoutingUpdated { is_new_peer, .. } if is_new_peer => {
                let known: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
                if known < 20 && !self.provided.is_empty() && self.reprovide_at.is_none() {
                    self.reprovide_at = Some(Instant::now() + REPROVIDE_DEBOUNCE);
                }
            }
            _ => {}
        }
        dials
    }

    fn finish(&mut self, id: QueryId) {
        if let Some(lookup) = self.lookups.remove(&id) {
            let _ = lookup.reply.send(lookup.found.into_iter().collect());
        }
    }
}

/// The addresses of a peer's identify report worth adding to the routing table: every
/// listen address but an unspecified one (`0.0.0.0`).
pub(crate) fn routable(addrs: &[Multiaddr]) -> Vec<Multiaddr> {
    addrs
        .iter()
        .filter(|a| {
            super::socket_addr(a).is_some_and(|s| !s.ip().is_unspecified() && s.port() != 0)
        })
        .cloned()
        .collect()
}

/// The peer-port `host:port` of a peer: the IP its connection comes from (what a peer says
/// of its own host is not trusted) and the TCP port it listens on (from identify).
pub(crate) fn peer_port_address(remote: std::net::IpAddr, listen: &[Multiaddr]) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    let port = listen.iter().find_map(|a| {
        let mut tcp = None;
        for p in a.iter() {
            match p {
                Protocol::Tcp(port) => tcp = Some(port),
                Protocol::P2pCircuit => return None,
                _ => {}
            }
        }
        tcp.filter(|p| *p != 0)
    })?;
    Some(std::net::SocketAddr::new(remote, port).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_originals() {
        assert_eq!(layer_key(7).as_ref(), b"layer_7");
        assert_ne!(layer_key(1), layer_key(11));
    }

    #[test]
    fn addresses_of_identify_reports() {
        let listen: Vec<Multiaddr> = vec![
            "/ip4/0.0.0.0/udp/9001/quic-v1".parse().unwrap(),
            "/ip4/127.0.0.1/udp/9001/quic-v1".parse().unwrap(),
            "/ip4/127.0.0.1/tcp/9001".parse().unwrap(),
        ];
        assert_eq!(routable(&listen), listen[1..].to_vec());
        let ip = "10.1.2.3".parse().unwrap();
        assert_eq!(
            peer_port_address(ip, &listen).as_deref(),
            Some("10.1.2.3:9001")
        );
        let relayed: Vec<Multiaddr> = vec![
            "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
                .parse()
                .unwrap(),
        ];
        assert_eq!(peer_port_address(ip, &relayed), None);
    }
}
