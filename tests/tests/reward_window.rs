//! Rewards wait out the network's challenge window (issue #19: a reward is `pending` while a
//! fraud proof can still void it, then `available`). A real node trains with
//! `ledger.challenge_window_secs = 60`: its first reward shows as pending with its release
//! time, nothing of it can be spent before that time, and all of it can after.

use std::time::Duration;

use chrono::{DateTime, Utc};
use neuroshard_tests::{Node, NodeOptions, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WINDOW_SECS: i64 = 60;

fn balance(node: &Node) -> Option<Value> {
    let (code, b) = node.authed(Method::GET, "/api/v1/wallet/balance", None)?;
    (code == 200).then_some(b)
}

fn release_time(b: &Value, key: &str) -> Option<DateTime<Utc>> {
    b["pending"][key].as_str()?.parse().ok()
}

#[test]
fn rewards_are_pending_until_their_window_ends() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 2\nseq_len = 32\n\n\
             [ledger]\nchallenge_window_secs = {WINDOW_SECS}\naccept_unattested_training = true\n"
        ),
        ..NodeOptions::default()
    })?;
    node.wait_healthy(Duration::from_secs(60))?;

    // The first reward arrives pending, with the time it is released.
    let first = wait_for(
        "a pending reward",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || {
            let b = balance(&node)?;
            (b["pending"]["rewards"].as_f64()? > 0.0).then_some(b)
        },
    )?;
    let seen_at = Utc::now();
    let next = release_time(&first, "rewards_next_release_at").expect("a release time");
    let all = release_time(&first, "rewards_released_at").expect("a last release time");
    assert!(next <= all, "{first}");
    let pending = first["pending"]["rewards"].as_f64().unwrap();
    assert!(
        first["balances"]["pending"].as_f64().unwrap() >= pending,
        "pending rewards are part of the pending balance: {first}"
    );
    assert_eq!(
        first["balances"]["total"].as_f64().unwrap(),
        first["balances"]["available"].as_f64().unwrap()
            + first["balances"]["staked"].as_f64().unwrap()
            + first["balances"]["pending"].as_f64().unwrap(),
        "{first}"
    );
    // Read before the release time (the usual case: the poll saw the reward within a second
    // of it), nothing is available and a send is refused for want of funds.
    if seen_at < next {
        assert_eq!(first["balances"]["available"], 0.0, "{first}");
        let (code, body) = node
            .authed(
                Method::POST,
                "/api/v1/wallet/send",
                Some(json!({"to": format!("0x{}", "11".repeat(20)), "amount": 0.000001})),
            )
            .expect("an answer");
        if Utc::now() < next {
            assert_eq!(code, 402, "spent a pending reward: {body}");
            assert_eq!(body["error"]["code"], "INSUFFICIENT_BALANCE", "{body}");
        }
    }

    // Once the window of that reward has passed, its amount is available.
    let released = wait_for(
        "the first reward released",
        Duration::from_secs(WINDOW_SECS as u64 + 120),
        Duration::from_millis(500),
        || {
            let b = balance(&node)?;
            (b["balances"]["available"].as_f64()? >= pending).then_some(b)
        },
    )?;
    assert!(Utc::now() >= next, "released before its time: {released}");
    node.send_from_node(
        &format!("0x{}", "22".repeat(20)),
        (pending / 2.0 * 1e9).floor() / 1e9,
    )?;
    Ok(())
}

/// A node training alone in an open network (issue #19): nobody receives its work and no
/// peer hears its heartbeats, so nobody attests anything -- it claims neither training nor
/// uptime, makes no proof at all (one would earn nothing), and none is refused.
#[test]
fn a_node_training_alone_earns_no_training_reward() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 2\nseq_len = 32\n\n\
                 [ledger]\nchallenge_window_secs = 0\naccept_unattested_training = false\n"
            .into(),
        ..NodeOptions::default()
    })?;
    node.wait_healthy(Duration::from_secs(60))?;
    let trained = |node: &Node| {
        node.get("/api/v1/status")
            .and_then(|(_, s)| s["training"]["step"].as_u64())
            .unwrap_or(0)
    };
    wait_for(
        "training steps",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || (trained(&node) > 0).then_some(()),
    )?;
    // Two epochs turn while it trains: each would have had its proof.
    let until = Utc::now().timestamp() / 60 * 60 + 2 * 60 + 5;
    wait_for(
        "two epochs while training",
        Duration::from_secs(200),
        Duration::from_millis(500),
        || (Utc::now().timestamp() >= until).then_some(()),
    )?;
    let (code, page) = node
        .authed(Method::GET, "/api/v1/proofs?limit=100", None)
        .expect("proofs answered");
    assert_eq!(code, 200, "{page}");
    assert!(trained(&node) > 0);
    assert_eq!(page["stats"]["total_submitted"], 0, "{page}");
    assert_eq!(page["proofs"], json!([]), "{page}");
    assert_eq!(page["stats"]["rejected_by_reason"], json!({}), "{page}");
    Ok(())
}
