//! A DiLoCo replica SIGKILLed in the middle of a round (real processes, `tiny`, H = 20):
//! the other two carry on, the killed one restarts from its checkpoint, adopts the
//! replicas' agreed weights from a peer and, one round later, all three start the round from
//! the same hash again.

use crate::diloco_common;

use std::time::Duration;

use diloco_common::{POLL, ROUNDS, START, agreed_round, dump_logs, global, options};
use neuroshard_tests::{Node, pid_alive, wait_for};
use nix::sys::signal::Signal;

#[test]
fn a_replica_killed_mid_round_rejoins_and_agrees_again() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let a = Node::start(options("")).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(options("").with_seed_peers(&[a.peer_addr()])).unwrap();
    let mut c = Node::start(options("").with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(START).unwrap();
    c.wait_healthy(START).unwrap();

    let (round, _) = wait_for("replicas to agree", ROUNDS, POLL, || {
        agreed_round(&[&a, &b, &c], 1)
    })
    .unwrap_or_else(|e| {
        dump_logs(&[&a, &b, &c]);
        panic!("{e}")
    });
    // Mid-round: some inner steps done, the boundary not reached.
    wait_for(
        "c in the middle of a round",
        ROUNDS,
        Duration::from_millis(20),
        || {
            let g = global(&c)?;
            let d = &g["diloco"];
            (d["round"].as_u64()? == round + 1 || d["round"].as_u64()? == round).then_some(())?;
            let step = d["inner_step_count"].as_u64()?;
            (5..15).contains(&step).then_some(())
        },
    )
    .unwrap();
    let engine = c.engine_pid().expect("one engine child");
    c.signal(Signal::SIGKILL).unwrap();
    c.wait_exit(Duration::from_secs(5)).unwrap();
    wait_for("the killed node's engine to exit", START, POLL, || {
        (!pid_alive(engine)).then_some(())
    })
    .unwrap();
    let killed_in = agreed_round(&[&a, &b], 0).map_or(round, |(r, _)| r);

    c.spawn().unwrap();
    c.wait_healthy(START).unwrap();
    let nodes = [&a, &b, &c];
    let (back, hash) = wait_for("the restarted replica to agree again", ROUNDS, POLL, || {
        agreed_round(&nodes, killed_in + 1)
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}")
    });
    let g = global(&c).unwrap();
    assert!(
        g["diloco"]["catch_ups"].as_u64().unwrap() >= 1,
        "the restarted replica did not adopt the agreed weights: {g}"
    );
    // And it takes part again: one more round in lockstep, with a new hash.
    let (_, next) = wait_for("one more round together", ROUNDS, POLL, || {
        agreed_round(&nodes, back + 1)
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}")
    });
    assert_ne!(hash, next);
    wait_for(
        "the restarted replica to take an outer step itself",
        ROUNDS,
        POLL,
        || (global(&c)?["diloco"]["outer_step_count"].as_u64()? >= 1).then_some(()),
    )
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}: {:?}", global(&c))
    });
}
