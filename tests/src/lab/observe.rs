//! What the lab reads from each node's REST API (`/api/v1/status`, `/api/v1/network`,
//! `/api/training/global`) and the network-wide row it makes of them: throughput, coverage,
//! hash agreement per stage, ledger convergence, peers and memory per node. [`summarize`] is
//! a pure function of the readings, so its rules have unit tests.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

use super::node::{LabNode, Memory};

/// One node's answers at one moment (`None`: it did not answer).
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub index: usize,
    /// Which start of the node this is (a restart begins a new count of steps).
    pub generation: u32,
    pub answered: bool,
    pub role: String,
    pub layers: Vec<u64>,
    pub peers: u64,
    pub step: u64,
    pub uncovered: Option<u64>,
    pub ledger_root: String,
    pub ledger_blocks: u64,
    pub round: u64,
    pub round_hash: String,
    pub reported_agreement: Option<f64>,
    pub memory: Memory,
}

impl Reading {
    pub fn of(node: &LabNode, generation: u32) -> Reading {
        let mut r = Reading {
            index: node.index,
            generation,
            memory: node.memory(),
            ..Reading::default()
        };
        let Some(status) = node.get("/api/v1/status") else {
            return r;
        };
        r.answered = true;
        r.role = status["role"].as_str().unwrap_or_default().to_string();
        r.layers = status["layers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        r.peers = status["peer_count"].as_u64().unwrap_or(0);
        r.step = status["training"]["step"].as_u64().unwrap_or(0);
        if let Some(net) = node.get("/api/v1/network") {
            r.uncovered = net["coverage"]["uncovered"].as_u64();
            r.ledger_root = net["ledger"]["root_hash"]
                .as_str()
                .unwrap_or_default()
                .into();
            r.ledger_blocks = net["ledger"]["blocks"].as_u64().unwrap_or(0);
        }
        if let Some(g) = node.get("/api/training/global") {
            r.round = g["diloco"]["round"].as_u64().unwrap_or(0);
            r.round_hash = g["diloco"]["round_hash"]
                .as_str()
                .unwrap_or_default()
                .into();
            r.reported_agreement = g["hash_agreement_rate"].as_f64();
        }
        r
    }

    /// Whether this node's steps are tokens entering the network: it holds layer 0 (a
    /// pipeline's driver or a full replica). Later stages see the same tokens again.
    fn drives(&self) -> bool {
        self.layers.contains(&0)
    }
}

/// One row of the timeline.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Row {
    pub t_s: f64,
    /// Nodes the lab runs now, and those whose API answered.
    pub nodes_running: usize,
    pub nodes_answering: usize,
    /// Network training tokens per second since the previous row: the steps of the nodes
    /// holding layer 0 times the tokens of a step.
    pub tokens_per_s: f64,
    pub steps_total: u64,
    /// Share of answering nodes that see every layer held (coverage 0 uncovered; a node
    /// whose `/network` did not answer counts as not seeing it).
    pub coverage_ok: f64,
    pub max_uncovered: u64,
    /// Distinct layer sets (stages) among the answering nodes.
    pub stages: usize,
    /// The lowest, over stages, of the share of a stage's nodes in its most common DiLoCo
    /// (round, model hash); 1 when every copy of every stage agrees.
    pub stage_agreement_min: f64,
    /// Mean of the nodes' own `hash_agreement_rate`.
    pub reported_agreement_mean: f64,
    /// Distinct ledger roots, and the share of nodes holding the most common one.
    pub ledger_roots: usize,
    pub ledger_agreement: f64,
    pub peers_min: u64,
    pub peers_mean: f64,
    pub peers_max: u64,
    /// Daemon + engine memory per running node (MiB).
    pub pss_mean_mib: f64,
    pub pss_max_mib: f64,
    pub rss_mean_mib: f64,
    pub partitioned: bool,
}

/// Share of `items` equal to the most common one (1 for none).
fn modal_share<T: std::hash::Hash + Eq>(items: impl Iterator<Item = T>) -> (usize, f64) {
    let mut counts: HashMap<T, usize> = HashMap::new();
    let mut n = 0;
    for i in items {
        *counts.entry(i).or_default() += 1;
        n += 1;
    }
    let max = counts.values().copied().max().unwrap_or(0);
    (
        counts.len(),
        if n == 0 { 1.0 } else { max as f64 / n as f64 },
    )
}

