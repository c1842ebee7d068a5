//! Dynamic layer pool: how many layers a node can hold and which ones it takes.
//!
//! Rule (the original's, made deterministic): a node whose capacity covers the whole model is
//! a full replica. Otherwise it takes `capacity` contiguous layers starting at the first layer
//! no training node holds; when every layer is held it adds a replica where the network's
//! training throughput is lowest ([`crate::balance`]: fewest holders per unit of compute,
//! layer 0 included, since every holder of the embedding drives its own pipeline). Serve-only
//! nodes hold layers for inference and count neither here nor in the takeover rule. Role from
//! what is held: embedding (layer 0) → driver, LM head (last layer) → validator, both → full,
//! else worker.
//!
//! Takeover ([`takeover`]): while running, when some layers are held by nobody (their last
//! holder left the peer table), one node — the same one in every node's view — extends or
//! moves its contiguous range over the first such gap: a neighbour of the gap with room
//! (`capacity` above what it holds; the left one first, then the right one, lowest node id
//! among equals), else a node whose every layer another node also holds (it moves to the gap).

use std::ops::Range;

use neuroshard_shared::model::ModelConfig;

pub use crate::balance::Holder;

/// What a node is in the pipeline, from the layers it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Every layer: trains alone (DiLoCo with other full replicas).
    Full,
    /// The embedding (layer 0) but not the head: drives pipeline steps.
    Driver,
    /// Layers in the middle.
    Worker,
    /// The LM head: computes the loss.
    Validator,
}

impl Role {
    /// The name peers and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Full => "full",
            Role::Driver => "driver",
            Role::Worker => "worker",
            Role::Validator => "validator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The layers a node holds and the role that follows from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub layers: Range<u32>,
    /// Layers of the whole model.
    pub total: u32,
}

impl Assignment {
    pub fn full(total: u32) -> Assignment {
        Assignment {
            layers: 0..total,
            total,
        }
    }

    pub fn has_embedding(&self) -> bool {
        self.layers.start == 0
    }

    pub fn has_head(&self) -> bool {
        self.layers.end == self.total
    }

    /// What the held layers make this node.
    pub fn role(&self) -> Role {
        match (self.has_embedding(), self.has_head()) {
            (true, true) => Role::Full,
            (true, false) => Role::Driver,
            (false, true) => Role::Validator,
            (false, false) => Role::Worker,
        }
    }

    pub fn is_full(&self) -> bool {
        self.has_embedding() && self.has_head()
    }
}

/// Bytes one transformer layer needs for training (weights, grads, two Adam moments in fp32):
/// (4h² + 3h·ffn + 2h) × 16, as in the original.
pub fn layer_bytes(m: &ModelConfig) -> u64 {
    let h = u64::from(m.hidden);
    (4 * h * h + 3 * h * u64::from(m.ffn) + 2 * h) * 16
}

/// Parameters one token passes through on a stage holding `layers` of `total` (the transformer
/// layers, and the LM head when the stage holds the last layer; the embedding is a lookup):
/// tokens per second times this is a node's compute whatever stage it holds.
pub fn params_per_token(m: &ModelConfig, layers: &Range<u32>, total: u32) -> u64 {
    let h = u64::from(m.hidden);
    let per_layer = 4 * h * h + 3 * h * u64::from(m.ffn) + 2 * h;
    let n = u64::from(layers.end.saturating_sub(layers.start));
    let head = if layers.end >= total && n > 0 {
        u64::from(m.vocab_size) * h
    } else {
        0
    };
    n * per_layer + head
}

