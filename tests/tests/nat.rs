//! The peer-to-peer stack through real NATs (issue 21 items 1 and 5, first part): the NAT lab
//! (`neuroshard_tests::lab::nat`: a public namespace, home LANs behind nftables masquerade
//! routers, a relay on the public side) and the chosen stack's bench binary, rust-libp2p's
//! (`bench/p2p/libp2p-bench`: relay v2, DCUtR, identify, AutoNAT; built by scripts/test.sh). Two endpoints behind endpoint-independent NATs
//! end on a direct path after hole punching; one behind a symmetric NAT still connects,
//! through the relay; with the relay gone, a NAT'd endpoint cannot be found and the client
//! fails with an error within its timeout, not a hang. Needs root, `ip` and `nft`.
//!
//! The daemon's transport on the stack (docs/p2p.md, steps 1-3): a node behind a NAT and a
//! public node train as a two-stage pipeline, then serve a generation through both stages
//! (step 7: distributed inference across the NAT); the calls of the public node to the NAT'd
//! one run over the connection the NAT'd node opened.
//!
//! Relays and hole punching in the daemon (step 4): two nodes behind endpoint-independent
//! NATs meet through a public node (it relays; they dial each other's circuit address) and
//! train over a direct connection after DCUtR; with one of them behind a symmetric NAT they
//! train through the relay; when a relay dies the NAT'd node reserves on a third public
//! node within a bound and training goes on. The NAT'd nodes' APIs are read from inside their LANs.

use std::time::Duration;

use neuroshard_tests::lab::cgroup::Cgroups;
use neuroshard_tests::lab::nat::{NatKind, NatLab, Placement};
use neuroshard_tests::lab::p2p::{ClientOptions, P2pRun, Stack};
use neuroshard_tests::lab::{LabNode, run_name, tiny_training};
use neuroshard_tests::wait_for;
use serde_json::{Value, json};

/// The stack chosen by measuring both (BENCHMARKS.md, "Peer-to-peer stacks").
const STACK: Stack = Stack::Libp2p;
const EIM: Placement = Placement::Behind(NatKind::EndpointIndependent);
const SYMMETRIC: Placement = Placement::Behind(NatKind::Symmetric);
const CLIENT_LIMIT: Duration = Duration::from_secs(90);

#[test]
fn natted_endpoints_hole_punch_fall_back_to_the_relay_and_fail_cleanly_without_it()
-> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let mut lab = NatLab::new()?;
    let a = lab.add_host("a", EIM)?;
    let b = lab.add_host("b", EIM)?;
    let s = lab.add_host("s", SYMMETRIC)?;
    let mut run = P2pRun::start(&mut lab, STACK)?;
    run.start_server(&mut lab, &a, "a")?;

    // Both behind endpoint-independent NATs: direct after hole punching, the data arrives.
    let opts = ClientOptions {
        bytes: 4 << 20,
        wait_direct_s: 20.0,
        ..ClientOptions::default()
    };
    let r = run.client(&mut lab, &b, "a", &opts, CLIENT_LIMIT)?;
    assert_eq!(r["path"], "direct", "{r}\n{}", run.log("a"));
    assert!(r["direct_ms"].is_number(), "{r}");
    assert_eq!(r["transfer"]["bytes"], 4 << 20, "{r}");

    // Behind a symmetric NAT the punched hole leads nowhere: relayed, and it still works.
    let relayed = ClientOptions {
        wait_direct_s: 3.0,
        ..opts.clone()
    };
    let r = run.client(&mut lab, &s, "a", &relayed, CLIENT_LIMIT)?;
    assert_eq!(r["path"], "relay", "{r}");
    assert_eq!(r["transfer"]["bytes"], 4 << 20, "{r}");

    // The relay down: nothing coordinates the punch and nothing carries the bytes; the client
    // gives up with an error (its dial of the relay fails, or its connect timeout of 10 s
    // passes) instead of hanging (the run kills a client still there after 90 s and says so).
    run.stop_relay(&mut lab);
    let down = ClientOptions {
        connect_timeout_s: 10.0,
        ..opts
    };
    let err = run
        .client(&mut lab, &b, "a", &down, CLIENT_LIMIT)
        .expect_err("connected to a NAT'd endpoint with the relay down");
    let text = format!("{err:#}");
    assert!(!text.contains("hung"), "{text}");
    assert!(text.contains("failed"), "{text}");
    Ok(())
}

