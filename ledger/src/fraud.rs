//! Fraud verdicts: how staked verifiers' votes on a reward convict it (the reward and the
//! claimant's later pending rewards are voided, part of its stake is slashed, part of that paid
//! to the voters who found it) or acquit it (each accuser pays the accused a share of its
//! stake).
//!
//! A verifier that recomputed a sampled piece of another node's claimed work writes a
//! `verdict` block on its own chain (`Op::Verdict`): the reward block judged, the accused, the
//! hash of what it compared, and guilty or not. Its weight is the voter's stake at that block
//! (a verdict from an account with nothing staked is void), one verdict per voter and reward.
//! Only verdicts dated within the reward's challenge window count, so a reward is final once
//! its window has passed.
//!
//! **Decision** (stake-weighted, so Sybils without stake decide nothing): guilty weight at
//! least `rules.fraud_quorum` and at least twice the innocent weight convicts; when someone
//! accused, innocent weight at least the quorum and at least twice the guilty weight acquits;
//! anything else changes nothing (yet). Innocent verdicts on an unaccused reward only show who
//! verified it.
//!
//! **Determinism.** Verdicts never change the outcome of any block: chains are evaluated as
//! before, and the decisions are a second, pure pass over that result (`settle`), taken in
//! the order of the judged blocks' hashes. So balances and the root are a function of the
//! block set, as everywhere in the ledger, with no cycle between a vote's weight and the
//! slashes it causes (weights come from the first pass). The price: a slash takes what the
//! account holds when the pass runs (a reward that was released and spent before its
//! conviction arrived is gone; the window exists so that convictions arrive first).

use std::collections::BTreeMap;

use serde_json::json;

use super::account::{Account, Effect, HistoryEntry, Outcome};
use super::address::Address;
use super::block::{Op, SignedBlock};
use super::keys::Hash32;
use super::rules::Rules;

/// One counted verdict, as the first pass recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictRecord {
    pub voter: Address,
    pub accused: Address,
    pub guilty: bool,
    pub weight: u64,
    pub timestamp: i64,
    pub block: Hash32,
}

/// What a decided reward came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The judged reward block.
    pub target: Hash32,
    pub accused: Address,
    pub convicted: bool,
    pub guilty_weight: u64,
    pub innocent_weight: u64,
    /// Voters on the winning side.
    pub voters: Vec<Address>,
    /// Rewards voided (convicted), in units.
    pub voided: u64,
    /// Stake slashed from the accused (convicted) or taken from the accusers (acquitted).
    pub slashed: u64,
    /// Paid to the voters who found the fraud (convicted) or to the accused (acquitted).
    pub paid: u64,
    /// The latest counted verdict's timestamp: when the decision was reached.
    pub decided_at: i64,
}

/// The second pass's result: accounts as the decisions leave them, and what was burned.
#[derive(Debug, Clone, Default)]
pub struct Settlement {
    pub accounts: BTreeMap<Address, Account>,
    pub burned: u128,
    pub decisions: Vec<Decision>,
}

fn bps(amount: u64, share: u32) -> u64 {
    (u128::from(amount) * u128::from(share) / 10_000) as u64
}

