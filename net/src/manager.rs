//! The peer manager: keeps the addresses this node may dial (seeds, addresses learned from
//! handshakes and from peer exchange), dials them with backoff, and runs one task per
//! connected peer that pings it, measures RTT, asks it for its peers and drops it after
//! missed heartbeats, all in the one peer table ([`crate::table::PeerTable`]). Each new
//! connection is announced as a [`PeerUp`](crate::PeerUp) event.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_identity::Address;
use neuroshard_proto::peer as pb;
use parking_lot::MutexGuard;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::client::PeerConn;
use super::error::NetworkError;
use super::score::node_key;
use super::{DROP_AFTER, MAX_KNOWN_ADDRESSES, Network, PEX_INTERVAL, PING_INTERVAL, stopped};

/// How often the manager looks for addresses to dial.
const DIAL_TICK: Duration = Duration::from_millis(500);
/// Redial backoff: from 1 s, doubling, at most 30 s.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A learned (non-seed) address is forgotten after this many failed dials in a row.
const MAX_FAILURES: u32 = 5;
/// An address that led to an already connected node is checked again after this long.
const ALIAS_RECHECK: Duration = Duration::from_secs(30);

/// An address this node may dial.
#[derive(Debug, Clone)]
pub struct Known {
    /// Seeds are never forgotten.
    pub seed: bool,
    pub failures: u32,
    pub next_try: Instant,
    /// The address leads back to this node.
    pub is_self: bool,
    /// The node last found there.
    pub id: Option<Address>,
    /// The layers the node there holds, as peer exchange or the DHT said (empty: unknown).
    pub layers: Vec<u32>,
}

/// The port of a `host:port` string.
pub fn port_of(addr: &str) -> Option<u16> {
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    port.parse().ok().filter(|p| *p != 0)
}

/// `ip:port`, with brackets for IPv6.
pub fn join_host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// `host:port` for an IP literal (bracketed when IPv6) or a DNS name.
pub fn join_host_port_str(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => join_host_port(ip, port),
        Err(_) => format!("{host}:{port}"),
    }
}

/// How useful a peer holding `layers` is to this node (holding `own`): 3 when it holds a
/// wanted layer, 2 when it is a neighbour stage or a replica, 1 otherwise (and when its
/// layers are unknown: a seed is worth its place until something better is found).
pub(crate) fn usefulness(own: &[u32], wanted: &HashSet<u32>, layers: &[u32]) -> u8 {
    if layers.iter().any(|l| wanted.contains(l)) {
        return 3;
    }
    let (Some(lo), Some(hi)) = (own.iter().min(), own.iter().max()) else {
        return 1;
    };
    let near = |l: &u32| *l + 1 >= *lo && *l <= hi.saturating_add(1);
    if layers.iter().any(near) { 2 } else { 1 }
}

fn known(net: &Network) -> MutexGuard<'_, HashMap<String, Known>> {
    net.known.lock()
}

/// Adds the configured seed peers.
pub fn add_seeds(net: &Network, seeds: &[String]) {
    let mut g = known(net);
    for s in seeds {
        g.insert(
            s.trim().to_string(),
            Known {
                seed: true,
                failures: 0,
                next_try: Instant::now(),
                is_self: false,
                id: None,
                layers: Vec::new(),
            },
        );
    }
}

/// Remembers an address learned from a handshake or from peer exchange.
pub fn learn_address(net: &Network, addr: &str) {
    if port_of(addr).is_none() && crate::p2p::relay::circuit_address(addr).is_none() {
        return;
    }
    let mut g = known(net);
    if g.contains_key(addr) {
        return;
    }
    if g.len() >= MAX_KNOWN_ADDRESSES {
        // Make room by forgetting a learned address that failed; else ignore the new one.
        let victim = g
            .iter()
            .filter(|(_, k)| !k.seed && k.failures > 0)
            .max_by_key(|(_, k)| k.failures)
            .map(|(a, _)| a.clone());
        match victim {
            Some(v) => {
                g.remove(&v);
            }
            None => return,
        }
    }
    g.insert(
        addr.to_string(),
        Known {
            seed: false,
            failures: 0,
            next_try: Instant::now(),
            is_self: false,
            id: None,
            layers: Vec::new(),
        },
    );
}

