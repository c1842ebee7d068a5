//! The ledger state machine: a pure function of the set of blocks a node holds.
//!
//! Blocks are kept whatever their economic fate; each account's chain is walked from its first
//! block, and a block is evaluated once its previous block (and, for a receive, its source) has
//! been evaluated. Evaluation depends only on those, so arrival order cannot change the result.
//! Two blocks of one account at the same height on the same previous block freeze the account
//! at that height: neither fork counts, and once the chain below is evaluated the account's
//! funds are burned (slashed). Because that can change the fate of blocks already evaluated, a
//! new fork triggers a full re-evaluation from the block set.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::account::{Account, Effect, Outcome, ProofRecord, SourceInfo, history_entry};
use super::address::Address;
use super::block::{Op, SignedBlock};
use super::encode::Encoder;
use super::fraud::{Decision, Settlement, VerdictRecord, settle};
use super::keys::{Hash32, keccak};
use super::rules::Rules;

/// A valid send not yet claimed by its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub from: Address,
    pub to: Address,
    pub amount: u64,
}

/// What inserting a block did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    Duplicate,
    /// Stored; `fork` when it exposed (or lowered) an equivocation of its account.
    New {
        fork: bool,
    },
}

/// Derived state of the whole ledger.
#[derive(Debug, Default, Clone)]
pub struct LedgerState {
    blocks: HashMap<Hash32, SignedBlock>,
    /// (account, previous, height) -> blocks claiming that slot.
    slots: HashMap<(Address, Hash32, u64), BTreeSet<Hash32>>,
    accounts: BTreeMap<Address, Account>,
    outcomes: HashMap<Hash32, Outcome>,
    inflight: BTreeMap<Hash32, InFlight>,
    incoming: HashMap<Address, BTreeSet<Hash32>>,
    /// Accounts waiting for a source block to be evaluated.
    waiting: HashMap<Hash32, BTreeSet<Address>>,
    minted: u128,
    burned: u128,
    rebuilds: u64,
    rules: Rules,
    /// Counted verdicts per judged reward block (first pass).
    verdicts: BTreeMap<Hash32, Vec<VerdictRecord>>,
    /// The second pass: the accounts the verdicts' decisions changed, and what they burned.
    settlement: Settlement,
}

