//! Unit tests of `account.rs`: the pure rules of one account chain.

use super::*;
use crate::amount::transfer_fee;
use crate::block::Block;
use crate::keys::Wallet;

fn blk(w: &Wallet, ts: i64, op: Op) -> SignedBlock {
    SignedBlock::sign(
        Block {
            account: w.address(),
            height: 1,
            previous: Hash32([9; 32]),
            timestamp: ts,
            op,
        },
        w,
    )
}

#[test]
fn send_needs_amount_plus_fee() {
    let w = Wallet::from_seed(1);
    let mut a = Account::new(w.address(), None, Rules::default());
    a.available = 1000;
    let to = Wallet::from_seed(2).address();
    let send = |amount| {
        blk(
            &w,
            10,
            Op::Send {
                to,
                amount,
                fee: transfer_fee(amount),
                memo: String::new(),
            },
        )
    };
    assert!(matches!(a.evaluate(&send(999), None), Outcome::Applied(_)));
    assert_eq!(
        a.evaluate(&send(1000), None),
        Outcome::Void(VoidReason::InsufficientBalance {
            required: 1001,
            available: 1000
        })
    );
}

#[test]
fn unstake_respects_lock_and_cooldown_release() {
    let w = Wallet::from_seed(1);
    let mut a = Account::new(w.address(), None, Rules::default());
    a.staked = 500;
    a.unlock_at = 1000;
    let un = |ts| blk(&w, ts, Op::Unstake { amount: 100 });
    assert_eq!(
        a.evaluate(&un(999), None),
        Outcome::Void(VoidReason::StakeLocked { unlock_at: 1000 })
    );
    assert!(matches!(
        a.evaluate(&un(1000), None),
        Outcome::Applied(Effect::Unstaking { .. })
    ));
    a.unbonding = 100;
    a.unbond_at = 5000;
    let s = a.settled(4999);
    assert_eq!((s.available, s.unbonding), (0, 100));
    let s = a.settled(5000);
    assert_eq!((s.available, s.unbonding), (100, 0));
}

#[test]
fn hourly_rate_limit_and_replay() {
    use crate::proof::SignedProof;
    use crate::proof::tests::training_proof;
    let w = Wallet::from_seed(1);
    let mut a = Account::new(w.address(), None, Rules::default());
    let p = SignedProof::sign(training_proof(&w, 100_000), &w);
    let (amount, _) = a.expected_reward(&p).unwrap();
    assert!(a.reward_for(&p, amount + 1).is_err());
    a.reward_times = (0..120).map(|i| 100_000 - 3599 + i).collect();
    assert_eq!(
        a.expected_reward(&p).unwrap_err(),
        RejectReason::RateLimited
    );
    a.reward_times.clear();
    a.proof_ids.insert(p.id());
    assert_eq!(a.expected_reward(&p).unwrap_err(), RejectReason::Replay);
    a.proof_ids.clear();
    a.last_reward_epoch = Some(p.proof.epoch_id);
    assert_eq!(
        a.expected_reward(&p).unwrap_err(),
        RejectReason::DuplicateEpoch
    );
}

#[test]
fn receive_rules() {
    let w = Wallet::from_seed(1);
    let mut a = Account::new(w.address(), None, Rules::default());
    let src = Hash32([5; 32]);
    let rcv = blk(&w, 10, Op::Receive { source: src });
    let mine = SourceInfo::Send {
        from: Wallet::from_seed(2).address(),
        to: w.address(),
        amount: 7,
        inference: None,
    };
    assert!(matches!(a.evaluate(&rcv, Some(&mine)), Outcome::Applied(_)));
    a.claimed.insert(src);
    assert_eq!(
        a.evaluate(&rcv, Some(&mine)),
        Outcome::Void(VoidReason::SourceAlreadyClaimed)
    );
    let other = SourceInfo::Send {
        from: Wallet::from_seed(2).address(),
        to: Wallet::from_seed(3).address(),
        amount: 7,
        inference: None,
    };
    a.claimed.clear();
    assert!(matches!(
        a.evaluate(&rcv, Some(&other)),
        Outcome::Void(VoidReason::BadSource(_))
    ));
}

