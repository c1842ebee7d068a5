//! Layer balance: where a joining node's layers do the most for the network's training
//! throughput, and when a node moves (as Petals rebalances its blocks).
//!
//! A pipeline trains no faster than its slowest layer, so the pool looks at the training
//! throughput of each layer: the sum, over the nodes that hold it and train (serve-only nodes
//! hold layers for inference and do not count), of each node's measured training compute
//! (`NodeInfo.train_compute`: parameter-tokens per second of its stage's work). The parameter
//! count is only an estimate of a stage's cost per token (the head's softmax and the
//! embedding's scatter cost more than their parameters say: on the `default` model six equal
//! nodes split 2/4 when rates were compared across stages), so a node is weighed against the
//! other holders of its own range only: its compute over their mean, rounded to a power of four
//! (nodes within a factor of 2 weigh 1, as does a node not measured yet or alone on its
//! stage). Equal nodes come down to counting holders; a stage of one fast and one slow node
//! weighs less than one of two equal nodes.
//!
//! * **Joining** ([`best_window`]): the window of `capacity` layers whose slowest layer has the
//!   least throughput, then the one that uses all its room, then the least mean throughput, then
//!   the last start.
//!   Layer 0 is a window like any other (every holder of the embedding drives its own
//!   pipeline). Windows start at layer 0 or at a boundary of a range already held, and those
//!   that also end at one come first, so equal nodes form stages of the same layer ranges
//!   (replicas of one stage), not overlapping ones a route could not chain.
//! * **Moving** ([`rebalance`]): a node moves to the best window for it (computed without
//!   itself) when that raises the network's throughput (its slowest layer) by more than
//!   [`REBALANCE_GAIN`], and none of its layers would be left without another training holder.
//!   Among the nodes whose move passes the threshold, the one whose move gives the most (then
//!   the lowest id) moves: every node applies the rule to the same table, so one node moves
//!   at a time. Hysteresis: the gain must exceed 25%, so moving back can never pass the
//!   threshold (it would lower the throughput the first move raised); and the executor
//!   ([`crate::upkeep`]) acts only on a proposal seen on two checks in a row and at least
//!   [`crate::upkeep::REBALANCE_COOLDOWN`] after this node last moved, so a node does not flap
//!   while the others' advertisements catch up with a move.
//!
//! Six equal nodes with room for 2 of 4 layers: the first two take 0..2 and 2..4 (layers
//! nobody holds come first), then 2..4, 0..2, 2..4, 0..2: three holders per window.

use std::ops::Range;

/// A node as the layer pool sees it: its id, the layers it advertises, its capacity, its
/// measured training throughput, and whether it only serves inference.
#[derive(Debug, Clone, Default)]
pub struct Holder {
    pub id: String,
    pub layers: Vec<u32>,
    pub capacity: u32,
    /// Measured training compute, parameter-tokens per second (0: not measured yet).
    pub compute: f64,
    /// Serve-only (`--no-training`): its layers are not training coverage.
    pub serve_only: bool,
}

impl Holder {
    /// Whether its layers count as training coverage.
    pub fn trains(&self) -> bool {
        !self.serve_only
    }

    /// Its layers as a range, when they are contiguous and not empty.
    pub fn range(&self, total: u32) -> Option<Range<u32>> {
        let first = *self.layers.iter().min()?;
        let last = *self.layers.iter().max()?;
        let mut sorted = self.layers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        (sorted.len() as u32 == last - first + 1 && last < total).then_some(first..last + 1)
    }

    pub(crate) fn room(&self, total: u32) -> u32 {
        self.range(total)
            .map_or(0, |r| self.capacity.saturating_sub(r.end - r.start))
    }
}

/// The least relative gain in the network's throughput for which a node moves: 25%.
pub const REBALANCE_GAIN: f64 = 0.25;

