//! Wallet and proof endpoints. Each acts for the account the caller's token is bound to;
//! amounts are NEURO as JSON numbers (integer units of 10^-9 NEURO inside).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;
use crate::api::AppState;
use crate::auth::Caller;
use neuroshard_ledger::amount::signed_units_to_neuro;
use neuroshard_ledger::views::{date_string, timestamp_string};
use neuroshard_ledger::{Address, HistoryEntry, parse_neuro_f64, units_to_neuro};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Runs a ledger write on a task of its own, so a client that hangs up or times out cannot
/// cancel it between its database commit and the in-memory update (a request future is
/// dropped when its connection closes). A write cut there was stored but unknown to the
/// state: the account's next write reused its sequence number and was refused, as were all
/// later ones, until a restart.
async fn ledger_write<T: Send + 'static>(
    write: impl std::future::Future<Output = Result<T, neuroshard_ledger::LedgerError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(write).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::internal(format!("ledger write task: {e}"))),
    }
}

fn wallet_of(
    state: &AppState,
    caller: &Caller,
) -> Result<std::sync::Arc<neuroshard_ledger::Wallet>, ApiError> {
    state
        .keyring
        .wallet(&caller.account)
        .map_err(ApiError::internal)
}

#[derive(Serialize, ToSchema)]
pub struct BalanceResponse {
    pub address: String,
    pub balances: Balances,
    /// Always present: amount 0, duration 0, null dates and multiplier 1 when nothing is
    /// staked.
    pub staking: StakingView,
    /// What `pending` is made of and when it is released.
    pub pending: PendingView,
    /// Set when the account equivocated: its funds are burned and it is frozen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_at_height: Option<u64>,
}

