//! Three real nodes on loopback, no tracker: B and C are seeded with A only, so C finds B
//! through peer exchange. Ledger blocks injected at A reach every node by gossip, a node that
//! was offline catches up by anti-entropy, and a stopped node leaves the peer tables within
//! the documented bound. Then the nodes pay each other through their REST APIs and all three
//! end up with one root hash and the same balances. Once with every node's ledger in SQLite,
//! once with each node on a PostgreSQL database of its own.

use crate::network_common;

use std::collections::BTreeSet;
use std::time::Duration;

use network_common::{Observer, now_s};
use neuroshard_ledger::{Address, UNITS_PER_NEURO, units_to_neuro};
use neuroshard_net::DROP_BOUND;
use neuroshard_net::client::PeerConn;
use neuroshard_tests::{Backend, Node, NodeOptions, wait_for};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

const START: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);
/// Nodes claim incoming transfers with their proof of work, once per 60 s epoch.
const EPOCH_WAIT: Duration = Duration::from_secs(150);
/// A transfer is the recipient's as soon as its node holds the send: within a gossip push
/// (250 ms) and a claim; generous for a loaded machine, and well under an epoch.
const ARRIVAL: Duration = Duration::from_secs(15);

/// `ledger` of `GET /api/v1/network` on every node, when they all agree.
fn one_root(nodes: &[&Node]) -> Option<Value> {
    let roots: Vec<Value> = nodes
        .iter()
        .map(|n| n.get("/api/v1/network").map(|(_, b)| b["ledger"].clone()))
        .collect::<Option<_>>()?;
    (roots[0]["root_hash"].is_string() && roots.iter().all(|r| *r == roots[0]))
        .then(|| roots[0].clone())
}

/// Every node holds the same ledger (one root hash over REST), the blocks each holds give
/// the same balances, and each node's REST balance of its own wallet matches them.
fn agreed(obs: &Observer, nodes: &[&Node], conns: &[&PeerConn], ids: &[Address]) -> Option<Value> {
    let root = one_root(nodes)?;
    let now = now_s();
    let derived: Vec<_> = conns
        .iter()
        .map(|c| obs.balances_held_by(c, ids, now).ok())
        .collect::<Option<_>>()?;
    if derived.iter().any(|d| *d != derived[0]) {
        return None;
    }
    for (i, node) in nodes.iter().enumerate() {
        let (code, body) = node.authed(Method::GET, "/api/v1/wallet/balance", None)?;
        let b = &body["balances"];
        let want = &derived[0][i];
        let close = |field: &str, units: u64| {
            b[field]
                .as_f64()
                .is_some_and(|v| (v - units_to_neuro(units)).abs() < 1e-9)
        };
        if code != 200
            || !close("available", want.available)
            || !close("pending", want.pending)
            || !close("total", want.total)
        {
            return None;
        }
    }
    // Nothing was minted meanwhile (a new epoch would change the ledger under our feet).
    (one_root(nodes)? == root).then_some(root)
}

fn seeded(seed: &Node) -> NodeOptions {
    NodeOptions::default()
        .with_seed_peers(&[seed.peer_addr()])
        .on(seed.backend())
}

/// Waits until every node's block set is the same and contains `must_hold`; returns it.
fn converged(
    obs: &Observer,
    conns: &[&PeerConn],
    must_hold: &BTreeSet<String>,
) -> anyhow::Result<BTreeSet<String>> {
    wait_for("ledgers to converge", SETTLE, POLL, || {
        let sets: Vec<BTreeSet<String>> = conns
            .iter()
            .map(|c| obs.block_hashes(c))
            .collect::<Option<_>>()?;
        let first = sets[0].clone();
        (sets.iter().all(|s| *s == first) && must_hold.is_subset(&first)).then_some(first)
    })
}

#[test]
fn three_nodes_find_each_other_and_converge_on_one_ledger_sqlite() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    three_nodes_find_each_other_and_converge_on_one_ledger(Backend::Sqlite);
}

#[test]
fn three_nodes_find_each_other_and_converge_on_one_ledger_postgres() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    three_nodes_find_each_other_and_converge_on_one_ledger(Backend::Postgres);
}

