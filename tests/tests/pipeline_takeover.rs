//! The dynamic layer pool while running (real processes on loopback, `default` preset, 4
//! layers): a worker SIGKILLed mid-training has its layer taken over by a neighbour with room
//! and training resumes; a node joining a pipeline with layers others already hold starts from
//! their weights and step; a worker that stalls (SIGSTOP) under the drop time is waited for,
//! one that stalls past it is taken over, and training goes on when it wakes.

use std::path::Path;
use std::time::Duration;

use crate::pipeline_common;
use neuroshard_proto::engine as pb;

use neuroshard_tests::{Node, NodeOptions, pid_alive, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pipeline_common::{POLL, START, dump, network, role_and_layers, status, step, wait_role};

const TRAIN: Duration = Duration::from_secs(300);

fn options(max_layers: u32, extra: &str) -> NodeOptions {
    let timeout = if extra.contains("pipeline_timeout_secs") {
        String::new()
    } else {
        "pipeline_timeout_secs = 5\n".to_string()
    };
    NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"default\"\nbatch_size = 4\nseq_len = 32\n\
             learning_rate = 0.003\nmicro_batches = 2\n{timeout}{extra}\n\
             [resources]\nmax_layers = {max_layers}\n"
        ),
        ..NodeOptions::default()
    }
}

/// Driver (layers 0-1), worker (2), validator (3), started in that order; the validator's
/// capacity (`c_layers`) may leave it room.
fn three_stages(c_layers: u32, extra: &str) -> (Node, Node, Node) {
    pipeline_common::three_stages([
        options(2, extra),
        options(1, extra),
        options(c_layers, extra),
    ])
}

#[test]
fn a_killed_worker_s_layer_is_taken_over_and_training_resumes() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // The validator may hold 3 layers but holds 1: it has room for the worker's.
    let (a, mut b, c) = three_stages(3, "");
    wait_for("pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= 3)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&[&a, &b, &c])));

    let engine = b.engine_pid().expect("one engine child");
    b.signal(Signal::SIGKILL).unwrap();
    b.wait_exit(Duration::from_secs(5)).unwrap();
    wait_for("the worker's engine to exit", START, POLL, || {
        (!pid_alive(engine)).then_some(())
    })
    .unwrap();
    let at_kill = step(&a).unwrap();

    // The others drop the worker from their peer tables; the validator, a neighbour of the
    // uncovered layer with room, extends its range over it.
    wait_role(&c, "validator", &[2, 3]);
    let net = wait_for(
        "the driver's view: every layer covered, layer 2 on the validator",
        START,
        POLL,
        || {
            network(&a).filter(|n| {
                n["coverage"]["uncovered"] == 0
                    && n["coverage"]["layers"][2]["holders"] == 1
                    && n["nodes"]["total"] == 2
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&[&a, &c])));
    assert_eq!(net["coverage"]["min_replicas"], 1, "{net}");
    let layers = c
        .authed(reqwest::Method::GET, "/api/v1/layers", None)
        .unwrap()
        .1;
    assert_eq!(layers["my_layer_count"], 2, "{layers}");

    // Nobody held layer 2 any more and the validator never had: it starts from the seed, and
    // the validator says so.
    let cn = network(&c).unwrap();
    assert_eq!(cn["pipeline"]["takeovers"], 1, "{cn}");
    assert_eq!(cn["pipeline"]["layers_from_init"], 1, "{cn}");
    assert!(
        c.logs().contains("they start from the seed"),
        "{}",
        c.logs()
    );

    // Training resumes through the new holder.
    wait_for("training to resume", TRAIN, POLL, || {
        step(&a).filter(|s| *s >= at_kill + 5)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&[&a, &c])));
    let s = status(&a).unwrap();
    let loss = s["training"]["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{s}");
    // The validator stepped its optimizer with the driver (give or take the step in flight).
    // Read between two reads of the driver, so a step finishing meanwhile cannot fail it.
    let (da1, dc, da2) = (step(&a).unwrap(), step(&c).unwrap(), step(&a).unwrap());
    assert!(
        dc + 1 >= da1 && dc <= da2 + 1,
        "driver at {da1}..{da2}, validator at {dc}"
    );
    let an = network(&a).unwrap();
    assert!(
        an["pipeline"]["failed_steps"].as_u64().unwrap() >= 1,
        "{an}"
    );
}

