//! A Byzantine peer against three honest DiLoCo replicas (`tiny`, H = 20), once with the
//! trimmed mean and once with Krum (with Streaming DiLoCo's two fragments): every round it sends each replica a pseudo-gradient
//! scaled far past the norm bound, then a sign-flipped copy of the replicas' last outer
//! update scaled to just under the bound, then that one again. The replicas refuse the first
//! (norm) and the third (duplicate), outvote the second, keep agreeing bit for bit, and
//! their loss falls as it does without an attacker.
//!
//! A replica that meets the attacker with fewer contributions than its aggregator needs to
//! outvote one (three: replicas briefly out of step) steps with its own delta only and
//! adopts the others' state at the next boundary, so the attacker never decides a round.
//!
//! With fragments (Krum's run; `DILOCO_TEST_FRAGMENTS=2` for the trimmed mean's) it sends, each
//! round, the tensors of the fragment that round syncs, flipping that fragment's last update.

use crate::diloco_common;
use crate::network_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diloco_common::{
    POLL, ROUNDS, START, agreed_round, dump_logs, global, losses, mean_of, options,
};
use network_common::Observer;
use neuroshard::diloco::compress::{self, Encoding};
use neuroshard::diloco::round;
use neuroshard_net::client::PeerConn;
use neuroshard_proto::peer as pb;
use neuroshard_tests::{Node, wait_for};

/// The two scenarios each start four processes' worth of work: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Rounds run under attack before the figures are checked.
const ATTACKED_ROUNDS: u64 = 8;
/// Losses averaged at the start and at the end (one round's inner steps).
const WINDOW: usize = 20;

fn message(
    round: u64,
    hash: &str,
    layout: &round::Tensors,
    values: &[Vec<f32>],
) -> pb::DeltaMessage {
    pb::DeltaMessage {
        auth: None,
        round,
        model_hash: hash.into(),
        loss: 1.0,
        batches: 20,
        encoding: "bf16".into(),
        tensors: layout
            .iter()
            .zip(values)
            .map(|((name, shape, _), v)| pb::DeltaTensor {
                name: name.clone(),
                shape: shape.clone(),
                data: compress::encode(Encoding::Bf16, v, &mut Vec::new()),
            })
            .collect(),
        // The attacker commits to no round checkpoint: a verifier that samples it finds
        // nothing to replay.
        start_checkpoint: String::new(),
        data_id: String::new(),
        replay_class: String::new(),
        step_root: String::new(),
    }
}

/// Attacks every round it sees until `stop`, each round once (a replica that catches up
/// goes back to a round it had left; attacking that round again would only get the attacker
/// banned for its over-norm deltas before any round could outvote it); counts the deltas the
/// replicas accepted. Round r syncs fragment r mod `fragments`, last updated between rounds
/// r − fragments and r − fragments + 1: the attacker flips that update.
async fn attack(
    conns: Vec<PeerConn>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    fragments: u32,
) {
    let mut seen: std::collections::BTreeMap<u64, round::Tensors> = Default::default();
    let mut attacked = 0u64;
    let p = u64::from(fragments);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok((r, hash, bytes)) = conns[0].get_weights(64 << 20).await else {
            continue;
        };
        if seen.contains_key(&r) {
            continue;
        }
        let Ok(all) = round::decode_weights(&bytes) else {
            continue;
        };
        let theta: round::Tensors = all
            .into_iter()
            .filter(|(n, _, _)| !n.starts_with("momentum."))
            .collect();
        seen.insert(r, theta);
        let (Some(old), Some(new)) = (
            r.checked_sub(p).and_then(|b| seen.get(&b)),
            seen.get(&(r + 1).saturating_sub(p)),
        ) else {
            continue;
        };
        if r > attacked {
            attacked = r;
            // The fragment's last outer update points along the honest pseudo-gradients'
            // opposite; send it (the sign flip of an honest delta), scaled to norm 500.
            let names: Vec<&str> = new.iter().map(|(n, _, _)| n.as_str()).collect();
            let fragment = neuroshard::diloco::streaming::Partition::new(&names, fragments)
                .expect("the model's tensors split into the fragments")
                .tensors((r % p) as u32);
            let theta: round::Tensors = fragment.iter().map(|&i| new[i].clone()).collect();
            let update: Vec<Vec<f32>> = fragment
                .iter()
                .map(|&i| new[i].2.iter().zip(&old[i].2).map(|(a, b)| a - b).collect())
                .collect();
            let norm = update
                .iter()
                .flatten()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                let k = (500.0 / norm) as f32;
                let flipped: Vec<Vec<f32>> = update
                    .iter()
                    .map(|t| t.iter().map(|v| v * k).collect())
                    .collect();
                let scaled: Vec<Vec<f32>> = flipped
                    .iter()
                    .map(|t| t.iter().map(|v| v * 1000.0).collect())
                    .collect();
                let big = message(r, &hash, &theta, &scaled);
                let evil = message(r, &hash, &theta, &flipped);
                for conn in &conns {
                    let _ = conn.push_delta(big.clone()).await;
                    if let Ok(ack) = conn.push_delta(evil.clone()).await
                        && ack.accepted
                    {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = conn.push_delta(evil.clone()).await;
                }
            }
        }
        // Only the rounds a fragment's last update can still be read from are kept.
        seen.retain(|&k, _| k + p + 1 > r);
    }
}