/// Decides every judged reward and applies the decisions to copies of the accounts they
/// touch. `accounts` is the first pass's state; nothing in it is changed.
pub fn settle(
    rules: &Rules,
    blocks: &std::collections::HashMap<Hash32, SignedBlock>,
    outcomes: &std::collections::HashMap<Hash32, Outcome>,
    accounts: &BTreeMap<Address, Account>,
    verdicts: &BTreeMap<Hash32, Vec<VerdictRecord>>,
) -> Settlement {
    let mut out = Settlement::default();
    for (target, votes) in verdicts {
        let Some(block) = blocks.get(target) else {
            continue;
        };
        let Op::Reward { proof, .. } = &block.block.op else {
            continue;
        };
        let Some(Outcome::Applied(Effect::Rewarded {
            amount, release_at, ..
        })) = outcomes.get(target)
        else {
            continue;
        };
        let accused = block.block.account;
        // Verdicts count until the reward's own release (an unbonded account's is later).
        let deadline = *release_at;
        let counted: Vec<&VerdictRecord> = votes
            .iter()
            .filter(|v| v.accused == accused && v.timestamp <= deadline)
            .collect();
        let weight = |guilty: bool| -> u64 {
            counted
                .iter()
                .filter(|v| v.guilty == guilty)
                .fold(0u64, |s, v| s.saturating_add(v.weight))
        };
        let (guilty, innocent) = (weight(true), weight(false));
        let take = |map: &mut BTreeMap<Address, Account>, addr: &Address| {
            map.remove(addr).or_else(|| accounts.get(addr).cloned())
        };
        if !counted.is_empty()
            && let Some(mut a) = take(&mut out.accounts, &accused)
        {
            let id = proof.id_string();
            let judged: Vec<(Address, bool, i64)> = counted
                .iter()
                .map(|v| (v.voter, v.guilty, v.timestamp))
                .collect();
            for p in a.proofs.iter_mut().filter(|p| p.id == id) {
                p.judged_by = judged.clone();
            }
            out.accounts.insert(accused, a);
        }
        let convicted = guilty >= rules.fraud_quorum && guilty >= innocent.saturating_mul(2);
        // An acquittal answers an accusation: innocent verdicts alone only verify.
        let acquitted =
            guilty > 0 && innocent >= rules.fraud_quorum && innocent >= guilty.saturating_mul(2);
        if !convicted && !acquitted {
            continue;
        }
        let winners: Vec<&VerdictRecord> = counted
            .iter()
            .copied()
            .filter(|v| v.guilty == convicted)
            .collect();
        let mut decision = Decision {
            target: *target,
            accused,
            convicted,
            guilty_weight: guilty,
            innocent_weight: innocent,
            voters: winners.iter().map(|v| v.voter).collect(),
            voided: 0,
            slashed: 0,
            paid: 0,
            decided_at: counted.iter().map(|v| v.timestamp).max().unwrap_or(0),
        };
        if convicted {
            let Some(mut a) = take(&mut out.accounts, &accused) else {
                continue;
            };
            // Every reward still pending is voided (the convicted one and any other: a
            // convicted account's pending claims are not trusted, and an unbonded account,
            // which has no stake to slash, loses all it is waiting for); a convicted reward
            // already released loses what is left of it.
            let target_pending = a
                .pending_rewards
                .iter()
                .any(|(r, m)| r == release_at && m == amount);
            let mut voided: u64 = a.pending_rewards.drain(..).map(|(_, amt)| amt).sum();
            if !target_pending {
                let from_available = (*amount).min(a.available);
                a.available -= from_available;
                voided += from_available;
            }
            let slash = bps(a.staked.saturating_add(a.unbonding), rules.slash_bps);
            let from_staked = slash.min(a.staked);
            a.staked -= from_staked;
            a.unbonding -= slash - from_staked;
            let reward_pool = bps(slash, rules.reporter_bps);
            let mut paid: u64 = 0;
            for v in &winners {
                let share = (u128::from(reward_pool) * u128::from(v.weight)
                    / u128::from(guilty.max(1))) as u64;
                if share == 0 || v.voter == accused {
                    continue;
                }
                let mut voter = take(&mut out.accounts, &v.voter)
                    .unwrap_or_else(|| Account::new(v.voter, None, a.rules));
                voter.available += share;
                paid += share;
                voter.history.push(entry(
                    "fraud_reward",
                    share as i128,
                    v.voter,
                    &decision,
                    &proof.id_string(),
                ));
                out.accounts.insert(v.voter, voter);
            }
            decision.voided = voided;
            decision.slashed = slash;
            decision.paid = paid;
            out.burned += u128::from(voided) + u128::from(slash - paid);
            a.history.push(entry(
                "slash",
                -(i128::from(voided) + i128::from(slash)),
                accused,
                &decision,
                &proof.id_string(),
            ));
            let id = proof.id_string();
            for p in a.proofs.iter_mut().filter(|p| p.id == id) {
                p.verified = false;
                p.reward = 0;
                p.reason = Some("convicted of fraud by staked verifiers".into());
                p.reason_code = Some("fraud");
            }
            out.accounts.insert(accused, a);
        } else {
            let mut paid: u64 = 0;
            for v in counted.iter().filter(|v| v.guilty) {
                let Some(mut accuser) = take(&mut out.accounts, &v.voter) else {
                    continue;
                };
                let fine = bps(accuser.staked, rules.false_accusation_bps);
                accuser.staked -= fine;
                paid += fine;
                accuser.history.push(entry(
                    "false_accusation",
                    -(fine as i128),
                    accused,
                    &decision,
                    &proof.id_string(),
                ));
                out.accounts.insert(v.voter, accuser);
            }
            let mut a = take(&mut out.accounts, &accused)
                .unwrap_or_else(|| Account::new(accused, None, *rules));
            a.available += paid;
            decision.slashed = paid;
            decision.paid = paid;
            a.history.push(entry(
                "acquittal",
                paid as i128,
                accused,
                &decision,
                &proof.id_string(),
            ));
            out.accounts.insert(accused, a);
        }
        out.decisions.push(decision);
    }
    out
}

fn entry(
    kind: &'static str,
    amount: i128,
    counterparty: Address,
    d: &Decision,
    proof_id: &str,
) -> HistoryEntry {
    HistoryEntry {
        id: format!("{kind}_{}", d.target.to_hex()),
        kind,
        amount,
        fee: 0,
        counterparty: Some(counterparty),
        memo: None,
        timestamp: d.decided_at,
        rejected: None,
        pending: false,
        details: json!({
            "target": format!("tx_{}", d.target.to_hex()),
            "proof_id": proof_id,
            "convicted": d.convicted,
            "guilty_weight": d.guilty_weight,
            "innocent_weight": d.innocent_weight,
        }),
    }
}

#[cfg(test)]
#[path = "fraud_tests.rs"]
mod tests;
