//! One account's derived state and the pure rule that evaluates its next block: given the
//! state after the previous block and what the block's source (if any) turned out to be,
//! every node computes the same outcome.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde_json::{Value, json};

use super::address::Address;
use super::block::{Op, SignedBlock};
use super::dates::timestamp_string;
use super::inference::InferenceCredit;
use super::keys::Hash32;
use super::proof::{MAX_PROOFS_PER_HOUR, ProofType, RejectReason};
use super::receipt::{ReceiptKey, ReceiptKind, attested};
use super::rewards::{SECONDS_PER_DAY, UNSTAKE_COOLDOWN_DAYS, compute_reward};
use super::rules::Rules;
use super::units::format_neuro;

/// What the source of a receive block turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceInfo {
    /// A send block that took effect.
    Send {
        from: Address,
        to: Address,
        amount: u64,
        /// For an inference payment (see `inference.rs`): the epoch of the send and the tokens
        /// it pays for.
        inference: Option<(u64, u64)>,
    },
    /// A block that can never be claimed (void, not a send, or cut off by equivocation).
    Unusable(&'static str),
}

/// Why a block has no effect. The block still extends its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidReason {
    TimestampRegression,
    InsufficientBalance {
        required: u64,
        available: u64,
    },
    InsufficientStake {
        requested: u64,
        staked: u64,
    },
    StakeLocked {
        unlock_at: i64,
    },
    BadSource(&'static str),
    SourceAlreadyClaimed,
    Proof(RejectReason),
    /// A verdict from an account with nothing staked.
    Unstaked,
    /// A second verdict of the same voter on the same reward.
    AlreadyVoted,
}

impl std::fmt::Display for VoidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TimestampRegression => f.write_str("timestamp before the previous block's"),
            Self::InsufficientBalance {
                required,
                available,
            } => {
                write!(
                    f,
                    "insufficient balance: required {} NEURO, available {} NEURO",
                    format_neuro(*required),
                    format_neuro(*available)
                )
            }
            Self::InsufficientStake { requested, staked } => {
                write!(
                    f,
                    "insufficient stake: requested {} NEURO, staked {} NEURO",
                    format_neuro(*requested),
                    format_neuro(*staked)
                )
            }
            Self::StakeLocked { unlock_at } => {
                write!(f, "stake locked until {}", timestamp_string(*unlock_at))
            }
            Self::BadSource(why) => write!(f, "unusable source: {why}"),
            Self::SourceAlreadyClaimed => f.write_str("source already claimed"),
            Self::Proof(r) => write!(f, "proof rejected: {r}"),
            Self::Unstaked => f.write_str("a verdict needs stake"),
            Self::AlreadyVoted => f.write_str("this account already judged that reward"),
        }
    }
}

/// The effect of a block that took effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Sent {
        to: Address,
        amount: u64,
        fee: u64,
    },
    Received {
        from: Address,
        amount: u64,
        source: Hash32,
        /// Paid inference tokens credited to the account: (epoch of the payment, tokens).
        inference: Option<(u64, u64)>,
    },
    Staked {
        amount: u64,
        duration_days: u32,
        unlock_at: i64,
    },
    Unstaking {
        amount: u64,
        available_at: i64,
    },
    Rewarded {
        amount: u64,
        proof_id: Hash32,
        credited_uptime: u64,
        /// When the amount leaves its challenge window and becomes available.
        release_at: i64,
    },
    /// A verdict counted with the voter's stake at that block as its weight.
    Voted {
        target: Hash32,
        accused: Address,
        guilty: bool,
        weight: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied(Effect),
    Void(VoidReason),
}

/// A line of an account's history, newest last.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// `tx_<block hash>`.
    pub id: String,
    /// send, receive, reward, stake, unstake, slash.
    pub kind: &'static str,
    /// Signed amount in units: + received/rewarded, - sent (fee apart) or staked; 0 when void.
    pub amount: i128,
    pub fee: u64,
    pub counterparty: Option<Address>,
    pub memo: Option<String>,
    pub timestamp: i64,
    /// None when confirmed; the reason when the block was void.
    pub rejected: Option<String>,
    /// A transfer to the account that its owner has not claimed yet (no receive block yet):
    /// the id and timestamp are the send's.
    pub pending: bool,
    pub details: Value,
}