#[test]
fn trimmed_mean_replicas_outvote_a_sign_flipping_attacker_and_refuse_scaled_deltas() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    attacked("trimmed_mean", diloco_common::fragments());
}

#[test]
fn krum_replicas_outvote_a_sign_flipping_attacker_and_refuse_scaled_deltas() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // Streaming DiLoCo: each round syncs one of two fragments (the default path is the
    // trimmed mean's run above).
    attacked("krum", 2);
}

fn attacked(aggregator: &str, fragments: u32) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let options = || {
        options(&format!(
            "aggregator = \"{aggregator}\"\ndiloco_fragments = {fragments}\n"
        ))
    };
    let a = Node::start(options()).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(options().with_seed_peers(&[a.peer_addr()])).unwrap();
    let c = Node::start(options().with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(START).unwrap();
    c.wait_healthy(START).unwrap();
    let nodes = [&a, &b, &c];

    // The attacker joins once the replicas agree on a round.
    let (round, _) = wait_for("replicas to agree", ROUNDS, POLL, || {
        agreed_round(&nodes, 1)
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}")
    });
    let obs = Observer::new().unwrap();
    let attacker = obs.net.id().to_string();
    let conns: Vec<PeerConn> = nodes
        .iter()
        .map(|n| {
            wait_for("the attacker to connect", START, POLL, || {
                obs.connect(n).ok()
            })
            .unwrap()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let task = obs
        .rt
        .spawn(attack(conns, stop.clone(), accepted.clone(), fragments));

    // Rounds under attack: the honest replicas still end each one with the same weights.
    let (later, _) = wait_for("replicas to agree under attack", ROUNDS, POLL, || {
        (accepted.load(Ordering::Relaxed) >= 3)
            .then(|| agreed_round(&nodes, round + ATTACKED_ROUNDS))
            .flatten()
    })
    .unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("{e}")
    });
    stop.store(true, Ordering::Relaxed);
    let _ = obs.rt.block_on(task);

    // Every node refuses the attacker's over-norm and duplicate messages, counted by reason;
    // the ones accepted are outvoted where they meet the honest deltas (a node whose state
    // differs from the one the attacker targets never sees them matched).
    let mut outvoted = 0;
    for n in nodes {
        let g = global(n).unwrap();
        let d = &g["diloco"];
        let rejected = &d["contributions_rejected"];
        assert!(rejected["norm_too_large"].as_u64().unwrap_or(0) >= 1, "{g}");
        assert!(rejected["duplicate"].as_u64().unwrap_or(0) >= 1, "{g}");
        outvoted += d["outvoted_by_sender"][&attacker].as_u64().unwrap_or(0);
    }
    assert!(outvoted >= 1, "the attacker {attacker} was never outvoted");
    // The loss falls under attack: each replica's last round of inner steps is below the
    // first round's, by at least the stated margin (an all-honest run of the same length
    // falls by far more; see docs/reliability.md for the figures).
    let start = mean_of(&losses(&a).unwrap(), WINDOW, true);
    for n in nodes {
        let end = mean_of(&losses(n).unwrap(), WINDOW, false);
        let d = &global(n).unwrap()["diloco"];
        eprintln!(
            "{aggregator}: loss {start:.3} in the first round, {end:.3} at round {later}; \
             outvoted {}, rounds alone {}, catch-ups {}, refused {}",
            d["contributions_outvoted"],
            d["rounds_alone"],
            d["catch_ups"],
            d["contributions_rejected"]
        );
        assert!(
            end < start - LOSS_MARGIN,
            "{aggregator}: the loss did not fall under attack: {start:.3} in the first round, \
             {end:.3} at round {later}"
        );
    }
}

/// How far the mean loss of the last round's steps must be below the first round's. Over 8
/// consecutive runs of this file (48 replica figures) the fall was 0.44–1.60 with Krum
/// (mean 1.16) and 1.47–1.95 with the trimmed mean (mean 1.65); an all-honest run of
/// `diloco.rs` fell 1.31 in 5 rounds (docs/reliability.md). A delta that got in sent the
/// loss up, not down: 5.60 → 13.55 once before the too-few-to-outvote rule.
const LOSS_MARGIN: f64 = 0.25;
