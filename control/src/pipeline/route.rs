//! Routes: which connected peers run the layers after this node's, chosen by the layers
//! they advertise and their latency.

pub use neuroshard_coordination::route::shortest_route;

use super::PipeError;
use neuroshard_net::Network;
use neuroshard_net::client::PeerConn;

/// A stage after this one: its connection and the layers it runs.
#[derive(Clone)]
pub struct Hop {
    pub conn: PeerConn,
    pub layers: std::ops::Range<u32>,
}

/// The connected peers whose advertised layers are one contiguous range inside the model
/// (`..total`), lowest measured latency first, then id: the candidate stages of a route.
pub(crate) fn candidate_hops(net: &Network, total: u32) -> Vec<Hop> {
    let mut hops: Vec<(Hop, f64)> = net
        .peers
        .conns_with_rtt()
        .into_iter()
        .filter_map(|(c, info, rtt)| {
            let first = *info.layers.iter().min()?;
            let last = *info.layers.iter().max()?;
            let contiguous = info.layers.len() as u32 == last - first + 1;
            (contiguous && last < total).then(|| {
                (
                    Hop {
                        conn: c,
                        layers: first..last + 1,
                    },
                    rtt,
                )
            })
        })
        .collect();
    hops.sort_by(|a, b| {
        a.1.partial_cmp(&b.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.conn.id.to_string().cmp(&b.0.conn.id.to_string()))
    });
    hops.into_iter().map(|(h, _)| h).collect()
}

/// Latencies below this many milliseconds count as this much when a driver weighs a stage's
/// holders: on one machine or one LAN, scheduling noise decides the measured latency.
const LATENCY_FLOOR_MS: f64 = 20.0;

/// The candidate stages of a training route: connected peers that train (a serve-only node's
/// layers are for inference), in a random order drawn afresh for every step, each holder
/// weighted by `1 / ((1 + load) * latency)` (`NodeInfo.pipeline_load`: steps running there or
/// waiting for it; latency no lower than [`LATENCY_FLOOR_MS`]). This is SWARM parallelism's
/// stochastic wiring: a driver prefers idle and near holders, yet drivers that see the same
/// (gossiped, so slightly stale) loads and latencies spread over a stage's holders instead of
/// all queueing at the one that looked best a moment ago.
fn training_hops(net: &Network, total: u32) -> Vec<Hop> {
    let infos: std::collections::HashMap<String, (u32, f64, bool)> = net
        .peers
        .conns_with_rtt()
        .into_iter()
        .map(|(c, i, rtt)| (c.id.to_string(), (i.pipeline_load, rtt, i.serve_only)))
        .collect();
    let mut rng = rand::rng();
    let mut hops: Vec<(Hop, f64)> = candidate_hops(net, total)
        .into_iter()
        .filter_map(|h| {
            let &(load, rtt, serve_only) = infos.get(&h.conn.id.to_string())?;
            let weight = 1.0 / ((1.0 + f64::from(load)) * rtt.max(LATENCY_FLOOR_MS));
            (!serve_only).then(|| (h, draw_key(weight, rand::Rng::random::<f64>(&mut rng))))
        })
        .collect();
    hops.sort_by(|a, b| a.1.total_cmp(&b.1));
    hops.into_iter().map(|(h, _)| h).collect()
}

/// The sort key of an item of weight `weight` in a weighted random order (Efraimidis and
/// Spirakis: the item with the smallest `-ln(u) / weight` comes first, so each item is first
/// with probability proportional to its weight), `u` uniform in `[0, 1)`.
fn draw_key(weight: f64, u: f64) -> f64 {
    -(1.0 - u).ln() / weight.max(f64::MIN_POSITIVE)
}

/// The stages after `from` to the end of the model over the connected peers that train (see
/// [`shortest_route`] and [`training_hops`]); the last one holds the head.
pub fn plan_route(net: &Network, from: u32, total: u32) -> Result<Vec<Hop>, PipeError> {
    let hops = training_hops(net, total);
    let ranges: Vec<_> = hops.iter().map(|h| h.layers.clone()).collect();
    let route = shortest_route(&ranges, |_| true, from, total).ok_or_else(|| {
        // Look the missing holders up in the DHT: the next try finds them connected.
        net.want_layers(from..total);
        PipeError::NoRoute(format!(
            "the connected peers do not cover layers {from}..{total}"
        ))
    })?;
    Ok(route.into_iter().map(|i| hops[i].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::draw_key;

    /// Holders are first in proportion to their weights: two equal holders about half the
    /// time each, a holder four times as loaded about a fifth as often as an idle one.
    #[test]
    fn holders_come_first_in_proportion_to_their_weights() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let share = |w: [f64; 2], rng: &mut rand::rngs::StdRng| {
            let n = 20_000;
            let first = (0..n)
                .filter(|_| draw_key(w[0], rng.random()) < draw_key(w[1], rng.random()))
                .count();
            first as f64 / n as f64
        };
        let equal = share([1.0, 1.0], &mut rng);
        assert!((equal - 0.5).abs() < 0.02, "{equal}");
        let loaded = share([1.0, 0.25], &mut rng);
        assert!((loaded - 0.8).abs() < 0.02, "{loaded}");
        // A zero weight never wins against a positive one, and never yields NaN.
        assert!(draw_key(0.0, 0.5).is_finite() && draw_key(0.0, 0.5) > draw_key(1.0, 0.999));
    }
}