#[test]
fn layers_must_exist_and_roles_follow_them() {
    use crate::proof::tests::training_proof;
    use crate::proof::{Proof, SignedProof};
    use crate::receipt::attest_forward;
    let w = Wallet::from_seed(1);
    let next = Wallet::from_seed(99);
    let a = Account::new(w.address(), None, Rules::new(600, 6).unwrap());
    // Signs `p` with a forward receipt from the stage after its layers.
    let code = |mut p: Proof| {
        let end = p.layers_held.last().map_or(0, |l| l + 1);
        p.receipts = vec![attest_forward(
            &next,
            w.address(),
            p.epoch_id,
            p.training_batches,
            end,
        )];
        a.expected_reward(&SignedProof::sign(p, &w))
            .err()
            .map(|r| r.to_string())
    };
    let base = training_proof(&w, 100_000);
    assert_eq!(code(base.clone()), None);
    // The inflated claim: 1024 layers of a 6-layer model.
    let mut p = base.clone();
    p.layers_held = (0..1024).collect();
    assert_eq!(
        code(p).as_deref(),
        Some("implausible: layer 6 claimed, the model has 6 layers")
    );
    let mut p = base.clone();
    p.layers_held = vec![2, 3];
    assert_eq!(
        code(p.clone()).as_deref(),
        Some("implausible: embedding claimed without layer 0")
    );
    p.holds_embedding = false;
    assert_eq!(code(p.clone()), None);
    p.holds_lm_head = true;
    assert_eq!(
        code(p.clone()).as_deref(),
        Some("implausible: LM head claimed without the last layer (5)")
    );
    // Holding the last layer, there is no next stage to receive a forward output.
    p.layers_held = vec![4, 5];
    assert_eq!(
        code(p).as_deref(),
        Some("unattested: forward receipt at layer boundary 6 of a 6-layer model")
    );
}

#[test]
fn claims_beyond_the_receipts_earn_nothing() {
    use crate::proof::SignedProof;
    use crate::proof::tests::training_proof;
    use crate::receipt::attest_forward;
    let w = Wallet::from_seed(1);
    let next = Wallet::from_seed(99);
    let mut a = Account::new(w.address(), None, Rules::default());
    let mut p = training_proof(&w, 100_000);
    // Ten batches attested, eleven claimed.
    p.training_batches = 11;
    let err = a
        .expected_reward(&SignedProof::sign(p.clone(), &w))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unattested: claims 11 training batches, receipts from other nodes attest 10"
    );
    // No receipt at all: the measured cheat (an engine that computes nothing, a claim
    // only its author vouches for).
    p.receipts.clear();
    let err = a
        .expected_reward(&SignedProof::sign(p.clone(), &w))
        .unwrap_err();
    assert_eq!(err.code(), "unattested");
    // Steps already counted by the previous reward count nothing again.
    p.training_batches = 10;
    p.receipts = vec![attest_forward(&next, w.address(), p.epoch_id, 10, 4)];
    a.receipt_counts = [((next.address(), ReceiptKind::Forward, p.epoch_id), 10)].into();
    a.last_reward_epoch = Some(p.epoch_id - 1);
    let err = a
        .expected_reward(&SignedProof::sign(p.clone(), &w))
        .unwrap_err();
    assert!(err.to_string().contains("attest 0"), "{err}");
    // A development network takes the claim as it is.
    let mut dev = a.clone();
    dev.rules = dev.rules.unattested();
    assert!(
        dev.expected_reward(&SignedProof::sign(p.clone(), &w))
            .is_ok()
    );
    // An uptime proof without receipts is valid, and earns nothing (see below).
    p.training_batches = 0;
    p.proof_type = crate::proof::ProofType::Uptime;
    p.receipts.clear();
    assert_eq!(
        a.expected_reward(&SignedProof::sign(p, &w)).map(|(_, u)| u),
        Ok(0)
    );
}