/// Training throughput per layer over the training holders among `nodes` (see the module doc).
pub fn layer_throughput<'a>(
    total: u32,
    nodes: impl Iterator<Item = &'a Holder> + Clone,
) -> Vec<f64> {
    // The mean measured compute of the holders of each range: a node is compared only with
    // the others on its stage (same cost per token).
    let mut means: std::collections::HashMap<Range<u32>, (f64, u32)> = Default::default();
    for h in nodes.clone().filter(|h| h.trains() && h.compute > 0.0) {
        if let Some(r) = h.range(total) {
            let e = means.entry(r).or_default();
            *e = (e.0 + h.compute, e.1 + 1);
        }
    }
    let mut thr = vec![0.0; total as usize];
    for h in nodes.filter(|h| h.trains()) {
        let mean = h
            .range(total)
            .and_then(|r| means.get(&r))
            .map_or(0.0, |&(sum, n)| sum / f64::from(n));
        let w = if h.compute > 0.0 && mean > 0.0 {
            // Steps of 4x: log4 rounded.
            4f64.powf(((h.compute / mean).log2() / 2.0).round())
        } else {
            1.0
        };
        for l in h.range(total).into_iter().flatten() {
            thr[l as usize] += w;
        }
    }
    thr
}

/// The start of the best window of `capacity` layers for a node joining a network with this
/// per-layer throughput (module doc), given the ranges held now: windows start at layer 0 or
/// at a boundary of a held range, and those that also end at one (or at the head) come
/// first, so the new range is a replica of existing stages and routes through it exist.
pub fn best_window(thr: &[f64], capacity: u32, held: &[Range<u32>]) -> u32 {
    let total = thr.len() as u32;
    if total == 0 {
        return 0;
    }
    let capacity = capacity.clamp(1, total);
    let mut bounds: Vec<u32> = [0, total]
        .into_iter()
        .chain(held.iter().flat_map(|r| [r.start, r.end]))
        .filter(|&b| b <= total)
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let end = |s: u32| (s + capacity).min(total);
    let starts: Vec<u32> = bounds.iter().copied().filter(|&s| s < total).collect();
    let aligned: Vec<u32> = starts
        .iter()
        .copied()
        .filter(|&s| bounds.binary_search(&end(s)).is_ok())
        .collect();
    let candidates = if aligned.is_empty() { starts } else { aligned };
    // (slowest layer, layers left unused, mean throughput): a window cut short by the head
    // adds this node's compute to fewer layers.
    let score = |s: u32| {
        let w = &thr[s as usize..end(s) as usize];
        let min = w.iter().copied().fold(f64::INFINITY, f64::min);
        let unused = f64::from(capacity) - w.len() as f64;
        (min, unused, w.iter().sum::<f64>() / w.len().max(1) as f64)
    };
    // Ties go to the later window (as before several drivers were wanted: a replica of the
    // last stage changes no route); the embedding's window wins whenever it is the thinnest.
    candidates
        .into_iter()
        .min_by(|&a, &b| {
            let (sa, sb) = (score(a), score(b));
            sa.0.total_cmp(&sb.0)
                .then(sa.1.total_cmp(&sb.1))
                .then(sa.2.total_cmp(&sb.2))
                .then(b.cmp(&a))
        })
        .unwrap_or(0)
}