/// The row for `now`, with `prev` the readings of the previous row `dt_s` seconds earlier.
pub fn summarize(
    t_s: f64,
    prev: &[Reading],
    now: &[Reading],
    dt_s: f64,
    tokens_per_step: u64,
    partitioned: bool,
) -> Row {
    let answering: Vec<&Reading> = now.iter().filter(|r| r.answered).collect();
    let before: HashMap<usize, &Reading> = prev
        .iter()
        .filter(|r| r.answered)
        .map(|r| (r.index, r))
        .collect();
    let new_steps: u64 = answering
        .iter()
        .filter(|r| r.drives())
        .filter_map(|r| {
            let p = before.get(&r.index)?;
            (p.generation == r.generation).then(|| r.step.saturating_sub(p.step))
        })
        .sum();
    let mut stages: BTreeMap<&[u64], Vec<&Reading>> = BTreeMap::new();
    for r in &answering {
        if !r.layers.is_empty() {
            stages.entry(&r.layers).or_default().push(r);
        }
    }
    let stage_agreement_min = stages
        .values()
        .map(|rs| {
            modal_share(
                rs.iter()
                    .filter(|r| !r.round_hash.is_empty())
                    .map(|r| (r.round, r.round_hash.clone())),
            )
            .1
        })
        .fold(1.0, f64::min);
    // A node whose `/network` did not answer in time says nothing about its ledger.
    let (ledger_roots, ledger_agreement) = modal_share(
        answering
            .iter()
            .filter(|r| !r.ledger_root.is_empty())
            .map(|r| r.ledger_root.clone()),
    );
    let n = answering.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Reading) -> f64| answering.iter().map(|r| f(r)).sum::<f64>() / n;
    let running: Vec<&Reading> = now.iter().filter(|r| r.memory.rss_kib > 0).collect();
    let m = running.len().max(1) as f64;
    Row {
        t_s,
        nodes_running: now.len(),
        nodes_answering: answering.len(),
        tokens_per_s: if dt_s > 0.0 {
            (new_steps * tokens_per_step) as f64 / dt_s
        } else {
            0.0
        },
        steps_total: answering
            .iter()
            .filter(|r| r.drives())
            .map(|r| r.step)
            .sum(),
        coverage_ok: mean(&|r| f64::from(u8::from(r.uncovered == Some(0)))),
        max_uncovered: answering
            .iter()
            .filter_map(|r| r.uncovered)
            .max()
            .unwrap_or(0),
        stages: stages.len(),
        stage_agreement_min,
        reported_agreement_mean: mean(&|r| r.reported_agreement.unwrap_or(0.0)),
        ledger_roots,
        ledger_agreement,
        peers_min: answering.iter().map(|r| r.peers).min().unwrap_or(0),
        peers_mean: mean(&|r| r.peers as f64),
        peers_max: answering.iter().map(|r| r.peers).max().unwrap_or(0),
        pss_mean_mib: running.iter().map(|r| r.memory.pss_kib as f64).sum::<f64>() / m / 1024.0,
        pss_max_mib: running
            .iter()
            .map(|r| r.memory.pss_kib as f64 / 1024.0)
            .fold(0.0, f64::max),
        rss_mean_mib: running.iter().map(|r| r.memory.rss_kib as f64).sum::<f64>() / m / 1024.0,
        partitioned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(index: usize, layers: &[u64], step: u64, root: &str, hash: &str) -> Reading {
        Reading {
            index,
            generation: 0,
            answered: true,
            role: "full".into(),
            layers: layers.to_vec(),
            peers: 2,
            step,
            uncovered: Some(0),
            ledger_root: root.into(),
            round: 3,
            round_hash: hash.into(),
            reported_agreement: Some(1.0),
            ..Reading::default()
        }
    }

    #[test]
    fn throughput_counts_the_drivers_steps_and_agreement_is_per_stage() {
        let prev = [
            reading(0, &[0], 10, "r", "a"),
            reading(1, &[1], 10, "r", "b"),
            reading(2, &[0], 5, "r", "a"),
        ];
        let mut now = [
            reading(0, &[0], 20, "r", "a"),
            // A later stage's steps are the same tokens again: not counted.
            reading(1, &[1], 20, "r", "b"),
            reading(2, &[0], 15, "r", "c"),
            reading(3, &[1], 0, "s", "b"),
        ];
        now[3].uncovered = Some(1);
        let row = summarize(10.0, &prev, &now, 2.0, 100, false);
        // 10 + 10 steps of nodes 0 and 2, 100 tokens each, over 2 s.
        assert_eq!(row.tokens_per_s, 1000.0);
        assert_eq!(row.stages, 2);
        // Stage [0]: hashes a and c, half agree; stage [1]: both b.
        assert_eq!(row.stage_agreement_min, 0.5);
        assert_eq!((row.ledger_roots, row.ledger_agreement), (2, 0.75));
        assert_eq!(row.coverage_ok, 0.75);
        assert_eq!(row.max_uncovered, 1);
    }

    #[test]
    fn a_restart_does_not_count_as_steps_and_silence_is_not_coverage() {
        let prev = [reading(0, &[0], 50, "r", "a")];
        let mut now = [
            reading(0, &[0], 3, "r", "a"),
            Reading::default(),
            reading(2, &[0], 3, "", "a"),
        ];
        now[0].generation = 1;
        now[2].uncovered = None;
        let row = summarize(1.0, &prev, &now, 1.0, 100, true);
        assert_eq!(row.tokens_per_s, 0.0);
        // Node 2's `/network` did not answer: no ledger root, no coverage.
        assert_eq!((row.ledger_roots, row.coverage_ok), (1, 0.5));
        assert_eq!(row.max_uncovered, 0);
        assert_eq!((row.nodes_running, row.nodes_answering), (3, 2));
        assert!(row.partitioned);
    }
}
