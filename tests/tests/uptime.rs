//! Uptime attested by peers (issue #19): nodes sign heartbeat receipts for the peers they
//! exchange pings with, and the ledger credits a proof's uptime up to what the second
//! largest count among its cited attesters shows. Three real nodes in an open network, one
//! built with the `adversary` feature and told to claim the most uptime a proof may (120 s)
//! every epoch: the ledger cuts it to what its peers heard, the same as an honest node's, and
//! honest nodes are credited the 60 s of every epoch they were up, as before heartbeat
//! receipts existed. Once its peers are gone, the cheater earns no uptime at all.

use std::time::Duration;

use chrono::{DateTime, Utc};
use neuroshard_tests::{Node, NodeOptions, wait_for};
use serde_json::Value;

use crate::network_common::address;

const POLL: Duration = Duration::from_millis(500);

fn options(cheat: &str) -> NodeOptions {
    NodeOptions {
        config: format!(
            "[training]\nenabled = false\nmodel = \"tiny\"\n\n\
             [ledger]\nchallenge_window_secs = 0\naccept_unattested_training = false\n\n\
             [adversary]\ncheat = \"{cheat}\"\n"
        ),
        ..NodeOptions::default()
    }
}

/// A rewarded proof as `/api/v1/proofs` lists it.
#[derive(Debug, Clone)]
struct Rewarded {
    at: i64,
    uptime: u64,
    reward: f64,
    attested_by: Vec<String>,
}

fn page(node: &Node) -> Option<Value> {
    node.authed(reqwest::Method::GET, "/api/v1/proofs?limit=100", None)
        .and_then(|(code, b)| (code == 200).then_some(b))
}

/// The rewarded proofs of `node`, oldest first.
fn rewarded(node: &Node) -> Vec<Rewarded> {
    let Some(page) = page(node) else {
        return Vec::new();
    };
    let mut out: Vec<Rewarded> = page["proofs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["verified"] == true)
        .filter_map(|p| {
            Some(Rewarded {
                at: p["timestamp"]
                    .as_str()?
                    .parse::<DateTime<Utc>>()
                    .ok()?
                    .timestamp(),
                uptime: p["uptime_seconds"].as_u64()?,
                reward: p["reward"].as_f64()?,
                attested_by: p["uptime_attested_by"]
                    .as_array()?
                    .iter()
                    .filter_map(|a| a.as_str().map(|s| s.to_lowercase()))
                    .collect(),
            })
        })
        .collect();
    out.sort_by_key(|r| r.at);
    out
}

/// The proofs after a node's first credited one (the first covers the epoch it joined in).
fn steady(node: &Node) -> Vec<Rewarded> {
    rewarded(node)
        .into_iter()
        .skip_while(|r| r.uptime == 0)
        .skip(1)
        .collect()
}

#[test]
fn uptime_is_bounded_by_peers_heartbeat_receipts() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let start = Duration::from_secs(60);
    let a = Node::start(options("none")).unwrap();
    a.wait_healthy(start).unwrap();
    let b = Node::start(options("none").with_seed_peers(&[a.peer_addr()])).unwrap();
    let cheater = Node::start(options("inflate_uptime").with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(start).unwrap();
    cheater.wait_healthy(start).unwrap();
    let nodes = [&a, &b, &cheater];
    let addrs: Vec<String> = nodes.iter().map(|n| address(n).to_lowercase()).collect();
    let dump = || {
        for (n, name) in nodes.iter().zip(["a", "b", "cheater"]) {
            eprintln!("--- {name}: {:?}\n{}", page(n), n.logs());
        }
    };

    // Three steady epochs on every node.
    const EPOCHS: usize = 3;
    wait_for(
        "three steady rewarded epochs on every node",
        Duration::from_secs(480),
        POLL,
        || {
            nodes
                .iter()
                .all(|n| steady(n).len() >= EPOCHS)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        dump();
        panic!("{e}")
    });
    let per_node: Vec<Vec<Rewarded>> = nodes
        .iter()
        .map(|n| steady(n).into_iter().take(EPOCHS).collect())
        .collect();
    for (i, proofs) in per_node.iter().enumerate() {
        eprintln!("node {i} steady proofs: {proofs:?}");
        for p in proofs {
            // Credited uptime never exceeds an epoch, whatever was claimed.
            assert!(p.uptime <= 60, "node {i}: {p:?}");
            // The heartbeat attesters are listed: both other nodes.
            for (j, other) in addrs.iter().enumerate() {
                if j != i {
                    assert!(
                        p.attested_by.contains(other),
                        "node {i}: {p:?} lacks {other}"
                    );
                }
            }
        }
    }
    let uptime = |i: usize| per_node[i].iter().map(|p| p.uptime).sum::<u64>() as f64;
    let reward = |i: usize| per_node[i].iter().map(|p| p.reward).sum::<f64>();
    let today = (60 * EPOCHS) as f64;
    // Honest nodes: the 60 s of each epoch, as an honest node was credited before heartbeat
    // receipts (within 1%).
    for i in [0, 1] {
        assert!(
            (uptime(i) - today).abs() <= 0.01 * today,
            "honest node {i}: {} s credited over {EPOCHS} epochs, {today} s before",
            uptime(i)
        );
    }
    // The cheater claimed 120 s each epoch and was credited what its peers heard: an honest
    // node's uptime, not more, and the same reward.
    assert!(
        uptime(2) <= uptime(0).max(uptime(1)),
        "cheater credited {} s, honest {} s and {} s",
        uptime(2),
        uptime(0),
        uptime(1)
    );
    assert!(
        reward(2) <= reward(0).max(reward(1)) * 1.000_001,
        "cheater earned {} NEURO, honest {} and {}",
        reward(2),
        reward(0),
        reward(1)
    );
    eprintln!(
        "credited uptime over {EPOCHS} steady epochs: honest {} s and {} s, cheater {} s \
         (claimed {} s); rewards {} / {} / {} NEURO",
        uptime(0),
        uptime(1),
        uptime(2),
        120 * EPOCHS,
        reward(0),
        reward(1),
        reward(2)
    );

    // Its peers gone, the cheater's claims of 120 s earn nothing: no receipt backs them.
    drop(b);
    drop(a);
    let gone = Utc::now().timestamp();
    // Receipts of the epoch the peers left in still count; from two epochs on, none exist.
    let dark = (gone / 60 + 2) * 60;
    // One refused proof shows it; `NEUROSHARD_LONG_TESTS` waits for two (a minute more).
    let refused = if std::env::var_os("NEUROSHARD_LONG_TESTS").is_some() {
        2
    } else {
        1
    };
    wait_for(
        "refused proofs of the lone cheater",
        Duration::from_secs(300),
        POLL,
        || {
            let p = page(&cheater)?;
            let late = p["proofs"]
                .as_array()?
                .iter()
                .filter(|x| {
                    x["timestamp"]
                        .as_str()
                        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                        .is_some_and(|t| t.timestamp() >= dark)
                })
                .count();
            (late >= refused).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", page(&cheater), cheater.logs()));
    let late: Vec<Rewarded> = rewarded(&cheater)
        .into_iter()
        .filter(|r| r.at >= dark)
        .collect();
    assert!(
        late.iter().all(|r| r.uptime == 0),
        "uptime credited without peers: {late:?}"
    );
    let stats = page(&cheater).unwrap()["stats"].clone();
    assert!(
        stats["rejected_by_reason"]["implausible"]
            .as_u64()
            .unwrap_or(0)
            >= refused as u64,
        "the lone cheater's proofs were not refused: {stats}"
    );
}