/// The slowest layer's throughput: what the network trains at.
fn network(thr: &[f64]) -> f64 {
    thr.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Where `node` would move and the network's throughput after it, when the move passes the
/// rule (module doc); None otherwise.
fn proposal(total: u32, node: &Holder, all: &[&Holder]) -> Option<(Range<u32>, f64)> {
    let mine = node.range(total)?;
    if !node.trains() || node.capacity >= total || node.capacity == 0 {
        return None;
    }
    let thr = layer_throughput(total, all.iter().copied());
    let before = network(&thr);
    if before <= 0.0 {
        return None; // a gap: the takeover rule's business
    }
    let others: Vec<&Holder> = all.iter().copied().filter(|h| h.id != node.id).collect();
    // Every layer keeps another training holder.
    let without = layer_throughput(total, others.iter().copied());
    if mine.clone().any(|l| without[l as usize] <= 0.0) {
        return None;
    }
    let held: Vec<Range<u32>> = others
        .iter()
        .filter(|h| h.trains())
        .filter_map(|h| h.range(total))
        .collect();
    let start = best_window(&without, node.capacity, &held);
    let target = start..(start + node.capacity).min(total);
    if target == mine {
        return None;
    }
    // This node's own throughput, as the table counts it.
    let w = thr[mine.start as usize] - without[mine.start as usize];
    let mut after = without;
    for l in target.clone() {
        after[l as usize] += w;
    }
    let after = network(&after);
    (after > before * (1.0 + REBALANCE_GAIN)).then_some((target, after))
}

/// The range `me` should move to so that the network trains faster (module doc), or None when
/// no move passes the threshold or another node's move goes first.
pub fn rebalance(total: u32, me: &Holder, peers: &[Holder]) -> Option<Range<u32>> {
    let all: Vec<&Holder> = std::iter::once(me).chain(peers).collect();
    let best = all
        .iter()
        .filter_map(|h| proposal(total, h, &all).map(|(r, gain)| (h, r, gain)))
        .max_by(|a, b| a.2.total_cmp(&b.2).then(b.0.id.cmp(&a.0.id)))?;
    (best.0.id == me.id).then_some(best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, layers: Range<u32>, capacity: u32, tps: f64) -> Holder {
        Holder {
            id: id.into(),
            layers: layers.collect(),
            capacity,
            compute: tps,
            serve_only: false,
        }
    }

    #[test]
    fn one_node_moves_when_the_imbalance_passes_the_threshold() {
        // One driver, five holders of 2..4 (what the old rule built): the slowest layer has
        // 1 holder; a move to 0..2 doubles it.
        let nodes = [
            h("a", 0..2, 2, 0.0),
            h("b", 2..4, 2, 0.0),
            h("c", 2..4, 2, 0.0),
            h("d", 2..4, 2, 0.0),
            h("e", 2..4, 2, 0.0),
            h("f", 2..4, 2, 0.0),
        ];
        let moves = |nodes: &[Holder]| -> Vec<(String, Range<u32>)> {
            nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    let mut peers = nodes.to_vec();
                    peers.remove(i);
                    rebalance(4, n, &peers).map(|r| (n.id.clone(), r))
                })
                .collect()
        };
        // Exactly one node moves (the lowest id among equals), then the next, then none.
        let mut nodes = nodes.to_vec();
        for expected in ["b", "c"] {
            let m = moves(&nodes);
            assert_eq!(m, vec![(expected.to_string(), 0..2)]);
            let n = nodes.iter_mut().find(|n| n.id == expected).unwrap();
            n.layers = vec![0, 1];
        }
        assert_eq!(moves(&nodes), vec![]);
        // Below the threshold nobody moves: 4 and 5 holders (a move gives 5/4 = 1.25, not more).
        let mut nine: Vec<Holder> = (0..4).map(|i| h(&format!("x{i}"), 0..2, 2, 0.0)).collect();
        nine.extend((0..5).map(|i| h(&format!("y{i}"), 2..4, 2, 0.0)));
        assert_eq!(moves(&nine), vec![]);
        // The thin stage gains a holder from the thick one; its only holder never leaves it.
        let four = [
            h("a", 0..2, 2, 0.0),
            h("b", 0..2, 2, 0.0),
            h("c", 0..2, 2, 0.0),
            h("d", 2..4, 2, 0.0),
        ];
        assert_eq!(moves(&four), vec![("a".to_string(), 2..4)]);
        // A move never uncovers a layer: two stages of one holder each stay as they are.
        assert_eq!(moves(&four[2..]), vec![]);
        // Full replicas never move.
        assert_eq!(
            rebalance(4, &h("f", 0..4, 4, 0.0), &[h("a", 0..2, 2, 0.0)]),
            None
        );
    }

    #[test]
    fn windows_replicate_the_stages_already_held() {
        let thr = [1.0, 1.0, 1.0, 1.0];
        // Stages 0..2, 2..3, 3..4 and room for one layer: 0..1 would end inside a stage (no
        // route continues at 1); 2..3 and 3..4 replicate stages, the later one on a tie.
        assert_eq!(best_window(&thr, 1, &[0..2, 2..3, 3..4]), 3);
        assert_eq!(
            best_window(&[1.0, 1.0, 1.0, 2.0], 1, &[0..2, 2..3, 3..4]),
            2
        );
        // The least throughput wins wherever it is, layer 0 included.
        assert_eq!(best_window(&[1.0, 1.0, 2.0, 2.0], 2, &[0..2, 2..4]), 0);
        // Room for more than a stage: windows from a boundary to a boundary (or the head),
        // the one that uses the room first.
        assert_eq!(
            best_window(&[1.0, 2.0, 2.0, 2.0], 3, &[0..1, 1..3, 3..4]),
            0
        );
        assert_eq!(
            best_window(&[2.0, 2.0, 1.0, 1.0], 2, &[0..2, 2..3, 3..4]),
            2
        );
        // No window both starts and ends at a boundary: one that starts at one.
        assert_eq!(best_window(&thr, 1, &[0..2, 2..4]), 2);
        // The capacity is clamped to the model.
        assert_eq!(best_window(&thr, 9, &[]), 0);
    }
}