/// A reward block as listed by the proofs endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ProofRecord {
    pub id: String,
    pub proof_type: &'static str,
    pub layer: Option<u32>,
    pub timestamp: i64,
    pub verified: bool,
    pub reward: u64,
    pub reason: Option<String>,
    pub reason_code: Option<&'static str>,
    /// The nodes whose receipts of the work back the proof (forward, backward, contribution).
    pub attested_by: Vec<Address>,
    /// The peers whose heartbeat receipts back its uptime.
    pub uptime_attested_by: Vec<Address>,
    /// Uptime credited (seconds): what the heartbeat receipts attest, at most the claim.
    pub uptime_seconds: u64,
    /// Staked verifiers' verdicts on it that count: (voter, guilty, verdict timestamp).
    pub judged_by: Vec<(Address, bool, i64)>,
}

/// Derived state of one account chain.
#[derive(Debug, Clone)]
pub struct Account {
    pub address: Address,
    /// Lowest height with two conflicting blocks; the account is frozen there.
    pub fork_height: Option<u64>,
    pub head: Hash32,
    pub next_height: u64,
    pub last_ts: i64,
    pub available: u64,
    pub staked: u64,
    pub stake_start: i64,
    pub stake_days: u32,
    pub unlock_at: i64,
    pub unbonding: u64,
    pub unbond_at: i64,
    pub slashed: bool,
    pub claimed: HashSet<Hash32>,
    pub proof_ids: HashSet<Hash32>,
    pub last_reward_epoch: Option<u64>,
    pub last_uptime_ts: Option<i64>,
    pub reward_times: VecDeque<i64>,
    /// What the receipts of the rewards so far counted, per (attester, kind, epoch), for the
    /// epochs a later proof's receipts may still name.
    pub receipt_counts: BTreeMap<ReceiptKey, u64>,
    /// Inference tokens paid by other accounts' signed payments and not yet rewarded.
    pub inference_credit: InferenceCredit,
    /// Rewards still in their challenge window: (release time, amount), oldest first.
    pub pending_rewards: VecDeque<(i64, u64)>,
    /// Reward blocks this account has judged (one verdict each).
    pub judged: HashSet<Hash32>,
    pub history: Vec<HistoryEntry>,
    pub proofs: Vec<ProofRecord>,
    /// The network's rules this account is judged by.
    pub rules: Rules,
}

/// An account's funds as of a moment: what has cooled down or left its challenge window is
/// available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    pub available: u64,
    /// Unstaked funds still in their cooldown.
    pub unbonding: u64,
    /// Rewards still in their challenge window.
    pub pending_rewards: u64,
    /// When the oldest pending reward is released, if any.
    pub next_release: Option<i64>,
    /// When the newest pending reward is released, if any.
    pub last_release: Option<i64>,
}

impl Account {
    pub fn new(address: Address, fork_height: Option<u64>, rules: Rules) -> Self {
        Account {
            address,
            fork_height,
            head: Hash32::ZERO,
            next_height: 0,
            last_ts: 0,
            available: 0,
            staked: 0,
            stake_start: 0,
            stake_days: 0,
            unlock_at: 0,
            unbonding: 0,
            unbond_at: 0,
            slashed: false,
            claimed: HashSet::new(),
            proof_ids: HashSet::new(),
            last_reward_epoch: None,
            last_uptime_ts: None,
            reward_times: VecDeque::new(),
            pending_rewards: VecDeque::new(),
            receipt_counts: BTreeMap::new(),
            inference_credit: InferenceCredit::default(),
            judged: HashSet::new(),
            history: Vec::new(),
            proofs: Vec::new(),
            rules,
        }
    }