/// A node behind a NAT takes part in a pipeline. A public node and a node behind an
/// endpoint-independent NAT each hold one layer of the `tiny` model: the public one drives
/// layer 0 and must call the NAT'd one for layer 1, which nothing can dial. Before the peer
/// service ran over libp2p this failed with "no route: the connected peers do not cover
/// layers 1..2" and no step was trained.
const NODE_START: Duration = Duration::from_secs(120);
/// Steps the driving stage must complete through the NAT'd stage.
const STEPS: u64 = 3;

fn step(node: &LabNode) -> Option<u64> {
    node.get("/api/v1/status")?["training"]["step"].as_u64()
}

/// The role and layers of `node`, and how many peers it has.
fn role(node: &LabNode) -> Option<(String, Vec<u64>, u64)> {
    let s = node.get("/api/v1/status")?;
    let layers = s["layers"].as_array()?.iter().filter_map(Value::as_u64);
    Some((
        s["role"].as_str()?.to_string(),
        layers.collect(),
        s["peer_count"].as_u64()?,
    ))
}

#[test]
fn a_natted_node_and_a_public_one_train_as_a_two_stage_pipeline() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let mut lab = NatLab::new()?;
    // This thread reads the public node's API from the public namespace (its threads too).
    lab.topology.enter_public()?;
    let public = lab.add_host("open", Placement::Public)?;
    let home = lab.add_host("home", EIM)?;
    let mut cgroups = Cgroups::new(&format!("natpipe{}", run_name()), 0.0)?;
    let dir = tempfile::tempdir()?;
    // One layer each: two stages.
    let (config, _) = tiny_training(1);
    let mut a = LabNode::start(
        0,
        public.ns.clone(),
        public.ip,
        dir.path().join("a"),
        cgroups.child("a", 0.0)?,
        &config,
    )?;
    a.wait_up(NODE_START)?;
    let b_config = format!("seed_peers = [{:?}]\n{config}", a.peer_addr());
    let mut b = LabNode::start(
        1,
        home.ns.clone(),
        home.ip,
        dir.path().join("b"),
        cgroups.child("b", 0.0)?,
        &b_config,
    )?;
    // The NAT'd node's API is behind its router: everything is read from the public node.
    let trained = wait_for(
        "the public node to train steps through the NAT'd stage",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            // A driver of layer 0 alone cannot train a step: each one went through the
            // NAT'd node's layer 1.
            let (r, l, peers) = role(&a)?;
            let s = step(&a)?;
            (r == "driver" && l == [0] && peers == 1 && s >= STEPS).then_some(s)
        },
    );
    // Distributed inference across the NAT (docs/p2p.md step 7): the public node holds layer
    // 0 only, so every token of its generation went through the NAT'd node's layer 1, over
    // the connection the NAT'd node opened.
    let generated = trained.as_ref().ok().map(|_| {
        let body = json!({"prompt": "The river", "max_tokens": 8, "temperature": 0});
        let started = std::time::Instant::now();
        let r = wait_for(
            "a generation through the NAT'd stage",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || match a.post("/api/v1/inference", &body)? {
                (200, r) => Some(r),
                // No route yet (the stage's layers not known): asked again.
                (503, _) => None,
                (code, r) => Some(json!({"status": code, "answer": r})),
            },
        );
        (r, started.elapsed())
    });
    let status = a.get("/api/v1/status");
    let (a_logs, b_logs) = (a.logs(), b.logs());
    a.stop();
    b.stop();
    drop(lab);
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let steps = trained.map_err(|e| {
        anyhow::anyhow!(
            "{e}\nstatus of the public node: {status:?}\npublic node:\n{}\nNAT'd node:\n{}",
            tail(&a_logs),
            tail(&b_logs)
        )
    })?;
    assert!(steps >= STEPS);
    let (generated, took) = generated.expect("trained, so a generation was asked for");
    let generated = generated.map_err(|e| {
        anyhow::anyhow!(
            "{e}\npublic node:\n{}\nNAT'd node:\n{}",
            tail(&a_logs),
            tail(&b_logs)
        )
    })?;
    assert_eq!(generated["tokens_generated"], 8, "{generated}");
    assert!(generated["text"].is_string(), "{generated}");
    println!(
        "the public node trained {steps} steps through the NAT'd stage, then generated 8 \
         tokens through it in {:.2} s (timing {})",
        took.as_secs_f64(),
        generated["timing"]
    );
    Ok(())
}