fn three_nodes_find_each_other_and_converge_on_one_ledger(backend: Backend) {
    if !backend.available("three_nodes_find_each_other_and_converge_on_one_ledger") {
        return;
    }
    let a = Node::start(NodeOptions::default().on(backend)).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(seeded(&a)).unwrap();
    let mut c = Node::start(seeded(&a)).unwrap();
    // A seeded node is healthy only once it has a peer.
    b.wait_healthy(START).unwrap();
    c.wait_healthy(START).unwrap();

    let obs = Observer::new().unwrap();
    let (ca, cb, cc) = (
        obs.connect(&a).unwrap(),
        obs.connect(&b).unwrap(),
        obs.connect(&c).unwrap(),
    );
    let ids = [ca.id, cb.id, cc.id];
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        3,
        "three identities"
    );

    // Everyone sees both others (C learned B from A's peer list), and nobody sees itself.
    for (conn, me) in [(&ca, 0), (&cb, 1), (&cc, 2)] {
        let others: BTreeSet<Address> = (0..3).filter(|i| *i != me).map(|i| ids[i]).collect();
        wait_for("a full peer table", SETTLE, POLL, || {
            (obs.peer_ids(conn)? == others).then_some(())
        })
        .unwrap();
    }
    for node in [&a, &b, &c] {
        let (code, status) = node.get("/api/v1/status").unwrap();
        assert_eq!(code, 200);
        assert_eq!(status["peer_count"], 2, "{status}");
    }

    // Blocks signed by a wallet that is none of the nodes, handed to A only: a reward and a
    // transfer to each node's wallet. B and C get them by gossip.
    // A hundredth of a NEURO: one proof of the tiny model mints 0.9 NEURO.
    let n = UNITS_PER_NEURO / 100;
    let now = now_s();
    obs.mint(now).unwrap();
    for (i, id) in ids.iter().enumerate() {
        obs.send(*id, (10 + i as u64) * n, now).unwrap();
    }
    let pushed = obs.push_to(&ca, 0).unwrap();
    let ours = obs.own_block_hashes(100);
    assert_eq!(ours.len(), 4);
    converged(&obs, &[&ca, &cb, &cc], &ours).unwrap();

    // Every node derives the same balances from what it holds: rebuild C's ledger.
    let rebuilt = Observer::new().unwrap();
    let held = obs.messages(&cc).unwrap();
    for m in &held {
        rebuilt
            .rt
            .block_on(rebuilt.ledger().apply(m, now_s()))
            .unwrap();
    }
    // Pending, or already claimed: each node claims a transfer to it as it arrives. (A node
    // also mints its own uptime reward once an epoch has passed, on a slow machine before
    // this check: that part is its reward blocks', counted apart.)
    for (i, id) in ids.iter().enumerate() {
        let bal = rebuilt.rt.block_on(rebuilt.ledger().balance(id, now_s()));
        let own_rewards: u64 = held
            .iter()
            .flat_map(|m| m.blocks())
            .filter(|b| b.block.account == *id)
            .filter_map(|b| match &b.block.op {
                neuroshard_ledger::Op::Reward { amount, .. } => Some(*amount),
                _ => None,
            })
            .sum();
        let (total, want) = (bal.pending + bal.available, (10 + i as u64) * n);
        assert!(
            total == want || total.checked_sub(own_rewards) == Some(want),
            "transfer to node {i}: {bal:?}, own rewards {own_rewards}, want {want}"
        );
    }

    // C goes offline; A and B drop it within the documented bound.
    c.signal(Signal::SIGTERM).unwrap();
    c.wait_exit(Duration::from_secs(30)).unwrap();
    for conn in [&ca, &cb] {
        wait_for(
            "the stopped node to leave the peer table",
            DROP_BOUND + Duration::from_secs(10),
            POLL,
            || (!obs.peer_ids(conn)?.contains(&ids[2])).then_some(()),
        )
        .unwrap();
    }

    // Meanwhile more transfers reach A; C, back online, catches up by pulling.
    obs.send(ids[2], 5 * n, now_s()).unwrap();
    obs.send(ids[1], 6 * n, now_s()).unwrap();
    obs.push_to(&ca, pushed).unwrap();
    let all = obs.own_block_hashes(100);
    assert_eq!(all.len(), 6);
    converged(&obs, &[&ca, &cb], &all).unwrap();
    c.spawn().unwrap();
    c.wait_healthy(START).unwrap();
    let cc = obs.connect(&c).unwrap();
    assert_eq!(cc.id, ids[2], "a restarted node keeps its identity");
    converged(&obs, &[&ca, &cb, &cc], &all).unwrap();
    for conn in [&ca, &cb, &cc] {
        wait_for(
            "the restarted node back in every table",
            SETTLE,
            POLL,
            || (obs.peer_ids(conn)?.len() == 2).then_some(()),
        )
        .unwrap();
    }

    // The nodes' wallets: what /status says is what the handshake proved.
    let nodes = [&a, &b, &c];
    let conns = [&ca, &cb, &cc];
    for (node, id) in nodes.iter().zip(ids) {
        let (_, status) = node.get("/api/v1/status").unwrap();
        let said = status["wallet_address"].as_str().unwrap_or_default();
        assert_eq!(Address::parse(said).unwrap(), id, "{status}");
    }
    // Each node claims what the observer sent it (on arrival, or with a proof of work).
    for node in nodes {
        wait_for("the observer's transfer claimed", EPOCH_WAIT, POLL, || {
            let (code, body) = node.authed(Method::GET, "/api/v1/wallet/balance", None)?;
            (code == 200 && body["balances"]["available"].as_f64()? >= 0.1).then_some(())
        })
        .unwrap();
    }
    // The nodes pay each other in a ring through their REST APIs (hundredths of a NEURO).
    for (i, node) in nodes.iter().enumerate() {
        let to = ids[(i + 1) % 3].to_checksum();
        let amount = (3.0 - i as f64) / 100.0;
        let (code, body) = node
            .authed(
                Method::POST,
                "/api/v1/wallet/send",
                Some(json!({"to": to, "amount": amount, "memo": "ring"})),
            )
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "confirmed", "{body}");
    }
    let root = wait_for(
        "one ledger and the same balances on every node",
        EPOCH_WAIT,
        POLL,
        || agreed(&obs, &nodes, &conns, &ids),
    )
    .unwrap();
    assert!(root["blocks"].as_u64().unwrap() >= 6 + 3, "{root}");
    assert_eq!(root["invariant_ok"], true, "{root}");
    // The ring transfers are part of it: each recipient holds its transfer (claimed or not).
    let derived = obs.balances_held_by(&ca, &ids, now_s()).unwrap();
    for (i, bal) in derived.iter().enumerate() {
        assert!(bal.total > 0, "wallet {i}: {bal:?}");
    }
    let sends = obs
        .messages(&cb)
        .unwrap()
        .iter()
        .filter(|m| {
            m.blocks().iter().any(|blk| {
                matches!(&blk.block.op, neuroshard_ledger::Op::Send { memo, .. } if memo == "ring")
            })
        })
        .count();
    assert_eq!(sends, 3, "B holds the three ring transfers");
    for node in nodes {
        node.assert_database_settings();
    }
}

