//! Inference claims bound to payments: a node's reward for `tokens_processed` counts only the
//! tokens that payers paid it for, with transfers *they* signed.
//!
//! An inference payment is an ordinary send whose memo has the form
//! `inference tokens=<n> id=<request id>` ([`payment_memo`]). When the serving node claims it
//! (a receive block on its own chain), the ledger credits the account with
//! `min(n, amount / INFERENCE_PRICE_UNITS_PER_TOKEN)` paid tokens, dated by the send's epoch
//! ([`paid_tokens`]); a payment from the account to itself credits nothing. A reward may claim
//! at most the credited tokens of the epochs `[proof epoch - MAX_RECEIPT_AGE_EPOCHS, proof
//! epoch]` not yet claimed by an earlier reward ([`InferenceCredit`]), or the whole proof is
//! void (`unattested`). Everything here is a pure function of the blocks, so every node counts
//! the same credit.

use std::collections::BTreeMap;

use super::amount::UNITS_PER_NEURO;
use super::receipt::MAX_RECEIPT_AGE_EPOCHS;

/// What a user pays the serving node per prompt or completion token: 0.0001 NEURO.
pub const INFERENCE_PRICE_UNITS_PER_TOKEN: u64 = UNITS_PER_NEURO / 10_000;

const MEMO_PREFIX: &str = "inference tokens=";

/// The memo of an inference payment for `tokens` tokens of request `id`.
pub fn payment_memo(tokens: u64, id: &str) -> String {
    format!("{MEMO_PREFIX}{tokens} id={id}")
}

/// The tokens an inference payment of `amount` with this memo pays for: the memo's count, at
/// most what the amount buys at the price. `None` when the memo is not an inference payment's.
pub fn paid_tokens(memo: &str, amount: u64) -> Option<u64> {
    let rest = memo.strip_prefix(MEMO_PREFIX)?;
    let digits = rest.split(' ').next()?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tokens: u64 = digits.parse().ok()?;
    Some(tokens.min(amount / INFERENCE_PRICE_UNITS_PER_TOKEN))
}

/// The request id an inference payment's memo names (`None` when the memo is not an
/// inference payment's or names none).
pub fn payment_request_id(memo: &str) -> Option<&str> {
    paid_tokens(memo, u64::MAX)?;
    let id = memo.split(' ').find_map(|w| w.strip_prefix("id="))?;
    (!id.is_empty()).then_some(id)
}

/// An account's paid inference tokens not yet claimed by a reward, per epoch of the payment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InferenceCredit {
    by_epoch: BTreeMap<u64, u64>,
}

impl InferenceCredit {
    /// Credits `tokens` paid in `epoch`.
    pub fn add(&mut self, epoch: u64, tokens: u64) {
        if tokens > 0 {
            let e = self.by_epoch.entry(epoch).or_default();
            *e = e.saturating_add(tokens);
        }
    }

    fn window(proof_epoch: u64) -> std::ops::RangeInclusive<u64> {
        proof_epoch.saturating_sub(MAX_RECEIPT_AGE_EPOCHS)..=proof_epoch
    }

    /// Paid tokens a proof of `proof_epoch` may claim: the unclaimed credit of the payments of
    /// that epoch and the `MAX_RECEIPT_AGE_EPOCHS` before it.
    pub fn available(&self, proof_epoch: u64) -> u64 {
        self.by_epoch
            .range(Self::window(proof_epoch))
            .fold(0u64, |s, (_, t)| s.saturating_add(*t))
    }

    /// Claims `tokens` for a reward of `proof_epoch`, oldest payments first, and forgets the
    /// payments too old for any later proof. `tokens` must not exceed [`Self::available`].
    pub fn consume(&mut self, proof_epoch: u64, mut tokens: u64) {
        let window = Self::window(proof_epoch);
        self.by_epoch.retain(|e, _| *e >= *window.start());
        for (_, t) in self.by_epoch.range_mut(window) {
            let take = tokens.min(*t);
            *t -= take;
            tokens -= take;
        }
        self.by_epoch.retain(|_, t| *t > 0);
    }

