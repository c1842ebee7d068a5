//! Server-Sent Events: a generation streamed piece by piece, closed by a summary event.

use std::convert::Infallible;
use std::time::Instant;

use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde_json::json;

use super::billing::charge;
use super::{Generated, InferenceRequest, Usage, generate};
use crate::api::AppState;
use crate::auth::Caller;
use neuroshard_ledger::units_to_neuro;

/// Streams `data: {"token", "index"}` events, then `data: {"token": "[DONE]", ...}`. A reader
/// that goes away stops the generation; only delivered tokens are charged.
pub(super) fn stream(
    state: AppState,
    caller: Caller,
    req: InferenceRequest,
    id: String,
    started: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl IntoResponse {
    stream_events(
        Streaming {
            state,
            caller,
            req,
            id,
            started,
            permit,
        },
        |piece, index| vec![json!({"token": piece, "index": index}).to_string()],
        |g, usage, cost| {
            vec![
                json!({"token": "[DONE]", "finish_reason": g.finish_reason, "usage": usage,
                       "cost": {"amount": units_to_neuro(cost), "currency": "NEURO"}, "id": g.id})
                .to_string(),
            ]
        },
    )
}

/// An admitted streaming request.
pub struct Streaming {
    pub state: AppState,
    pub caller: Caller,
    pub req: InferenceRequest,
    pub id: String,
    pub started: Instant,
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// Server-Sent Events of a generation: `piece(text, index)` gives the `data:` payloads of a
/// released piece, `end(generated, usage of the delivered tokens, cost)` those closing the
/// stream. An engine failure ends it with a contract error object.
pub fn stream_events(
    s: Streaming,
    piece: impl Fn(String, u32) -> Vec<String> + Send + 'static,
    end: impl FnOnce(&Generated, Usage, u64) -> Vec<String> + Send + 'static,
) -> impl IntoResponse {
    // Unbounded, yet bounded by max_tokens (below the model's context): a slow reader never
    // stalls the engine, and a gone one is noticed at the next token.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let Streaming {
            state,
            caller,
            req,
            id,
            started,
            permit,
        } = s;
        let _permit = permit;
        let sender = tx.clone();
        let mut on_text = move |text: String, index: u32| {
            piece(text, index)
                .into_iter()
                .all(|data| sender.send(Ok(Event::default().data(data))).is_ok())
        };
        let result = generate(&state, &req, &id, started, &mut on_text).await;
        let (closing, tokens) = match result {
            Ok((g, delivered)) => {
                let cost =
                    charge(&state, &caller, &id, u64::from(g.prompt_tokens + delivered)).await;
                super::billing::keep_evidence(&state, &g, cost);
                let usage = Usage {
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: delivered,
                    total_tokens: g.prompt_tokens + delivered,
                };
                (end(&g, usage, cost), delivered)
            }
            Err(e) => (
                vec![json!({"error": {"code": e.code, "message": e.message}}).to_string()],
                0,
            ),
        };
        state
            .metrics
            .record_inference(u64::from(tokens), started.elapsed());
        for data in closing {
            let _ = tx.send(Ok(Event::default().data(data)));
        }
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
}
