//! Plain result structs for the REST layer (amounts in units; `*_neuro` helpers give the f64
//! the JSON contract shows); the date formats are `dates.rs`'s.

use serde_json::Value;

use super::account::{HistoryEntry, ProofRecord};
use super::address::Address;

pub use super::dates::{date_string, timestamp_string};

/// `GET /wallet/balance`. total = available + staked + pending.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    pub address: Address,
    pub available: u64,
    pub staked: u64,
    /// Unstaked funds in cooldown, transfers to this address not yet claimed and rewards in
    /// their challenge window.
    pub pending: u64,
    /// The part of `pending` in its unstaking cooldown, and when the cooldown ends.
    pub cooling: u64,
    pub cooling_until: Option<i64>,
    /// The part of `pending` sent to this address and not claimed yet (the recipient's node
    /// claims it as soon as it holds the send).
    pub unclaimed: u64,
    pub total: u64,
    pub staking: Option<Staking>,
    /// Set when the account equivocated: its funds are burned and it can do nothing more.
    pub frozen_at_height: Option<u64>,
    /// The part of `pending` that is rewards still in their challenge window.
    pub pending_rewards: u64,
    /// When the oldest pending reward becomes available.
    pub rewards_next_release_at: Option<i64>,
    /// When the newest pending reward becomes available (all of them by then).
    pub rewards_released_at: Option<i64>,
}

/// The `staking` object (present when something is staked).
#[derive(Debug, Clone, PartialEq)]
pub struct Staking {
    pub amount: u64,
    pub duration_days: u32,
    pub start_at: i64,
    pub unlock_at: i64,
    pub multiplier: f64,
}

/// `POST /wallet/send`.
#[derive(Debug, Clone, PartialEq)]
pub struct SendReceipt {
    pub transaction_id: String,
    pub from: Address,
    pub to: Address,
    pub amount: u64,
    pub fee: u64,
    pub memo: String,
    /// Always "confirmed": the block is durably stored and applied when this returns.
    pub status: &'static str,
    pub timestamp: i64,
}

/// `POST /wallet/stake`.
#[derive(Debug, Clone, PartialEq)]
pub struct StakeReceipt {
    pub transaction_id: String,
    pub stake: Staking,
    pub available: u64,
    pub staked: u64,
}

/// `POST /wallet/unstake`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnstakeReceipt {
    pub transaction_id: String,
    pub amount: u64,
    pub cooldown_days: i64,
    pub available_at: i64,
}

/// `GET /wallet/transactions`: newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionPage {
    pub transactions: Vec<HistoryEntry>,
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

/// One line of `GET /proofs`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProofEntry {
    pub id: String,
    pub proof_type: String,
    pub layer: Option<u32>,
    pub timestamp: i64,
    pub verified: bool,
    pub reward: u64,
    /// Why it earned nothing, when it did not.
    pub reason: Option<String>,
    /// The nodes whose receipts of the work back the proof.
    pub attested_by: Vec<Address>,
    /// The peers whose heartbeat receipts back its uptime.
    pub uptime_attested_by: Vec<Address>,
    /// Uptime credited (seconds).
    pub uptime_seconds: u64,
    /// Staked verifiers' counted verdicts: (voter, guilty, when).
    pub judged_by: Vec<(Address, bool, i64)>,
}

impl From<&ProofRecord> for ProofEntry {
    fn from(p: &ProofRecord) -> Self {
        ProofEntry {
            id: p.id.clone(),
            proof_type: p.proof_type.to_string(),
            layer: p.layer,
            timestamp: p.timestamp,
            verified: p.verified,
            reward: p.reward,
            reason: p.reason.clone(),
            attested_by: p.attested_by.clone(),
            uptime_attested_by: p.uptime_attested_by.clone(),
            uptime_seconds: p.uptime_seconds,
            judged_by: p.judged_by.clone(),
        }
    }
}

/// `stats` of `GET /proofs`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProofStats {
    pub total_submitted: usize,
    pub total_verified: usize,
    pub total_reward: u64,
    /// Rejections counted by reason code.
    pub rejected_by_reason: Vec<(String, usize)>,
}

/// `GET /proofs`: newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ProofPage {
    pub proofs: Vec<ProofEntry>,
    pub stats: ProofStats,
}

/// Outcome of a local proof submission.
#[derive(Debug, Clone, PartialEq)]
pub struct ProofAccepted {
    pub proof_id: String,
    pub reward: u64,
    pub transaction_id: String,
    pub details: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date_string(1_733_270_400), "2024-12-04");
        assert_eq!(timestamp_string(1_733_313_600), "2024-12-04T12:00:00Z");
    }
}
