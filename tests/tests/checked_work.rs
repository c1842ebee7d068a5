//! Cheating claims against an open network's ledger (issue #19), from a modified peer. Two
//! honest nodes run the `tiny` model under an open network's rules (receipts required); the
//! test's observer plays a modified node: it signs the reward blocks such a node would make
//! and gossips them to one of the two. Claims of layers the model does not have, of batches
//! nobody attests, of more batches than attested, and of steps already rewarded once are held
//! by both nodes as void; forged and self-signed receipts are refused at the door (counted,
//! not stored). The cheater keeps exactly the one reward its receipts back, on both nodes,
//! and both ledgers have the root a rebuild under the same rules has. Verdicts from accounts
//! with nothing staked (a Sybil's fresh accounts) and verdicts on blocks that do not exist
//! change nothing; a claimant judging itself and forged verdict blocks are refused at the door.

use crate::network_common;

use std::time::Duration;

use network_common::{ATTESTED_LEDGER, Observer, TINY_LAYERS, now_s};
use neuroshard_ledger::account::Account;
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::receipt::attest_forward;
use neuroshard_ledger::{
    Block, Hash32, Ledger, Message, Op, ProofType, Rules, SignedBlock, SignedProof, Wallet,
};
use neuroshard_tests::{Node, NodeOptions, wait_for};

const START: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(300);

/// The nodes' rules: no window, receipts required, the `tiny` model's 2 layers.
fn open_rules() -> Rules {
    Rules::new(0, TINY_LAYERS).unwrap()
}

/// A training proof of `cheater` at `ts` over `layers`, claiming `batches`, with `receipts`.
fn claim(
    cheater: &Wallet,
    ts: i64,
    layers: Vec<u32>,
    batches: u64,
    receipts: Vec<neuroshard_ledger::receipt::SignedReceipt>,
) -> SignedProof {
    let last = TINY_LAYERS - 1;
    SignedProof::sign(
        Proof {
            node_id: cheater.address(),
            proof_type: ProofType::Training,
            timestamp: ts,
            nonce: ts as u64,
            // Training claims only: uptime needs heartbeat receipts of its own (`uptime::`).
            uptime_seconds: 0,
            tokens_processed: 0,
            training_batches: batches,
            data_samples: 0,
            request_id: String::new(),
            model_hash: "ab".repeat(32),
            holds_embedding: layers.first() == Some(&0),
            holds_lm_head: layers.last() == Some(&last),
            layers_held: layers,
            epoch_id: Proof::epoch_of(ts),
            model_hash_start: format!("{ts:064x}"),
            model_hash_end: format!("{:064x}", ts + 1),
            gradient_commitment: "cc".repeat(32),
            current_loss: 2.0,
            receipts,
        },
        cheater,
    )
}

/// The cheater's next reward block for `proof`, claiming what the rules would give if the
/// claim were backed (so a void block is void for the cheat, not for its amount).
fn reward_block(
    cheater: &Wallet,
    height: u64,
    previous: Hash32,
    proof: SignedProof,
) -> SignedBlock {
    let trusting = Account::new(
        cheater.address(),
        None,
        Rules::new(0, 1024).unwrap().unattested(),
    );
    let amount = trusting
        .expected_reward(&proof)
        .map_or(1, |(a, _)| a.max(1));
    SignedBlock::sign(
        Block {
            account: cheater.address(),
            height,
            previous,
            timestamp: proof.proof.timestamp,
            op: Op::Reward { proof, amount },
        },
        cheater,
    )
}

/// Gossips `messages` (encoded) to the node behind `conn`; its reply.
fn gossip(
    obs: &Observer,
    conn: &PeerConn,
    messages: Vec<Vec<u8>>,
) -> neuroshard_proto::peer::GossipReply {
    obs.rt
        .block_on(neuroshard::gossip::gossip_ledger(conn, messages))
        .unwrap()
}