    /// The account's funds at time `t`: cooled-down unstakes and rewards whose challenge
    /// window ended by `t` count as available.
    pub fn settled(&self, t: i64) -> Settled {
        let mut s = Settled {
            available: self.available,
            unbonding: self.unbonding,
            ..Settled::default()
        };
        if self.unbonding > 0 && t >= self.unbond_at {
            s.available += self.unbonding;
            s.unbonding = 0;
        }
        for (release, amount) in &self.pending_rewards {
            if *release <= t {
                s.available += amount;
            } else {
                s.pending_rewards += amount;
                s.next_release.get_or_insert(*release);
                s.last_release = Some(*release);
            }
        }
        s
    }

    /// Moves what `settled(t)` counts as available into `available`.
    pub fn release(&mut self, t: i64) {
        let s = self.settled(t);
        self.available = s.available;
        self.unbonding = s.unbonding;
        self.pending_rewards.retain(|(release, _)| *release > t);
    }

    /// Everything the account holds: available, staked, unbonding and pending rewards.
    pub fn held(&self) -> u128 {
        u128::from(self.available)
            + u128::from(self.staked)
            + u128::from(self.unbonding)
            + self
                .pending_rewards
                .iter()
                .map(|(_, a)| u128::from(*a))
                .sum::<u128>()
    }

    /// Whether the account may still add blocks (not frozen at or below its next height).
    pub fn is_frozen(&self) -> bool {
        self.fork_height.is_some()
    }

    /// The outcome of `block` as this account's next block. Pure.
    pub fn evaluate(&self, block: &SignedBlock, source: Option<&SourceInfo>) -> Outcome {
        let b = &block.block;
        let ts = b.timestamp;
        if ts < self.last_ts {
            return Outcome::Void(VoidReason::TimestampRegression);
        }
        let available = self.settled(ts).available;
        match &b.op {
            Op::Send {
                to, amount, fee, ..
            } => {
                let required = amount + fee;
                if available < required {
                    return Outcome::Void(VoidReason::InsufficientBalance {
                        required,
                        available,
                    });
                }
                Outcome::Applied(Effect::Sent {
                    to: *to,
                    amount: *amount,
                    fee: *fee,
                })
            }
            Op::Receive { source: src_hash } => match source {
                Some(SourceInfo::Send {
                    from,
                    to,
                    amount,
                    inference,
                }) => {
                    if *to != self.address {
                        Outcome::Void(VoidReason::BadSource("not addressed to this account"))
                    } else if self.claimed.contains(src_hash) {
                        Outcome::Void(VoidReason::SourceAlreadyClaimed)
                    } else {
                        Outcome::Applied(Effect::Received {
                            from: *from,
                            amount: *amount,
                            source: *src_hash,
                            // A node paying itself earns no inference reward.
                            inference: inference.filter(|_| *from != self.address),
                        })
                    }
                }
                Some(SourceInfo::Unusable(why)) => Outcome::Void(VoidReason::BadSource(why)),
                None => Outcome::Void(VoidReason::BadSource("missing")),
            },
            Op::Stake {
                amount,
                duration_days,
            } => {
                if available < *amount {
                    return Outcome::Void(VoidReason::InsufficientBalance {
                        required: *amount,
                        available,
                    });
                }
                Outcome::Applied(Effect::Staked {
                    amount: *amount,
                    duration_days: *duration_days,
                    unlock_at: self
                        .unlock_at
                        .max(ts + i64::from(*duration_days) * SECONDS_PER_DAY),
                })
            }
            Op::Unstake { amount } => {
                if *amount > self.staked {
                    return Outcome::Void(VoidReason::InsufficientStake {
                        requested: *amount,
                        staked: self.staked,
                    });
                }
                if ts < self.unlock_at {
                    return Outcome::Void(VoidReason::StakeLocked {
                        unlock_at: self.unlock_at,
                    });
                }
                Outcome::Applied(Effect::Unstaking {
                    amount: *amount,
                    available_at: ts + UNSTAKE_COOLDOWN_DAYS * SECONDS_PER_DAY,
                })
            }
            Op::Reward { proof, amount } => match self.reward_for(proof, *amount) {
                Ok((computed, credited_uptime)) => Outcome::Applied(Effect::Rewarded {
                    amount: computed,
                    proof_id: proof.id(),
                    credited_uptime,
                    release_at: self.rules.release_at(ts, self.staked),
                }),
                Err(r) => Outcome::Void(VoidReason::Proof(r)),
            },
            Op::Verdict {
                target,
                accused,
                guilty,
                ..
            } => {
                if self.staked == 0 {
                    return Outcome::Void(VoidReason::Unstaked);
                }
                if self.judged.contains(target) {
                    return Outcome::Void(VoidReason::AlreadyVoted);
                }
                Outcome::Applied(Effect::Voted {
                    target: *target,
                    accused: *accused,
                    guilty: *guilty,
                    weight: self.staked,
                })
            }
        }
    }