/// The parts of `balances.pending`.
#[derive(Serialize, ToSchema)]
pub struct PendingView {
    /// Unstaked NEURO in its cooldown.
    pub cooling: f64,
    /// RFC 3339 (UTC) end of the cooldown, when `cooling` becomes available; null when
    /// nothing is cooling.
    pub cooling_until: Option<String>,
    /// Transfers to this account its node has not claimed yet (it claims them as they arrive).
    pub unclaimed: f64,
    /// Rewards still in their challenge window (a fraud proof can still void them).
    pub rewards: f64,
    /// RFC 3339 (UTC) release of the oldest pending reward; null when none.
    pub rewards_next_release_at: Option<String>,
    /// RFC 3339 (UTC) release of the newest pending reward (all of them by then); null when
    /// none.
    pub rewards_released_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Balances {
    pub available: f64,
    pub staked: f64,
    /// Unstaked funds in their cooldown, transfers not yet claimed and rewards in their
    /// challenge window (the parts: `pending`).
    pub pending: f64,
    pub total: f64,
}

#[derive(Serialize, ToSchema)]
pub struct StakingView {
    /// 0 when nothing is staked.
    pub amount: f64,
    /// 0 when nothing is staked.
    pub duration_days: u32,
    /// YYYY-MM-DD (UTC); null when nothing is staked.
    pub start_date: Option<String>,
    /// YYYY-MM-DD (UTC); null when nothing is staked.
    pub unlock_date: Option<String>,
    /// 1.00 when nothing is staked.
    pub multiplier: f64,
}

fn staking_view(s: &neuroshard_ledger::Staking) -> StakingView {
    StakingView {
        amount: units_to_neuro(s.amount),
        duration_days: s.duration_days,
        start_date: Some(date_string(s.start_at)),
        unlock_date: Some(date_string(s.unlock_at)),
        multiplier: (s.multiplier * 100.0).round() / 100.0,
    }
}

/// The `staking` object of an account that stakes nothing.
fn no_stake() -> StakingView {
    StakingView {
        amount: 0.0,
        duration_days: 0,
        start_date: None,
        unlock_date: None,
        multiplier: 1.0,
    }
}

/// `GET /wallet/balance`.
#[utoipa::path(get, path = "/api/v1/wallet/balance", tag = "wallet", security(("bearer" = [])),
    responses((status = 200, description = "Balances of the token's account", body = BalanceResponse),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn balance(State(state): State<AppState>, caller: Caller) -> Json<BalanceResponse> {
    let b = state.ledger.balance(&caller.account, now()).await;
    Json(BalanceResponse {
        address: b.address.to_checksum(),
        balances: Balances {
            available: units_to_neuro(b.available),
            staked: units_to_neuro(b.staked),
            pending: units_to_neuro(b.pending),
            total: units_to_neuro(b.total),
        },
        staking: b.staking.as_ref().map_or_else(no_stake, staking_view),
        pending: PendingView {
            cooling: units_to_neuro(b.cooling),
            cooling_until: b.cooling_until.map(timestamp_string),
            unclaimed: units_to_neuro(b.unclaimed),
            rewards: units_to_neuro(b.pending_rewards),
            rewards_next_release_at: b.rewards_next_release_at.map(timestamp_string),
            rewards_released_at: b.rewards_released_at.map(timestamp_string),
        },
        frozen_at_height: b.frozen_at_height,
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// 0x + 40 hex digits.
    pub to: String,
    /// NEURO, at most 9 decimals.
    pub amount: f64,
    #[serde(default)]
    pub memo: String,
}

#[derive(Serialize, ToSchema)]
pub struct SendResponse {
    pub transaction_id: String,
    pub from: String,
    pub to: String,
    pub amount: f64,
    /// Burned: 0.1% of the amount.
    pub fee: f64,
    pub memo: String,
    /// confirmed: stored durably and applied.
    pub status: String,
    pub timestamp: String,
}

/// `POST /wallet/send`.
#[utoipa::path(post, path = "/api/v1/wallet/send", tag = "wallet", security(("bearer" = [])),
    request_body = SendRequest,
    responses((status = 200, description = "Transfer confirmed", body = SendResponse),
              (status = 400, description = "Invalid address, amount or memo", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 402, description = "Not enough NEURO", body = super::error::ErrorBody),
              (status = 503, description = "STORAGE_ERROR: the disk is full or read-only; nothing was changed", body = super::error::ErrorBody)))]
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> Result<Json<SendResponse>, ApiError> {
    let Json(req) = body?;
    let to = Address::parse(&req.to)?;
    let amount = parse_neuro_f64(req.amount)?;
    let wallet = wallet_of(&state, &caller)?;
    let ledger = state.ledger.clone();
    let r = ledger_write(async move { ledger.send(&wallet, to, amount, &req.memo, now()).await })
        .await?;
    // A transfer between two wallets of this node is the recipient's at once too.
    crate::wallets::claim_now(&state.keyring, &state.ledger, vec![to]);
    Ok(Json(SendResponse {
        transaction_id: r.transaction_id,
        from: r.from.to_checksum(),
        to: r.to.to_checksum(),
        amount: units_to_neuro(r.amount),
        fee: units_to_neuro(r.fee),
        memo: r.memo,
        status: r.status.into(),
        timestamp: timestamp_string(r.timestamp),
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// 1 to 1000, default 10 (proofs: 50).
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

fn page(q: &PageQuery, default: usize) -> Result<(usize, usize), ApiError> {
    let limit = q.limit.unwrap_or(default);
    if !(1..=1000).contains(&limit) {
        return Err(
            ApiError::bad_request(format!("limit {limit} is not in 1..=1000"))
                .with_details(json!({"field": "limit"})),
        );
    }
    Ok((limit, q.offset.unwrap_or(0)))
}

#[derive(Serialize, ToSchema)]
pub struct TransactionsResponse {
    pub transactions: Vec<TransactionView>,
    /// All entries of the account, not only this page.
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Serialize, ToSchema)]
pub struct TransactionView {
    pub id: String,
    /// send, receive, reward, stake, unstake.
    #[serde(rename = "type")]
    pub kind: String,
    /// Signed NEURO: + received or rewarded, - sent or staked; 0 when rejected.
    pub amount: f64,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fee: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// confirmed; pending for a transfer to this account not claimed yet (its id is the
    /// send's); rejected (with `reason`) when the block took no effect.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
}

/// Unit amounts and unix times in history details, as NEURO and dates.
fn details_view(details: &Value) -> Value {
    let mut d = details.clone();
    if let Some(map) = d.as_object_mut() {
        for key in ["staked", "unstaked", "claimed"] {
            if let Some(units) = map.get(key).and_then(Value::as_u64) {
                map.insert(key.into(), json!(units_to_neuro(units)));
            }
        }
        for (key, name) in [
            ("unlock_at", "unlock_date"),
            ("available_at", "available_date"),
        ] {
            if let Some(t) = map.remove(key).and_then(|v| v.as_i64()) {
                map.insert(name.into(), json!(date_string(t)));
            }
        }
    }
    d
}

fn transaction_view(e: &HistoryEntry) -> TransactionView {
    let counterparty = e.counterparty.map(|a| a.to_checksum());
    TransactionView {
        id: e.id.clone(),
        kind: e.kind.into(),
        amount: signed_units_to_neuro(e.amount),
        timestamp: timestamp_string(e.timestamp),
        to: counterparty.clone().filter(|_| e.kind == "send"),
        from: counterparty.filter(|_| e.kind == "receive"),
        fee: (e.kind == "send").then(|| units_to_neuro(e.fee)),
        memo: e.memo.clone(),
        status: if e.rejected.is_some() {
            "rejected"
        } else if e.pending {
            "pending"
        } else {
            "confirmed"
        }
        .into(),
        reason: e.rejected.clone(),
        details: details_view(&e.details),
    }
}

/// `GET /wallet/transactions?limit&offset`, newest first.
#[utoipa::path(get, path = "/api/v1/wallet/transactions", tag = "wallet", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, description = "History of the token's account", body = TransactionsResponse),
              (status = 400, description = "Bad limit or offset", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn transactions(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<TransactionsResponse>, ApiError> {
    let Query(q) = query?;
    let (limit, offset) = page(&q, 10)?;
    let p = state
        .ledger
        .transactions(&caller.account, limit, offset)
        .await;
    Ok(Json(TransactionsResponse {
        transactions: p.transactions.iter().map(transaction_view).collect(),
        total: p.total,
        limit: p.limit,
        offset: p.offset,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StakeRequest {
    pub amount: f64,
    /// 1 to 365.
    pub duration_days: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StakeResponse {
    pub success: bool,
    pub transaction_id: String,
    pub stake: StakingView,
    pub new_balance: NewBalance,
}

#[derive(Serialize, ToSchema)]
pub struct NewBalance {
    pub available: f64,
    pub staked: f64,
}

/// `POST /wallet/stake`.
#[utoipa::path(post, path = "/api/v1/wallet/stake", tag = "wallet", security(("bearer" = [])),
    request_body = StakeRequest,
    responses((status = 200, description = "Staked", body = StakeResponse),
              (status = 400, description = "Invalid amount or duration", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 402, description = "Not enough NEURO", body = super::error::ErrorBody),
              (status = 503, description = "STORAGE_ERROR: the disk is full or read-only; nothing was changed", body = super::error::ErrorBody)))]
pub async fn stake(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<StakeRequest>, JsonRejection>,
) -> Result<Json<StakeResponse>, ApiError> {
    let Json(req) = body?;
    let amount = parse_neuro_f64(req.amount)?;
    let wallet = wallet_of(&state, &caller)?;
    let ledger = state.ledger.clone();
    let days = req.duration_days;
    let r = ledger_write(async move { ledger.stake(&wallet, amount, days, now()).await }).await?;
    Ok(Json(StakeResponse {
        success: true,
        transaction_id: r.transaction_id,
        stake: staking_view(&r.stake),
        new_balance: NewBalance {
            available: units_to_neuro(r.available),
            staked: units_to_neuro(r.staked),
        },
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnstakeRequest {
    pub amount: f64,
}

#[derive(Serialize, ToSchema)]
pub struct UnstakeResponse {
    pub success: bool,
    pub transaction_id: String,
    pub unstake: UnstakeView,
}

#[derive(Serialize, ToSchema)]
pub struct UnstakeView {
    pub amount: f64,
    pub cooldown_days: i64,
    /// YYYY-MM-DD (UTC) when the funds become available.
    pub available_date: String,
}

/// `POST /wallet/unstake`.
#[utoipa::path(post, path = "/api/v1/wallet/unstake", tag = "wallet", security(("bearer" = [])),
    request_body = UnstakeRequest,
    responses((status = 200, description = "Cooldown started", body = UnstakeResponse),
              (status = 400, description = "Invalid amount", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 402, description = "Not that much staked", body = super::error::ErrorBody),
              (status = 409, description = "Stake still locked", body = super::error::ErrorBody),
              (status = 503, description = "STORAGE_ERROR: the disk is full or read-only; nothing was changed", body = super::error::ErrorBody)))]
pub async fn unstake(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<UnstakeRequest>, JsonRejection>,
) -> Result<Json<UnstakeResponse>, ApiError> {
    let Json(req) = body?;
    let amount = parse_neuro_f64(req.amount)?;
    let wallet = wallet_of(&state, &caller)?;
    let ledger = state.ledger.clone();
    let r = ledger_write(async move { ledger.unstake(&wallet, amount, now()).await }).await?;
    Ok(Json(UnstakeResponse {
        success: true,
        transaction_id: r.transaction_id,
        unstake: UnstakeView {
            amount: units_to_neuro(r.amount),
            cooldown_days: r.cooldown_days,
            available_date: date_string(r.available_at),
        },
    }))
}

#[derive(Serialize, ToSchema)]
pub struct ProofsResponse {
    pub proofs: Vec<ProofView>,
    pub stats: ProofStatsView,
}

#[derive(Serialize, ToSchema)]
pub struct ProofView {
    pub id: String,
    /// uptime, training, inference, data.
    #[serde(rename = "type")]
    pub kind: String,
    /// First layer the proof covers; null for proofs without layers.
    pub layer: Option<u32>,
    pub timestamp: String,
    pub verified: bool,
    pub reward: f64,
    /// Why it earned nothing, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The nodes whose signed receipts of the work (activations, gradients, DiLoCo
    /// contributions they received) back the proof (issue #19).
    pub attested_by: Vec<String>,
    /// The peers whose signed heartbeat receipts back its uptime.
    pub uptime_attested_by: Vec<String>,
    /// Uptime credited, in seconds: at most what peers' heartbeat receipts attest.
    pub uptime_seconds: u64,
    /// Staked verifiers that recomputed a sampled part of the work, with their verdict and
    /// when; the proof is `verified` by others when one of them found it innocent.
    pub verified_by: Vec<VerdictView>,
}

#[derive(Serialize, ToSchema)]
pub struct VerdictView {
    pub verifier: String,
    /// true: the recomputation did not reproduce the claimed work.
    pub guilty: bool,
    pub timestamp: String,
}

#[derive(Serialize, ToSchema)]
pub struct ProofStatsView {
    pub total_submitted: usize,
    pub total_verified: usize,
    pub total_reward: f64,
    /// Refused proofs counted by reason code.
    #[schema(value_type = Object)]
    pub rejected_by_reason: Value,
}

/// `GET /proofs?limit&offset`: the proofs of the token's account, newest first.
#[utoipa::path(get, path = "/api/v1/proofs", tag = "wallet", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, description = "Proof history", body = ProofsResponse),
              (status = 400, description = "Bad limit or offset", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn proofs(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<ProofsResponse>, ApiError> {
    let Query(q) = query?;
    let (limit, offset) = page(&q, 50)?;
    let p = state.ledger.proofs(&caller.account, limit, offset).await?;
    Ok(Json(ProofsResponse {
        proofs: p
            .proofs
            .into_iter()
            .map(|e| ProofView {
                id: e.id,
                kind: e.proof_type,
                layer: e.layer,
                timestamp: timestamp_string(e.timestamp),
                verified: e.verified,
                reward: units_to_neuro(e.reward),
                reason: e.reason,
                attested_by: e.attested_by.iter().map(|a| a.to_checksum()).collect(),
                uptime_attested_by: e
                    .uptime_attested_by
                    .iter()
                    .map(|a| a.to_checksum())
                    .collect(),
                uptime_seconds: e.uptime_seconds,
                verified_by: e
                    .judged_by
                    .iter()
                    .map(|(v, guilty, t)| VerdictView {
                        verifier: v.to_checksum(),
                        guilty: *guilty,
                        timestamp: timestamp_string(*t),
                    })
                    .collect(),
            })
            .collect(),
        stats: ProofStatsView {
            total_submitted: p.stats.total_submitted,
            total_verified: p.stats.total_verified,
            total_reward: units_to_neuro(p.stats.total_reward),
            rejected_by_reason: p
                .stats
                .rejected_by_reason
                .into_iter()
                .map(|(k, v)| (k, json!(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(name: &str) -> Value {
        let doc = serde_json::to_value(crate::api::openapi::document()).unwrap();
        doc["components"]["schemas"][name].clone()
    }

    /// `staking` is an object in every balance, as the contract shows it: zero and null dates
    /// when nothing is staked, and the OpenAPI document says so.
    #[test]
    fn staking_is_always_an_object() {
        let view = serde_json::to_value(no_stake()).unwrap();
        assert_eq!(
            view,
            json!({"amount": 0.0, "duration_days": 0, "start_date": null,
                   "unlock_date": null, "multiplier": 1.0})
        );
        let balance = schema("BalanceResponse");
        let required: Vec<&str> = balance["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(required.contains(&"staking"), "{balance}");
        assert_eq!(
            balance["properties"]["staking"]["$ref"], "#/components/schemas/StakingView",
            "{balance}"
        );
        let staking = schema("StakingView");
        for date in ["start_date", "unlock_date"] {
            assert_eq!(
                staking["properties"][date]["type"],
                json!(["string", "null"]),
                "{staking}"
            );
        }
    }

    #[test]
    fn an_unclaimed_transfer_reads_pending() {
        let entry = HistoryEntry {
            id: "tx_ab".into(),
            kind: "receive",
            amount: 1_500_000_000,
            fee: 0,
            counterparty: Some(Address([7; 20])),
            memo: Some("hi".into()),
            timestamp: 1_733_313_600,
            rejected: None,
            pending: true,
            details: json!({"source": "tx_ab"}),
        };
        let v = serde_json::to_value(transaction_view(&entry)).unwrap();
        assert_eq!(v["status"], "pending", "{v}");
        assert_eq!(v["amount"], 1.5, "{v}");
        assert_eq!(v["from"], Address([7; 20]).to_checksum(), "{v}");
        let confirmed = HistoryEntry {
            pending: false,
            ..entry
        };
        assert_eq!(transaction_view(&confirmed).status, "confirmed");
    }
}
