//! Holders of layers through the DHT (docs/p2p.md step 5). Each node provides `layer_{i}`
//! for the layers it holds ([`Network::set_local_role`] republishes on every change). The
//! lookup task ([`run`]) finds the holders this node needs and is not connected to: those of
//! the layers next to its own (the stages before and after it), replicas of its own layers
//! (DiLoCo), and layers a stage asked for because its route had a gap
//! ([`Network::want_layers`]). What it finds goes to the peer manager's addresses, marked
//! with the layer, and the manager prefers those peers within its bound
//! ([`Network::max_peers`]): lookups fill the gaps a bounded table leaves.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_identity::Address;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{CONNECT_TIMEOUT, Network, NetworkError, manager, stopped};

/// How often the lookup task looks for layers without a connected holder.
pub const LOOKUP_TICK: Duration = Duration::from_secs(2);
/// A layer is looked up at most this often...
pub const LOOKUP_EVERY: Duration = Duration::from_secs(10);
/// ...and, when nobody held it at the last lookup, at most this often.
pub const LOOKUP_EMPTY_EVERY: Duration = Duration::from_secs(30);
/// A layer a stage asked for is looked for this long after its last ask.
pub const WANT_FOR: Duration = Duration::from_secs(60);
/// Most layers one ask may name (a route's gap is a few stages).
const MAX_WANTED: u32 = 1024;

/// A holder found in the DHT: its proven identity and its peer-port `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: Address,
    pub addr: String,
}

impl Network {
    /// Publishes this node's provider records for `layers` (once the transport runs).
    pub(crate) fn provide(&self, layers: Vec<u32>) {
        if let Some(t) = self.transport.get()
            && let Err(e) = t.provide(layers)
        {
            tracing::debug!(error = %e, "providing layers in the DHT");
        }
    }

    /// A stage found no connected holder for `layers`: the lookup task looks them up in the
    /// DHT within [`LOOKUP_TICK`] and the manager connects to the holders it finds.
    pub fn want_layers(&self, layers: Range<u32>) {
        let now = Instant::now();
        let mut g = self.wanted.lock();
        for layer in layers.take(MAX_WANTED as usize) {
            g.insert(layer, now);
        }
    }

    /// The layers asked for within [`WANT_FOR`].
    pub(crate) fn wanted_layers(&self, now: Instant) -> HashSet<u32> {
        let mut g = self.wanted.lock();
        g.retain(|_, at| now.duration_since(*at) < WANT_FOR);
        g.keys().copied().collect()
    }

    /// Looks up the holders of `layer` in the DHT (O(log N) queries); the transport dials
    /// each one found. Answers those whose peer port is known within [`CONNECT_TIMEOUT`].
    pub async fn find_holders(&self, layer: u32) -> Result<Vec<Holder>, NetworkError> {
        let transport = self.transport()?;
        let peers = transport.find_holders(layer).await?;
        let mut found = Vec::new();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut left: Vec<_> = peers;
        while !left.is_empty() {
            left.retain(|peer| match transport.peer_port_address(peer) {
                Some(addr) => {
                    if let Ok(id) = crate::p2p::address_of(peer) {
                        found.push(Holder { id, addr });
                    }
                    false
                }
                None => true,
            });
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(found)
    }
}

/// The layers worth a lookup now: the neighbours of this node's layers, its own layers
/// (replicas) and the wanted ones, less those a connected peer holds.
pub(crate) fn needed(own: &[u32], wanted: &HashSet<u32>, covered: &HashSet<u32>) -> Vec<u32> {
    let mut out: HashSet<u32> = wanted.clone();
    if let (Some(lo), Some(hi)) = (own.iter().min(), own.iter().max()) {
        out.extend(own.iter().copied());
        if *lo > 0 {
            out.insert(lo - 1);
        }
        out.insert(hi.saturating_add(1));
    }
    let mut out: Vec<u32> = out.difference(covered).copied().collect();
    out.sort_unstable();
    out
}

/// Looks up every [`LOOKUP_TICK`] the layers [`needed`] lists (each at most every
/// [`LOOKUP_EVERY`]) and hands the holders found to the peer manager, until `shutdown`.
pub async fn run(net: Arc<Network>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown;
    let mut tick = tokio::time::interval(LOOKUP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each layer may be looked up again.
    let mut next: HashMap<u32, Instant> = HashMap::new();
    let mut lookups: JoinSet<(u32, Result<Vec<Holder>, NetworkError>)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {
                let now = Instant::now();
                let own = net.local_role().layers;
                let covered: HashSet<u32> = net
                    .peers
                    .conns_with_info()
                    .into_iter()
                    .flat_map(|(_, info)| info.layers)
                    .collect();
                for layer in needed(&own, &net.wanted_layers(now), &covered) {
                    if next.get(&layer).is_some_and(|at| *at > now) {
                        continue;
                    }
                    next.insert(layer, now + LOOKUP_EVERY);
                    let net = net.clone();
                    lookups.spawn(async move { (layer, net.find_holders(layer).await) });
                }
            }
            Some(done) = lookups.join_next(), if !lookups.is_empty() => {
                let Ok((layer, result)) = done else { continue };
                match result {
                    Ok(holders) if holders.is_empty() => {
                        next.insert(layer, Instant::now() + LOOKUP_EMPTY_EVERY);
                    }
                    Ok(holders) => {
                        tracing::debug!(layer, found = holders.len(), "holders found in the DHT");
                        for h in holders {
                            manager::learn_holder(&net, &h.addr, h.id, layer);
                        }
                    }
                    Err(e) => tracing::debug!(layer, error = %e, "DHT lookup failed"),
                }
            }
        }
    }
    lookups.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_replicas_and_wanted_layers_are_looked_up() {
        let none = HashSet::new();
        assert_eq!(needed(&[2, 3], &none, &none), vec![1, 2, 3, 4]);
        assert_eq!(needed(&[0, 1], &none, &HashSet::from([2])), vec![0, 1]);
        assert_eq!(needed(&[], &HashSet::from([5, 6]), &none), vec![5, 6]);
        assert!(needed(&[], &none, &none).is_empty());
    }
}
