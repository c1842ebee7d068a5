//! What the DiLoCo scenarios share: the replicas' settings (`tiny`, H = 20) and how to read
//! their round, agreed hash and losses from the API.

#![allow(dead_code)]

use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions};
use serde_json::Value;

pub const START: Duration = Duration::from_secs(60);
pub const ROUNDS: Duration = Duration::from_secs(600);
pub const POLL: Duration = Duration::from_millis(200);

/// A replica of the `tiny` model, 20 inner steps per round; `extra` goes into `[training]`.
/// `DILOCO_TEST_ENCODING` (e.g. `topk`) sets `training.diloco_encoding` for every scenario
/// that starts its replicas here (the default encoding otherwise), and
/// `DILOCO_TEST_FRAGMENTS` (e.g. 2) `training.diloco_fragments` (Streaming DiLoCo) unless
/// `extra` names it, `DILOCO_TEST_OVERLAP` (e.g. 2) `training.diloco_overlap_steps`.
pub fn options(extra: &str) -> NodeOptions {
    let mut encoding = std::env::var("DILOCO_TEST_ENCODING")
        .map(|e| format!("diloco_encoding = \"{e}\"\n"))
        .unwrap_or_default();
    if !extra.contains("diloco_fragments") {
        encoding.push_str(&format!("diloco_fragments = {}\n", fragments()));
    }
    if let Ok(tau) = std::env::var("DILOCO_TEST_OVERLAP") {
        encoding.push_str(&format!("diloco_overlap_steps = {tau}\n"));
    }
    NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 64\n\
             learning_rate = 0.003\ndiloco_steps = 20\ndiloco_round_timeout_secs = 30\n\
             {encoding}{extra}"
        ),
        ..NodeOptions::default()
    }
}

/// The fragments the scenarios' replicas sync in (`DILOCO_TEST_FRAGMENTS`, default 1).
pub fn fragments() -> u32 {
    std::env::var("DILOCO_TEST_FRAGMENTS")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(1)
}

pub fn global(node: &Node) -> Option<Value> {
    node.get("/api/training/global").map(|(_, b)| b)
}

/// (round, round hash) of every node when they all agree on both and are at least `round`.
pub fn agreed_round(nodes: &[&Node], round: u64) -> Option<(u64, String)> {
    let states: Vec<(u64, String)> = nodes
        .iter()
        .map(|n| {
            let g = global(n)?;
            Some((
                g["diloco"]["round"].as_u64()?,
                g["diloco"]["round_hash"].as_str()?.to_string(),
            ))
        })
        .collect::<Option<_>>()?;
    (states[0].0 >= round && !states[0].1.is_empty() && states.iter().all(|s| *s == states[0]))
        .then(|| states[0].clone())
}

/// The latest training loss of `node`.
pub fn loss(node: &Node) -> Option<f64> {
    node.get("/api/v1/status")?.1["training"]["loss"].as_f64()
}

/// The node's training losses, oldest first (`/api/v1/training/history`).
pub fn losses(node: &Node) -> Option<Vec<f64>> {
    let (_, body) = node.get("/api/v1/training/history")?;
    body["points"]
        .as_array()?
        .iter()
        .map(|p| p[1].as_f64())
        .collect()
}

/// Mean of the first (`first`) or last `n` values.
pub fn mean_of(xs: &[f64], n: usize, first: bool) -> f64 {
    let n = n.min(xs.len()).max(1);
    let part = if first {
        &xs[..n.min(xs.len())]
    } else {
        &xs[xs.len().saturating_sub(n)..]
    };
    part.iter().sum::<f64>() / part.len().max(1) as f64
}

pub fn dump_logs(nodes: &[&Node]) {
    for n in nodes {
        eprintln!("{}", n.logs());
    }
}