/// Remembers a holder of `layer` found in the DHT at `addr`: dialed at once, ahead of less
/// useful addresses.
pub fn learn_holder(net: &Network, addr: &str, id: Address, layer: u32) {
    if id == net.id() || net.peers.contains(&id) {
        return;
    }
    learn_address(net, addr);
    if let Some(k) = known(net).get_mut(addr) {
        if !k.layers.contains(&layer) {
            k.layers.push(layer);
        }
        k.id = Some(id);
        if k.failures == 0 {
            k.next_try = Instant::now();
        }
    }
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1 << failures.min(5))
        .min(BACKOFF_MAX)
}

/// Addresses worth dialing now, the most useful first (see
/// [`usefulness`]), no more than the table has room for. When
/// the table is full and an address is more useful than the least useful peer (a holder of
/// a wanted layer, a neighbour stage or a replica), that peer gives up its place.
fn due(net: &Network, dialing: &HashSet<String>, now: Instant) -> Vec<String> {
    let own = net.local_role().layers;
    let wanted = net.wanted_layers(now);
    let mut candidates: Vec<(u8, String)> = known(net)
        .iter()
        .filter(|(addr, k)| {
            !k.is_self
                && k.next_try <= now
                && !dialing.contains(*addr)
                && !k.id.is_some_and(|id| net.peers.contains(&id))
        })
        .map(|(a, k)| (usefulness(&own, &wanted, &k.layers), a.clone()))
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut room = net
        .max_peers()
        .saturating_sub(net.peers.len() + dialing.len());
    if room == 0
        && dialing.is_empty()
        && let Some((best, _)) = candidates.first()
        && *best >= 2
    {
        let worst = net
            .peers
            .conns_with_info()
            .into_iter()
            .map(|(c, info)| (usefulness(&own, &wanted, &info.layers), c))
            .min_by_key(|(u, c)| (*u, c.id));
        if let Some((u, conn)) = worst
            && u < *best
            && net.peers.evict(&conn.id)
        {
            tracing::info!(peer = %conn.id, "peer dropped for a more useful one (peer.max_peers)");
            room = 1;
        }
    }
    candidates.into_iter().take(room).map(|(_, a)| a).collect()
}

/// Records a dial's outcome; returns the connection when it should be kept.
fn dialed(net: &Network, addr: &str, result: Result<PeerConn, NetworkError>) -> Option<PeerConn> {
    let now = Instant::now();
    let mut g = known(net);
    let entry = g.get_mut(addr)?;
    match result {
        Ok(conn) => {
            entry.failures = 0;
            entry.id = Some(conn.id);
            if net.peers.contains(&conn.id) {
                entry.next_try = now + ALIAS_RECHECK;
                return None;
            }
            if let Some(left) = net.scores.banned(&node_key(&conn.id), now) {
                entry.next_try = now + Duration::from_secs(left);
                return None;
            }
            Some(conn)
        }
        Err(NetworkError::SelfConnection { .. }) => {
            entry.is_self = true;
            None
        }
        Err(e) => {
            entry.failures += 1;
            entry.next_try = now + backoff(entry.failures);
            tracing::debug!(%addr, error = %e, failures = entry.failures, "dial failed");
            if !entry.seed && entry.failures >= MAX_FAILURES {
                g.remove(addr);
            }
            None
        }
    }
}

/// Runs until `shutdown` turns true.
pub async fn run(net: Arc<Network>, shutdown: watch::Receiver<bool>) {
    let mut dialing: HashSet<String> = HashSet::new();
    let mut dials: JoinSet<(String, Result<PeerConn, NetworkError>)> = JoinSet::new();
    let mut tick = tokio::time::interval(DIAL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {
                for addr in due(&net, &dialing, Instant::now()) {
                    dialing.insert(addr.clone());
                    let net = net.clone();
                    dials.spawn(async move {
                        let r = PeerConn::connect(net, &addr).await;
                        (addr, r)
                    });
                }
            }
            Some(done) = dials.join_next(), if !dials.is_empty() => {
                let Ok((addr, result)) = done else { continue };
                dialing.remove(&addr);
                if let Some(conn) = dialed(&net, &addr, result) {
                    connected(&net, conn, shutdown.clone());
                }
            }
        }
    }
    dials.abort_all();
}