// Relays and hole punching in the daemon (docs/p2p.md step 4): two nodes behind NATs train
// together as a two-stage pipeline, found through a public node that relays for them.

/// GET `path` from the API of the node at `ip` with `token`, from inside namespace `ns` (a
/// NAT'd node's API is reachable from its own LAN only).
fn get_in(ns: &str, ip: std::net::Ipv4Addr, token: &str, path: &str) -> Option<Value> {
    serde_json::from_str(&get_text_in(ns, ip, token, path)?).ok()
}

/// [`get_in`]'s body as text (`/metrics`).
fn get_text_in(ns: &str, ip: std::net::Ipv4Addr, token: &str, path: &str) -> Option<String> {
    let url = format!("http://{ip}:8000{path}");
    let token = token.to_string();
    neuroshard_tests::lab::net::run_in(ns, move || {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let r = http.get(url).bearer_auth(token).send().ok()?;
        r.status().is_success().then_some(())?;
        r.text().ok()
    })
    .ok()
    .flatten()
}

/// The peer traffic counters of one node's `/metrics` (bytes, all since start).
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    /// `/neuroshard/peer/1` stream bytes, sent plus received, to peers on a direct path.
    direct: f64,
    /// The same, to peers reached through a relay only.
    relayed: f64,
    /// Encoded peer messages, sent plus received (what the calls carry, any path).
    messages: f64,
}

impl Traffic {
    fn parse(text: &str) -> Option<Traffic> {
        let v = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("neuroshard_{name}_total ")))?
                .trim()
                .parse()
                .ok()
        };
        Some(Traffic {
            direct: v("peer_stream_bytes_sent_direct")? + v("peer_stream_bytes_received_direct")?,
            relayed: v("peer_stream_bytes_sent_relayed")?
                + v("peer_stream_bytes_received_relayed")?,
            messages: v("peer_bytes_sent")? + v("peer_bytes_received")?,
        })
    }
}

/// What a window of training steps cost the driving stage.
#[derive(Debug)]
struct Window {
    /// Seconds per step.
    step_s: f64,
    /// Bytes per step (the counters' growth over the window, divided by its steps).
    per_step: Traffic,
}

/// A node of a relay scenario: its host and the daemon.
struct Natted {
    host: neuroshard_tests::lab::nat::Host,
    node: LabNode,
}

impl Natted {
    /// GET with the API token the daemon wrote for this start.
    fn get(&self, path: &str) -> Option<Value> {
        let token = std::fs::read_to_string(self.node.data_dir().join("api.cookie")).ok()?;
        get_in(&self.host.ns, self.host.ip, token.trim(), path)
    }

    /// The node's `/metrics` text.
    fn metrics(&self) -> Option<String> {
        let token = std::fs::read_to_string(self.node.data_dir().join("api.cookie")).ok()?;
        get_text_in(&self.host.ns, self.host.ip, token.trim(), "/metrics")
    }

    /// (role, training step) of the node.
    fn training(&self) -> Option<(String, u64)> {
        let s = self.get("/api/v1/status")?;
        Some((
            s["role"].as_str()?.to_string(),
            s["training"]["step"].as_u64()?,
        ))
    }

