//! A node trains out of the box, its loss falls, and training survives an engine crash and a
//! daemon restart by resuming from the last checkpoint.

use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn step_and_loss(node: &Node) -> Option<(u64, f64)> {
    let (_, s) = node.get("/api/v1/status")?;
    Some((
        s["training"]["step"].as_u64()?,
        s["training"]["loss"].as_f64()?,
    ))
}

fn wait_step(node: &Node, at_least: u64) -> (u64, f64) {
    wait_for(
        &format!("training step {at_least}"),
        Duration::from_secs(240),
        Duration::from_millis(100),
        || step_and_loss(node).filter(|(s, _)| *s >= at_least),
    )
    .unwrap()
}

#[test]
fn training_loss_falls_and_resumes_from_checkpoints_after_crashes() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 8\nseq_len = 64\n\
                 learning_rate = 0.003\ncheckpoint_every = 10\n"
            .into(),
        ..NodeOptions::default()
    };
    let mut node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();

    let (first_step, first_loss) = wait_step(&node, 1);
    assert!(
        first_step <= 30,
        "first observation too late: step {first_step}"
    );
    let (_, later_loss) = wait_step(&node, first_step + 120);
    assert!(
        later_loss < first_loss - 0.5,
        "loss did not fall: {first_loss} at step {first_step}, {later_loss} 120 steps later"
    );

    // Device memory comes from the engine, also while it is busy with training steps.
    let (_, status) = node.get("/api/v1/status").unwrap();
    assert!(
        status["resources"]["gpu_memory_total"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(
        status["resources"]["gpu_memory_used"].as_u64().unwrap() > 0,
        "{status}"
    );

    // Engine crash: the daemon restarts it and training resumes from the last checkpoint
    // (at most checkpoint_every steps back), not from scratch.
    let (before_kill, _) = step_and_loss(&node).unwrap();
    kill(Pid::from_raw(node.engine_pid().unwrap()), Signal::SIGKILL).unwrap();
    node.wait_healthy(Duration::from_secs(10)).unwrap();
    let (resumed, _) = wait_for(
        "model restored",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let s = step_and_loss(&node)?;
            node.logs().contains("restored=true").then_some(s)
        },
    )
    .unwrap();
    assert!(
        resumed + 12 >= before_kill,
        "resumed at step {resumed}, had reached {before_kill}"
    );

    // Clean stop writes a last checkpoint; the next start continues from exactly there.
    let (before_stop, _) = wait_step(&node, resumed + 5);
    node.signal(Signal::SIGTERM).unwrap();
    assert_eq!(node.wait_exit(Duration::from_secs(40)).unwrap(), Some(0));
    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let (after_restart, _) = wait_step(&node, 1);
    assert!(
        after_restart >= before_stop,
        "restarted at {after_restart}, stopped after {before_stop}"
    );
}