/// How many layers a node may hold: `max_layers` when set (above 0), else what
/// `max_memory_gb` leaves after the embedding and head (2·vocab·h·16 bytes) with 20% kept for
/// activations; at least one.
pub fn capacity(max_layers: u32, max_memory_gb: f64, m: &ModelConfig) -> u32 {
    if max_layers > 0 {
        return max_layers;
    }
    let budget = (max_memory_gb.max(0.0) * 0.8 * (1u64 << 30) as f64) as u64;
    let ends = 2 * u64::from(m.vocab_size) * u64::from(m.hidden) * 16;
    let per = layer_bytes(m).max(1);
    let n = budget.saturating_sub(ends) / per;
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// The layers a node with `capacity` takes, given the known peers: the first layers no
/// training peer holds; when every layer has a training holder, the window where the network's
/// training throughput is lowest ([`crate::balance`]). Serve-only peers do not count.
pub fn choose(total: u32, capacity: u32, peers: &[Holder]) -> Assignment {
    if total == 0 || capacity >= total {
        return Assignment::full(total);
    }
    let thr = crate::balance::layer_throughput(total, peers.iter());
    let start = match thr.iter().position(|&t| t <= 0.0) {
        Some(first_free) => first_free as u32,
        None => {
            let held: Vec<Range<u32>> = peers
                .iter()
                .filter(|h| h.trains())
                .filter_map(|h| h.range(total))
                .collect();
            crate::balance::best_window(&thr, capacity, &held)
        }
    };
    let end = (start + capacity).min(total);
    Assignment {
        layers: start..end,
        total,
    }
}

/// The first run of layers no training node among `nodes` holds.
pub fn first_gap<'a>(total: u32, nodes: impl Iterator<Item = &'a Holder>) -> Option<Range<u32>> {
    let mut held = vec![false; total as usize];
    for n in nodes.filter(|n| n.trains()) {
        for &l in &n.layers {
            if let Some(h) = held.get_mut(l as usize) {
                *h = true;
            }
        }
    }
    let g0 = held.iter().position(|h| !h)? as u32;
    let g1 = (g0..total).find(|&l| held[l as usize]).unwrap_or(total);
    Some(g0..g1)
}