impl LedgerState {
    /// An empty ledger under the default rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty ledger under `rules`.
    pub fn with_rules(rules: Rules) -> Self {
        LedgerState {
            rules,
            ..Self::default()
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn contains(&self, hash: &Hash32) -> bool {
        self.blocks.contains_key(hash)
    }

    pub fn block(&self, hash: &Hash32) -> Option<&SignedBlock> {
        self.blocks.get(hash)
    }

    pub fn outcome(&self, hash: &Hash32) -> Option<&Outcome> {
        self.outcomes.get(hash)
    }

    /// An account as the fraud decisions leave it (what it holds and may spend).
    pub fn account(&self, address: &Address) -> Option<&Account> {
        self.settlement
            .accounts
            .get(address)
            .or_else(|| self.accounts.get(address))
    }

    /// An account as its own chain left it, before fraud decisions: what its next block is
    /// evaluated against (a reward's amount depends on this stake).
    pub fn chain_account(&self, address: &Address) -> Option<&Account> {
        self.accounts.get(address)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        let settled = &self.settlement.accounts;
        let base = self
            .accounts
            .iter()
            .map(move |(a, acc)| settled.get(a).unwrap_or(acc));
        let extra = settled
            .iter()
            .filter(|(a, _)| !self.accounts.contains_key(a))
            .map(|(_, acc)| acc);
        base.chain(extra)
    }

    /// Every decided fraud verdict (convictions and acquittals), in the judged blocks' order.
    pub fn decisions(&self) -> &[Decision] {
        &self.settlement.decisions
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn minted(&self) -> u128 {
        self.minted
    }

    pub fn burned(&self) -> u128 {
        self.burned + self.settlement.burned
    }

    /// How many full re-evaluations equivocations have caused.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// Whether a stored block already claims the account's next slot (an own block waiting
    /// for a dependency): a new local block there would equivocate.
    pub fn next_slot_taken(&self, address: &Address) -> bool {
        let (head, next) = self
            .accounts
            .get(address)
            .map_or((Hash32::ZERO, 0), |a| (a.head, a.next_height));
        self.slots
            .get(&(*address, head, next))
            .is_some_and(|s| !s.is_empty())
    }

    /// Unclaimed sends addressed to `to`.
    pub fn incoming(&self, to: &Address) -> Vec<(Hash32, InFlight)> {
        self.incoming
            .get(to)
            .map(|set| set.iter().map(|h| (*h, self.inflight[h])).collect())
            .unwrap_or_default()
    }

    /// Adds a block that passed the stateless checks, and evaluates whatever became ready.
    pub fn insert(&mut self, block: SignedBlock, hash: Hash32) -> Inserted {
        if self.blocks.contains_key(&hash) {
            return Inserted::Duplicate;
        }
        let b = &block.block;
        let (addr, height) = (b.account, b.height);
        let slot = self.slots.entry((addr, b.previous, height)).or_default();
        slot.insert(hash);
        let conflict = slot.len() >= 2;
        self.blocks.insert(hash, block);
        let account = self
            .accounts
            .entry(addr)
            .or_insert_with(|| Account::new(addr, None, self.rules));
        let fork = conflict && account.fork_height.is_none_or(|f| height < f);
        if fork {
            account.fork_height = Some(height);
            self.rebuild();
        } else {
            self.advance(vec![addr]);
            self.settle();
        }
        Inserted::New { fork }
    }

    /// Re-evaluates everything from the block set.
    pub fn rebuild(&mut self) {
        self.rebuilds += 1;
        let mut forks: BTreeMap<Address, u64> = BTreeMap::new();
        for ((addr, _, height), set) in &self.slots {
            if set.len() >= 2 {
                let f = forks.entry(*addr).or_insert(*height);
                *f = (*f).min(*height);
            }
        }
        let addrs: Vec<Address> = self.accounts.keys().copied().collect();
        for a in &addrs {
            self.accounts
                .insert(*a, Account::new(*a, forks.get(a).copied(), self.rules));
        }
        self.outcomes.clear();
        self.inflight.clear();
        self.incoming.clear();
        self.waiting.clear();
        self.minted = 0;
        self.burned = 0;
        self.verdicts.clear();
        self.advance(addrs.into_iter().rev().collect());
        self.settle();
    }

    /// Recomputes the fraud decisions from the first pass (cheap: nothing to do without
    /// verdicts).
    fn settle(&mut self) {
        if self.verdicts.is_empty() {
            // Nothing to decide or annotate (a verdict cut off by its voter's equivocation
            // leaves no copy behind either).
            self.settlement = Settlement::default();
            return;
        }
        self.settlement = settle(
            &self.rules,
            &self.blocks,
            &self.outcomes,
            &self.accounts,
            &self.verdicts,
        );
    }

    fn source_info(&self, source: &Hash32) -> Option<SourceInfo> {
        if let Some(outcome) = self.outcomes.get(source) {
            let b = &self.blocks[source].block;
            return Some(match outcome {
                Outcome::Applied(Effect::Sent { to, amount, .. }) => SourceInfo::Send {
                    from: b.account,
                    to: *to,
                    amount: *amount,
                    inference: match &b.op {
                        Op::Send { memo, .. } => super::inference::paid_tokens(memo, *amount)
                            .map(|t| (super::proof::Proof::epoch_of(b.timestamp), t)),
                        _ => None,
                    },
                },
                Outcome::Applied(_) => SourceInfo::Unusable("not a send"),
                Outcome::Void(_) => SourceInfo::Unusable("void send"),
            });
        }
        let b = &self.blocks.get(source)?.block;
        let excluded = self
            .accounts
            .get(&b.account)
            .and_then(|a| a.fork_height)
            .is_some_and(|f| b.height >= f);
        excluded.then_some(SourceInfo::Unusable("cut off by equivocation"))
    }

    /// Evaluates ready blocks of the given accounts, and of those their results unblock.
    fn advance(&mut self, mut work: Vec<Address>) {
        while let Some(addr) = work.pop() {
            loop {
                let account = &self.accounts[&addr];
                if let Some(f) = account.fork_height
                    && account.next_height >= f
                {
                    if !account.slashed {
                        self.slash(addr);
                    }
                    break;
                }
                let key = (addr, account.head, account.next_height);
                let Some(slot) = self.slots.get(&key) else {
                    break;
                };
                let Some(hash) = slot.first().copied() else {
                    break;
                };
                let block = &self.blocks[&hash];
                let source = match &block.block.op {
                    Op::Receive { source } => match self.source_info(source) {
                        Some(info) => Some(info),
                        None => {
                            self.waiting.entry(*source).or_default().insert(addr);
                            break;
                        }
                    },
                    _ => None,
                };
                let outcome = self.accounts[&addr].evaluate(block, source.as_ref());
                self.apply(addr, hash, outcome.clone());
                self.outcomes.insert(hash, outcome);
                if let Some(waiters) = self.waiting.remove(&hash) {
                    work.extend(waiters);
                }
            }
        }
    }

    fn apply(&mut self, addr: Address, hash: Hash32, outcome: Outcome) {
        let block = self.blocks[&hash].clone();
        let ts = block.block.timestamp;
        let entry = history_entry(&block, &hash, &outcome);
        let account = self
            .accounts
            .get_mut(&addr)
            .expect("account exists for its blocks");
        account.head = hash;
        account.next_height += 1;
        if ts >= account.last_ts {
            account.release(ts);
            account.last_ts = ts;
        }
        account.history.push(entry);
        if let Op::Reward { proof, .. } = &block.block.op {
            let uptime_seconds = match &outcome {
                Outcome::Applied(Effect::Rewarded {
                    credited_uptime, ..
                }) => *credited_uptime,
                _ => 0,
            };
            let (verified, reward, reason, reason_code) = match &outcome {
                Outcome::Applied(Effect::Rewarded { amount, .. }) => (true, *amount, None, None),
                Outcome::Void(r) => {
                    let code = match r {
                        super::account::VoidReason::Proof(p) => p.code(),
                        _ => "void",
                    };
                    (false, 0, Some(r.to_string()), Some(code))
                }
                Outcome::Applied(_) => (false, 0, None, None),
            };
            account.proofs.push(ProofRecord {
                id: proof.id_string(),
                proof_type: proof.proof.proof_type.as_str(),
                layer: proof.proof.layers_held.first().copied(),
                timestamp: proof.proof.timestamp,
                verified,
                reward,
                reason,
                reason_code,
                attested_by: attesters(&proof.proof, false),
                uptime_attested_by: attesters(&proof.proof, true),
                uptime_seconds,
                judged_by: Vec::new(),
            });
        }
        let Outcome::Applied(effect) = outcome else {
            return;
        };
        match effect {
            Effect::Sent { to, amount, fee } => {
                account.available -= amount + fee;
                self.burned += u128::from(fee);
                self.inflight.insert(
                    hash,
                    InFlight {
                        from: addr,
                        to,
                        amount,
                    },
                );
                self.incoming.entry(to).or_default().insert(hash);
            }
            Effect::Received {
                amount,
                source,
                inference,
                ..
            } => {
                account.available += amount;
                if let Some((epoch, tokens)) = inference {
                    account.inference_credit.add(epoch, tokens);
                }
                account.claimed.insert(source);
                self.inflight.remove(&source);
                if let Some(set) = self.incoming.get_mut(&addr) {
                    set.remove(&source);
                }
            }
            Effect::Staked {
                amount,
                duration_days,
                unlock_at,
            } => {
                account.available -= amount;
                account.staked += amount;
                account.stake_start = ts;
                account.stake_days = duration_days;
                account.unlock_at = unlock_at;
            }
            Effect::Unstaking {
                amount,
                available_at,
            } => {
                account.staked -= amount;
                account.unbonding += amount;
                account.unbond_at = available_at;
                if account.staked == 0 {
                    account.stake_days = 0;
                }
            }
            Effect::Rewarded {
                amount,
                proof_id,
                credited_uptime,
                release_at,
            } => {
                if release_at > ts {
                    account.pending_rewards.push_back((release_at, amount));
                } else {
                    account.available += amount;
                }
                self.minted += u128::from(amount);
                account.proof_ids.insert(proof_id);
                if let Op::Reward { proof, .. } = &block.block.op {
                    let p = &proof.proof;
                    account.receipt_counts = super::receipt::attested(
                        &p.receipts,
                        &account.receipt_counts,
                        account.last_reward_epoch,
                        self.rules.uptime_attesters as usize,
                    )
                    .counted;
                    account.last_reward_epoch = Some(p.epoch_id);
                    let paid = account.inference_credit.available(p.epoch_id);
                    account
                        .inference_credit
                        .consume(p.epoch_id, p.tokens_processed.min(paid));
                    account.reward_times.push_back(p.timestamp);
                    while account
                        .reward_times
                        .front()
                        .is_some_and(|t| *t <= p.timestamp - 3600)
                    {
                        account.reward_times.pop_front();
                    }
                    if credited_uptime > 0 || p.uptime_seconds > 0 {
                        account.last_uptime_ts = Some(p.timestamp);
                    }
                }
            }
            Effect::Voted {
                target,
                accused,
                guilty,
                weight,
            } => {
                account.judged.insert(target);
                self.verdicts
                    .entry(target)
                    .or_default()
                    .push(VerdictRecord {
                        voter: addr,
                        accused,
                        guilty,
                        weight,
                        timestamp: ts,
                        block: hash,
                    });
            }
        }
    }

    /// Burns everything an equivocating account holds, once its chain below the fork is done.
    fn slash(&mut self, addr: Address) {
        let account = self
            .accounts
            .get_mut(&addr)
            .expect("slashed account exists");
        let total = account.held();
        self.burned += total;
        account.available = 0;
        account.staked = 0;
        account.unbonding = 0;
        account.pending_rewards.clear();
        account.slashed = true;
        account.history.push(super::account::HistoryEntry {
            id: format!("slash_{}", account.address.to_checksum().to_lowercase()),
            kind: "slash",
            amount: -(total as i128),
            fee: 0,
            counterparty: None,
            memo: None,
            timestamp: account.last_ts,
            rejected: None,
            pending: false,
            details: serde_json::json!({ "fork_height": account.fork_height }),
        });
    }

    /// minted == sum(available + staked + unbonding + pending rewards) + unclaimed sends +
    /// burned.
    pub fn check_invariant(&self) -> Result<(), String> {
        let held: u128 = self.accounts().map(Account::held).sum();
        let flying: u128 = self.inflight.values().map(|f| u128::from(f.amount)).sum();
        let burned = self.burned();
        if held + flying + burned != self.minted {
            return Err(format!(
                "held {held} + in flight {flying} + burned {burned} != minted {}",
                self.minted
            ));
        }
        Ok(())
    }

    /// A hash of the whole derived state: equal on two nodes iff they agree on every balance,
    /// stake, chain head, freeze and unclaimed transfer.
    pub fn root_hash(&self) -> Hash32 {
        let r = &self.rules;
        let mut e = Encoder::new(b"neuroshard-ledger-root-v5");
        e.i64(r.challenge_window_secs)
            .u32(r.model_layers)
            .bool(r.accept_unattested_training)
            .u64(r.fraud_quorum)
            .u32(r.slash_bps)
            .u32(r.reporter_bps)
            .u32(r.false_accusation_bps)
            .u32(r.uptime_attesters)
            .u64(r.bond)
            .u32(r.unbonded_window_factor)
            .u64(self.accounts().count() as u64);
        for a in self.accounts() {
            e.bytes(&a.address.0)
                .bytes(&a.head.0)
                .u64(a.next_height)
                .i64(a.last_ts)
                .u64(a.available)
                .u64(a.staked)
                .i64(a.stake_start)
                .u32(a.stake_days)
                .i64(a.unlock_at)
                .u64(a.unbonding)
                .i64(a.unbond_at)
                .u64(a.fork_height.map_or(u64::MAX, |f| f))
                .bool(a.slashed)
                .u64(a.pending_rewards.len() as u64);
            for (release, amount) in &a.pending_rewards {
                e.i64(*release).u64(*amount);
            }
        }
        e.u64(self.inflight.len() as u64);
        for (h, f) in &self.inflight {
            e.bytes(&h.0).bytes(&f.to.0).u64(f.amount);
        }
        e.bytes(&self.minted.to_be_bytes())
            .bytes(&self.burned().to_be_bytes());
        keccak(b"", e.finish())
    }
}

/// The distinct attesters of a proof's cited receipts, sorted: of its heartbeats (uptime) or
/// of the rest (the work).
fn attesters(proof: &crate::proof::Proof, heartbeats: bool) -> Vec<Address> {
    let mut by: Vec<Address> = proof
        .receipts
        .iter()
        .filter(|r| (r.receipt.kind == crate::receipt::ReceiptKind::Heartbeat) == heartbeats)
        .map(|r| r.receipt.attester)
        .collect();
    by.sort();
    by.dedup();
    by
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Account;
    use crate::amount::transfer_fee;
    use crate::block::Block;
    use crate::keys::Wallet;
    use crate::proof::SignedProof;
    use crate::proof::tests::training_proof;

    fn signed(w: &Wallet, height: u64, previous: Hash32, ts: i64, op: Op) -> SignedBlock {
        SignedBlock::sign(
            Block {
                account: w.address(),
                height,
                previous,
                timestamp: ts,
                op,
            },
            w,
        )
    }

    #[test]
    fn receive_waits_for_its_source_then_credits_once() {
        let (a, b) = (Wallet::from_seed(1), Wallet::from_seed(2));
        let p = SignedProof::sign(training_proof(&a, 6000), &a);
        let amount = Account::new(a.address(), None, Rules::default())
            .expected_reward(&p)
            .unwrap()
            .0;
        let r0 = signed(&a, 0, Hash32::ZERO, 6000, Op::Reward { proof: p, amount });
        let send = signed(
            &a,
            1,
            r0.hash(),
            6010,
            Op::Send {
                to: b.address(),
                amount: 1000,
                fee: transfer_fee(1000),
                memo: String::new(),
            },
        );
        let recv = signed(
            &b,
            0,
            Hash32::ZERO,
            6020,
            Op::Receive {
                source: send.hash(),
            },
        );
        let again = signed(
            &b,
            1,
            recv.hash(),
            6030,
            Op::Receive {
                source: send.hash(),
            },
        );
        // No challenge window: the reward is spent ten seconds after it was minted.
        let mut st = LedgerState::with_rules(Rules::new(0, 1024).unwrap());
        // Arrival in reverse order: everything waits, then resolves.
        for blk in [&again, &recv, &send] {
            st.insert(blk.clone(), blk.hash());
            assert_eq!(st.account(&b.address()).unwrap().available, 0);
        }
        st.insert(r0.clone(), r0.hash());
        let acct_b = st.account(&b.address()).unwrap();
        assert_eq!(acct_b.available, 1000);
        assert!(matches!(st.outcome(&again.hash()), Some(Outcome::Void(_))));
        assert_eq!(st.account(&a.address()).unwrap().available, amount - 1001);
        assert_eq!(st.burned(), 1);
        st.check_invariant().unwrap();
        let root = st.root_hash();
        st.rebuild();
        assert_eq!(st.root_hash(), root);
    }
}
