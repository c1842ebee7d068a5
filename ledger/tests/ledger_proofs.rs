//! Proof of Neural Work through the ledger: accepted proofs mint, refused ones are counted with
//! their reason and mint nothing, and peers re-verify reward blocks.

mod ledger_support;

use ledger_support::{T0, TestDb, postgres_db, proof, sqlite_db, sync};
use neuroshard_ledger::account::VoidReason;
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::{
    Block, BlockStatus, Hash32, Message, Op, RejectReason, SignedBlock, SignedProof, Wallet,
};

macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::sqlite_db(), super::sqlite_db()).await;
            }
            #[tokio::test]
            async fn postgres() {
                let name = concat!(stringify!($name), "::postgres");
                let Some(a) = super::postgres_db(name).await else {
                    return;
                };
                let Some(b) = super::postgres_db(name).await else {
                    return;
                };
                super::$name(a, b).await;
            }
        }
    };
}

fn reason_count(stats: &neuroshard_ledger::ProofStats, code: &str) -> usize {
    stats
        .rejected_by_reason
        .iter()
        .find(|(c, _)| c == code)
        .map_or(0, |(_, n)| *n)
}

on_both_backends!(proofs_mint_or_are_counted);
async fn proofs_mint_or_are_counted(db: TestDb, _other: TestDb) {
    let ledger = db.open().await;
    let w = Wallet::from_seed(501);
    let mut now = T0;
    // Three good proofs, one per epoch.
    let mut total = 0;
    for _ in 0..3 {
        let ok = ledger
            .submit_proof(&w, proof(&w, now, 8), now)
            .await
            .unwrap();
        assert!(ok.proof_id.starts_with("proof_"));
        total += ok.reward;
        now += 60;
    }
    // Per proof: training 0.0005 * 600 batches * 8 layers = 2.4 NEURO, uptime 0.0001 NEURO;
    // its 1,228,800 tokens earn nothing: no payer paid for them (inference.rs).
    let per_proof = 2_400_000_000 + 100_000;
    assert_eq!(total, 3 * per_proof);
    // Replay of an accepted proof.
    let first = proof(&w, T0, 8);
    assert!(ledger.submit_proof(&w, first, T0 + 60).await.is_err());
    // Too old, in the future, same epoch twice, implausible, someone else's.
    assert!(
        ledger
            .submit_proof(&w, proof(&w, now - 301, 8), now)
            .await
            .is_err()
    );
    assert!(
        ledger
            .submit_proof(&w, proof(&w, now + 61, 8), now)
            .await
            .is_err()
    );
    let mut bad = proof(&w, now, 8).proof;
    bad.current_loss = 0.0;
    let e = ledger
        .submit_proof(&w, SignedProof::sign(bad, &w), now)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "PROOF_REJECTED");
    assert!(e.to_string().contains("loss"), "{e}");
    let other = Wallet::from_seed(502);
    assert!(
        ledger
            .submit_proof(&w, proof(&other, now, 8), now)
            .await
            .is_err()
    );
    ledger
        .submit_proof(&w, proof(&w, now, 8), now)
        .await
        .unwrap();
    let same_epoch = proof(&w, now + 1, 9);
    let e = ledger
        .submit_proof(&w, same_epoch, now + 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("epoch"), "{e}");
    let page = ledger.proofs(&w.address(), 100, 0).await.unwrap();
    assert_eq!(page.stats.total_verified, 4);
    // The proof of `other` is counted against `other`, whose node_id it carries.
    assert_eq!(page.stats.total_submitted, 4 + 5, "{:?}", page.stats);
    assert_eq!(page.stats.total_reward, total + per_proof);
    assert_eq!(reason_count(&page.stats, "replay"), 1);
    assert_eq!(reason_count(&page.stats, "too_old"), 1);
    assert_eq!(reason_count(&page.stats, "in_future"), 1);
    assert_eq!(reason_count(&page.stats, "implausible"), 1);
    let theirs = ledger.proofs(&other.address(), 10, 0).await.unwrap();
    assert_eq!(reason_count(&theirs.stats, "signer_mismatch"), 1);
    assert_eq!(reason_count(&page.stats, "duplicate_epoch"), 1);
    assert_eq!(page.proofs.len(), 9);
    assert!(
        page.proofs
            .windows(2)
            .all(|p| p[0].timestamp >= p[1].timestamp)
    );
    assert_eq!(page.proofs.iter().filter(|p| p.verified).count(), 4);
    let limited = ledger.proofs(&w.address(), 3, 2).await.unwrap();
    assert_eq!(limited.proofs.len(), 3);
    assert_eq!(limited.proofs[0], page.proofs[2]);
    assert_eq!(
        ledger.balance(&w.address(), now).await.available,
        page.stats.total_reward
    );
    ledger.check_invariant().await.unwrap();
    ledger.close().await;
    db.drop_db().await;
    _other.drop_db().await;
}

