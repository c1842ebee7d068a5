//! Sampled recomputation of pipeline-stage work (issue #19, item 2): a two-stage pipeline
//! (`default` preset, layers 0-1 and 2-3) whose upper stage has two holders, one of them built
//! with the `adversary` feature and spoofing its operation log (`made_up_sender`: the
//! `spoofed_stage_log` forgery, its inputs logged as received from a made-up node): it never
//! runs its engine, answers forwards with the loss of zero weights (ln of the vocabulary) and
//! backwards with zero input gradients, and logs what it would serve when drawn, checkpoints
//! of zero weights and made-up (zero) inputs, logged as received from an address of no node,
//! so that no sender's reward cites a receipt for them. Replayed, that log
//! reproduces every output it sent; the honest holder of the same layers convicts it anyway,
//! because the checkpoint is 1.0 from the stage round's agreed weights and the sender its
//! log names for its inputs is not a node of the network (`pipeline/senders.rs`):
//! the cheater is slashed on every node, the ledger roots agree, and the honest holder
//! (replayed by the cheater's unmodified verifier, its checkpoints measured against the agreed
//! weights too) is never found guilty.
//! Run with `--features neuroshard/adversary` (the binaries too).

use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, wait_for};

use crate::fraud_common::{convicted_everywhere, fraud, slashed_and_roots_agree, stake_available};
use crate::network_common::address;
use crate::pipeline_common::{POLL, dump, wait_role};

fn options(cheat: &str) -> NodeOptions {
    NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"default\"\nbatch_size = 4\nseq_len = 32\n\
             learning_rate = 0.003\nmicro_batches = 2\npipeline_timeout_secs = 10\n\
             stage_round_secs = 20\ndiloco_round_timeout_secs = 20\n\
             [resources]\nmax_layers = 2\n\
             [ledger]\nchallenge_window_secs = 90\naccept_unattested_training = false\n\
             fraud_quorum_neuro = 0.000000001\nverify_probability = 1.0\n\
             unbonded_window_factor = 1\n\
             [adversary]\ncheat = \"{cheat}\"\n"
        ),
        ..NodeOptions::default()
    }
}

#[test]
fn a_stage_that_spoofs_its_log_is_convicted_and_slashed_on_every_node() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let a = Node::start(options("none")).unwrap();
    wait_role(&a, "driver", &[0, 1]);
    let b = Node::start(options("none").with_seed_peers(&[a.peer_addr()])).unwrap();
    wait_role(&b, "validator", &[2, 3]);
    let cheater =
        Node::start(options("made_up_sender").with_seed_peers(&[a.peer_addr(), b.peer_addr()]))
            .unwrap();
    wait_role(&cheater, "validator", &[2, 3]);
    let nodes = [&a, &b, &cheater];
    let cheat_addr = address(&cheater);

    // Everyone earns from its first attested steps and stakes it: verdicts weigh stake, and a
    // conviction slashes it.
    let window = Duration::from_secs(400);
    let staked: Vec<f64> = nodes.iter().map(|n| stake_available(n, window)).collect();
    eprintln!("staked {staked:?}");

    let decided = wait_for("the cheater convicted on every node", window, POLL, || {
        convicted_everywhere(&nodes, cheat_addr.as_str())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", nodes.map(fraud), dump(&nodes)));
    eprintln!("convictions {decided:?}");

    // The honest holder found the cheat; the cheater's own (unmodified) verifier reproduced
    // the honest holder's work. Their distances are printed for BENCHMARKS.md.
    let fb = fraud(&b).unwrap();
    eprintln!("honest holder's replays: {}", fb["replays"]);
    assert!(fb["replays"]["guilty"].as_u64().unwrap() >= 1, "{fb}");
    // The forged log reproduces its outputs: what convicts it is the checkpoint (and the
    // inputs, when the verdict checks the receipts). The lines are printed for BENCHMARKS.md.
    let logs = b.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("replayed a stage's work") || l.contains("verdict written"))
        .collect();
    eprintln!("honest holder's checks:\n{}", lines.join("\n"));
    for why in ["a made-up checkpoint", "not a node of the network"] {
        assert!(
            lines.iter().any(|l| l.contains(why)),
            "{why}: {}",
            lines.join("\n")
        );
    }
    let (innocent, fc) = wait_for(
        "the honest holder's work reproduced",
        Duration::from_secs(180),
        POLL,
        || {
            let f = fraud(&cheater)?;
            let n = f["replays"]["innocent"].as_u64()?;
            (n >= 1).then_some((n, f))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", fraud(&cheater), cheater.logs()));
    let d = fc["replays"]["max_innocent_distance"].as_f64().unwrap();
    eprintln!(
        "honest stage replays: {innocent}, max distance (CPU against CPU) {d:e}; {}",
        fc["replays"]
    );
    // The honest holder's checkpoints against the agreed weights, as the cheater's verifier
    // measured them, its inputs' sender (the driver) asked for its own log (printed for
    // BENCHMARKS.md).
    let logs = cheater.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("replayed a stage's work"))
        .collect();
    eprintln!("the honest holder's checks:\n{}", lines.join("\n"));
    assert!(d < 0.05, "{fc}");
    assert_eq!(fc["replays"]["guilty"].as_u64(), Some(0), "{fc}");
    // Nobody accused the honest holders.
    for n in nodes {
        for s in fraud(n).unwrap()["slashes"].as_array().unwrap() {
            assert_eq!(s["accused"], cheat_addr.as_str(), "{s}");
        }
    }
    slashed_and_roots_agree(&nodes, &cheater, staked[2]);
}
