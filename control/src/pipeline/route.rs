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

/// The stages after `from` to the end of the model over the connected peers (see
/// [`shortest_route`]); the last one holds the head.
pub fn plan_route(net: &Network, from: u32, total: u32) -> Result<Vec<Hop>, PipeError> {
    let hops = candidate_hops(net, total);
    let ranges: Vec<_> = hops.iter().map(|h| h.layers.clone()).collect();
    let route = shortest_route(&ranges, |_| true, from, total).ok_or_else(|| {
        PipeError::NoRoute(format!(
            "the connected peers do not cover layers {from}..{total}"
        ))
    })?;
    Ok(route.into_iter().map(|i| hops[i].clone()).collect())
}
