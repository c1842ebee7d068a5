//! Discovery and gossip at bounded fan-out (issue 21 item 4, docs/p2p.md steps 5-6): eight
//! real nodes (`DHT_NODES` sets another count: the benchmark's 16 and 100; `DHT_OBSERVERS=1`
//! makes them layer-less observers, no engine, as the 100-node run needs) each keep at most
//! three peers (`peer.max_peers = 3`), all bootstrapped from the first one. A peer outside
//! the table holding layers is found through the DHT (`layer_{i}` provider records) from a
//! node that never heard of it; ledger blocks handed to one node reach every node through
//! gossipsub and anti-entropy, and all agree on one root; a peer that floods invalid gossip
//! is banned and the nodes stay healthy. A pipeline stage finds the next stage through the
//! DHT alone (its table and its bootstrap node's never name it) and trains with it.

use crate::network_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use network_common::{Observer, now_s};
use neuroshard::gossip::pubsub::LEDGER_TOPIC;
use neuroshard_ledger::UNITS_PER_NEURO;
use neuroshard_ledger::Wallet;
use neuroshard_net::{LocalRole, Network, PeerState, p2p};
use neuroshard_tests::{Node, NodeOptions, wait_for};
use serde_json::Value;

const START: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
/// The layers the holder outside every table provides (no node of the scenario holds any).
const HELD: std::ops::Range<u32> = 100..120;