async fn engine_hash(socket: &Path) -> String {
    for _ in 0..500 {
        if let Ok(mut c) = neuroshard::supervisor::connect(socket.to_path_buf()).await {
            return c
                .model_hash(pb::ModelHashRequest {})
                .await
                .unwrap()
                .into_inner()
                .model_hash;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("engine socket {} does not answer", socket.display());
}

#[test]
fn a_late_joiner_starts_from_the_holders_weights_and_step() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // Training stops at step 6, so the holders' weights stay put while the joiner loads.
    let (a, b, c) = three_stages(1, "max_steps = 6");
    let nodes = [&a, &b, &c];
    wait_for("six pipeline steps on every stage", TRAIN, POLL, || {
        nodes.iter().all(|n| step(n) == Some(6)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));

    // Every layer is held once: the joiner adds a replica of the last one (not a second
    // driver) and fetches the validator's weights, optimizer state and step.
    let seeds = [a.peer_addr(), b.peer_addr(), c.peer_addr()];
    let d = Node::start(options(1, "max_steps = 6").with_seed_peers(&seeds)).unwrap();
    wait_role(&d, "validator", &[3]);
    d.wait_model_loaded(START).unwrap();
    assert_eq!(step(&d), Some(6), "{}", d.logs());
    let dn = network(&d).unwrap();
    assert_eq!(dn["pipeline"]["layers_from_peer"], 1, "{dn}");
    assert_eq!(dn["pipeline"]["layers_from_init"], 0, "{dn}");
    assert!(network(&c).unwrap()["pipeline"]["weights_served"].as_u64() >= Some(1));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (hc, hd) = rt.block_on(async {
        (
            engine_hash(&c.data_dir().join("engine.sock")).await,
            engine_hash(&d.data_dir().join("engine.sock")).await,
        )
    });
    assert_eq!(hc, hd, "the joiner's layers equal the holder's");
    // The driver's view shows the replica once its peer table has the joiner.
    wait_for(
        "two holders of layer 3 in the driver's view",
        START,
        POLL,
        || {
            network(&a).filter(|n| {
                n["coverage"]["layers"][3]["holders"] == 2 && n["coverage"]["min_replicas"] == 1
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&[&a, &d])));
}

#[test]
fn a_stalled_worker_fails_steps_by_the_deadline_and_training_resumes_when_it_wakes() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // No stage has room: the stall is waited out, not taken over.
    let (a, b, c) = three_stages(1, "pipeline_timeout_secs = 2");
    let nodes = [&a, &b, &c];
    wait_for("pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= 3)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let failed = |n: &Node| network(n).and_then(|v| v["pipeline"]["failed_steps"].as_u64());
    let failed_before = failed(&a).unwrap();

    // The worker's daemon stops answering (its sockets stay open) for 6 s: under the time
    // a peer is dropped, three times the step deadline.
    let worker = Pid::from_raw(b.pid().unwrap());
    kill(worker, Signal::SIGSTOP).unwrap();
    let stalled_at = step(&a).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(6);
    let mut polls = 0;
    while std::time::Instant::now() < until {
        // The driver and the validator answer throughout.
        for n in [&a, &c] {
            let (code, _) = n
                .get("/api/v1/health")
                .expect("health answers during the stall");
            assert_eq!(code, 200);
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = step(&a).unwrap();
    let failed_during = failed(&a).unwrap();
    kill(worker, Signal::SIGCONT).unwrap();
    assert!(polls >= 10, "{polls} health polls");
    // At most the step in flight at the stop finished; the others failed by their deadline
    // (6 s of 2 s deadlines) instead of waiting.
    assert!(
        during <= stalled_at + 1,
        "steps went on without the worker: {stalled_at} -> {during}"
    );
    assert!(
        failed_during > failed_before,
        "no step failed during the stall: {failed_before} -> {failed_during}\n{}",
        dump(&nodes)
    );

    // Awake again: training resumes through the same stages.
    wait_for("training to resume after the stall", TRAIN, POLL, || {
        step(&a).filter(|s| *s >= during + 5)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    assert_eq!(
        role_and_layers(&b).unwrap(),
        ("worker".to_string(), vec![2])
    );
    let loss = status(&a).unwrap()["training"]["loss"].as_f64().unwrap();
    assert!(loss.is_finite(), "loss {loss}");
}

#[test]
fn a_worker_stalled_past_the_drop_time_is_taken_over_and_training_goes_on_when_it_wakes() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // The validator has room: a stall longer than the peer drop time is a departure.
    let (a, b, c) = three_stages(3, "pipeline_timeout_secs = 2");
    let nodes = [&a, &b, &c];
    wait_for("pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= 3)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));

    // The worker's daemon stops answering, its sockets open, until the others have dropped it,
    // the validator has taken its layer over and training runs through the validator.
    let worker = Pid::from_raw(b.pid().unwrap());
    kill(worker, Signal::SIGSTOP).unwrap();
    let stalled_at = std::time::Instant::now();
    wait_role(&c, "validator", &[2, 3]);
    let taken_over = step(&a).unwrap();
    let resumed = wait_for(
        "training to resume through the validator",
        TRAIN,
        POLL,
        || step(&a).filter(|s| *s >= taken_over + 5),
    );
    let stalled_for = stalled_at.elapsed();
    // Health answered on the others throughout (their figures came from the API above).
    for n in [&a, &c] {
        assert_eq!(n.get("/api/v1/health").map(|(code, _)| code), Some(200));
    }
    kill(worker, Signal::SIGCONT).unwrap();
    let resumed = resumed.unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    eprintln!("stalled for {stalled_for:?}; training resumed at step {resumed}");

    // Awake, the worker still holds its old layer 2 and reconnects. The driver's routes must
    // keep reaching the head: the worker alone does not (nobody starts at layer 3), the
    // validator does.
    wait_for("the worker back in the driver's view", START, POLL, || {
        network(&a)
            .filter(|n| n["nodes"]["total"] == 3 && n["coverage"]["layers"][2]["holders"] == 2)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    wait_for("the worker healthy again", START, POLL, || {
        b.get("/api/v1/health").filter(|(code, _)| *code == 200)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let back = step(&a).unwrap();
    let failed = |n: &Node| network(n).and_then(|v| v["pipeline"]["failed_steps"].as_u64());
    let failed_back = failed(&a).unwrap();
    wait_for(
        "training to go on with the worker back",
        TRAIN,
        POLL,
        || step(&a).filter(|s| *s >= back + 10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let failed_after = failed(&a).unwrap();
    assert!(
        failed_after <= failed_back + 1,
        "steps failed with the worker back: {failed_back} -> {failed_after}\n{}",
        dump(&nodes)
    );
    assert_eq!(role_and_layers(&c).unwrap().1, vec![2, 3]);
    let loss = status(&a).unwrap()["training"]["loss"].as_f64().unwrap();
    assert!(loss.is_finite(), "loss {loss}");

    // Left off the route, the woken worker's layer 2 would stay as it was when it stopped,
    // and a route switched back to it would train on stale weights: once idle for 10 s it
    // refreshes the layer from the validator, which trained it further (weights, moments and
    // step), and training goes on.
    let (worker_step, validator_step) = (step(&b).unwrap(), step(&c).unwrap());
    assert!(
        validator_step > worker_step,
        "the validator at step {validator_step}, the idle worker at {worker_step}"
    );
    wait_for(
        "the idle worker to refresh its layer from the validator",
        Duration::from_secs(60),
        POLL,
        || {
            let resyncs = network(&b)?["pipeline"]["resyncs"].as_u64()?;
            (resyncs >= 1 && step(&b)? >= validator_step).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    assert_eq!(role_and_layers(&b).unwrap().1, vec![2]);
    eprintln!(
        "worker refreshed: step {worker_step} -> {:?} (validator at {validator_step}); {}",
        step(&b),
        network(&b).unwrap()["pipeline"]
    );
    let after = step(&a).unwrap();
    wait_for("training to go on after the refresh", TRAIN, POLL, || {
        step(&a).filter(|s| *s >= after + 5)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
}