    /// The entry of `/api/v1/peers` for the peer whose address is not one of `public`.
    fn natted_peer(&self, public: &[String]) -> Option<Value> {
        let peers = self.get("/api/v1/peers")?;
        peers["peers"]
            .as_array()?
            .iter()
            .find(|p| {
                let a = p["address"].as_str().unwrap_or_default();
                !public.iter().any(|ip| a.starts_with(&format!("{ip}:")))
            })
            .cloned()
    }
}

/// Public observer nodes (bootstrap and relays, no layers), then two nodes behind NATs of
/// kinds `kinds`, each holding one layer of `tiny` (two stages), seeded with the public ones.
struct RelayScene {
    public: Vec<LabNode>,
    natted: Vec<Natted>,
    _lab: NatLab,
    _cgroups: Cgroups,
    _dir: tempfile::TempDir,
}

impl RelayScene {
    fn start(publics: usize, kinds: [NatKind; 2]) -> anyhow::Result<RelayScene> {
        let mut lab = NatLab::new()?;
        lab.topology.enter_public()?;
        let mut cgroups = Cgroups::new(&format!("natrelay{}", run_name()), 0.0)?;
        let dir = tempfile::tempdir()?;
        let mut public = Vec::new();
        for i in 0..publics {
            let host = lab.add_host(&format!("p{i}"), Placement::Public)?;
            public.push(LabNode::start(
                i,
                host.ns.clone(),
                host.ip,
                dir.path().join(format!("p{i}")),
                cgroups.child(&format!("p{i}"), 0.0)?,
                "[node]\nobserver = true\n",
            )?);
        }
        for p in &public {
            wait_for(
                "a public node's API",
                NODE_START,
                Duration::from_millis(250),
                || p.get("/api/v1/status"),
            )?;
        }
        let seeds: Vec<String> = public.iter().map(LabNode::peer_addr).collect();
        let (config, _) = tiny_training(1);
        let config = format!("seed_peers = {seeds:?}\n{config}");
        let mut natted: Vec<Natted> = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            let host = lab.add_host(&format!("h{i}"), Placement::Behind(kind))?;
            let node = LabNode::start(
                publics + i,
                host.ns.clone(),
                host.ip,
                dir.path().join(format!("h{i}")),
                cgroups.child(&format!("h{i}"), 0.0)?,
                &config,
            )?;
            let n = Natted { host, node };
            // One after the other: the second takes the layer the first left.
            wait_for(
                "a NAT'd node up with a layer",
                NODE_START,
                Duration::from_millis(500),
                || {
                    let s = n.get("/api/v1/status")?;
                    (!s["layers"].as_array()?.is_empty()).then_some(())
                },
            )?;
            natted.push(n);
        }
        Ok(RelayScene {
            public,
            natted,
            _lab: lab,
            _cgroups: cgroups,
            _dir: dir,
        })
    }

    /// Seconds and peer bytes per training step of the driving stage over `window` (None:
    /// no step in it).
    fn step_window(&self, window: Duration) -> Option<Window> {
        let driver = self
            .natted
            .iter()
            .find(|n| n.training().is_some_and(|(r, _)| r == "driver"))?;
        let traffic = || Traffic::parse(&driver.metrics()?);
        let (before, (_, a)) = (traffic()?, driver.training()?);
        let t = std::time::Instant::now();
        std::thread::sleep(window);
        let (after, (_, b)) = (traffic()?, driver.training()?);
        let steps = b.checked_sub(a).filter(|n| *n > 0)? as f64;
        Some(Window {
            step_s: t.elapsed().as_secs_f64() / steps,
            per_step: Traffic {
                direct: (after.direct - before.direct) / steps,
                relayed: (after.relayed - before.relayed) / steps,
                messages: (after.messages - before.messages) / steps,
            },
        })
    }

    fn public_ips(&self) -> Vec<String> {
        self.public.iter().map(|p| p.ip.to_string()).collect()
    }

    /// Waits until the driving stage has trained `steps` steps past `from` (through the other
    /// NAT'd node), and its peer entry of that node has path `path`; that entry and the step.
    fn wait_training(
        &self,
        from: u64,
        steps: u64,
        path: &str,
        limit: Duration,
    ) -> anyhow::Result<(Value, u64)> {
        let public = self.public_ips();
        let result = wait_for(
            &format!("the NAT'd stages to train {steps} steps over a {path} connection"),
            limit,
            Duration::from_millis(1000),
            || {
                let driver = self
                    .natted
                    .iter()
                    .find(|n| n.training().is_some_and(|(r, _)| r == "driver"))?;
                let (_, step) = driver.training()?;
                let peer = driver.natted_peer(&public)?;
                (step >= from + steps && peer["path"] == path).then_some((peer, step))
            },
        );
        result.map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut out = String::new();
        for (i, p) in self.public.iter().enumerate() {
            out += &format!("--- public node {i}:\n{}\n", tail(p.logs()));
        }
        for (i, n) in self.natted.iter().enumerate() {
            let peers = n.get("/api/v1/peers");
            out += &format!(
                "--- NAT'd node {i} ({}): peers {peers:?}\n{}\n",
                n.host.placement.label(),
                tail(n.node.logs())
            );
        }
        out
    }
}

