//! Unit tests of `fraud.rs`: verdicts convict, acquit or change nothing, the same way in any
//! arrival order.

use super::*;
use crate::account::{Account, VoidReason};
use crate::block::Block;
use crate::keys::Wallet;
use crate::proof::SignedProof;
use crate::proof::tests::training_proof;
use crate::rewards::MIN_STAKE_DAYS;
use crate::state::LedgerState;

/// One account's chain being written.
struct Chain {
    wallet: Wallet,
    height: u64,
    previous: Hash32,
    nonce: u64,
}

impl Chain {
    fn new(seed: u64) -> Chain {
        Chain {
            wallet: Wallet::from_seed(seed),
            height: 0,
            previous: Hash32::ZERO,
            nonce: 0,
        }
    }

    fn addr(&self) -> Address {
        self.wallet.address()
    }

    fn push(
        &mut self,
        st: &mut LedgerState,
        log: &mut Vec<SignedBlock>,
        ts: i64,
        op: Op,
    ) -> Hash32 {
        let b = SignedBlock::sign(
            Block {
                account: self.addr(),
                height: self.height,
                previous: self.previous,
                timestamp: ts,
                op,
            },
            &self.wallet,
        );
        let hash = b.verify_stateless().expect("valid block");
        st.insert(b.clone(), hash);
        log.push(b);
        self.height += 1;
        self.previous = hash;
        hash
    }

    fn reward(&mut self, st: &mut LedgerState, log: &mut Vec<SignedBlock>, ts: i64) -> Hash32 {
        self.nonce += 1;
        let mut p = training_proof(&self.wallet, ts);
        p.nonce = self.nonce;
        let proof = SignedProof::sign(p, &self.wallet);
        let amount = st
            .chain_account(&self.addr())
            .cloned()
            .unwrap_or_else(|| Account::new(self.addr(), None, *st.rules()))
            .expected_reward(&proof)
            .expect("a valid proof")
            .0;
        self.push(st, log, ts, Op::Reward { proof, amount })
    }

    fn stake_all(&mut self, st: &mut LedgerState, log: &mut Vec<SignedBlock>, ts: i64) {
        let amount = st
            .chain_account(&self.addr())
            .unwrap()
            .settled(ts)
            .available;
        let op = Op::Stake {
            amount,
            duration_days: MIN_STAKE_DAYS,
        };
        self.push(st, log, ts, op);
    }

    fn verdict(
        &mut self,
        st: &mut LedgerState,
        log: &mut Vec<SignedBlock>,
        ts: i64,
        target: Hash32,
        accused: Address,
        guilty: bool,
    ) -> Hash32 {
        let op = Op::Verdict {
            target,
            accused,
            evidence: Hash32([7; 32]),
            guilty,
        };
        self.push(st, log, ts, op)
    }
}

/// A (the accused) and three verifiers, each with one reward staked; A has two rewards
/// pending in their window (the first is judged). Returns the state, every block, the
/// chains, the judged reward and one verifier's stake.
fn staked_network() -> (LedgerState, Vec<SignedBlock>, Vec<Chain>, Hash32, u64) {
    // Every account bonded (bond 0): one window for all.
    let base = Rules::new(600, 8)
        .unwrap()
        .with_bond(0, crate::rules::DEFAULT_UNBONDED_WINDOW_FACTOR)
        .unwrap();
    let mut log = Vec::new();
    let mut chains: Vec<Chain> = (1..=4).map(Chain::new).collect();
    // Measure one staked reward to set the quorum between one and two verifiers' weight.
    let mut probe = LedgerState::with_rules(base);
    let mut c = Chain::new(1);
    c.reward(&mut probe, &mut Vec::new(), 1000);
    c.stake_all(&mut probe, &mut Vec::new(), 1700);
    let weight = probe.chain_account(&c.addr()).unwrap().staked;
    let rules = base.with_fraud(weight + 1, 5_000, 2_000, 1_000).unwrap();
    let mut st = LedgerState::with_rules(rules);
    for c in chains.iter_mut() {
        c.reward(&mut st, &mut log, 1000);
        c.stake_all(&mut st, &mut log, 1700);
    }
    let target = chains[0].reward(&mut st, &mut log, 1800);
    chains[0].reward(&mut st, &mut log, 1900);
    (st, log, chains, target, weight)
}

fn replayed(log: &[SignedBlock], rules: Rules, reverse: bool) -> LedgerState {
    let mut st = LedgerState::with_rules(rules);
    let mut blocks = log.to_vec();
    if reverse {
        blocks.reverse();
    }
    for b in blocks {
        let h = b.hash();
        st.insert(b, h);
    }
    st
}

