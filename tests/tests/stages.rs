//! Every node trains (issue #20): many pipelines at once over balanced stages, real processes
//! on loopback, `default` preset (4 layers), `resources.max_layers = 2`. Six nodes joining one
//! after another end as three holders of layers 0-1 (three drivers, three pipelines) and three
//! of layers 2-3, each joiner taking the stage with the least training throughput; every
//! driver steps, every holder of the upper stage trains; the holders of each stage agree on one
//! hash per DiLoCo round (rounds of 5 s of the clock, the same for both stages); a holder
//! killed mid-training does not stop the pipelines (their next routes go through the other
//! holders) nor the other holders' rounds; a serve-only node (`training.enabled = false`)
//! started first does not count as training coverage.

use std::time::Duration;

use crate::pipeline_common;

use neuroshard_tests::{Node, NodeOptions, wait_for};
use nix::sys::signal::Signal;
use pipeline_common::{POLL, START, dump, network, step, wait_role};

const TRAIN: Duration = Duration::from_secs(600);
/// A stage's DiLoCo round, in seconds of the clock.
const ROUND_SECS: u64 = 5;

/// The DiLoCo state `/api/training/global` shows: (round, round hash, layers, replicas
/// compared, contributors averaged in the last round).
fn diloco(node: &Node) -> Option<(u64, String, Vec<u64>, usize, u64)> {
    let (_, g) = node.get("/api/training/global")?;
    let d = &g["diloco"];
    let layers = d["layers"]
        .as_array()?
        .iter()
        .filter_map(|l| l.as_u64())
        .collect();
    Some((
        d["round"].as_u64()?,
        d["round_hash"].as_str()?.to_string(),
        layers,
        g["peers"].as_array()?.len(),
        d["last_round_contributors"].as_u64()?,
    ))
}

/// When every node of `stage` shows the same round (at least `min_round`) and hash, with
/// `layers`, `replicas` others compared, and the last round averaged over at least
/// `contributors`: that round.
fn agreed(
    stage: &[&Node],
    layers: &[u64],
    (replicas, contributors): (usize, u64),
    min_round: u64,
) -> Option<u64> {
    let states: Vec<_> = stage.iter().map(|n| diloco(n)).collect::<Option<_>>()?;
    let (round, hash) = (states[0].0, &states[0].1);
    let all = states.iter().all(|(r, h, l, peers, n)| {
        *r == round && h == hash && l == layers && *peers == replicas && *n >= contributors
    });
    (all && round >= min_round && !hash.is_empty()).then_some(round)
}

fn options(extra: &str) -> NodeOptions {
    NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"default\"\nbatch_size = 4\nseq_len = 32\n\
             learning_rate = 0.003\nmicro_batches = 2\npipeline_timeout_secs = 10\n\
             stage_round_secs = {ROUND_SECS}\ndiloco_round_timeout_secs = 20\n{extra}\n\
             [resources]\nmax_layers = 2\n"
        ),
        ..NodeOptions::default()
    }
}

/// Starts `roles.len()` nodes one after another, each seeded with all before it, and waits
/// for each to take the expected stage.
fn join(nodes: &mut Vec<Node>, roles: &[(&str, &[u64])]) {
    for (role, layers) in roles {
        let seeds: Vec<String> = nodes.iter().map(Node::peer_addr).collect();
        let n = Node::start(options("").with_seed_peers(&seeds)).unwrap();
        wait_role(&n, role, layers);
        nodes.push(n);
    }
}

