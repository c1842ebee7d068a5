//! What the pipeline scenarios share: three stages of the `default` preset (4 layers) started
//! one after another — driver (embedding + layers 0-1), worker (layer 2), validator (layer 3 +
//! head) — and how to read a stage's role, step and figures from the API.

#![allow(dead_code)]

use std::time::Duration;

use neuroshard_net::error::NetworkError;
use neuroshard_tests::{Node, NodeOptions, wait_for};
use serde_json::Value;

pub const START: Duration = Duration::from_secs(90);
pub const POLL: Duration = Duration::from_millis(200);

pub fn status(node: &Node) -> Option<Value> {
    node.get("/api/v1/status").map(|(_, b)| b)
}

pub fn network(node: &Node) -> Option<Value> {
    node.get("/api/v1/network").map(|(_, b)| b)
}

pub fn role_and_layers(node: &Node) -> Option<(String, Vec<u64>)> {
    let s = status(node)?;
    let layers = s["layers"].as_array()?.iter().filter_map(Value::as_u64);
    Some((s["role"].as_str()?.to_string(), layers.collect()))
}

pub fn wait_role(node: &Node, role: &str, layers: &[u64]) {
    wait_for(&format!("role {role} {layers:?}"), START, POLL, || {
        role_and_layers(node).filter(|(r, l)| r == role && l == layers)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
}

pub fn step(node: &Node) -> Option<u64> {
    status(node)?["training"]["step"].as_u64()
}

pub fn loss(node: &Node) -> Option<f64> {
    status(node)?["training"]["loss"].as_f64()
}

pub fn dump(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| n.logs())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// Starts driver, worker and validator with `options` of each (seed peers added), each after
/// the previous one chose its layers.
pub fn three_stages([a, b, c]: [NodeOptions; 3]) -> (Node, Node, Node) {
    let a = Node::start(a).unwrap();
    wait_role(&a, "driver", &[0, 1]);
    let b = Node::start(b.with_seed_peers(&[a.peer_addr()])).unwrap();
    wait_role(&b, "worker", &[2]);
    let c = Node::start(c.with_seed_peers(&[a.peer_addr(), b.peer_addr()])).unwrap();
    wait_role(&c, "validator", &[3]);
    (a, b, c)
}

/// The gRPC code of a peer's refusal; an acceptance or a local error fails the test.
pub fn code_of<T: std::fmt::Debug>(r: Result<T, NetworkError>) -> tonic::Code {
    match r {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(NetworkError::Rpc { source, .. }) => source.code(),
        Err(e) => panic!("not an RPC refusal: {e}"),
    }
}