    /// The stateful proof rules: replay, one proof per epoch, hourly rate, and the claimed
    /// amount equal to what the rules give for this account's stake. Returns (amount, uptime).
    pub fn reward_for(
        &self,
        proof: &super::proof::SignedProof,
        claimed: u64,
    ) -> Result<(u64, u64), RejectReason> {
        let (computed, uptime) = self.expected_reward(proof)?;
        if computed != claimed {
            return Err(RejectReason::AmountMismatch { claimed, computed });
        }
        Ok((computed, uptime))
    }

    /// What the rules give for `proof` as this account's next reward: (amount, uptime
    /// credited), or why it earns nothing.
    pub fn expected_reward(
        &self,
        proof: &super::proof::SignedProof,
    ) -> Result<(u64, u64), RejectReason> {
        let p = &proof.proof;
        if self.proof_ids.contains(&proof.id()) {
            return Err(RejectReason::Replay);
        }
        if self.last_reward_epoch.is_some_and(|e| p.epoch_id <= e) {
            return Err(RejectReason::DuplicateEpoch);
        }
        let recent = self
            .reward_times
            .iter()
            .filter(|t| **t > p.timestamp - 3600)
            .count();
        if recent >= MAX_PROOFS_PER_HOUR {
            return Err(RejectReason::RateLimited);
        }
        check_layers(p, &self.rules)?;
        let attested = attested(
            &p.receipts,
            &self.receipt_counts,
            self.last_reward_epoch,
            self.rules.uptime_attesters as usize,
        );
        if p.training_batches > attested.steps && !self.rules.accept_unattested_training {
            return Err(RejectReason::Unattested(format!(
                "claims {} training batches, receipts from other nodes attest {}",
                p.training_batches, attested.steps
            )));
        }
        // Uptime: in an open network at most what peers' heartbeat receipts attest (each
        // epoch's slots credited once, so no more than the time that passed); a development
        // network bounds it by the time since the last uptime proof only.
        let max_uptime = if self.rules.accept_unattested_training {
            match self.last_uptime_ts {
                Some(prev) => (p.timestamp - prev).max(0) as u64,
                None => u64::MAX,
            }
        } else {
            attested.uptime_seconds
        };
        // Inference: at most the tokens payers paid this node for (their signed transfers,
        // claimed on this chain); a proof of type inference that claims more is void.
        let paid = self.inference_credit.available(p.epoch_id);
        if p.proof_type == ProofType::Inference && p.tokens_processed > paid {
            return Err(RejectReason::Unattested(format!(
                "claims {} inference tokens, payments signed by payers cover {paid}",
                p.tokens_processed
            )));
        }
        let work = p.work(max_uptime, paid);
        let computed = compute_reward(&work, self.staked, self.stake_days).total;
        Ok((computed, work.uptime_seconds))
    }
}