#[test]
fn two_staked_guilty_verdicts_void_pending_rewards_and_slash_the_stake() {
    let (mut st, mut log, mut chains, target, weight) = staked_network();
    let accused = chains[0].addr();
    let before = st.account(&accused).unwrap().clone();
    assert_eq!(before.pending_rewards.len(), 2);
    assert_eq!(before.staked, weight);
    let minted = st.minted();

    chains[1].verdict(&mut st, &mut log, 1850, target, accused, true);
    // One verifier's weight is below the quorum: nothing changes yet.
    assert!(st.decisions().is_empty());
    assert_eq!(st.account(&accused).unwrap().pending_rewards.len(), 2);
    let v2 = chains[2].verdict(&mut st, &mut log, 1860, target, accused, true);
    assert!(matches!(st.outcome(&v2), Some(Outcome::Applied(_))));

    let d = st.decisions().to_vec();
    assert_eq!(d.len(), 1);
    assert!(d[0].convicted);
    assert_eq!(d[0].guilty_weight, 2 * weight);
    let pending: u64 = before.pending_rewards.iter().map(|(_, a)| a).sum();
    assert_eq!(d[0].voided, pending);
    assert_eq!(d[0].slashed, weight / 2);
    let a = st.account(&accused).unwrap();
    assert!(a.pending_rewards.is_empty());
    assert_eq!(a.staked, weight - weight / 2);
    assert_eq!(
        a.proofs
            .iter()
            .filter(|p| p.reason_code == Some("fraud"))
            .count(),
        1
    );
    // A fifth of the slash goes to the two voters, pro rata (equal weights).
    let pool = (weight / 2) / 5;
    for c in &chains[1..3] {
        let v = st.account(&c.addr()).unwrap();
        assert_eq!(v.available, pool / 2, "each voter's share");
        assert_eq!(v.staked, weight);
    }
    assert_eq!(st.account(&chains[3].addr()).unwrap().available, 0);
    // The chain itself is untouched: the next reward is judged against the chain's stake.
    assert_eq!(st.chain_account(&accused).unwrap().staked, weight);
    assert_eq!(st.minted(), minted);
    st.check_invariant().unwrap();

    // Any arrival order, and a rebuild, give the same balances and root.
    let root = st.root_hash();
    for reverse in [false, true] {
        let other = replayed(&log, *st.rules(), reverse);
        assert_eq!(other.root_hash(), root);
        other.check_invariant().unwrap();
    }
    st.rebuild();
    assert_eq!(st.root_hash(), root);
}

#[test]
fn an_acquittal_makes_the_accuser_pay_the_accused() {
    let (mut st, mut log, mut chains, target, weight) = staked_network();
    let accused = chains[0].addr();
    let avail = st.account(&accused).unwrap().available;
    chains[1].verdict(&mut st, &mut log, 1850, target, accused, true);
    chains[2].verdict(&mut st, &mut log, 1860, target, accused, false);
    assert!(st.decisions().is_empty(), "one against one decides nothing");
    chains[3].verdict(&mut st, &mut log, 1870, target, accused, false);
    let d = &st.decisions()[0];
    assert!(!d.convicted);
    assert_eq!(d.innocent_weight, 2 * weight);
    let fine = weight / 10;
    assert_eq!(st.account(&chains[1].addr()).unwrap().staked, weight - fine);
    let a = st.account(&accused).unwrap();
    assert_eq!(a.available, avail + fine);
    assert_eq!(a.pending_rewards.len(), 2, "the accused keeps its rewards");
    st.check_invariant().unwrap();
    assert_eq!(
        replayed(&log, *st.rules(), true).root_hash(),
        st.root_hash()
    );
}

#[test]
fn late_unstaked_and_repeated_verdicts_do_not_count() {
    let (mut st, mut log, mut chains, target, _) = staked_network();
    let accused = chains[0].addr();
    // After the window (1800 + 600) a verdict no longer counts.
    chains[1].verdict(&mut st, &mut log, 2401, target, accused, true);
    chains[2].verdict(&mut st, &mut log, 2402, target, accused, true);
    assert!(st.decisions().is_empty());
    // A second verdict of the same voter on the same reward is void.
    let again = chains[1].verdict(&mut st, &mut log, 2403, target, accused, true);
    assert_eq!(
        st.outcome(&again),
        Some(&Outcome::Void(VoidReason::AlreadyVoted))
    );
    // A voter with nothing staked weighs nothing.
    let mut stranger = Chain::new(9);
    let v = stranger.verdict(&mut st, &mut log, 1850, target, accused, true);
    assert_eq!(st.outcome(&v), Some(&Outcome::Void(VoidReason::Unstaked)));
    // A verdict naming another account than the reward's, or a block that is no reward,
    // decides nothing.
    let stake_block = log
        .iter()
        .find(|b| b.block.account == chains[3].addr() && b.block.op.kind() == "stake")
        .unwrap()
        .hash();
    let other = chains[2].addr();
    chains[3].verdict(&mut st, &mut log, 1850, stake_block, other, true);
    assert!(st.decisions().is_empty());
    st.check_invariant().unwrap();
}