fn connected(net: &Arc<Network>, conn: PeerConn, shutdown: watch::Receiver<bool>) {
    let Some(generation) = net.peers.insert(conn.clone(), 0.0) else {
        return;
    };
    tracing::info!(peer = %conn.id, addr = %conn.addr, role = %conn.info.role, "peer connected");
    tokio::spawn(heartbeat(net.clone(), conn.clone(), generation, shutdown));
    net.announce(conn, generation);
}

/// Pings every [`PING_INTERVAL`], asks for peers every [`PEX_INTERVAL`], drops the peer when
/// it has not answered for [`DROP_AFTER`] or got banned.
async fn heartbeat(
    net: Arc<Network>,
    conn: PeerConn,
    generation: u64,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_pex = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        if !net.peers.is_current(&conn.id, generation) {
            return;
        }
        if net
            .scores
            .banned(&node_key(&conn.id), Instant::now())
            .is_some()
        {
            drop_peer(&net, &conn, generation, "banned after misbehaving");
            return;
        }
        match conn.ping().await {
            Ok((rtt_ms, info)) => {
                net.peers.answered(&conn.id, generation, rtt_ms, info);
            }
            Err(e) if e.code() == tonic::Code::Unauthenticated => {
                // The peer no longer knows our session (it restarted, or evicted it):
                // drop now, so the manager dials and handshakes again at once.
                drop_peer(&net, &conn, generation, "session lost");
                return;
            }
            Err(e) => {
                let Some(last) = net.peers.last_ok(&conn.id, generation) else {
                    return;
                };
                tracing::debug!(peer = %conn.id, error = %e, "ping missed");
                if last.elapsed() >= DROP_AFTER {
                    drop_peer(&net, &conn, generation, "missed heartbeats");
                    return;
                }
                continue;
            }
        }
        if Instant::now() >= next_pex {
            next_pex = Instant::now() + PEX_INTERVAL;
            match conn.get_peers().await {
                Ok(list) => exchange(&net, list),
                Err(e) => tracing::debug!(peer = %conn.id, error = %e, "peer exchange failed"),
            }
        }
    }
}

/// Learns the addresses of nodes a peer knows that this node is not connected to.
fn exchange(net: &Network, list: Vec<pb::NodeInfo>) {
    let me = net.id();
    for p in list {
        let Ok(id) = Address::parse(&p.node_id) else {
            continue;
        };
        if id == me || net.peers.contains(&id) {
            continue;
        }
        learn_address(net, &p.address);
        if let Some(k) = known(net).get_mut(&p.address) {
            k.layers = p.layers;
        }
    }
}

fn drop_peer(net: &Network, conn: &PeerConn, generation: u64, why: &str) {
    if net.peers.remove(&conn.id, generation) {
        tracing::warn!(peer = %conn.id, addr = %conn.addr, reason = why, "peer dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_backoff() {
        assert_eq!(port_of("127.0.0.1:9000"), Some(9000));
        assert_eq!(port_of("[::1]:9000"), Some(9000));
        assert_eq!(port_of("host:0"), None);
        assert_eq!(port_of(":9000"), None);
        assert_eq!(port_of("nohost"), None);
        assert_eq!(port_of("h:99999"), None);
        assert_eq!(join_host_port("::1".parse().unwrap(), 5), "[::1]:5");
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }

    #[test]
    fn wanted_holders_beat_neighbours_beat_the_rest() {
        let wanted = HashSet::from([7]);
        let own = [2, 3];
        assert_eq!(usefulness(&own, &wanted, &[7]), 3);
        assert_eq!(usefulness(&own, &wanted, &[4, 5]), 2);
        assert_eq!(usefulness(&own, &wanted, &[0, 1]), 2);
        assert_eq!(usefulness(&own, &wanted, &[3]), 2);
        assert_eq!(usefulness(&own, &wanted, &[9]), 1);
        assert_eq!(usefulness(&own, &wanted, &[]), 1);
        assert_eq!(usefulness(&[], &HashSet::new(), &[1]), 1);
    }
}
