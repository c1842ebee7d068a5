//! What a generation costs and how it is paid.
//!
//! Price: [`PRICE_UNITS_PER_TOKEN`] per prompt and completion token (0.0001 NEURO, so the
//! contract's example of 168 tokens costs 0.0168), sent from the caller's account to the node
//! wallet as a ledger transfer (its 0.1% fee burned on top). Before any work the caller must
//! afford the prompt plus `max_tokens`; afterwards only the tokens produced (delivered, when
//! streaming) are charged. A node serving its own wallet charges nothing. The payment's memo
//! names the tokens it pays for (`neuroshard_ledger::inference::payment_memo`): the ledger
//! rewards the serving node's inference only up to the tokens such payments paid for.

use std::time::Instant;

use super::{Generated, InferenceRequest};
use crate::api::ApiError;
use crate::api::AppState;
use crate::auth::Caller;
use neuroshard_ledger::inference::{INFERENCE_PRICE_UNITS_PER_TOKEN, payment_memo};
use neuroshard_ledger::transfer_fee;

/// 0.0001 NEURO per token (the ledger's, which bounds a payment's tokens by its amount).
pub const PRICE_UNITS_PER_TOKEN: u64 = INFERENCE_PRICE_UNITS_PER_TOKEN;

fn cost_of(tokens: u64) -> u64 {
    tokens.saturating_mul(PRICE_UNITS_PER_TOKEN)
}

/// Refuses with 402 before any work when the caller cannot pay for the prompt plus
/// `max_tokens` (the prompt's token count is bounded by its bytes + 1).
pub(super) async fn check_funds(
    state: &AppState,
    caller: &Caller,
    req: &InferenceRequest,
) -> Result<(), ApiError> {
    if caller.account == state.wallet.address() {
        return Ok(());
    }
    let wallet = state
        .keyring
        .wallet(&caller.account)
        .map_err(ApiError::internal)?;
    let now = chrono::Utc::now().timestamp();
    state.ledger.claim_incoming(&wallet, now).await?;
    let bound = cost_of(req.prompt.len() as u64 + 1 + u64::from(req.max_tokens));
    let required = bound + transfer_fee(bound);
    let available = state.ledger.balance(&caller.account, now).await.available;
    if available < required {
        return Err(neuroshard_ledger::LedgerError::InsufficientBalance {
            required,
            available,
        }
        .into());
    }
    Ok(())
}

/// Charges `tokens` to the caller, paid to the node wallet.
pub(super) async fn charge(state: &AppState, caller: &Caller, id: &str, tokens: u64) -> u64 {
    if caller.account == state.wallet.address() || tokens == 0 {
        return 0;
    }
    let amount = cost_of(tokens);
    let wallet = match state.keyring.wallet(&caller.account) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, request = id, "cannot sign the payment");
            return 0;
        }
    };
    let now = chrono::Utc::now().timestamp();
    match state
        .ledger
        .send(
            &wallet,
            state.wallet.address(),
            amount,
            &payment_memo(tokens, id),
            now,
        )
        .await
    {
        Ok(_) => amount,
        Err(e) => {
            tracing::warn!(error = %e, request = id, "inference payment failed");
            0
        }
    }
}

/// Keeps, for a paid generation (`cost` > 0) of this node's engine, what a verifier needs to
/// check it (`evidence.rs`), in the background: the weights' hash is asked again and the
/// evidence kept only if the weights did not change during the generation (a verifier could
/// not recompute it otherwise).
pub(super) fn keep_evidence(state: &AppState, g: &Generated, cost: u64) {
    let Some(mut ev) = g
        .evidence
        .clone()
        .filter(|e| cost > 0 && !e.model_hash.is_empty())
    else {
        return;
    };
    let (engine, store, ledger) = (
        state.engine.handle(),
        state.evidence.clone(),
        state.ledger.clone(),
    );
    tokio::spawn(async move {
        let after = match engine {
            Some(e) => e.model_hash().await.unwrap_or_default(),
            None => String::new(),
        };
        if after != ev.model_hash {
            tracing::debug!(request = %ev.request_id, "weights changed during the generation: no evidence kept");
            return;
        }
        let now = chrono::Utc::now().timestamp();
        ev.served_at = now;
        if let Err(e) = store.put(&ev) {
            tracing::warn!(error = %e, "inference evidence not kept");
        }
        let keep = ledger.rules().await.challenge_window_secs
            + 2 * neuroshard_ledger::proof::EPOCH_SECONDS;
        store.prune(now, keep);
    });
}

/// Charges a finished (non-streamed) generation and records it.
pub async fn settle(state: &AppState, caller: &Caller, g: &mut Generated, started: Instant) {
    g.cost = charge(
        state,
        caller,
        &g.id,
        u64::from(g.prompt_tokens + g.completion_tokens),
    )
    .await;
    keep_evidence(state, g, g.cost);
    state
        .metrics
        .record_inference(u64::from(g.completion_tokens), started.elapsed());
}