/// The layers a proof claims must exist in the network's model, and its role bonuses must
/// follow from them: the embedding comes with layer 0, the LM head with the last layer.
pub fn check_layers(p: &super::proof::Proof, rules: &Rules) -> Result<(), RejectReason> {
    let n = rules.model_layers;
    if let Some(beyond) = p.layers_held.iter().find(|l| **l >= n) {
        return Err(RejectReason::Implausible(format!(
            "layer {beyond} claimed, the model has {n} layers"
        )));
    }
    if p.holds_embedding && p.layers_held.first() != Some(&0) {
        return Err(RejectReason::Implausible(
            "embedding claimed without layer 0".into(),
        ));
    }
    if p.holds_lm_head && p.layers_held.last() != Some(&(n - 1)) {
        return Err(RejectReason::Implausible(format!(
            "LM head claimed without the last layer ({})",
            n - 1
        )));
    }
    for r in &p.receipts {
        let (kind, boundary) = (r.receipt.kind, r.receipt.boundary);
        let inside = match kind {
            ReceiptKind::Forward => boundary < n,
            ReceiptKind::Backward => boundary > 0 && boundary < n,
            // A contribution is of the whole model.
            ReceiptKind::Contribution => p.layer_range() == Some((0, n)),
            ReceiptKind::Heartbeat => true,
        };
        if !inside {
            return Err(RejectReason::Unattested(format!(
                "{} receipt at layer boundary {boundary} of a {n}-layer model",
                kind.as_str()
            )));
        }
    }
    Ok(())
}

/// Role name for a proof's holdings, as the API shows it.
pub fn role_of(holds_embedding: bool, holds_lm_head: bool) -> &'static str {
    match (holds_embedding, holds_lm_head) {
        (true, true) => "full",
        (true, false) => "driver",
        (false, true) => "validator",
        (false, false) => "worker",
    }
}

/// A history line for a block and its outcome.
pub fn history_entry(block: &SignedBlock, hash: &Hash32, outcome: &Outcome) -> HistoryEntry {
    let b = &block.block;
    let rejected = match outcome {
        Outcome::Void(r) => Some(r.to_string()),
        Outcome::Applied(_) => None,
    };
    let ok = rejected.is_none();
    let mut e = HistoryEntry {
        id: format!("tx_{}", hash.to_hex()),
        kind: b.op.kind(),
        amount: 0,
        fee: 0,
        counterparty: None,
        memo: None,
        timestamp: b.timestamp,
        rejected,
        pending: false,
        details: json!({ "height": b.height }),
    };
    match (&b.op, outcome) {
        (
            Op::Send {
                to,
                amount,
                fee,
                memo,
            },
            _,
        ) => {
            // As the contract shows it: the amount sent; the burned fee is its own field.
            e.amount = -i128::from(*amount) * i128::from(ok);
            e.fee = *fee;
            e.counterparty = Some(*to);
            e.memo = Some(memo.clone());
        }
        (Op::Receive { source }, out) => {
            e.details["source"] = json!(format!("tx_{}", source.to_hex()));
            if let Outcome::Applied(Effect::Received { from, amount, .. }) = out {
                e.amount = i128::from(*amount);
                e.counterparty = Some(*from);
            }
        }
        (
            Op::Stake {
                amount,
                duration_days,
            },
            out,
        ) => {
            e.details["staked"] = json!(amount);
            e.details["duration_days"] = json!(duration_days);
            if let Outcome::Applied(Effect::Staked { unlock_at, .. }) = out {
                e.amount = -i128::from(*amount);
                e.details["unlock_at"] = json!(unlock_at);
            }
        }
        (Op::Unstake { amount }, out) => {
            e.details["unstaked"] = json!(amount);
            if let Outcome::Applied(Effect::Unstaking { available_at, .. }) = out {
                e.details["available_at"] = json!(available_at);
            }
        }
        (Op::Reward { proof, amount }, out) => {
            e.details["proof_id"] = json!(proof.id_string());
            e.details["role"] = json!(role_of(
                proof.proof.holds_embedding,
                proof.proof.holds_lm_head
            ));
            e.details["proof_type"] = json!(proof.proof.proof_type.as_str());
            e.details["claimed"] = json!(amount);
            if let Outcome::Applied(Effect::Rewarded {
                amount, release_at, ..
            }) = out
            {
                e.amount = i128::from(*amount);
                e.details["release_at"] = json!(release_at);
            }
        }
        (
            Op::Verdict {
                target,
                accused,
                guilty,
                evidence,
            },
            _,
        ) => {
            e.counterparty = Some(*accused);
            e.details["target"] = json!(format!("tx_{}", target.to_hex()));
            e.details["evidence"] = json!(evidence.to_hex());
            e.details["guilty"] = json!(guilty);
        }
    }
    e
}

#[cfg(test)]
#[path = "account_tests.rs"]
mod tests;
