//! What the checked-work scenarios (`replay`, `stage_check`) read from their nodes: the fraud
//! figures, the ledger root, balances; staking what a node earned; a conviction seen everywhere.

use std::time::Duration;

use neuroshard_tests::{Node, wait_for};
use serde_json::{Value, json};

const POLL: Duration = Duration::from_millis(500);

/// `/api/v1/network` → `ledger.fraud` (replays, slashes).
pub fn fraud(node: &Node) -> Option<Value> {
    node.get("/api/v1/network")
        .map(|(_, b)| b["ledger"]["fraud"].clone())
}

pub fn root(node: &Node) -> Option<String> {
    node.get("/api/v1/network")
        .and_then(|(_, b)| b["ledger"]["root_hash"].as_str().map(String::from))
}

pub fn balance(node: &Node) -> Option<Value> {
    node.authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .map(|(_, b)| b)
}

/// Stakes what `node` can spend, once it can spend something.
pub fn stake_available(node: &Node, timeout: Duration) -> f64 {
    let amount = wait_for("spendable rewards", timeout, POLL, || {
        let a = balance(node)?["balances"]["available"].as_f64()?;
        (a > 0.0).then_some(a)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", balance(node), node.logs()));
    let amount = (amount * 1e9).floor() / 1e9;
    let (status, body) = node
        .authed(
            reqwest::Method::POST,
            "/api/v1/wallet/stake",
            Some(json!({"amount": amount, "duration_days": 1})),
        )
        .expect("stake answered");
    assert_eq!(status, 200, "{body}");
    amount
}

/// Each node's record of `cheater` convicted with stake slashed, once every node has one. A
/// conviction decided before the cheater staked slashes nothing (there is nothing to slash);
/// its later rewards are judged too, after it staked.
pub fn convicted_everywhere(nodes: &[&Node], cheater: &str) -> Option<Vec<Value>> {
    let mut all = Vec::new();
    for n in nodes {
        let f = fraud(n)?;
        let hit = f["slashes"]
            .as_array()?
            .iter()
            .find(|s| {
                s["accused"] == cheater
                    && s["convicted"] == true
                    && s["slashed"].as_f64().is_some_and(|x| x > 0.0)
            })?
            .clone();
        all.push(hit);
    }
    Some(all)
}

/// After a conviction: `cheater`'s stake is below `staked` (what it staked before), and every
/// node of `nodes` reaches the same ledger root.
pub fn slashed_and_roots_agree(nodes: &[&Node], cheater: &Node, staked: f64) {
    let cheater_staked = balance(cheater).unwrap()["balances"]["staked"]
        .as_f64()
        .unwrap();
    assert!(cheater_staked < staked, "{cheater_staked} vs {staked}");
    wait_for(
        "the same ledger root everywhere",
        Duration::from_secs(60),
        POLL,
        || {
            let r: Vec<String> = nodes.iter().filter_map(|n| root(n)).collect();
            (r.len() == nodes.len() && r.iter().all(|x| *x == r[0])).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let roots: Vec<Option<String>> = nodes.iter().map(|n| root(n)).collect();
        panic!("{e}: {roots:?}")
    });
}