impl Drop for RelayScene {
    fn drop(&mut self) {
        for n in &mut self.natted {
            n.node.kill();
        }
        for p in &mut self.public {
            p.kill();
        }
    }
}

/// Steps the NAT'd stages must train in the relay scenarios.
const RELAY_STEPS: u64 = 3;
const RELAY_LIMIT: Duration = Duration::from_secs(150);
/// How long the step time is measured over.
const STEP_WINDOW: Duration = Duration::from_secs(20);

#[test]
fn two_nodes_behind_nats_train_direct_after_hole_punching() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let scene = RelayScene::start(
        1,
        [NatKind::EndpointIndependent, NatKind::EndpointIndependent],
    )?;
    let up = std::time::Instant::now();
    let (peer, steps) = scene.wait_training(0, RELAY_STEPS, "direct", RELAY_LIMIT)?;
    let to_direct = up.elapsed();
    // They met through the public node, which handed each the other's address: its NAT's
    // (both dial it from their peer port at once, which punches the hole through both
    // endpoint-independent NATs) or, once it has a reservation, its circuit address (dialed
    // through the relay, then made direct by DCUtR). Either way the path is direct.
    let addr = peer["address"].as_str().unwrap_or_default();
    let w = scene
        .step_window(STEP_WINDOW)
        .ok_or_else(|| anyhow::anyhow!("no step in {STEP_WINDOW:?}\n{}", scene.logs()))?;
    println!(
        "trained {steps} steps over a direct connection between two NAT'd nodes ({addr}); \
         {:.1} s from both up to {RELAY_STEPS} steps direct; step time {:.3} s; per step: \
         {:.0} stream bytes direct, {:.0} relayed, {:.0} message bytes",
        to_direct.as_secs_f64(),
        w.step_s,
        w.per_step.direct,
        w.per_step.relayed,
        w.per_step.messages,
    );
    // The activations and gradients went over the direct path.
    assert!(w.per_step.direct > w.per_step.relayed, "{w:?}");
    Ok(())
}

#[test]
fn a_node_behind_a_symmetric_nat_trains_through_a_relay() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let scene = RelayScene::start(1, [NatKind::EndpointIndependent, NatKind::Symmetric])?;
    let up = std::time::Instant::now();
    let (peer, steps) = scene.wait_training(0, RELAY_STEPS, "relayed", RELAY_LIMIT)?;
    let to_relayed = up.elapsed();
    // Hole punching cannot work behind a symmetric NAT: still relayed a while later, and
    // training still advances through the relay.
    std::thread::sleep(Duration::from_secs(10));
    let (peer2, more) = scene.wait_training(steps, 1, "relayed", RELAY_LIMIT)?;
    assert_eq!(peer["id"], peer2["id"]);
    let w = scene
        .step_window(STEP_WINDOW)
        .ok_or_else(|| anyhow::anyhow!("no step in {STEP_WINDOW:?}\n{}", scene.logs()))?;
    println!(
        "trained {more} steps through the relay (peer {peer}); {:.1} s from both up to \
         {RELAY_STEPS} steps relayed; step time {:.3} s; per step: {:.0} stream bytes \
         direct, {:.0} relayed, {:.0} message bytes",
        to_relayed.as_secs_f64(),
        w.step_s,
        w.per_step.direct,
        w.per_step.relayed,
        w.per_step.messages,
    );
    // The activations and gradients crossed the relay.
    assert!(w.per_step.relayed > w.per_step.direct, "{w:?}");
    Ok(())
}

