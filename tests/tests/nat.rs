//! The peer-to-peer stack through real NATs (issue 21 items 1 and 5, first part): the NAT lab
//! (`neuroshard_tests::lab::nat`: a public namespace, home LANs behind nftables masquerade
//! routers, a relay on the public side) and the chosen stack's bench binary, rust-libp2p's
//! (`bench/p2p/libp2p-bench`: relay v2, DCUtR, identify, AutoNAT; built by scripts/test.sh). Two endpoints behind endpoint-independent NATs
//! end on a direct path after hole punching; one behind a symmetric NAT still connects,
//! through the relay; with the relay gone, a NAT'd endpoint cannot be found and the client
//! fails with an error within its timeout, not a hang. Needs root, `ip` and `nft`.
//!
//! The daemon's transport on the stack (docs/p2p.md, steps 1-3): a node behind a NAT and a
//! public node train as a two-stage pipeline; the calls of the public node to the NAT'd one
//! run over the connection the NAT'd node opened.

use std::time::Duration;

use neuroshard_tests::lab::cgroup::Cgroups;
use neuroshard_tests::lab::nat::{NatKind, NatLab, Placement};
use neuroshard_tests::lab::p2p::{ClientOptions, P2pRun, Stack};
use neuroshard_tests::lab::{LabNode, run_name, tiny_training};
use neuroshard_tests::wait_for;
use serde_json::Value;

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
    println!("the public node trained {steps} steps through the NAT'd stage");
    Ok(())
}
