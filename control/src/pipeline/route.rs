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

/// Latencies within this many milliseconds count as equal when a driver picks a stage's holder.
const SAME_LATENCY_MS: f64 = 5.0;

/// The candidate stages of a training route: connected peers that train (a serve-only node's
/// layers are for inference), the least loaded first (`NodeInfo.pipeline_load`: steps running
/// there or waiting for it), then the lowest latency (in steps of [`SAME_LATENCY_MS`]), then
/// an order of its own for each driver (a hash of the driver's and the holder's ids), so that
/// drivers that see the same loads and latencies spread over a stage's holders instead of
/// all queueing at one (SWARM parallelism's choice of the next hop, made per step).
fn training_hops(net: &Network, total: u32) -> Vec<Hop> {
    let me = net.id().to_string();
    let infos: std::collections::HashMap<String, (u32, f64, bool)> = net
        .peers
        .conns_with_rtt()
        .into_iter()
        .map(|(c, i, rtt)| (c.id.to_string(), (i.pipeline_load, rtt, i.serve_only)))
        .collect();
    let mut hops: Vec<(Hop, (u32, u64, u64))> = candidate_hops(net, total)
        .into_iter()
        .filter_map(|h| {
            let id = h.conn.id.to_string();
            let &(load, rtt, serve_only) = infos.get(&id)?;
            let bucket = (rtt.max(0.0) / SAME_LATENCY_MS) as u64;
            (!serve_only).then(|| (h, (load, bucket, spread(&me, &id))))
        })
        .collect();
    hops.sort_by_key(|(_, k)| *k);
    hops.into_iter().map(|(h, _)| h).collect()
}

/// A stable number for the pair (driver, holder): FNV-1a over both ids.
fn spread(driver: &str, holder: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in driver.bytes().chain([0]).chain(holder.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The stages after `from` to the end of the model over the connected peers that train (see
/// [`shortest_route`] and [`training_hops`]); the last one holds the head.
pub fn plan_route(net: &Network, from: u32, total: u32) -> Result<Vec<Hop>, PipeError> {
    let hops = training_hops(net, total);
    let ranges: Vec<_> = hops.iter().map(|h| h.layers.clone()).collect();
    let route = shortest_route(&ranges, |_| true, from, total).ok_or_else(|| {
        PipeError::NoRoute(format!(
            "the connected peers do not cover layers {from}..{total}"
        ))
    })?;
    Ok(route.into_iter().map(|i| hops[i].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn drivers_order_the_same_holders_differently() {
        let holders = ["0xaa", "0xbb", "0xcc"];
        let first = |driver: &str| {
            *holders
                .iter()
                .min_by_key(|h| spread(driver, h))
                .expect("holders")
        };
        // Stable for one driver; not the same holder for every driver.
        assert_eq!(first("0x01"), first("0x01"));
        let picks: std::collections::HashSet<&str> =
            ["0x01", "0x02", "0x03", "0x04", "0x05", "0x06"]
                .iter()
                .map(|d| first(d))
                .collect();
        assert!(picks.len() > 1, "{picks:?}");
    }
}