/// The node's ledger root, when it equals a rebuild of what the node holds under `rules`
/// (read twice around the rebuild: the node mints its own blocks meanwhile).
fn root_matches_rebuild(
    obs: &Observer,
    node: &Node,
    conn: &PeerConn,
    rules: Rules,
) -> Option<String> {
    let root = || {
        node.get("/api/v1/network")
            .and_then(|(_, n)| n["ledger"]["root_hash"].as_str().map(String::from))
    };
    let before = root()?;
    let messages = obs.messages(conn).ok()?;
    let after = root()?;
    (before == after).then_some(())?;
    let dir = tempfile::tempdir().ok()?;
    let rebuilt = obs.rt.block_on(async {
        let ledger = Ledger::open_data_dir(dir.path(), rules).await.ok()?;
        for m in &messages {
            ledger.apply(m, now_s()).await.ok()?;
        }
        let root = ledger.root_hash().await.to_hex();
        ledger.close().await;
        Some(root)
    })?;
    (rebuilt == before).then_some(before)
}

type PeerConn = neuroshard_net::client::PeerConn;

/// Two serve-only `tiny` nodes with these `[ledger]` settings, peered, and the test's observer
/// connected to both.
fn two_nodes(ledger: &str) -> (Node, Node, Observer, PeerConn, PeerConn) {
    let options = || NodeOptions {
        config: format!("[training]\nenabled = false\nmodel = \"tiny\"\n{ledger}"),
        ..NodeOptions::default()
    };
    let a = Node::start(options()).unwrap();
    a.wait_healthy(START).unwrap();
    let b = Node::start(options().with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(START).unwrap();
    let obs = Observer::new().unwrap();
    let (ca, cb) = (obs.connect(&a).unwrap(), obs.connect(&b).unwrap());
    wait_for("the nodes to peer", START, POLL, || {
        obs.peer_ids(&ca)?.contains(&cb.id).then_some(())
    })
    .unwrap();
    (a, b, obs, ca, cb)
}

#[test]
fn cheating_claims_earn_nothing_on_every_node() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, obs, ca, cb) = two_nodes(ATTESTED_LEDGER);

    // The cheater and the node that really received 10 of its steps (its next stage).
    let cheater = Wallet::from_seed(7_001);
    let next_stage = Wallet::from_seed(7_002);
    let t0 = (now_s() / 60 - 4) * 60 + 5;
    let epoch = |i: i64| Proof::epoch_of(t0 + 60 * i);
    let ten = attest_forward(&next_stage, cheater.address(), epoch(2), 10, 1);
    let claims = [
        // The measured cheat: 1024 layers of a 2-layer model.
        claim(&cheater, t0, (0..1024).collect(), 600, vec![]),
        // 600 batches that no other node received.
        claim(&cheater, t0 + 60, vec![0], 600, vec![]),
        // 10 batches, received and attested by the next stage: the one honest claim.
        claim(&cheater, t0 + 120, vec![0], 10, vec![ten.clone()]),
        // The same receipt again, a proof later: those steps were rewarded already.
        claim(&cheater, t0 + 180, vec![0], 10, vec![ten]),
        // 20 batches on a receipt of 10.
        claim(
            &cheater,
            t0 + 240,
            vec![0],
            20,
            vec![attest_forward(
                &next_stage,
                cheater.address(),
                epoch(4),
                10,
                1,
            )],
        ),
    ];
    let mut previous = Hash32::ZERO;
    let mut blocks = Vec::new();
    for (height, proof) in claims.into_iter().enumerate() {
        let block = reward_block(&cheater, height as u64, previous, proof);
        previous = block.hash();
        blocks.push(block);
    }
    let bytes: Vec<Vec<u8>> = blocks
        .iter()
        .map(|b| Message::Block(b.clone()).to_bytes())
        .collect();
    let reply = gossip(&obs, &ca, bytes);
    assert_eq!((reply.accepted, reply.rejected), (5, 0), "{reply:?}");

    // Receipts that are not what they say: refused at the door, never stored.
    let mut forged = attest_forward(&next_stage, cheater.address(), epoch(4), 10, 1);
    forged.receipt.steps = 600;
    let own = attest_forward(&cheater, cheater.address(), epoch(4), 600, 1);
    let bad: Vec<Vec<u8>> = [forged, own]
        .into_iter()
        .map(|r| {
            let p = claim(&cheater, t0 + 240, vec![0], 600, vec![r]);
            Message::Block(reward_block(&cheater, 5, previous, p)).to_bytes()
        })
        .collect();
    let reply = gossip(&obs, &ca, bad);
    assert_eq!((reply.accepted, reply.rejected), (0, 2), "{reply:?}");

    // Both nodes hold the five blocks (B by gossip from A) and judge them alike.
    let ours: Vec<String> = blocks.iter().map(|b| b.hash().to_hex()).collect();
    for conn in [&ca, &cb] {
        wait_for("the cheater's blocks everywhere", START, POLL, || {
            let held = obs.block_hashes(conn)?;
            ours.iter().all(|h| held.contains(h)).then_some(())
        })
        .unwrap();
    }
    let honest = Account::new(cheater.address(), None, open_rules())
        .expected_reward(&SignedProof::clone(match &blocks[2].block.op {
            Op::Reward { proof, .. } => proof,
            _ => unreachable!(),
        }))
        .unwrap()
        .0;
    for (node, conn) in [(&a, &ca), (&b, &cb)] {
        let dir = tempfile::tempdir().unwrap();
        let messages = obs.messages(conn).unwrap();
        let (balance, page) = obs.rt.block_on(async {
            let ledger = Ledger::open_data_dir(dir.path(), open_rules())
                .await
                .unwrap();
            for m in &messages {
                ledger.apply(m, now_s()).await.unwrap();
            }
            let balance = ledger.balance(&cheater.address(), now_s()).await;
            let page = ledger.proofs(&cheater.address(), 100, 0).await.unwrap();
            ledger.close().await;
            (balance, page)
        });
        assert_eq!(balance.available, honest, "{balance:?}");
        assert_eq!(balance.total, honest, "{balance:?}");
        let reasons: Vec<String> = page
            .proofs
            .iter()
            .filter_map(|p| p.reason.clone())
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("layer 2 claimed, the model has 2 layers")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r
                    .contains("claims 600 training batches, receipts from other nodes attest 0")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r
                    .contains("claims 10 training batches, receipts from other nodes attest 0")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r
                    .contains("claims 20 training batches, receipts from other nodes attest 10")),
            "{reasons:?}"
        );
        // The node's own view agrees with that rebuild (equal roots, rules included).
        wait_for("the node's root to match a rebuild", START, POLL, || {
            root_matches_rebuild(&obs, node, conn, open_rules())
        })
        .unwrap();
    }
}