fn nodes_wanted() -> usize {
    std::env::var("DHT_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 3)
        .unwrap_or(8)
}

/// Whether the nodes are observers (`DHT_OBSERVERS=1`): no layers, no engine.
fn observers() -> bool {
    std::env::var("DHT_OBSERVERS").is_ok_and(|v| v == "1")
}

/// How long a wait for the whole network may take: longer with more nodes on 2 cores.
fn settle(n: usize) -> Duration {
    SETTLE * (n as u32).div_ceil(16).max(1)
}

fn options(seed: Option<&Node>) -> NodeOptions {
    let mut o = NodeOptions::default();
    if observers() {
        o.config.push_str("\n[node]\nobserver = true\n");
    }
    o.config.push_str("\n[peer]\nmax_peers = 3\n");
    if nodes_wanted() > 16 {
        // Every node dials from 127.0.0.1: the seed's per-address caps (64 connections, 10
        // new ones a second) would refuse the rest of a large network.
        o.config
            .push_str("max_connections_per_address = 4096\nconnection_rate_per_address = 1000\n");
    }
    match seed {
        Some(s) => o.with_seed_peers(&[s.peer_addr()]),
        None => o,
    }
}

fn peer_count(node: &Node) -> Option<u64> {
    node.get("/api/v1/status")?.1["peer_count"].as_u64()
}

/// Peer-port connections open at `node` (from other nodes: incoming), from `/metrics`.
fn incoming_connections(node: &Node) -> Option<u64> {
    let text = reqwest::blocking::get(node.url("/metrics"))
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("neuroshard_peer_connections_open "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// `ledger` of `GET /api/v1/network` on every node, when they all agree.
fn one_root(nodes: &[Node]) -> Option<Value> {
    let roots: Vec<Value> = nodes
        .iter()
        .map(|n| n.get("/api/v1/network").map(|(_, b)| b["ledger"].clone()))
        .collect::<Option<_>>()?;
    (roots[0]["root_hash"].is_string() && roots.iter().all(|r| *r == roots[0]))
        .then(|| roots[0].clone())
}

/// A peer of the test process that listens and provides `layers` in the DHT: a real swarm
/// and network, which no node has in its table.
struct Holder {
    net: Arc<Network>,
    port: u16,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Holder {
    fn start(obs: &Observer, layers: Vec<u32>) -> Holder {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (connected, _) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(PeerState::default());
        let net = Network::new(
            Arc::new(Wallet::generate()),
            state.clone(),
            0,
            port,
            LocalRole {
                role: "worker".into(),
                layers: Vec::new(),
                serve_only: false,
            },
            neuroshard_net::no_advert(),
            connected,
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let admission = p2p::swarm::Admission {
            caps: neuroshard_net::admission::Caps {
                per_address: 64,
                total: 1024,
                new_per_second: 100,
            },
            state,
        };
        let transport = obs
            .rt
            .block_on(p2p::swarm::start(
                &net.wallet,
                Some(port),
                admission,
                p2p::relay::Options::default(),
                stopped,
            ))
            .unwrap();
        net.attach(transport);
        net.set_local_role(LocalRole {
            role: "worker".into(),
            layers,
            serve_only: false,
        });
        Holder {
            net,
            port,
            _stop: stop,
        }
    }
}

#[test]
fn bounded_tables_find_holders_in_the_dht_and_agree_on_one_ledger() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let n = nodes_wanted();
    let settle = settle(n);
    let first = Node::start(options(None)).unwrap();
    first.wait_healthy(START + settle).unwrap();
    let mut nodes = vec![first];
    for _ in 1..n {
        let node = Node::start(options(Some(&nodes[0]))).unwrap();
        nodes.push(node);
    }
    for node in &nodes {
        node.wait_healthy(START + settle).unwrap();
    }
    // Every node has peers, none more than three.
    for node in &nodes {
        wait_for("a peer", settle, POLL, || {
            peer_count(node).filter(|c| *c >= 1)
        })
        .unwrap();
    }

    // A holder of layers that no node knows of: it connects to the last node only.
    let obs = Observer::new().unwrap();
    let holder = Holder::start(&obs, HELD.collect());
    let last = nodes.last().unwrap();
    let t = holder.net.transport().unwrap().clone();
    obs.rt.block_on(t.resolve(&last.peer_addr())).unwrap();

    // A client connected to the first node only finds it through the DHT: the holder's
    // identity and its peer port, on the address its connection comes from.
    obs.connect(&nodes[0]).unwrap();
    let want = format!(":{}", holder.port);
    let found = wait_for(
        "the holder in the DHT",
        settle,
        Duration::from_secs(1),
        || {
            let h = obs.rt.block_on(obs.net.find_holders(HELD.start));
            eprintln!("dht: lookup of layer {}: {h:?}", HELD.start);
            h.ok()?
                .into_iter()
                .find(|h| h.id == holder.net.id() && h.addr.ends_with(&want))
        },
    );
    found.unwrap();
    // Lookups of every layer it holds: each finds it (timed for BENCHMARKS.md).
    let mut times = Vec::new();
    for layer in HELD {
        let t0 = Instant::now();
        let h = obs.rt.block_on(obs.net.find_holders(layer)).unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert!(
            h.iter().any(|h| h.id == holder.net.id()),
            "layer {layer}: {h:?}"
        );
    }
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "dht: {n} nodes, {} lookups: median {:.1} ms, p95 {:.1} ms",
        times.len(),
        p(0.5),
        p(0.95)
    );

    // Blocks handed to the last node only reach every node (gossipsub, anti-entropy).
    let conns: Vec<_> = nodes.iter().map(|n| obs.connect(n).unwrap()).collect();
    let ids: Vec<_> = conns.iter().map(|c| c.id).collect();
    let now = now_s();
    obs.mint(now).unwrap();
    for id in &ids {
        obs.send(*id, UNITS_PER_NEURO / 100, now).unwrap();
    }
    obs.push_to(conns.last().unwrap(), 0).unwrap();
    let ours = obs.own_block_hashes(1000);
    wait_for("every node holds the blocks", settle, POLL, || {
        conns
            .iter()
            .all(|c| obs.block_hashes(c).is_some_and(|h| ours.is_subset(&h)))
            .then_some(())
    })
    .unwrap();
    // One root over REST, and the same balances derived from what each node holds (a node
    // mints its own uptime reward each epoch: both are read until they agree).
    let root = wait_for("one root and the same balances", settle, POLL, || {
        let root = one_root(&nodes)?;
        let now = now_s();
        let balances: Vec<_> = conns
            .iter()
            .map(|c| obs.balances_held_by(c, &ids, now).ok())
            .collect::<Option<_>>()?;
        (balances.iter().all(|b| *b == balances[0]) && one_root(&nodes)? == root).then_some(root)
    })
    .unwrap();
    eprintln!("one ledger on {n} nodes: {root}");
    let counts: Vec<u64> = nodes.iter().filter_map(peer_count).collect();
    let incoming: Vec<Option<u64>> = nodes.iter().map(incoming_connections).collect();
    eprintln!("dht: peers per node {counts:?}, incoming peer-port connections {incoming:?}");
    assert_eq!(counts.len(), n);
    assert!(counts.iter().all(|c| (1..=3).contains(c)), "{counts:?}");

    // A peer that floods invalid gossip at a node is banned there; the node stays healthy.
    let attacker = Observer::new().unwrap();
    let target = &nodes[1];
    let conn = attacker.connect(target).unwrap();
    let t = attacker.net.transport().unwrap().clone();
    t.subscribe(LEDGER_TOPIC).unwrap();
    let banned = wait_for("the flooder banned", settle, POLL, || {
        for i in 0..4u32 {
            let garbage = format!("not a ledger message {i} {:?}", Instant::now());
            t.publish(LEDGER_TOPIC, garbage.into_bytes()).unwrap();
        }
        let e = attacker.rt.block_on(conn.ping()).err()?;
        e.to_string().contains("banned").then_some(e)
    });
    banned.unwrap();
    target.wait_healthy(Duration::from_secs(10)).unwrap();
    let fresh = Observer::new().unwrap();
    let ok = fresh.connect(target).unwrap();
    fresh.rt.block_on(ok.ping()).unwrap();
    // Every node still agrees on one ledger.
    wait_for("one root hash", settle, POLL, || one_root(&nodes)).unwrap();
}

/// Whether `node`'s table has the peer whose peer port is `peer_addr`'s.
fn has_peer(node: &Node, peer_addr: &str) -> Option<bool> {
    let port = peer_addr.rsplit_once(':')?.1;
    let (_, body) = node.authed(reqwest::Method::GET, "/api/v1/peers", None)?;
    Some(body["peers"].as_array()?.iter().any(|p| {
        p["address"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":{port}")))
    }))
}

/// (role, training step) of `node`.
fn training(node: &Node) -> Option<(String, u64)> {
    let s = node.get("/api/v1/status")?.1;
    Some((
        s["role"].as_str()?.to_string(),
        s["training"]["step"].as_u64()?,
    ))
}

/// A pipeline stage finds the holder of the next layer through the DHT alone and trains
/// with it (issue 21 item 4; no tracker). The bootstrap node keeps one peer in its table
/// (the first stage, the first to connect), so peer exchange never names the second stage to
/// the first; the first stage keeps one peer too (the bootstrap node). The second stage is
/// seeded with both (it must see the first stage's layer to take the other one); its
/// connection tells the first stage an address, not what it holds, and the first stage's one
/// place is taken. The first stage has a gap after its layer, looks `layer_1` up in the DHT,
/// and the holder it finds is more useful than the bootstrap node: it takes its place and the
/// two train.
#[test]
fn a_stage_finds_the_next_stage_in_the_dht_and_trains_with_it() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let one_peer = "\n[peer]\nmax_peers = 1\n";
    let seed = Node::start(NodeOptions {
        config: format!("[node]\nobserver = true\n{one_peer}"),
        ..NodeOptions::default()
    })
    .unwrap();
    seed.wait_healthy(START).unwrap();
    let (tiny, _) = neuroshard_tests::lab::tiny_training(1);
    let stage = |peer: &str, seeds: &[String]| {
        NodeOptions {
            config: format!("{tiny}{peer}"),
            // The lookups' outcome is logged at debug.
            env: vec![(
                "RUST_LOG".into(),
                "info,neuroshard_net::discover=debug".into(),
            )],
            ..NodeOptions::default()
        }
        .with_seed_peers(seeds)
    };
    let first = Node::start(stage(one_peer, &[seed.peer_addr()])).unwrap();
    let layers = |n: &Node| -> Option<Vec<u64>> {
        let s = n.get("/api/v1/status")?.1;
        let l: Vec<u64> = s["layers"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        (!l.is_empty()).then_some(l)
    };
    let held = wait_for("the first stage's layer", START, POLL, || layers(&first)).unwrap();
    assert_eq!(held, vec![0], "{}", first.logs());
    // The bootstrap node has the first stage in its one place before the second comes.
    wait_for("the first stage in the seed's table", START, POLL, || {
        has_peer(&seed, &first.peer_addr())?.then_some(())
    })
    .unwrap();
    let second = Node::start(stage("", &[seed.peer_addr(), first.peer_addr()])).unwrap();
    let held = wait_for("the second stage's layer", START, POLL, || layers(&second));
    assert_eq!(held.unwrap(), vec![1], "{}", second.logs());

    let trained = wait_for(
        "the first stage to train with the holder it found",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let (role, step) = training(&first)?;
            (role == "driver" && step >= 1 && has_peer(&first, &second.peer_addr())?)
                .then_some(step)
        },
    );
    let logs = first.logs();
    let step = trained.unwrap_or_else(|e| panic!("{e}\n--- first stage:\n{logs}"));
    // It learnt the holder of layer 1 from the DHT, not from its only other peer.
    assert!(
        logs.lines()
            .any(|l| l.contains("holders found in the DHT") && l.contains("layer=1")),
        "no DHT lookup found layer 1:\n{logs}"
    );
    eprintln!("dht: the first stage found the second in the DHT and trained {step} step(s)");
}
