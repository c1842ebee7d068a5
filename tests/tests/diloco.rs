//! DiLoCo across real processes: three replicas of the `tiny` model (H = 20 inner steps)
//! exchange pseudo-gradients over the peer service; after some rounds all three start each
//! round from the same model hash and the loss has fallen; the training-verification
//! figures list each replica with the loss it reported and say why training is or is not
//! verified.

use crate::diloco_common;
use crate::network_common;

use diloco_common::{
    POLL, ROUNDS, START, agreed_round, dump_logs, global, loss, losses, mean_of, options,
};
use neuroshard_tests::{Node, wait_for};

#[test]
fn three_replicas_agree_bit_for_bit_and_their_loss_falls() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // An open network's ledger: the replicas earn for training only what the others'
    // receipts of aggregated contributions attest.
    let ledger = network_common::ATTESTED_LEDGER;
    let a = Node::start(options(ledger)).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(options(ledger).with_seed_peers(&[a.peer_addr()])).unwrap();
    let c = Node::start(options(ledger).with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(START).unwrap();
    c.wait_healthy(START).unwrap();
    let nodes = [&a, &b, &c];
    let first = wait_for("a first loss", START, POLL, || loss(&a)).unwrap();

    // A few rounds in lockstep: same round, same starting hash on all three.
    let (round, hash) = wait_for("replicas to agree after 2 rounds", ROUNDS, POLL, || {
        agreed_round(&nodes, 2)
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}")
    });
    let (later_round, later_hash) =
        wait_for("replicas to agree 3 rounds later", ROUNDS, POLL, || {
            agreed_round(&nodes, round + 3)
        })
        .unwrap();
    assert_ne!(
        hash,
        later_hash,
        "the model did not change in {} rounds",
        later_round - round
    );

    // Everyone steps with the others (a node that was out of step at the start caught up
    // instead of stepping, so this is waited for, not read once), and nothing honest was
    // refused for its content.
    for n in nodes {
        let g = wait_for("3 outer steps taken with the others", ROUNDS, POLL, || {
            let g = global(n)?;
            let d = &g["diloco"];
            (d["outer_step_count"].as_u64()? >= 3
                && g["successful_syncs"].as_u64()? >= 1
                && d["contributions_accepted"].as_u64()? >= 2
                && g["hash_agreement_rate"].as_f64()? >= 0.5)
                .then_some(g)
        })
        .unwrap_or_else(|e| {
            dump_logs(&nodes);
            panic!("{e}: {:?}", global(n))
        });
        let d = &g["diloco"];
        assert!(d["bytes_sent_last_round"].as_u64().unwrap() > 0, "{g}");
        let rejected = d["contributions_rejected"].as_object().unwrap();
        for reason in ["malformed", "wrong_shape", "non_finite", "norm_too_large"] {
            assert!(rejected.get(reason).is_none(), "{reason}: {g}");
        }
    }
    let last = loss(&a).unwrap();
    assert!(
        last < first,
        "loss did not fall: {first} at the start, {last} after {later_round} rounds"
    );

    // The all-honest figure the attack test is compared with (docs/reliability.md).
    let start = mean_of(&losses(&a).unwrap(), 20, true);
    let end = mean_of(&losses(&a).unwrap(), 20, false);
    let d = &global(&a).unwrap()["diloco"];
    eprintln!(
        "all honest, {} fragment(s): loss {start:.3} in the first round, {end:.3} at round \
         {later_round}; most bytes one round sent {}, last round {}",
        d["fragments"], d["bytes_sent_max_round"], d["bytes_sent_last_round"]
    );

    // Verification figures from real peers: each node lists the two others, with the
    // losses they reported, and the global loss is the mean of the three EMAs.
    for n in nodes {
        let g = wait_for("two replicas with reported losses", ROUNDS, POLL, || {
            let g = global(n)?;
            let peers = g["peers"].as_array()?;
            (peers.len() == 2 && peers.iter().all(|p| p["loss_ema"].as_f64().is_some()))
                .then_some(g)
        })
        .unwrap();
        assert_eq!(g["total_nodes_training"], 3, "{g}");
        let emas: Vec<f64> = g["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["loss_ema"].as_f64().unwrap())
            .chain(g["local"]["loss_ema"].as_f64())
            .collect();
        let min = emas.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(g["global_min_loss"].as_f64(), Some(min), "{g}");
        assert!(g["sync_success_rate"].as_f64().unwrap() > 0.0, "{g}");
        assert!(g["loss_checkpoints"].as_u64().unwrap() >= 3, "{g}");
        // verify agrees with the figures, and says why when it is not working.
        let (_, v) = n.get("/api/training/verify").unwrap();
        if v["is_working"] == true {
            assert!(v["metrics"]["hash_agreement"].is_string(), "{v}");
        } else {
            assert!(v["reason"].is_string() && v["action"].is_string(), "{v}");
        }
    }

    // Each replica earned training rewards backed by the two others' receipts of its
    // aggregated contributions (issue #19).
    let ids = nodes.map(network_common::address);
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<String> = (0..3).filter(|j| *j != i).map(|j| ids[j].clone()).collect();
        network_common::wait_attested_training(n, &others, ROUNDS).unwrap_or_else(|e| {
            dump_logs(&nodes);
            panic!("{e}")
        });
    }
}