/// The recipient of a transfer sees it within seconds of the sender's `confirmed` (as
/// pending until its node claims it, which it does as soon as the block arrives), not at
/// its node's next epoch turn a minute later.
#[test]
fn a_transfer_reaches_the_recipient_within_seconds() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let a = Node::start(NodeOptions::default()).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(seeded(&a)).unwrap();
    b.wait_healthy(START).unwrap();
    let obs = Observer::new().unwrap();
    let (ca, cb) = (obs.connect(&a).unwrap(), obs.connect(&b).unwrap());
    // Hundredths of a NEURO: one proof of the tiny model mints 0.9 NEURO.
    let n = UNITS_PER_NEURO / 100;
    // Funds for A from a wallet that is no node's: A claims them as they arrive.
    let now = now_s();
    obs.mint(now).unwrap();
    obs.send(ca.id, 10 * n, now).unwrap();
    obs.push_to(&ca, 0).unwrap();
    let available = |node: &Node| -> Option<f64> {
        let (code, body) = node.authed(Method::GET, "/api/v1/wallet/balance", None)?;
        (code == 200).then(|| body["balances"]["available"].as_f64())?
    };
    wait_for("A to claim the observer's transfer", ARRIVAL, POLL, || {
        (available(&a)? >= 0.1).then_some(())
    })
    .unwrap();

    let (code, sent) = a
        .authed(
            Method::POST,
            "/api/v1/wallet/send",
            Some(json!({"to": cb.id.to_checksum(), "amount": 0.025, "memo": "at once"})),
        )
        .unwrap();
    assert_eq!(code, 200, "{sent}");
    assert_eq!(sent["status"], "confirmed", "{sent}");
    let send_id = sent["transaction_id"].as_str().unwrap().to_string();
    // B's balance and history show it (pending or claimed) within seconds...
    let line = wait_for("the transfer at B", ARRIVAL, POLL, || {
        let (_, bal) = b.authed(Method::GET, "/api/v1/wallet/balance", None)?;
        let held = bal["balances"]["available"].as_f64()? + bal["balances"]["pending"].as_f64()?;
        let (_, hist) = b.authed(Method::GET, "/api/v1/wallet/transactions?limit=50", None)?;
        let line = hist["transactions"]
            .as_array()?
            .iter()
            .find(|t| t["type"] == "receive" && t["details"]["source"] == send_id.as_str())?
            .clone();
        ((held - 0.025).abs() < 1e-9).then_some(line)
    })
    .unwrap();
    assert_eq!(line["amount"], 0.025, "{line}");
    assert_eq!(line["from"], ca.id.to_checksum(), "{line}");
    assert!(
        ["pending", "confirmed"].contains(&line["status"].as_str().unwrap()),
        "{line}"
    );
    if line["status"] == "pending" {
        assert_eq!(
            line["id"],
            send_id.as_str(),
            "a pending line is the send's: {line}"
        );
    }
    // ... and B's node claims it as soon as it holds the send: available, a confirmed
    // receive in the history, and the receive block gossiped back to A.
    wait_for("B to claim the transfer", ARRIVAL, POLL, || {
        let (_, hist) = b.authed(Method::GET, "/api/v1/wallet/transactions?limit=50", None)?;
        let claimed = hist["transactions"].as_array()?.iter().any(|t| {
            t["type"] == "receive"
                && t["details"]["source"] == send_id.as_str()
                && t["status"] == "confirmed"
        });
        (claimed && available(&b)? >= 0.025).then_some(())
    })
    .unwrap();
    wait_for("A to hold B's receive block", ARRIVAL, POLL, || {
        let bal = obs.balances_held_by(&ca, &[cb.id], now_s()).ok()?;
        (bal[0].unclaimed == 0 && bal[0].available >= 5 * n / 2).then_some(())
    })
    .unwrap();
}