#[test]
fn six_nodes_train_as_three_pipelines_and_a_killed_holder_stops_none() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (low, high): (&[u64], &[u64]) = (&[0, 1], &[2, 3]);
    let mut nodes = Vec::new();
    // Layers nobody holds first, then (equal nodes, no throughput measured yet) the stage
    // with fewer holders, the later one on a tie: late joiners take the stage that needs them.
    join(
        &mut nodes,
        &[
            ("driver", low),
            ("validator", high),
            ("validator", high),
            ("driver", low),
            ("validator", high),
            ("driver", low),
        ],
    );
    let all: Vec<&Node> = nodes.iter().collect();
    let drivers = [0, 3, 5];
    let holders = [1, 2, 4];

    // Three holders of every layer in the first node's view.
    wait_for("three holders of every layer", START, POLL, || {
        network(&nodes[0]).filter(|n| {
            (0..4).all(|l| n["coverage"]["layers"][l]["holders"] == 3) && n["nodes"]["drivers"] == 3
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));

    // Three pipelines: every driver steps its own stage; every holder of layers 2-3 trains.
    wait_for("five steps on every driver", TRAIN, POLL, || {
        drivers
            .iter()
            .all(|&i| step(&nodes[i]).is_some_and(|s| s >= 5))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    wait_for("every upper holder trains", TRAIN, POLL, || {
        holders
            .iter()
            .all(|&i| step(&nodes[i]).is_some_and(|s| s >= 1))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    // Over the next steps, the upper stage's steps are the drivers' steps, each applied once
    // on one holder: pipelines through one stage never cancel each other's step. (Counted as
    // differences: a joiner starts from its stage's holder's step.)
    let steps =
        |is: &[usize]| -> Vec<u64> { is.iter().map(|&i| step(&nodes[i]).unwrap()).collect() };
    let (d0, u0) = (steps(&drivers), steps(&holders));
    wait_for("ten more steps on every driver", TRAIN, POLL, || {
        drivers
            .iter()
            .zip(&d0)
            .all(|(&i, &s)| step(&nodes[i]).is_some_and(|now| now >= s + 10))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    let (d1, u1) = (steps(&drivers), steps(&holders));
    let diff = |a: &[u64], b: &[u64]| -> Vec<u64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
    let (dd, du) = (diff(&d1, &d0), diff(&u1, &u0));
    let failed: Vec<u64> = drivers
        .iter()
        .map(|&i| {
            network(&nodes[i]).unwrap()["pipeline"]["failed_steps"]
                .as_u64()
                .unwrap()
        })
        .collect();
    eprintln!("driver steps {dd:?}, upper-stage steps {du:?}, failed driver steps {failed:?}");
    let (sd, su) = (dd.iter().sum::<u64>() as i64, du.iter().sum::<u64>() as i64);
    // Steps in flight at either reading: at most one per driver each time.
    assert!((sd - su).abs() <= 6, "drivers {dd:?}, upper stage {du:?}");
    // The drivers spread over the holders: at least two of the three took part in these ten
    // steps (each has trained, checked above; which one a driver picks follows load and
    // latency, so on a loaded machine one may sit out a short window).
    assert!(
        du.iter().filter(|&&d| d > 0).count() >= 2,
        "upper stage {du:?}\n{}",
        dump(&all)
    );

    // One model per stage: each stage's holders agree on one hash per round, in rounds that
    // advance together in both stages.
    let members = |is: &[usize]| -> Vec<&Node> { is.iter().map(|&i| &nodes[i]).collect() };
    let (low_nodes, high_nodes) = (members(&drivers), members(&holders));
    let first = wait_for("every stage's holders agree", TRAIN, POLL, || {
        let l = agreed(&low_nodes, low, (2, 3), 0)?;
        let h = agreed(&high_nodes, high, (2, 3), 0)?;
        (l == h).then_some(l)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    let later = wait_for("two rounds later, agreed again", TRAIN, POLL, || {
        let l = agreed(&low_nodes, low, (2, 3), first + 2)?;
        let h = agreed(&high_nodes, high, (2, 3), first + 2)?;
        (l == h).then_some(l)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    eprintln!("stage rounds agreed at {first} and {later}");

    // A holder of the upper stage killed mid-training: the drivers go on through the others.
    nodes[holders[0]].signal(Signal::SIGKILL).unwrap();
    nodes[holders[0]]
        .wait_exit(Duration::from_secs(10))
        .unwrap();
    let at_kill: Vec<u64> = drivers.iter().map(|&i| step(&nodes[i]).unwrap()).collect();
    let alive: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holders[0])
        .map(|(_, n)| n)
        .collect();
    wait_for("five more steps on every driver", TRAIN, POLL, || {
        drivers
            .iter()
            .zip(&at_kill)
            .all(|(&i, &s)| step(&nodes[i]).is_some_and(|now| now >= s + 5))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&alive)));
    // ... and the other two holders of its stage go on agreeing, round after round, once the
    // dead one is dropped (two cannot outvote each other: each steps alone and the pair adopts
    // one state, `diloco::sync`).
    let survivors = [&nodes[holders[1]], &nodes[holders[2]]];
    let killed_round = diloco(survivors[0]).unwrap().0;
    wait_for(
        "the surviving holders agree two rounds on",
        TRAIN,
        POLL,
        || agreed(&survivors, high, (1, 1), killed_round + 2),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&alive)));
}

#[test]
fn a_serve_only_node_does_not_block_training_coverage() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // A serve-only node holding the whole model, started first.
    let serve = Node::start(NodeOptions {
        config: "[training]\nenabled = false\nmodel = \"default\"\nbatch_size = 4\n\
                 seq_len = 32\n"
            .into(),
        ..NodeOptions::default()
    })
    .unwrap();
    serve.wait_model_loaded(START).unwrap();
    // Two nodes with room for half the model each still cover it between them and train.
    let a = Node::start(options("").with_seed_peers(&[serve.peer_addr()])).unwrap();
    wait_role(&a, "driver", &[0, 1]);
    let b = Node::start(options("").with_seed_peers(&[serve.peer_addr(), a.peer_addr()])).unwrap();
    wait_role(&b, "validator", &[2, 3]);
    let all = [&serve, &a, &b];
    wait_for("training steps through the two nodes", TRAIN, POLL, || {
        (step(&a).is_some_and(|s| s >= 3) && step(&b).is_some_and(|s| s >= 3)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&all)));
    // The serve-only node trained nothing (no route went through it).
    assert_eq!(step(&serve), Some(0), "{}", serve.logs());
}