/// The relays (peer ids) holding a reservation for `node`, as its `/api/v1/peers` says.
fn relays_of(node: &Natted) -> Option<Vec<String>> {
    let peers = node.get("/api/v1/peers")?;
    let relays = peers["relays"].as_array()?.iter().filter_map(Value::as_str);
    Some(relays.map(str::to_string).collect())
}

/// A relay that dies is replaced within this (its connection closes at once; a new
/// reservation is a round trip to a public node already connected).
const REPLACE_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_relay_that_dies_is_replaced_and_training_goes_on() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // Three public nodes: a NAT'd node reserves on two, the third is the spare.
    let mut scene = RelayScene::start(3, [NatKind::EndpointIndependent, NatKind::Symmetric])?;
    let (peer, steps) = scene.wait_training(0, RELAY_STEPS, "relayed", RELAY_LIMIT)?;
    // The circuit runs through the public node whose address leads the circuit address.
    let addr = peer["address"].as_str().unwrap_or_default().to_string();
    let relay = scene
        .public
        .iter()
        .position(|p| addr.starts_with(&format!("/ip4/{}/", p.ip)))
        .ok_or_else(|| anyhow::anyhow!("{addr} names no public node\n{}", scene.logs()))?;
    // `.../p2p/<relay>/p2p-circuit/...`: the relay's peer id.
    let relay_id = addr
        .split("/p2p-circuit")
        .next()
        .and_then(|a| a.rsplit("/p2p/").next())
        .unwrap_or_default()
        .to_string();
    // The stage the driver reaches through that circuit holds two reservations.
    let reached = scene
        .natted
        .iter()
        .position(|n| n.training().is_some_and(|(r, _)| r != "driver"))
        .ok_or_else(|| anyhow::anyhow!("no NAT'd stage besides the driver\n{}", scene.logs()))?;
    let natted = &scene.natted[reached];
    let before = wait_for(
        "the reached NAT'd stage to hold two reservations, one on the circuit's relay",
        RELAY_LIMIT,
        Duration::from_millis(500),
        || relays_of(natted).filter(|r| r.len() == 2 && r.contains(&relay_id)),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scene.logs()))?;
    scene.public[relay].kill();
    let killed = std::time::Instant::now();
    // It reserves on the spare: two reservations again, the dead relay's gone.
    let natted = &scene.natted[reached];
    let after = wait_for(
        "a reservation on the third public node",
        REPLACE_LIMIT,
        Duration::from_millis(250),
        || relays_of(natted).filter(|r| r.len() == 2 && !r.contains(&relay_id)),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scene.logs()))?;
    let replaced = killed.elapsed();
    let spare: Vec<&String> = after.iter().filter(|r| !before.contains(r)).collect();
    assert_eq!(spare.len(), 1, "before {before:?}, after {after:?}");
    // Past the time a peer that stops answering is dropped (10 s): what still runs after that
    // runs through the surviving relays. Training goes on (a relayed path between the two,
    // and steps past those trained then).
    std::thread::sleep(Duration::from_secs(15).saturating_sub(killed.elapsed()));
    let (_, now) = scene.wait_training(0, 0, "relayed", RELAY_LIMIT)?;
    let (peer, more) = scene.wait_training(now, RELAY_STEPS, "relayed", RELAY_LIMIT)?;
    println!(
        "relay {relay} killed at step {steps}; reserved on the spare {} in {:.1} s; step {more} \
         through the relays left {:.1} s later (entry {peer})",
        spare[0],
        replaced.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    Ok(())
}