/// The range `me` should hold instead of its current one so that the first uncovered gap is
/// covered (see the module doc), or None when nothing is uncovered or another node takes it.
/// Every node applies the same rule to the same table, so exactly one node acts on a gap.
/// Serve-only nodes neither count as holders nor take a gap.
pub fn takeover(total: u32, me: &Holder, peers: &[Holder]) -> Option<Range<u32>> {
    let all: Vec<&Holder> = std::iter::once(me)
        .chain(peers)
        .filter(|h| h.trains())
        .collect();
    let gap = first_gap(total, all.iter().copied())?;
    let lowest = |side: &dyn Fn(&Range<u32>) -> bool| {
        all.iter()
            .filter(|h| h.room(total) > 0 && h.range(total).is_some_and(|r| side(&r)))
            .min_by(|a, b| a.id.cmp(&b.id))
            .copied()
    };
    if let Some(h) = lowest(&|r| r.end == gap.start) {
        let r = h.range(total)?;
        return (h.id == me.id).then(|| r.start..(r.start + h.capacity).min(gap.end));
    }
    if let Some(h) = lowest(&|r| r.start == gap.end) {
        let r = h.range(total)?;
        return (h.id == me.id).then(|| r.end.saturating_sub(h.capacity).max(gap.start)..r.end);
    }
    // No neighbour has room: a node none of whose layers would be left uncovered moves there.
    let mut holders = vec![0u32; total as usize];
    for h in &all {
        for l in h.range(total).into_iter().flatten() {
            holders[l as usize] += 1;
        }
    }
    let redundant = all
        .iter()
        .filter(|h| {
            h.capacity > 0
                && h.range(total)
                    .is_some_and(|r| r.clone().all(|l| holders[l as usize] >= 2))
        })
        .min_by(|a, b| a.id.cmp(&b.id))?;
    (redundant.id == me.id).then(|| gap.start..(gap.start + me.capacity).min(gap.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(layers: &[&[u32]]) -> Vec<Holder> {
        layers
            .iter()
            .enumerate()
            .map(|(i, l)| Holder {
                id: format!("p{i}"),
                layers: l.to_vec(),
                capacity: l.len() as u32,
                ..Holder::default()
            })
            .collect()
    }

    #[test]
    fn a_node_that_fits_the_model_is_a_full_replica() {
        let a = choose(4, 4, &held(&[&[0, 1]]));
        assert_eq!(a.layers, 0..4);
        assert_eq!(a.role(), Role::Full);
        assert_eq!(choose(4, 9, &[]).role(), Role::Full);
    }

    #[test]
    fn nodes_take_the_first_free_layers_then_add_redundancy() {
        let a = choose(4, 2, &[]);
        assert_eq!((a.layers.clone(), a.role()), (0..2, Role::Driver));
        let b = choose(4, 1, &held(&[&[0, 1]]));
        assert_eq!((b.layers.clone(), b.role()), (2..3, Role::Worker));
        let c = choose(4, 1, &held(&[&[0, 1], &[2]]));
        assert_eq!((c.layers.clone(), c.role()), (3..4, Role::Validator));
        // Everything held: the thinnest window.
        let d = choose(4, 2, &held(&[&[0, 1], &[2], &[3], &[0, 1]]));
        assert_eq!(d.layers, 2..4);
        // A free layer in the middle is taken first, clamped at the end.
        let e = choose(4, 3, &held(&[&[0, 1, 2]]));
        assert_eq!(e.layers, 3..4);
    }

    fn h(id: &str, layers: std::ops::Range<u32>, capacity: u32) -> Holder {
        Holder {
            id: id.into(),
            layers: layers.collect(),
            capacity,
            ..Holder::default()
        }
    }

    #[test]
    fn a_neighbour_with_room_takes_over_an_uncovered_gap() {
        // The worker (2) left: the driver has no room, the validator (3, room 2) extends left.
        let a = h("a", 0..2, 2);
        let c = h("c", 3..4, 3);
        assert_eq!(takeover(4, &c, std::slice::from_ref(&a)), Some(2..4));
        assert_eq!(takeover(4, &a, std::slice::from_ref(&c)), None);
        // Nothing uncovered: nothing to do.
        assert_eq!(takeover(4, &c, &[a.clone(), h("b", 2..3, 1)]), None);
        // The left neighbour goes first; among equals the lowest id; clamped to the gap and
        // to the capacity.
        let l1 = h("l1", 0..1, 3);
        let l2 = h("l0", 0..1, 2);
        let r = h("r", 3..4, 4);
        assert_eq!(takeover(4, &l2, &[l1.clone(), r.clone()]), Some(0..2));
        assert_eq!(takeover(4, &l1, &[l2.clone(), r.clone()]), None);
        assert_eq!(takeover(4, &r, &[l1.clone(), l2.clone()]), None);
        // The driver left: the right neighbour extends down to layer 0 as far as it can.
        let w = h("w", 2..3, 2);
        assert_eq!(takeover(4, &w, &[h("v", 3..4, 1)]), Some(1..3));
    }

    #[test]
    fn without_room_a_redundant_node_moves_to_the_gap() {
        let a = h("a", 0..2, 2);
        let c = h("c", 3..4, 1);
        let d = h("d", 3..4, 1);
        assert_eq!(
            takeover(4, &d, &[a.clone(), c.clone()]),
            None,
            "c goes first"
        );
        assert_eq!(takeover(4, &c, &[a.clone(), d.clone()]), Some(2..3));
        // Nobody can: nothing happens.
        assert_eq!(takeover(4, &a, std::slice::from_ref(&c)), None);
        assert_eq!(takeover(4, &c, std::slice::from_ref(&a)), None);
    }

    #[test]
    fn capacity_comes_from_the_setting_or_the_memory() {
        let m = ModelConfig::preset("default").unwrap();
        assert!(capacity(0, 64.0, &m) >= m.layers);
        assert_eq!(capacity(1, 64.0, &m), 1);
        assert_eq!(capacity(0, 0.0, &m), 1);
        assert_eq!(capacity(0, -3.0, &m), 1);
    }

    #[test]
    fn roles_have_the_names_peers_use() {
        let names: Vec<&str> = [Role::Full, Role::Driver, Role::Worker, Role::Validator]
            .iter()
            .map(|r| r.as_str())
            .collect();
        assert_eq!(names, ["full", "driver", "worker", "validator"]);
    }

    fn node(id: &str, layers: Range<u32>, capacity: u32, compute: f64) -> Holder {
        Holder {
            id: id.into(),
            layers: layers.collect(),
            capacity,
            compute,
            serve_only: false,
        }
    }

    #[test]
    fn six_equal_nodes_joining_one_by_one_end_with_three_holders_per_window() {
        let mut nodes: Vec<Holder> = Vec::new();
        for i in 0..6 {
            let a = choose(4, 2, &nodes);
            nodes.push(node(&format!("n{i}"), a.layers, 2, 0.0));
        }
        let ranges: Vec<Range<u32>> = nodes.iter().map(|n| n.layers[0]..n.layers[1] + 1).collect();
        assert_eq!(ranges, [0..2, 2..4, 2..4, 0..2, 2..4, 0..2]);
        assert_eq!(
            crate::balance::layer_throughput(4, nodes.iter()),
            vec![3.0, 3.0, 3.0, 3.0]
        );
        // Balanced: nobody moves.
        for (i, n) in nodes.iter().enumerate() {
            let mut peers = nodes.clone();
            peers.remove(i);
            assert_eq!(crate::balance::rebalance(4, n, &peers), None, "{}", n.id);
        }
    }

    #[test]
    fn a_joiner_takes_the_window_with_the_least_compute_not_the_fewest_holders() {
        // 2..4 has a fast and a slow node (400, 50: weights 1 and 1/4 against their mean),
        // 0..2 two equal ones: 2..4 trains slower.
        let nodes = [
            node("a", 0..2, 2, 100.0),
            node("d", 0..2, 2, 100.0),
            node("b", 2..4, 2, 400.0),
            node("c", 2..4, 2, 50.0),
        ];
        assert_eq!(choose(4, 2, &nodes).layers, 2..4);
        // Rates are compared within a stage only (a stage's cost per token is an estimate):
        // one holder per stage, whatever their rates, is a tie.
        let nodes = [node("a", 0..2, 2, 500.0), node("b", 2..4, 2, 100.0)];
        assert_eq!(choose(4, 2, &nodes).layers, 2..4);
        // Equal compute: the fewest holders, layer 0 included (several drivers are wanted).
        let nodes = [
            node("a", 0..2, 2, 0.0),
            node("b", 2..4, 2, 0.0),
            node("c", 2..4, 2, 0.0),
        ];
        assert_eq!(choose(4, 2, &nodes).layers, 0..2);
        // Measurements within a factor of 2 of the mean weigh the same (noise and a stage's
        // bias move nobody): equal holders, the later window on the tie.
        let nodes = [node("a", 0..2, 2, 160.0), node("b", 2..4, 2, 90.0)];
        assert_eq!(choose(4, 2, &nodes).layers, 2..4);
        let nodes = [node("a", 0..2, 2, 90.0), node("b", 2..4, 2, 160.0)];
        assert_eq!(choose(4, 2, &nodes).layers, 2..4);
        // A node not measured yet counts as the mean of the measured ones.
        let nodes = [
            node("a", 0..2, 2, 0.0),
            node("b", 2..4, 2, 50.0),
            node("c", 2..4, 2, 50.0),
        ];
        assert_eq!(choose(4, 2, &nodes).layers, 0..2);
    }

    #[test]
    fn serve_only_nodes_do_not_count_as_training_coverage() {
        let mut serve = node("s", 0..4, 4, 0.0);
        serve.serve_only = true;
        // A serve-only full node first: the next two nodes still cover the model between them.
        let a = choose(4, 2, std::slice::from_ref(&serve));
        assert_eq!(a.layers, 0..2);
        let b = choose(4, 2, &[serve.clone(), node("a", 0..2, 2, 0.0)]);
        assert_eq!(b.layers, 2..4);
        assert_eq!(
            crate::balance::layer_throughput(4, [serve.clone()].iter()),
            vec![0.0; 4]
        );
        // Nor as holders for the takeover rule: layers only it holds are a gap.
        let c = node("c", 2..4, 4, 0.0);
        assert_eq!(takeover(4, &c, std::slice::from_ref(&serve)), Some(0..4));
        // And it never moves.
        assert_eq!(crate::balance::rebalance(4, &serve, &[c]), None);
    }
}