    /// Total unclaimed credit held (all epochs), for display.
    pub fn total(&self) -> u64 {
        self.by_epoch
            .values()
            .fold(0u64, |s, t| s.saturating_add(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_round_trip_and_price_bound() {
        let m = payment_memo(168, "chatcmpl-1");
        assert_eq!(m, "inference tokens=168 id=chatcmpl-1");
        assert_eq!(
            paid_tokens(&m, 168 * INFERENCE_PRICE_UNITS_PER_TOKEN),
            Some(168)
        );
        // A memo claiming more tokens than the amount buys counts what was paid.
        assert_eq!(
            paid_tokens(&m, 10 * INFERENCE_PRICE_UNITS_PER_TOKEN + 5),
            Some(10)
        );
        assert_eq!(paid_tokens(&m, 1), Some(0));
        assert_eq!(payment_request_id(&m), Some("chatcmpl-1"));
        assert_eq!(payment_request_id("inference tokens=3 id="), None);
        assert_eq!(payment_request_id("inference tokens=3"), None);
        assert_eq!(payment_request_id("rent id=x"), None);
        for bad in [
            "",
            "inference chatcmpl-1",
            "inference tokens= id=x",
            "inference tokens=-3 id=x",
            "inference tokens=1e9 id=x",
            "inference tokens=999999999999999999999999 id=x",
            "rent tokens=5",
        ] {
            assert_eq!(paid_tokens(bad, u64::MAX), None, "{bad}");
        }
    }

    #[test]
    fn credit_window_and_consumption() {
        let mut c = InferenceCredit::default();
        c.add(10, 100);
        c.add(12, 50);
        c.add(20, 7);
        assert_eq!(c.available(12), 150);
        // Epoch 10 is more than MAX_RECEIPT_AGE_EPOCHS before 16; 20 is after it.
        assert_eq!(c.available(16), 50);
        assert_eq!(c.available(20), 7);
        c.consume(12, 120);
        assert_eq!(c.available(12), 30);
        assert_eq!(c.total(), 37);
        // Consuming for epoch 20 forgets the payment of epoch 12 (too old from now on).
        c.consume(20, 7);
        assert_eq!(c.total(), 0);
    }

    use crate::account::{Account, Effect, Outcome, SourceInfo, VoidReason};
    use crate::amount::transfer_fee;
    use crate::block::{Block, Op, SignedBlock};
    use crate::keys::{Hash32, Wallet};
    use crate::proof::tests::training_proof;
    use crate::proof::{Proof, ProofType, RejectReason, SignedProof};
    use crate::rules::Rules;
    use crate::state::LedgerState;

    fn signed(w: &Wallet, height: u64, previous: Hash32, ts: i64, op: Op) -> SignedBlock {
        let block = Block {
            account: w.address(),
            height,
            previous,
            timestamp: ts,
            op,
        };
        SignedBlock::sign(block, w)
    }

    fn inference_proof(w: &Wallet, ts: i64, tokens: u64) -> SignedProof {
        let mut p = training_proof(w, ts);
        p.proof_type = ProofType::Inference;
        p.tokens_processed = tokens;
        p.training_batches = 0;
        p.uptime_seconds = 0;
        p.receipts.clear();
        p.current_loss = 0.0;
        p.model_hash_start.clear();
        p.model_hash_end.clear();
        p.gradient_commitment.clear();
        p.nonce = ts as u64;
        SignedProof::sign(p, w)
    }

    /// A node's chain under construction: each block on the previous one.
    struct Chain<'a> {
        w: &'a Wallet,
        head: Hash32,
        height: u64,
    }

    impl Chain<'_> {
        fn push(&mut self, st: &mut LedgerState, ts: i64, op: Op) -> Hash32 {
            let b = signed(self.w, self.height, self.head, ts, op);
            let h = b.hash();
            st.insert(b, h);
            self.head = h;
            self.height += 1;
            h
        }
    }

    fn reward_op(st: &LedgerState, w: &Wallet, p: SignedProof) -> Op {
        let a = st
            .chain_account(&w.address())
            .cloned()
            .unwrap_or_else(|| Account::new(w.address(), None, *st.rules()));
        // A void claim is written with the amount the proof would give without the rule.
        let amount = a.expected_reward(&p).map_or(1, |r| r.0);
        Op::Reward { proof: p, amount }
    }

    fn void_code(st: &LedgerState, h: &Hash32) -> Option<&'static str> {
        match st.outcome(h)? {
            Outcome::Void(VoidReason::Proof(r)) => Some(r.code()),
            _ => None,
        }
    }