/// A verdict block of `voter` on `target` (a reward block of `accused`).
fn verdict_block(
    voter: &Wallet,
    height: u64,
    previous: Hash32,
    ts: i64,
    (target, accused): (Hash32, neuroshard_ledger::Address),
    guilty: bool,
) -> SignedBlock {
    SignedBlock::sign(
        Block {
            account: voter.address(),
            height,
            previous,
            timestamp: ts,
            op: Op::Verdict {
                target,
                accused,
                evidence: Hash32([0xee; 32]),
                guilty,
            },
        },
        voter,
    )
}

#[test]
fn hostile_verdicts_change_nothing_and_forged_ones_are_refused() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // Rewards pending for an hour and a quorum of one unit (1e-9 NEURO): verdicts dated inside
    // that window would convict if the smallest stake stood behind them.
    const WINDOW: i64 = 3600;
    let ledger = "\n[ledger]\nchallenge_window_secs = 3600\naccept_unattested_training = false\n\
                  fraud_quorum_neuro = 0.000000001\n";
    let (a, b, obs, ca, cb) = two_nodes(ledger);

    // An honest worker's attested reward, and accusers with nothing staked (a Sybil's fresh
    // accounts), one of them the worker itself.
    let worker = Wallet::from_seed(7_101);
    let next_stage = Wallet::from_seed(7_102);
    let t0 = (now_s() / 60 - 3) * 60 + 5;
    let receipt = attest_forward(&next_stage, worker.address(), Proof::epoch_of(t0), 10, 1);
    let reward = reward_block(
        &worker,
        0,
        Hash32::ZERO,
        claim(&worker, t0, vec![0], 10, vec![receipt]),
    );
    let target = (reward.hash(), worker.address());
    let sybils: Vec<Wallet> = (0..3).map(|i| Wallet::from_seed(7_110 + i)).collect();
    let mut blocks = vec![reward.clone()];
    for (i, s) in sybils.iter().enumerate() {
        blocks.push(verdict_block(
            s,
            0,
            Hash32::ZERO,
            t0 + 30 + i as i64,
            target,
            true,
        ));
    }
    // A verdict naming a block that does not exist.
    let nowhere = (Hash32([0x42; 32]), next_stage.address());
    let first = blocks[1].hash();
    blocks.push(verdict_block(&sybils[0], 1, first, t0 + 50, nowhere, true));
    let bytes: Vec<Vec<u8>> = blocks
        .iter()
        .map(|b| Message::Block(b.clone()).to_bytes())
        .collect();
    let reply = gossip(&obs, &ca, bytes);
    assert_eq!((reply.accepted, reply.rejected), (5, 0), "{reply:?}");

    // Refused at the door: the worker judging its own reward; a verdict signed by another key than its account's, one whose signed
    // content was changed after signing (acquitted -> guilty), and bytes that are no message.
    let mut stolen = verdict_block(&sybils[1], 1, blocks[2].hash(), t0 + 60, target, true);
    stolen.block.account = next_stage.address();
    let mut flipped = verdict_block(&sybils[2], 1, blocks[3].hash(), t0 + 60, target, false);
    if let Op::Verdict { guilty, .. } = &mut flipped.block.op {
        *guilty = true;
    }
    let own = verdict_block(&worker, 1, reward.hash(), t0 + 40, target, true);
    let bad = vec![
        Message::Block(own).to_bytes(),
        Message::Block(stolen).to_bytes(),
        Message::Block(flipped).to_bytes(),
        b"{\"block\": \"verdict\", \"guilty\": true}".to_vec(),
        vec![0xff; 300],
    ];
    let reply = gossip(&obs, &ca, bad);
    assert_eq!((reply.accepted, reply.rejected), (0, 5), "{reply:?}");

    // Both nodes hold the five blocks and decide nothing: the worker keeps its whole reward
    // (pending through its window), nobody is convicted, acquitted or slashed, and each
    // node's root is a rebuild's under the same rules.
    let ours: Vec<String> = blocks.iter().map(|b| b.hash().to_hex()).collect();
    let d = Rules::new(WINDOW, TINY_LAYERS).unwrap();
    let rules = d
        .with_fraud(1, d.slash_bps, d.reporter_bps, d.false_accusation_bps)
        .unwrap();
    let honest = Account::new(worker.address(), None, rules)
        .expected_reward(&SignedProof::clone(match &reward.block.op {
            Op::Reward { proof, .. } => proof,
            _ => unreachable!(),
        }))
        .unwrap()
        .0;
    for (node, conn) in [(&a, &ca), (&b, &cb)] {
        wait_for("the blocks everywhere", START, POLL, || {
            let held = obs.block_hashes(conn)?;
            ours.iter().all(|h| held.contains(h)).then_some(())
        })
        .unwrap();
        let (_, net) = node.get("/api/v1/network").unwrap();
        let fraud = &net["ledger"]["fraud"];
        assert_eq!(fraud["convictions"], 0, "{fraud}");
        assert_eq!(fraud["acquittals"], 0, "{fraud}");
        assert_eq!(fraud["slashed"].as_f64(), Some(0.0), "{fraud}");
        let dir = tempfile::tempdir().unwrap();
        let messages = obs.messages(conn).unwrap();
        let balance = obs.rt.block_on(async {
            let ledger = Ledger::open_data_dir(dir.path(), rules).await.unwrap();
            for m in &messages {
                ledger.apply(m, now_s()).await.unwrap();
            }
            let balance = ledger.balance(&worker.address(), now_s()).await;
            ledger.close().await;
            balance
        });
        assert_eq!(balance.total, honest, "{balance:?}");
        assert_eq!(balance.pending, honest, "{balance:?}");
        wait_for("the node's root to match a rebuild", START, POLL, || {
            root_matches_rebuild(&obs, node, conn, rules)
        })
        .unwrap();
    }
}