/// An unbonded account (stake below the bond) waits `unbonded_window_factor` windows for its
/// rewards, verdicts count until then, and a conviction voids every reward it is waiting for,
/// the ones minted before the judged reward too: an unbonded cheater keeps only what survived
/// a whole day without a conviction.
#[test]
fn an_unbonded_accounts_rewards_wait_longer_and_a_conviction_voids_them_all() {
    let day = crate::rules::MAX_CHALLENGE_WINDOW_SECONDS;
    let base = Rules::new(600, 8).unwrap();
    // Verifiers: one reward each (unbonded: pending a day), then staked.
    let mut probe = LedgerState::with_rules(base);
    let mut c = Chain::new(2);
    c.reward(&mut probe, &mut Vec::new(), 1000);
    c.stake_all(&mut probe, &mut Vec::new(), 1000 + day + 100);
    let weight = probe.chain_account(&c.addr()).unwrap().staked;
    // Bond = one verifier's weight: staked verifiers are bonded, the accused (no stake) not.
    let rules = base
        .with_fraud(weight + 1, 5_000, 2_000, 1_000)
        .unwrap()
        .with_bond(weight, crate::rules::DEFAULT_UNBONDED_WINDOW_FACTOR)
        .unwrap();
    let mut st = LedgerState::with_rules(rules);
    let mut log = Vec::new();
    let mut chains: Vec<Chain> = (1..=3).map(Chain::new).collect();
    for c in chains[1..].iter_mut() {
        c.reward(&mut st, &mut log, 1000);
        let pending = st.account(&c.addr()).unwrap().pending_rewards.clone();
        assert_eq!(
            pending.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            [1000 + day]
        );
        c.stake_all(&mut st, &mut log, 1000 + day + 100);
    }
    let t0 = 1000 + day + 200;
    let accused = chains[0].addr();
    chains[0].reward(&mut st, &mut log, t0);
    let target = chains[0].reward(&mut st, &mut log, t0 + 100);
    // A bonded verifier's next reward waits one window.
    chains[1].reward(&mut st, &mut log, t0 + 100);
    assert!(
        st.account(&chains[1].addr())
            .unwrap()
            .pending_rewards
            .iter()
            .any(|(r, _)| *r == t0 + 100 + 600)
    );
    let before = st.account(&accused).unwrap().clone();
    assert_eq!(
        before
            .pending_rewards
            .iter()
            .map(|(r, _)| *r)
            .collect::<Vec<_>>(),
        [t0 + day, t0 + 100 + day]
    );
    // Verdicts long after one window (but within the day) count.
    chains[1].verdict(&mut st, &mut log, t0 + 5000, target, accused, true);
    chains[2].verdict(&mut st, &mut log, t0 + 5010, target, accused, true);
    let d = st.decisions().to_vec();
    assert_eq!(d.len(), 1);
    assert!(d[0].convicted);
    let all: u64 = before.pending_rewards.iter().map(|(_, a)| a).sum();
    assert_eq!(d[0].voided, all, "the earlier pending reward is voided too");
    assert_eq!(d[0].slashed, 0, "nothing staked, nothing slashed");
    let a = st.account(&accused).unwrap();
    assert!(a.pending_rewards.is_empty());
    assert_eq!(a.available, 0);
    st.check_invariant().unwrap();
    assert_eq!(
        replayed(&log, *st.rules(), true).root_hash(),
        st.root_hash()
    );
}

#[test]
fn a_verdict_on_ones_own_reward_is_refused_at_the_door() {
    let w = Wallet::from_seed(1);
    let b = SignedBlock::sign(
        Block {
            account: w.address(),
            height: 0,
            previous: Hash32::ZERO,
            timestamp: 10,
            op: Op::Verdict {
                target: Hash32([1; 32]),
                accused: w.address(),
                evidence: Hash32([2; 32]),
                guilty: false,
            },
        },
        &w,
    );
    assert!(b.verify_stateless().is_err());
}
