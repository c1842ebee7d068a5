//! Sampled recomputation of DiLoCo rounds (issue #19): replicas check each other's rounds by
//! short replay windows of committed inner steps (`diloco::window`) in a scratch engine; an
//! honest replica reproduces, also when it trains in another dtype (one honest replica runs
//! f32, the others bf16: another replay class, judged by windows replayed in the claimant's
//! dtype), and a replica built with the `adversary` feature that cheats is found guilty by
//! the others, whose staked verdicts convict it on every node: its pending rewards voided,
//! half its stake slashed, the same ledger root everywhere.

use std::time::Duration;

use neuroshard_tests::{Node, wait_for};

use crate::diloco_common::{POLL, START, dump_logs, options};
use crate::fraud_common::{convicted_everywhere, fraud, slashed_and_roots_agree, stake_available};
use crate::network_common::address;

/// An open network with a short challenge window (rewards pending 90 s, staked or not: the
/// nodes stake what they first earn), a quorum any staked verifier reaches, every
/// contribution replayed.
fn config(cheat: &str) -> String {
    format!(
        "\n[ledger]\nchallenge_window_secs = 90\naccept_unattested_training = false\n\
         fraud_quorum_neuro = 0.000000001\nverify_probability = 1.0\n\
         unbonded_window_factor = 1\n\
         [adversary]\ncheat = \"{cheat}\"\n"
    )
}

#[test]
fn a_replica_that_fakes_its_inner_steps_is_convicted_and_slashed_on_every_node() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let honest = config("none");
    let a = Node::start(options(&honest)).unwrap();
    a.wait_healthy(START).unwrap();
    // Another replay class: `training.dtype = "auto"` is bf16 on a CPU with AVX512-BF16 (the
    // CI machine); on one without, every node is f32 and the classes agree.
    let f32_honest = format!("dtype = \"f32\"\n{honest}");
    let b = Node::start(options(&f32_honest).with_seed_peers(&[a.peer_addr()])).unwrap();
    let cheater =
        Node::start(options(&config("fewer_steps_scaled")).with_seed_peers(&[a.peer_addr()]))
            .unwrap();
    b.wait_healthy(START).unwrap();
    cheater.wait_healthy(START).unwrap();
    let nodes = [&a, &b, &cheater];
    let cheat_addr = address(&cheater);

    // Everyone earns from the first attested rounds and stakes it: verdicts weigh stake, and
    // a conviction slashes it.
    let window = Duration::from_secs(400);
    let staked: Vec<f64> = nodes.iter().map(|n| stake_available(n, window)).collect();
    eprintln!("staked {staked:?}");

    // The honest replicas replay the cheater's rounds, find them guilty, write verdicts on
    // the rewards that cite their receipts, and every node convicts.
    let decided = wait_for("the cheater convicted on every node", window, POLL, || {
        convicted_everywhere(&nodes, cheat_addr.as_str())
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}: {:?}", nodes.map(fraud))
    });
    for s in &decided {
        assert!(s["slashed"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The honest ones found the cheat and reproduced each other's rounds (the honest noise,
    // CPU against CPU, is printed for BENCHMARKS.md), and nobody accused an honest replica.
    // An honest replica's innocent replays are of the other honest one: another dtype.
    // Which honest replica replays whom is the draw's, and only contributions a replica
    // attested (in its state, not outvoted) are drawn: on a loaded machine one replica may
    // meet only the cheater's rounds for a while, so the two are counted together.
    let honest = [&a, &b];
    let (innocent, guilty) = wait_for(
        "an honest round reproduced and a cheated one found",
        Duration::from_secs(240),
        POLL,
        || {
            let (mut innocent, mut guilty) = (0, 0);
            for n in honest {
                let f = fraud(n)?;
                innocent += f["replays"]["innocent"].as_u64()?;
                guilty += f["replays"]["guilty"].as_u64()?;
            }
            (innocent >= 1 && guilty >= 1).then_some((innocent, guilty))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", honest.map(fraud)));
    eprintln!("honest replays: {innocent} innocent, {guilty} guilty");
    let mut windows = 0;
    for n in honest {
        let f = fraud(n).unwrap();
        let d = f["replays"]["max_innocent_distance"].as_f64().unwrap();
        eprintln!(
            "honest replay distance (CPU against CPU): {d:e}; {}",
            f["replays"]
        );
        assert!(d < 0.05, "{f}");
        windows += f["replays"]["windows"].as_u64().unwrap();
        // Nobody accused an honest replica (an acquittal would be listed too).
        for s in f["slashes"].as_array().unwrap() {
            assert_eq!(s["accused"], cheat_addr.as_str(), "{s}");
        }
    }
    // Rounds are checked by windows of committed steps (every contribution after a replica's
    // first round commits its per-step states).
    assert!(windows >= 1, "no replay window checked");
    // The cheater's stake is slashed as seen by every node, and the ledgers agree.
    slashed_and_roots_agree(&nodes, &cheater, staked[2]);
}
