//! `POST /inference`: text generation on the engine, plain or streamed (Server-Sent Events),
//! with stop sequences matched on the decoded text, paid for through the ledger.
//!
//! The flow: `schema.rs` (the request, validated) -> [`admit`] (a place in the queue, the
//! 402 check of `billing.rs`) -> [`generate`] (tokens from the engine or the pipeline,
//! `generate.rs`, cut at stop sequences by `stop.rs`) -> the answer, whole or as events
//! (`sse.rs`) -> the charge (`billing.rs`). `openai.rs` shares everything but the request and
//! answer formats.

mod billing;
mod generate;
mod schema;
mod sse;
mod stop;

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use billing::{PRICE_UNITS_PER_TOKEN, settle};
pub use generate::{Generated, generate};
pub use schema::{Cost, InferenceRequest, InferenceResponse, Timing, Usage, usage};
pub use sse::{Streaming, stream_events};
pub use stop::StopMatcher;

use super::ApiError;
use crate::api::AppState;
use crate::auth::Caller;
use neuroshard_ledger::units_to_neuro;

/// Requests generating at once; more wait for [`QUEUE_LIMIT`] places, beyond that 503.
pub const QUEUE_LIMIT: usize = 64;

/// Admission: validation, a place in the queue, funds. Returns the permit to hold.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    req: &InferenceRequest,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max_seq = state.config().training.model.config().max_seq;
    req.validate(max_seq)?;
    if !state.training().model_loaded {
        return Err(ApiError::unavailable(
            "the model is being loaded; try again shortly",
        ));
    }
    let permit = state
        .inference_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable("too many inference requests queued; try again shortly")
        })?;
    billing::check_funds(state, caller, req).await?;
    Ok(permit)
}

pub fn new_id() -> String {
    format!("inf_{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// `POST /inference`.
#[utoipa::path(post, path = "/api/v1/inference", tag = "inference", security(("bearer" = [])),
    request_body = InferenceRequest,
    responses((status = 200, description = "Generated text (or text/event-stream with stream: true)", body = InferenceResponse),
              (status = 400, description = "A parameter is out of range", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 402, description = "The caller cannot pay for max_tokens", body = super::error::ErrorBody),
              (status = 502, description = "A pipeline stage failed (node without every layer)", body = super::error::ErrorBody),
              (status = 503, description = "Engine unavailable or queue full", body = super::error::ErrorBody),
              (status = 504, description = "A pipeline stage did not answer in time", body = super::error::ErrorBody)))]
pub async fn inference(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<InferenceRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(req) = body?;
    let permit = admit(&state, &caller, &req).await?;
    let id = new_id();
    if req.stream {
        return Ok(sse::stream(state, caller, req, id, started, permit).into_response());
    }
    let (mut g, _) = generate(&state, &req, &id, started, &mut |_, _| true).await?;
    drop(permit);
    g.cost = billing::charge(
        &state,
        &caller,
        &id,
        u64::from(g.prompt_tokens + g.completion_tokens),
    )
    .await;
    billing::keep_evidence(&state, &g, g.cost);
    state
        .metrics
        .record_inference(u64::from(g.completion_tokens), started.elapsed());
    Ok((
        StatusCode::OK,
        Json(InferenceResponse {
            usage: usage(&g),
            id: g.id,
            text: g.text,
            tokens_generated: g.completion_tokens,
            finish_reason: g.finish_reason.into(),
            cost: Cost {
                amount: units_to_neuro(g.cost),
                currency: "NEURO".into(),
            },
            timing: Timing {
                queue_ms: g.queue_ms,
                inference_ms: g.inference_ms,
                total_ms: g.total_ms,
            },
        }),
    )
        .into_response())
}
