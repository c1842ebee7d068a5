//! Checked inference (issue #19, TOPLOC-style): a serving node commits the top-k logits of
//! every 32 generated tokens of each paid request; staked nodes holding the model draw paid
//! requests from the ledger's payments, fetch the evidence, recompute it with one prefill in a
//! scratch engine and write their verdicts on the reward that claimed the payment. A node
//! built with the `adversary` feature that serves from a truncated model (cheat
//! `truncated_model`) is convicted on every node: its inference reward voided, its stake
//! slashed, the same ledger root everywhere; an honest server beside it is never convicted.
//!
//! Two nodes train (they earn the NEURO everybody stakes and the users pay with); two serve
//! without training (weights that do not move, so their requests stay checkable): the honest
//! server and the cheater. Every node holds the whole `tiny` model and checks.

use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, wait_for};
use serde_json::json;

use crate::diloco_common::{START, dump_logs};
use crate::fraud_common::{
    self, convicted_everywhere, fraud, slashed_and_roots_agree, stake_available,
};
use crate::network_common::address;

const POLL: Duration = Duration::from_millis(500);
/// Paid requests each server gets: every one is checked by a given verifier with p/V (p = 1,
/// V = 3 verifiers besides the server), so none checked at all is (2/3)^3 per request.
const REQUESTS: usize = 8;

/// Rewards pending 60 s (staked or not: the nodes stake what they first earn), a quorum any
/// staked verifier reaches, every payment checked once on average (`verify_probability` 1).
fn ledger(cheat: &str) -> String {
    format!(
        "\n[ledger]\nchallenge_window_secs = 60\naccept_unattested_training = true\n\
         fraud_quorum_neuro = 0.000000001\nverify_probability = 1.0\n\
         unbonded_window_factor = 1\n\
         [adversary]\ncheat = \"{cheat}\"\n"
    )
}

fn trainer(seeds: &[String]) -> NodeOptions {
    NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 64\n\
             diloco_steps = 20\ndiloco_round_timeout_secs = 30\n{}",
            ledger("none")
        ),
        ..NodeOptions::default()
    }
    .with_seed_peers(seeds)
}

fn server(cheat: &str, seeds: &[String]) -> NodeOptions {
    NodeOptions {
        config: format!(
            "[training]\nenabled = false\nmodel = \"tiny\"\n{}",
            ledger(cheat)
        ),
        ..NodeOptions::default()
    }
    .with_seed_peers(seeds)
}

/// `n` paid generations of `server` for the user holding `token` (the first waits for the
/// user's funds to reach the server's ledger by gossip).
fn serve_paid(server: &Node, token: &str, n: usize) {
    for i in 0..n {
        let ask = || {
            server.call_as(
                token,
                "POST",
                "/api/v1/inference",
                Some(json!({
                    "prompt": format!("The network {i} trains"),
                    "max_tokens": 40,
                    "temperature": 0.8,
                    "seed": i,
                })),
            )
        };
        let body = wait_for("a paid generation", Duration::from_secs(90), POLL, || {
            let b = ask();
            b["cost"]["amount"]
                .as_f64()
                .is_some_and(|c| c > 0.0)
                .then_some(b)
        })
        .unwrap_or_else(|e| panic!("{e}: {}", ask()));
        assert!(body["tokens_generated"].as_u64().unwrap() > 0, "{body}");
    }
}

/// Waits until `node` can spend at least `min` NEURO (transfers to it are claimed by its
/// minter once an epoch).
fn wait_funded(node: &Node, min: f64) {
    wait_for("funds received", Duration::from_secs(150), POLL, || {
        fraud_common::balance(node)?["balances"]["available"]
            .as_f64()
            .filter(|a| *a >= min)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", fraud_common::balance(node)));
}

#[test]
fn a_node_serving_a_truncated_model_is_convicted_and_an_honest_server_is_not() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let a = Node::start(trainer(&[])).unwrap();
    a.wait_healthy(START).unwrap();
    let seeds = [a.peer_addr()];
    let b = Node::start(trainer(&seeds)).unwrap();
    let honest = Node::start(server("none", &seeds)).unwrap();
    let cheater = Node::start(server("truncated_model", &seeds)).unwrap();
    for n in [&b, &honest, &cheater] {
        n.wait_healthy(START).unwrap();
    }
    let nodes = [&a, &b, &honest, &cheater];
    let cheat_addr = address(&cheater);
    let honest_addr = address(&honest);

    // The trainers' first rewards fund the servers' stakes and their users.
    let window = Duration::from_secs(300);
    for funder in [&a, &b] {
        funder.wait_available(0.5, window).unwrap_or_else(|e| {
            dump_logs(&nodes);
            panic!("{e}")
        });
    }
    let (user_c, user_c_addr) = cheater.new_wallet("user").unwrap();
    let (user_h, user_h_addr) = honest.new_wallet("user").unwrap();
    a.send_from_node(&cheat_addr, 0.1).unwrap();
    a.send_from_node(&honest_addr, 0.1).unwrap();
    b.send_from_node(&user_c_addr, 0.1).unwrap();
    b.send_from_node(&user_h_addr, 0.1).unwrap();
    wait_funded(&cheater, 0.09);
    wait_funded(&honest, 0.09);
    let staked: Vec<f64> = nodes
        .iter()
        .map(|n| stake_available(n, Duration::from_secs(200)))
        .collect();
    eprintln!("staked {staked:?}");

    // Paid requests to both servers; the verifiers learn of them from the payments.
    serve_paid(&cheater, &user_c, REQUESTS);
    serve_paid(&honest, &user_h, REQUESTS);

    let decided = wait_for(
        "the truncated-model server convicted on every node",
        Duration::from_secs(240),
        POLL,
        || convicted_everywhere(&nodes, cheat_addr.as_str()),
    )
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}: {:?}", nodes.map(fraud))
    });
    for s in &decided {
        assert!(s["slashed"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The honest server's requests were reproduced by some verifier and none was found
    // guilty; nobody accused the honest server.
    let checks = |n: &Node, guilty: bool| {
        n.logs()
            .lines()
            .filter(|l| {
                l.contains("checked served inference")
                    && l.contains(honest_addr.as_str())
                    && l.contains(&format!("guilty={guilty}"))
            })
            .count()
    };
    let innocent = wait_for(
        "an honest server's request reproduced",
        Duration::from_secs(120),
        POLL,
        || {
            let n: usize = nodes.iter().map(|n| checks(n, false)).sum();
            (n >= 1).then_some(n)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", nodes.map(fraud)));
    eprintln!("honest server's requests reproduced: {innocent}");
    for n in nodes {
        assert_eq!(checks(n, true), 0, "{}", n.logs());
        let f = fraud(n).unwrap();
        eprintln!("{}", f["replays"]);
        for s in f["slashes"].as_array().unwrap() {
            assert_eq!(s["accused"], cheat_addr.as_str(), "{s}");
        }
    }
    for l in inference_checks(&nodes) {
        eprintln!("{l}");
    }
    slashed_and_roots_agree(&nodes, &cheater, staked[3]);
}

/// The verifiers' log lines of their checks of served inference (distances for BENCHMARKS.md).
fn inference_checks(nodes: &[&Node]) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| {
            n.logs()
                .lines()
                .filter(|l| l.contains("checked served inference"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}
