//! `Ledger`: the async API the REST layer and the peer service call. One lock serializes
//! every change; each change is one database transaction, committed before the in-memory
//! state moves, so whatever a caller was told survives a crash.

use std::path::Path;

use tokio::sync::Mutex;

use super::account::{Effect, HistoryEntry, Outcome, VoidReason};
use super::address::Address;
use super::amount::{MAX_AMOUNT, format_neuro, transfer_fee};
use super::block::{Block, MAX_MEMO_BYTES, Message, Op, SignedBlock};
use super::error::LedgerError;
use super::keys::{Hash32, Wallet};
use super::proof::{RejectReason, SignedProof, check_age};
use super::rewards::{MAX_STAKE_DAYS, MIN_STAKE_DAYS, UNSTAKE_COOLDOWN_DAYS, stake_multiplier};
use super::rules::Rules;
use super::state::{InFlight, Inserted, LedgerState};
use super::store::{Rejection, Store, sqlite_url};
use super::views::{
    Balance, ProofAccepted, ProofEntry, ProofPage, ProofStats, SendReceipt, StakeReceipt, Staking,
    TransactionPage, UnstakeReceipt,
};

/// Blocks dated further ahead of the local clock are refused (offered again later, they pass).
pub const MAX_BLOCK_FUTURE_SECONDS: i64 = 60;
/// Most unclaimed transfers claimed in one operation.
const MAX_CLAIMS_PER_OP: usize = 256;
const LOAD_PAGE: i64 = 10_000;

/// What became of one block of an applied message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockStatus {
    /// Took effect.
    Applied(Effect),
    /// Part of its chain, but without effect (and why).
    Void(VoidReason),
    /// Stored; waits for its previous block or its source.
    Waiting,
    /// Stored, but at or above its account's equivocation height: it never takes effect.
    Frozen,
}

/// Result of [`Ledger::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// (block hash, newly stored, status) for each block the message carried.
    pub blocks: Vec<(Hash32, bool, BlockStatus)>,
    /// Set when this message exposed an equivocation: (account, fork height).
    pub equivocation: Option<(Address, u64)>,
}

pub(crate) struct Inner {
    pub(crate) state: LedgerState,
    next_seq: i64,
    next_rejection: i64,
}

/// The node's view of the network ledger.
pub struct Ledger {
    store: Store,
    pub(crate) inner: Mutex<Inner>,
}

impl Ledger {
    /// Opens `<data_dir>/ledger.db` (SQLite, WAL).
    pub async fn open_data_dir(data_dir: &Path, rules: Rules) -> Result<Ledger, LedgerError> {
        Self::open(&sqlite_url(data_dir), rules).await
    }