on_both_backends!(peers_reverify_reward_blocks);
async fn peers_reverify_reward_blocks(db_a: TestDb, db_b: TestDb) {
    let (node_a, node_b) = (db_a.open().await, db_b.open().await);
    let w = Wallet::from_seed(601);
    let now = T0;
    node_a
        .submit_proof(&w, proof(&w, now, 4), now)
        .await
        .unwrap();
    let head = node_a
        .with_state(|s| s.account(&w.address()).map(|a| a.head))
        .await
        .unwrap();
    // A reward block claiming more than the rules give: stored, void, mints nothing.
    let p = proof(&w, now + 60, 4);
    let greedy = SignedBlock::sign(
        Block {
            account: w.address(),
            height: 1,
            previous: head,
            timestamp: now + 60,
            op: Op::Reward {
                proof: p,
                amount: 1_000_000_000_000,
            },
        },
        &w,
    );
    sync(&node_a, &node_b, now + 60).await;
    let r = node_b
        .apply(&Message::Block(greedy.clone()), now + 60)
        .await
        .unwrap();
    assert!(matches!(
        r.blocks[0].2,
        BlockStatus::Void(VoidReason::Proof(RejectReason::AmountMismatch { .. }))
    ));
    node_a
        .apply(&Message::Block(greedy), now + 60)
        .await
        .unwrap();
    assert_eq!(node_a.root_hash().await, node_b.root_hash().await);
    let page = node_b.proofs(&w.address(), 10, 0).await.unwrap();
    assert_eq!(
        (page.stats.total_submitted, page.stats.total_verified),
        (2, 1)
    );
    assert_eq!(reason_count(&page.stats, "amount_mismatch"), 1);
    // A reward block for a proof signed by another node is refused outright.
    let thief = Wallet::from_seed(602);
    let stolen = SignedBlock::sign(
        Block {
            account: thief.address(),
            height: 0,
            previous: Hash32::ZERO,
            timestamp: now + 120,
            op: Op::Reward {
                proof: proof(&w, now + 120, 4),
                amount: 1,
            },
        },
        &thief,
    );
    let e = node_b
        .apply(&Message::Block(stolen), now + 120)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "PROOF_REJECTED");
    // A reward block whose proof is older than 300 s against the block's own time is refused.
    let stale = SignedBlock::sign(
        Block {
            account: thief.address(),
            height: 0,
            previous: Hash32::ZERO,
            timestamp: now + 1000,
            op: Op::Reward {
                proof: proof(&thief, now, 4),
                amount: 1,
            },
        },
        &thief,
    );
    assert_eq!(
        node_b
            .apply(&Message::Block(stale), now + 1000)
            .await
            .unwrap_err()
            .code(),
        "PROOF_REJECTED"
    );
    // Peer proofs checked on arrival are counted against that peer when refused.
    let mut late = proof(&thief, now, 4).proof;
    late.epoch_id = Proof::epoch_of(now) + 1;
    let late = SignedProof::sign(late, &thief);
    assert!(node_b.check_peer_proof(&late, now).await.is_err());
    let page = node_b.proofs(&thief.address(), 10, 0).await.unwrap();
    assert_eq!(reason_count(&page.stats, "epoch_mismatch"), 1);
    node_a.check_invariant().await.unwrap();
    node_b.check_invariant().await.unwrap();
    node_a.close().await;
    node_b.close().await;
    db_a.drop_db().await;
    db_b.drop_db().await;
}

on_both_backends!(the_receipts_an_attester_signed_are_found_in_the_rewards_citing_them);
async fn the_receipts_an_attester_signed_are_found_in_the_rewards_citing_them(
    db: TestDb,
    _other: TestDb,
) {
    use neuroshard_ledger::receipt::ReceiptKind;
    let ledger = db.open().await;
    let w = Wallet::from_seed(502);
    // `proof` cites a forward receipt signed by seed 9999 for its epoch.
    let attester = Wallet::from_seed(9_999).address();
    let mut rewards = Vec::new();
    for i in 0..2 {
        let now = T0 + 60 * i;
        let signed = proof(&w, now, 8);
        let cited = signed.proof.receipts[0].receipt.clone();
        ledger.submit_proof(&w, signed, now).await.unwrap();
        rewards.push((Proof::epoch_of(now), cited));
    }
    for (epoch, receipt) in &rewards {
        let all = ledger
            .cited_all(&w.address(), &attester, ReceiptKind::Forward, *epoch)
            .await;
        assert_eq!(all.len(), 1, "epoch {epoch}");
        assert_eq!(&all[0].1, receipt);
        // The same reward as the first one found.
        let first = ledger
            .cited(&w.address(), &attester, ReceiptKind::Forward, *epoch)
            .await
            .unwrap();
        assert_eq!(all[0], first);
    }
    // Another kind, another attester, another subject, an epoch nobody claimed: none.
    let epoch = rewards[0].0;
    assert!(
        ledger
            .cited_all(&w.address(), &attester, ReceiptKind::Backward, epoch)
            .await
            .is_empty()
    );
    assert!(
        ledger
            .cited_all(&w.address(), &w.address(), ReceiptKind::Forward, epoch)
            .await
            .is_empty()
    );
    assert!(
        ledger
            .cited_all(&attester, &attester, ReceiptKind::Forward, epoch)
            .await
            .is_empty()
    );
    assert!(
        ledger
            .cited_all(&w.address(), &attester, ReceiptKind::Forward, epoch + 9)
            .await
            .is_empty()
    );
}