    /// A payer's signed payment for 100 tokens lets the node claim 100 tokens once; more, a
    /// replay, or tokens nobody paid for are refused; the payer's outlay is far above the
    /// minted reward.
    #[test]
    fn inference_rewards_come_only_from_payments() {
        let (payer, node) = (Wallet::from_seed(1), Wallet::from_seed(2));
        let mut st = LedgerState::with_rules(Rules::new(0, 1024).unwrap());
        let mut pc = Chain {
            w: &payer,
            head: Hash32::ZERO,
            height: 0,
        };
        let mut nc = Chain {
            w: &node,
            head: Hash32::ZERO,
            height: 0,
        };
        // The payer earns something to pay with.
        let p0 = SignedProof::sign(training_proof(&payer, 6000), &payer);
        let op = reward_op(&st, &payer, p0);
        pc.push(&mut st, 6000, op);
        let funds = st.account(&payer.address()).unwrap().available;
        let price = 100 * INFERENCE_PRICE_UNITS_PER_TOKEN;
        assert!(funds > price + transfer_fee(price));
        // Before any payment, an inference proof earns nothing.
        let early = inference_proof(&node, 6001, 10);
        let op = reward_op(&st, &node, early);
        let h = nc.push(&mut st, 6001, op);
        assert_eq!(void_code(&st, &h), Some("unattested"));
        // Payment (epoch 100) and its claim on the node's chain.
        let send = pc.push(
            &mut st,
            6010,
            Op::Send {
                to: node.address(),
                amount: price,
                fee: transfer_fee(price),
                memo: payment_memo(100, "req-1"),
            },
        );
        nc.push(&mut st, 6020, Op::Receive { source: send });
        assert_eq!(
            st.chain_account(&node.address())
                .unwrap()
                .inference_credit
                .available(101),
            100
        );
        // Over-claim: refused, credit untouched.
        let over = inference_proof(&node, 6061, 101);
        let op = reward_op(&st, &node, over);
        let h = nc.push(&mut st, 6061, op);
        assert_eq!(void_code(&st, &h), Some("unattested"));
        // The paid tokens: rewarded (0.0001 NEURO per million tokens: 10 units, x1.2 role).
        let ok = inference_proof(&node, 6062, 100);
        let op = reward_op(&st, &node, ok.clone());
        let h = nc.push(&mut st, 6062, op);
        assert!(matches!(
            st.outcome(&h),
            Some(Outcome::Applied(Effect::Rewarded { amount: 12, .. }))
        ));
        // Replayed, and a second claim of the same payment: refused.
        let op = Op::Reward {
            proof: ok,
            amount: 12,
        };
        let h = nc.push(&mut st, 6130, op);
        assert_eq!(void_code(&st, &h), Some("replay"));
        let again = inference_proof(&node, 6131, 1);
        let op = reward_op(&st, &node, again);
        let h = nc.push(&mut st, 6131, op);
        assert_eq!(void_code(&st, &h), Some("unattested"));
        // Self-dealing loses: the payer paid 100 tokens' price plus its burned fee
        // (10,010,000 units) for a reward of 12 units; the fee alone burns 833 times the reward.
        assert_eq!(transfer_fee(price), 10_000);
        st.check_invariant().unwrap();
        let root = st.root_hash();
        st.rebuild();
        assert_eq!(st.root_hash(), root);
    }

    /// A training proof's `tokens_processed` is credited only up to the paid tokens (none).
    #[test]
    fn unpaid_tokens_of_other_proofs_earn_nothing() {
        let w = Wallet::from_seed(1);
        let a = Account::new(w.address(), None, Rules::default());
        let with = SignedProof::sign(training_proof(&w, 6000), &w);
        let mut p = training_proof(&w, 6000);
        p.tokens_processed = 0;
        let without = SignedProof::sign(p, &w);
        assert_eq!(
            a.expected_reward(&with).unwrap().0,
            a.expected_reward(&without).unwrap().0
        );
        let mut p = training_proof(&w, 6000);
        p.proof_type = ProofType::Inference;
        assert!(matches!(
            a.expected_reward(&SignedProof::sign(p, &w)),
            Err(RejectReason::Unattested(_))
        ));
        assert_eq!(Proof::epoch_of(6000), 100);
    }

    /// A node's own wallet paying itself (or any payment from the account itself) credits no
    /// tokens.
    #[test]
    fn paying_oneself_credits_nothing() {
        let w = Wallet::from_seed(1);
        let a = Account::new(w.address(), None, Rules::default());
        let rcv = signed(
            &w,
            1,
            Hash32([9; 32]),
            10,
            Op::Receive {
                source: Hash32([5; 32]),
            },
        );
        let src = |from| SourceInfo::Send {
            from,
            to: w.address(),
            amount: 10 * INFERENCE_PRICE_UNITS_PER_TOKEN,
            inference: Some((0, 10)),
        };
        let credited = |o: Outcome| match o {
            Outcome::Applied(Effect::Received { inference, .. }) => inference,
            other => panic!("{other:?}"),
        };
        assert_eq!(credited(a.evaluate(&rcv, Some(&src(w.address())))), None);
        let other = Wallet::from_seed(2).address();
        assert_eq!(credited(a.evaluate(&rcv, Some(&src(other)))), Some((0, 10)));
    }
}