#[test]
fn uptime_is_bounded_by_heartbeat_receipts() {
    use crate::proof::tests::training_proof;
    use crate::proof::{ProofType, SignedProof};
    use crate::receipt::attest_heartbeats;
    let w = Wallet::from_seed(1);
    let [b, c, sybil] = [2, 3, 4].map(Wallet::from_seed);
    let a = Account::new(w.address(), None, Rules::default());
    let mut p = training_proof(&w, 100_000);
    p.training_batches = 0;
    p.proof_type = ProofType::Uptime;
    p.uptime_seconds = 120;
    let e = p.epoch_id - 1;
    let credited = |p: &crate::proof::Proof| {
        a.expected_reward(&SignedProof::sign(p.clone(), &w))
            .map(|(_, uptime)| uptime)
    };
    // The maximum claimed, nothing attested: no uptime.
    p.receipts.clear();
    assert_eq!(credited(&p), Ok(0));
    // A Sybil alone cannot lift it; with an honest peer that heard 4 slots, 40 s.
    p.receipts = vec![attest_heartbeats(&sybil, w.address(), e, 6)];
    assert_eq!(credited(&p), Ok(0));
    p.receipts.push(attest_heartbeats(&b, w.address(), e, 4));
    assert_eq!(credited(&p), Ok(40));
    // Two honest peers that heard the whole epoch: 60 s, whatever is claimed above it;
    // a smaller claim is what is credited.
    p.receipts = vec![
        attest_heartbeats(&b, w.address(), e, 6),
        attest_heartbeats(&c, w.address(), e, 6),
    ];
    assert_eq!(credited(&p), Ok(60));
    p.uptime_seconds = 50;
    assert_eq!(credited(&p), Ok(50));
    // An epoch already credited counts nothing again.
    let mut after = a.clone();
    after.last_reward_epoch = Some(e);
    after.receipt_counts = [((w.address(), ReceiptKind::Heartbeat, e), 6)].into();
    p.uptime_seconds = 120;
    assert_eq!(
        after
            .expected_reward(&SignedProof::sign(p.clone(), &w))
            .map(|(_, u)| u),
        Ok(0)
    );
    // A forged receipt voids the proof (counted as unattested).
    let mut forged = p.clone();
    forged.receipts[0].receipt.steps = 5;
    let err = SignedProof::sign(forged, &w).check_stateless().unwrap_err();
    assert_eq!(err.code(), "unattested");
    // k = 1 lets a single peer attest (a network of two nodes).
    let mut one = a.clone();
    one.rules = one.rules.with_uptime_attesters(1).unwrap();
    p.receipts = vec![attest_heartbeats(&b, w.address(), e, 5)];
    assert_eq!(
        one.expected_reward(&SignedProof::sign(p.clone(), &w))
            .map(|(_, u)| u),
        Ok(50)
    );
    // A development network bounds uptime by the claim and the time since the last one.
    let mut dev = a.clone();
    dev.rules = dev.rules.unattested();
    p.receipts.clear();
    assert_eq!(
        dev.expected_reward(&SignedProof::sign(p, &w))
            .map(|(_, u)| u),
        Ok(120)
    );
}

#[test]
fn rewards_wait_out_their_window() {
    let w = Wallet::from_seed(1);
    let mut a = Account::new(w.address(), None, Rules::new(600, 4).unwrap());
    a.available = 5;
    a.pending_rewards = [(1600, 10), (1660, 20)].into();
    let s = a.settled(1599);
    assert_eq!((s.available, s.pending_rewards), (5, 30));
    assert_eq!((s.next_release, s.last_release), (Some(1600), Some(1660)));
    let s = a.settled(1600);
    assert_eq!((s.available, s.pending_rewards), (15, 20));
    assert_eq!(a.held(), 35);
    // A send may spend only what was released by its own timestamp.
    let send = |ts, amount| {
        blk(
            &w,
            ts,
            Op::Send {
                to: Wallet::from_seed(2).address(),
                amount,
                fee: 0,
                memo: String::new(),
            },
        )
    };
    assert!(matches!(
        a.evaluate(&send(1599, 6), None),
        Outcome::Void(VoidReason::InsufficientBalance { available: 5, .. })
    ));
    assert!(matches!(
        a.evaluate(&send(1600, 15), None),
        Outcome::Applied(_)
    ));
    a.release(1660);
    assert_eq!(
        (a.available, a.pending_rewards.len(), a.held()),
        (35, 0, 35)
    );
}

#[test]
fn void_reasons_give_amounts_in_neuro() {
    let balance = VoidReason::InsufficientBalance {
        required: 1_500_000_000,
        available: 0,
    };
    assert_eq!(
        balance.to_string(),
        "insufficient balance: required 1.5 NEURO, available 0 NEURO"
    );
    let stake = VoidReason::InsufficientStake {
        requested: 1_000_000,
        staked: 2 * crate::UNITS_PER_NEURO,
    };
    assert_eq!(
        stake.to_string(),
        "insufficient stake: requested 0.001 NEURO, staked 2 NEURO"
    );
    let locked = VoidReason::StakeLocked {
        unlock_at: 1_733_313_600,
    };
    assert_eq!(
        locked.to_string(),
        "stake locked until 2024-12-04T12:00:00Z"
    );
}