    /// Opens a database URL (`sqlite://...` or `postgres://...`), runs migrations and derives
    /// the state from every stored block (signatures were checked when they were stored).
    /// `rules` are the network's (see [`Rules`]): every node of a network must use the same.
    pub async fn open(database_url: &str, rules: Rules) -> Result<Ledger, LedgerError> {
        let store = Store::open(database_url).await?;
        let (max_seq, max_rej) = store.max_seqs().await?;
        let mut state = LedgerState::with_rules(rules);
        let mut after = 0;
        loop {
            let page = store.blocks_since(after, LOAD_PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (_, block) in page {
                let hash = block.hash();
                state.insert(block, hash);
            }
        }
        tracing::info!(blocks = state.block_count(), backend = ?store.backend(), "ledger loaded");
        Ok(Ledger {
            store,
            inner: Mutex::new(Inner {
                state,
                next_seq: max_seq + 1,
                next_rejection: max_rej + 1,
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The network rules this ledger applies.
    pub async fn rules(&self) -> Rules {
        *self.inner.lock().await.state.rules()
    }

    /// How many training steps `receipts` attest for `address`'s next proof beyond what its
    /// earlier rewards counted, and the epoch of its last reward (receipts of earlier epochs
    /// count nothing).
    pub async fn attested_steps(
        &self,
        address: &Address,
        receipts: &[super::receipt::SignedReceipt],
    ) -> (u64, Option<u64>) {
        let (a, last) = self.attested(address, receipts).await;
        (a.steps, last)
    }

    /// The inference tokens that payers' signed payments (claimed on `address`'s chain) let a
    /// proof of `epoch` claim: at most this is rewarded (see `inference.rs`).
    pub async fn paid_inference_tokens(&self, address: &Address, epoch: u64) -> u64 {
        let inner = self.inner.lock().await;
        inner
            .state
            .chain_account(address)
            .map_or(0, |a| a.inference_credit.available(epoch))
    }

    /// What `receipts` attest for `address`'s next proof beyond what its earlier rewards
    /// counted (training steps and uptime), and the epoch of its last reward.
    pub async fn attested(
        &self,
        address: &Address,
        receipts: &[super::receipt::SignedReceipt],
    ) -> (super::receipt::Attested, Option<u64>) {
        let inner = self.inner.lock().await;
        let k = inner.state.rules().uptime_attesters as usize;
        match inner.state.chain_account(address) {
            Some(a) => (
                super::receipt::attested(receipts, &a.receipt_counts, a.last_reward_epoch, k),
                a.last_reward_epoch,
            ),
            None => (
                super::receipt::attested(receipts, &Default::default(), None, k),
                None,
            ),
        }
    }

    /// Applies a gossiped message. Idempotent: a block already held is reported, not re-applied.
    /// Forged signatures and malformed blocks are errors and are not stored.
    pub async fn apply(&self, msg: &Message, now: i64) -> Result<Applied, LedgerError> {
        if let Message::Evidence(e) = msg {
            e.verify()?;
        }
        let mut checked = Vec::new();
        for block in msg.blocks() {
            let hash = block.verify_stateless()?;
            if block.block.timestamp > now + MAX_BLOCK_FUTURE_SECONDS {
                return Err(LedgerError::FutureTimestamp {
                    timestamp: block.block.timestamp,
                    now,
                    max_ahead: MAX_BLOCK_FUTURE_SECONDS,
                });
            }
            checked.push((hash, block));
        }
        let mut inner = self.inner.lock().await;
        let mut fresh: Vec<(Hash32, &SignedBlock)> = Vec::new();
        // Blocks of frozen accounts are stored too: one of them may be the source of another
        // account's receive, and every node must judge that receive the same way.
        for (hash, block) in &checked {
            if !inner.state.contains(hash) && !fresh.iter().any(|(h, _)| h == hash) {
                fresh.push((*hash, block));
            }
        }
        if !fresh.is_empty() {
            let seq = inner.next_seq;
            self.store.insert_blocks(seq, &fresh, now).await?;
            inner.next_seq += fresh.len() as i64;
        }
        let mut equivocation = None;
        for (hash, block) in &fresh {
            if let Inserted::New { fork: true } = inner.state.insert((*block).clone(), *hash) {
                let f = inner
                    .state
                    .account(&block.block.account)
                    .and_then(|a| a.fork_height);
                equivocation = f.map(|f| (block.block.account, f));
                tracing::warn!(account = %block.block.account, fork_height = ?f, "equivocation: account frozen");
            }
        }
        let blocks = checked
            .iter()
            .map(|(hash, block)| {
                let new = fresh.iter().any(|(h, _)| h == hash);
                (*hash, new, status_of(&inner.state, hash, block))
            })
            .collect();
        Ok(Applied {
            blocks,
            equivocation,
        })
    }

    /// Blocks stored after `after_seq` (arrival order), for gossip sync: (seq, message).
    pub async fn messages_since(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Message)>, LedgerError> {
        let blocks = self
            .store
            .blocks_since(after_seq, limit.clamp(1, LOAD_PAGE))
            .await?;
        Ok(blocks
            .into_iter()
            .map(|(s, b)| (s, Message::Block(b)))
            .collect())
    }

    /// Sequence number of the last stored block (0 when none): where a gossip push starts.
    pub async fn last_seq(&self) -> i64 {
        self.inner.lock().await.next_seq - 1
    }

    /// Hash of the derived state; equal on nodes holding the same blocks.
    pub async fn root_hash(&self) -> Hash32 {
        self.inner.lock().await.state.root_hash()
    }

    /// Checks minted == available + staked + pending (cooldown + unclaimed) + burned.
    pub async fn check_invariant(&self) -> Result<(), String> {
        self.inner.lock().await.state.check_invariant()
    }

    /// (minted, burned) in units.
    pub async fn totals(&self) -> (u128, u128) {
        let inner = self.inner.lock().await;
        (inner.state.minted(), inner.state.burned())
    }

    /// Runs `f` on the derived state (diagnostics and tests).
    pub async fn with_state<R>(&self, f: impl FnOnce(&LedgerState) -> R) -> R {
        f(&self.inner.lock().await.state)
    }

    /// Balances of `address` as of `now`.
    pub async fn balance(&self, address: &Address, now: i64) -> Balance {
        let inner = self.inner.lock().await;
        balance_of(&inner.state, address, now)
    }

    /// Claims every unclaimed transfer to the wallet (receive blocks, one transaction).
    pub async fn claim_incoming(
        &self,
        wallet: &Wallet,
        now: i64,
    ) -> Result<Vec<Hash32>, LedgerError> {
        let mut inner = self.inner.lock().await;
        self.claim_locked(&mut inner, wallet, now).await
    }

    async fn claim_locked(
        &self,
        inner: &mut Inner,
        wallet: &Wallet,
        now: i64,
    ) -> Result<Vec<Hash32>, LedgerError> {
        let addr = wallet.address();
        let mut incoming = inner.state.incoming(&addr);
        incoming.truncate(MAX_CLAIMS_PER_OP);
        if incoming.is_empty() || inner.state.account(&addr).is_some_and(|a| a.is_frozen()) {
            return Ok(Vec::new());
        }
        let ops = incoming
            .iter()
            .map(|(src, _)| Op::Receive { source: *src })
            .collect();
        self.commit_local(inner, wallet, ops, now).await
    }

    /// Signs and commits a run of blocks on the wallet's chain, in one transaction.
    pub(crate) async fn commit_local(
        &self,
        inner: &mut Inner,
        wallet: &Wallet,
        ops: Vec<Op>,
        now: i64,
    ) -> Result<Vec<Hash32>, LedgerError> {
        let addr = wallet.address();
        if let Some(a) = inner.state.account(&addr)
            && let Some(f) = a.fork_height
        {
            return Err(LedgerError::AccountFrozen {
                account: addr.to_string(),
                fork_height: f,
            });
        }
        if inner.state.next_slot_taken(&addr) {
            return Err(LedgerError::InvalidMessage {
                reason: "this wallet's chain has a stored block still waiting for its dependencies"
                    .into(),
            });
        }
        let (mut previous, mut height, last_ts) = inner
            .state
            .chain_account(&addr)
            .map_or((Hash32::ZERO, 0, 0), |a| (a.head, a.next_height, a.last_ts));
        let timestamp = now.max(last_ts);
        let mut signed = Vec::new();
        for op in ops {
            let block = SignedBlock::sign(
                Block {
                    account: addr,
                    height,
                    previous,
                    timestamp,
                    op,
                },
                wallet,
            );
            let hash = block.verify_stateless()?;
            previous = hash;
            height += 1;
            signed.push((hash, block));
        }
        let refs: Vec<(Hash32, &SignedBlock)> = signed.iter().map(|(h, b)| (*h, b)).collect();
        let seq = inner.next_seq;
        self.store.insert_blocks(seq, &refs, now).await?;
        inner.next_seq += refs.len() as i64;
        let mut hashes = Vec::new();
        for (hash, block) in signed {
            inner.state.insert(block, hash);
            match inner.state.outcome(&hash) {
                Some(Outcome::Applied(_)) => {}
                other => tracing::error!(?hash, ?other, "own block did not apply as pre-checked"),
            }
            hashes.push(hash);
        }
        Ok(hashes)
    }

    /// Sends `amount` units (plus the 0.1% fee, burned) to `to`.
    pub async fn send(
        &self,
        wallet: &Wallet,
        to: Address,
        amount: u64,
        memo: &str,
        now: i64,
    ) -> Result<SendReceipt, LedgerError> {
        check_amount(amount)?;
        if to == wallet.address() {
            return Err(LedgerError::SelfTransfer {
                address: to.to_string(),
            });
        }
        if memo.len() > MAX_MEMO_BYTES {
            return Err(LedgerError::MemoTooLong {
                len: memo.len(),
                max: MAX_MEMO_BYTES,
            });
        }
        let mut inner = self.inner.lock().await;
        ensure_active(&inner.state, &wallet.address())?;
        self.claim_locked(&mut inner, wallet, now).await?;
        let fee = transfer_fee(amount);
        let available = spendable(&inner.state, &wallet.address(), now);
        let required = amount + fee;
        if available < required {
            return Err(LedgerError::InsufficientBalance {
                required,
                available,
            });
        }
        let op = Op::Send {
            to,
            amount,
            fee,
            memo: memo.to_string(),
        };
        let hash = self.commit_local(&mut inner, wallet, vec![op], now).await?[0];
        let timestamp = inner.state.block(&hash).map_or(now, |b| b.block.timestamp);
        Ok(SendReceipt {
            transaction_id: format!("tx_{}", hash.to_hex()),
            from: wallet.address(),
            to,
            amount,
            fee,
            memo: memo.to_string(),
            status: "confirmed",
            timestamp,
        })
    }

    /// Stakes `amount` units for `duration_days` (1 to 365).
    pub async fn stake(
        &self,
        wallet: &Wallet,
        amount: u64,
        duration_days: i64,
        now: i64,
    ) -> Result<StakeReceipt, LedgerError> {
        check_amount(amount)?;
        if !(i64::from(MIN_STAKE_DAYS)..=i64::from(MAX_STAKE_DAYS)).contains(&duration_days) {
            return Err(LedgerError::InvalidDuration {
                days: duration_days,
                min: MIN_STAKE_DAYS,
                max: MAX_STAKE_DAYS,
            });
        }
        let mut inner = self.inner.lock().await;
        ensure_active(&inner.state, &wallet.address())?;
        self.claim_locked(&mut inner, wallet, now).await?;
        let available = spendable(&inner.state, &wallet.address(), now);
        if available < amount {
            return Err(LedgerError::InsufficientBalance {
                required: amount,
                available,
            });
        }
        let op = Op::Stake {
            amount,
            duration_days: duration_days as u32,
        };
        let hash = self.commit_local(&mut inner, wallet, vec![op], now).await?[0];
        let b = balance_of(&inner.state, &wallet.address(), now);
        let stake = b
            .staking
            .clone()
            .ok_or(LedgerError::Overflow { op: "stake" })?;
        Ok(StakeReceipt {
            transaction_id: format!("tx_{}", hash.to_hex()),
            stake,
            available: b.available,
            staked: b.staked,
        })
    }

    /// Starts the 7-day cooldown for `amount` staked units; refused before the unlock date.
    pub async fn unstake(
        &self,
        wallet: &Wallet,
        amount: u64,
        now: i64,
    ) -> Result<UnstakeReceipt, LedgerError> {
        check_amount(amount)?;
        let mut inner = self.inner.lock().await;
        let addr = wallet.address();
        ensure_active(&inner.state, &addr)?;
        let (staked, unlock_at, last_ts) = inner
            .state
            .account(&addr)
            .map_or((0, 0, 0), |a| (a.staked, a.unlock_at, a.last_ts));
        if amount > staked {
            return Err(LedgerError::InsufficientStake {
                requested: amount,
                staked,
            });
        }
        if now.max(last_ts) < unlock_at {
            return Err(LedgerError::StakeLocked { unlock_at });
        }
        let hash = self
            .commit_local(&mut inner, wallet, vec![Op::Unstake { amount }], now)
            .await?[0];
        let available_at = match inner.state.outcome(&hash) {
            Some(Outcome::Applied(Effect::Unstaking { available_at, .. })) => *available_at,
            _ => now + UNSTAKE_COOLDOWN_DAYS * super::rewards::SECONDS_PER_DAY,
        };
        Ok(UnstakeReceipt {
            transaction_id: format!("tx_{}", hash.to_hex()),
            amount,
            cooldown_days: UNSTAKE_COOLDOWN_DAYS,
            available_at,
        })
    }

    /// History of `address`, newest first: the transfers to it not claimed yet (pending,
    /// newest first) above its chain's entries.
    pub async fn transactions(
        &self,
        address: &Address,
        limit: usize,
        offset: usize,
    ) -> TransactionPage {
        let inner = self.inner.lock().await;
        let history = inner
            .state
            .account(address)
            .map(|a| a.history.as_slice())
            .unwrap_or(&[]);
        let mut pending: Vec<HistoryEntry> = inner
            .state
            .incoming(address)
            .iter()
            .filter_map(|(source, f)| pending_entry(&inner.state, source, f))
            .collect();
        pending.sort_by(|a, b| b.timestamp.cmp(&a.timestamp).then_with(|| a.id.cmp(&b.id)));
        let total = pending.len() + history.len();
        TransactionPage {
            transactions: pending
                .into_iter()
                .chain(history.iter().rev().cloned())
                .skip(offset)
                .take(limit)
                .collect(),
            total,
            limit,
            offset,
        }
    }

    /// Verifies this node's proof against the local clock and the rules, and mints its reward
    /// on the wallet's chain. Refused proofs are recorded with their reason.
    pub async fn submit_proof(
        &self,
        wallet: &Wallet,
        proof: SignedProof,
        now: i64,
    ) -> Result<ProofAccepted, LedgerError> {
        let mut inner = self.inner.lock().await;
        let addr = wallet.address();
        ensure_active(&inner.state, &addr)?;
        let last_ts = inner.state.account(&addr).map_or(0, |a| a.last_ts);
        let verdict = if proof.proof.node_id != addr {
            Err(RejectReason::SignerMismatch)
        } else {
            proof
                .check_live(now)
                .and_then(|_| check_age(proof.proof.timestamp, now.max(last_ts)))
                .and_then(|_| match inner.state.chain_account(&addr) {
                    Some(a) => a.expected_reward(&proof),
                    None => super::account::Account::new(addr, None, *inner.state.rules())
                        .expected_reward(&proof),
                })
                .and_then(|(amount, _)| {
                    if amount == 0 {
                        Err(RejectReason::Implausible("no reward-bearing work".into()))
                    } else {
                        Ok(amount)
                    }
                })
        };
        let amount = match verdict {
            Ok(a) => a,
            Err(reason) => {
                self.record_rejection(&mut inner, &proof, &reason, now)
                    .await?;
                return Err(LedgerError::ProofRejected {
                    proof_id: proof.id_string(),
                    reason: reason.to_string(),
                });
            }
        };
        let proof_id = proof.id_string();
        let (embedding, head) = (proof.proof.holds_embedding, proof.proof.holds_lm_head);
        let hash = self
            .commit_local(&mut inner, wallet, vec![Op::Reward { proof, amount }], now)
            .await?[0];
        Ok(ProofAccepted {
            proof_id,
            reward: amount,
            transaction_id: format!("tx_{}", hash.to_hex()),
            details: serde_json::json!({ "role": super::account::role_of(embedding, head) }),
        })
    }

    /// Checks a proof a peer broadcast (stateless rules and age against `now`); a refused one is
    /// recorded against that peer with its reason.
    pub async fn check_peer_proof(&self, proof: &SignedProof, now: i64) -> Result<(), LedgerError> {
        if let Err(reason) = proof.check_live(now) {
            let mut inner = self.inner.lock().await;
            self.record_rejection(&mut inner, proof, &reason, now)
                .await?;
            return Err(LedgerError::ProofRejected {
                proof_id: proof.id_string(),
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    async fn record_rejection(
        &self,
        inner: &mut Inner,
        proof: &SignedProof,
        reason: &RejectReason,
        now: i64,
    ) -> Result<(), LedgerError> {
        tracing::debug!(proof = %proof.id_string(), reason = %reason, "proof rejected");
        let id = inner.next_rejection;
        self.store
            .insert_rejection(
                id,
                &Rejection {
                    proof_id: proof.id_string(),
                    node_id: proof.proof.node_id.to_checksum(),
                    proof_type: proof.proof.proof_type.as_str().to_string(),
                    reason_code: reason.code().to_string(),
                    reason: reason.to_string(),
                    proof_timestamp: proof.proof.timestamp,
                    recorded_at: now,
                },
            )
            .await?;
        inner.next_rejection += 1;
        Ok(())
    }

    /// Proofs of `address` (rewarded, void in the ledger, and refused locally), newest first.
    pub async fn proofs(
        &self,
        address: &Address,
        limit: usize,
        offset: usize,
    ) -> Result<ProofPage, LedgerError> {
        let rejections = self.store.rejections(&address.to_checksum()).await?;
        let inner = self.inner.lock().await;
        let mut all: Vec<ProofEntry> = inner
            .state
            .account(address)
            .map(|a| a.proofs.iter().map(ProofEntry::from).collect())
            .unwrap_or_default();
        let mut stats = ProofStats::default();
        let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
        for p in inner
            .state
            .account(address)
            .map(|a| a.proofs.as_slice())
            .unwrap_or(&[])
        {
            if p.verified {
                stats.total_verified += 1;
                stats.total_reward += p.reward;
            } else if let Some(code) = p.reason_code {
                *reasons.entry(code.to_string()).or_default() += 1;
            }
        }
        for r in &rejections {
            *reasons.entry(r.reason_code.clone()).or_default() += 1;
            all.push(ProofEntry {
                id: r.proof_id.clone(),
                proof_type: r.proof_type.clone(),
                layer: None,
                timestamp: r.proof_timestamp,
                verified: false,
                reward: 0,
                reason: Some(r.reason.clone()),
                attested_by: Vec::new(),
                uptime_attested_by: Vec::new(),
                uptime_seconds: 0,
                judged_by: Vec::new(),
            });
        }
        stats.total_submitted = all.len();
        stats.rejected_by_reason = reasons.into_iter().collect();
        all.sort_by(|a, b| b.timestamp.cmp(&a.timestamp).then_with(|| a.id.cmp(&b.id)));
        Ok(ProofPage {
            proofs: all.into_iter().skip(offset).take(limit).collect(),
            stats,
        })
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// The history line of a transfer to its recipient before the recipient claims it.
fn pending_entry(state: &LedgerState, source: &Hash32, f: &InFlight) -> Option<HistoryEntry> {
    let send = state.block(source)?;
    let memo = match &send.block.op {
        Op::Send { memo, .. } => Some(memo.clone()),
        _ => None,
    };
    Some(HistoryEntry {
        id: format!("tx_{}", source.to_hex()),
        kind: "receive",
        amount: i128::from(f.amount),
        fee: 0,
        counterparty: Some(f.from),
        memo,
        timestamp: send.block.timestamp,
        rejected: None,
        pending: true,
        details: serde_json::json!({ "source": format!("tx_{}", source.to_hex()) }),
    })
}

fn ensure_active(state: &LedgerState, address: &Address) -> Result<(), LedgerError> {
    match state.account(address).and_then(|a| a.fork_height) {
        Some(fork_height) => Err(LedgerError::AccountFrozen {
            account: address.to_string(),
            fork_height,
        }),
        None => Ok(()),
    }
}

fn check_amount(amount: u64) -> Result<(), LedgerError> {
    if amount == 0 || amount > MAX_AMOUNT {
        return Err(LedgerError::InvalidAmount {
            reason: format!(
                "amount must be between {} and {} NEURO",
                format_neuro(1),
                format_neuro(MAX_AMOUNT)
            ),
        });
    }
    Ok(())
}

fn spendable(state: &LedgerState, address: &Address, now: i64) -> u64 {
    state
        .account(address)
        .map_or(0, |a| a.settled(now.max(a.last_ts)).available)
}

fn status_of(state: &LedgerState, hash: &Hash32, block: &SignedBlock) -> BlockStatus {
    let cut = state
        .account(&block.block.account)
        .and_then(|a| a.fork_height)
        .is_some_and(|f| block.block.height >= f);
    match state.outcome(hash) {
        Some(Outcome::Applied(e)) => BlockStatus::Applied(e.clone()),
        Some(Outcome::Void(r)) => BlockStatus::Void(r.clone()),
        None if cut => BlockStatus::Frozen,
        None => BlockStatus::Waiting,
    }
}

fn balance_of(state: &LedgerState, address: &Address, now: i64) -> Balance {
    let incoming: u64 = state.incoming(address).iter().map(|(_, f)| f.amount).sum();
    let Some(a) = state.account(address) else {
        return Balance {
            address: *address,
            available: 0,
            staked: 0,
            pending: incoming,
            cooling: 0,
            cooling_until: None,
            unclaimed: incoming,
            total: incoming,
            staking: None,
            frozen_at_height: None,
            pending_rewards: 0,
            rewards_next_release_at: None,
            rewards_released_at: None,
        };
    };
    let s = a.settled(now);
    let pending = s.unbonding + incoming + s.pending_rewards;
    let staking = (a.staked > 0).then(|| Staking {
        amount: a.staked,
        duration_days: a.stake_days,
        start_at: a.stake_start,
        unlock_at: a.unlock_at,
        multiplier: stake_multiplier(a.staked, a.stake_days),
    });
    Balance {
        address: *address,
        available: s.available,
        staked: a.staked,
        pending,
        cooling: s.unbonding,
        cooling_until: (s.unbonding > 0).then_some(a.unbond_at),
        unclaimed: incoming,
        total: s.available + a.staked + pending,
        staking,
        frozen_at_height: a.fork_height,
        pending_rewards: s.pending_rewards,
        rewards_next_release_at: s.next_release,
        rewards_released_at: s.last_release,
    }
}
