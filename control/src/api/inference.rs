//! `POST /inference`: text generation on the engine, plain or streamed (Server-Sent Events),
//! with stop sequences matched on the decoded text, paid for through the ledger.
//!
//! Price: [`PRICE_UNITS_PER_TOKEN`] per prompt and completion token (0.0001 NEURO, so the
//! contract's example of 168 tokens costs 0.0168), sent from the caller's account to the node
//! wallet as a ledger transfer (its 0.1% fee burned on top). Before any work the caller must
//! afford the prompt plus `max_tokens`; afterwards only the tokens produced (delivered, when
//! streaming) are charged. A node serving its own wallet charges nothing.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::ApiError;
use crate::auth::Caller;
use crate::engine::{EngineError, Sampling, Token};
use crate::ledger::{UNITS_PER_NEURO, transfer_fee, units_to_neuro};
use crate::state::AppState;

/// 0.0001 NEURO per token.
pub const PRICE_UNITS_PER_TOKEN: u64 = UNITS_PER_NEURO / 10_000;
/// Requests generating at once; more wait for [`QUEUE_LIMIT`] places, beyond that 503.
pub const QUEUE_LIMIT: usize = 64;
const MAX_PROMPT_BYTES: usize = 32 * 1024;
const MAX_STOPS: usize = 8;
const MAX_STOP_LEN: usize = 64;

fn default_max_tokens() -> u32 {
    100
}
fn one() -> f64 {
    1.0
}
fn default_top_k() -> u32 {
    50
}

#[derive(Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    pub prompt: String,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// 0 (greedy) to 2.
    #[serde(default = "one")]
    pub temperature: f64,
    /// (0, 1]: nucleus sampling threshold.
    #[serde(default = "one")]
    pub top_p: f64,
    /// 0 disables it.
    #[serde(default = "default_top_k")]
    pub top_k: u32,
    #[serde(default)]
    pub stream: bool,
    /// Up to 8 strings of 1 to 64 bytes; generation ends before the first one produced.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Same seed, same prompt and parameters: same text.
    #[serde(default)]
    pub seed: Option<u64>,
}

fn field_error(field: &str, message: String) -> ApiError {
    ApiError::bad_request(message).with_details(json!({ "field": field }))
}

impl InferenceRequest {
    pub fn validate(&self, max_seq: u32) -> Result<(), ApiError> {
        if self.prompt.is_empty() || self.prompt.len() > MAX_PROMPT_BYTES {
            return Err(field_error(
                "prompt",
                format!("prompt must be 1 to {MAX_PROMPT_BYTES} bytes"),
            ));
        }
        if !(1..max_seq).contains(&self.max_tokens) {
            return Err(field_error(
                "max_tokens",
                format!("max_tokens must be 1 to {} for this model", max_seq - 1),
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(field_error(
                "temperature",
                "temperature must be in [0, 2]".into(),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(field_error("top_p", "top_p must be in (0, 1]".into()));
        }
        if self.top_k > 100_000 {
            return Err(field_error("top_k", "top_k must be at most 100000".into()));
        }
        if self.stop.len() > MAX_STOPS
            || self
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(field_error(
                "stop",
                format!("at most {MAX_STOPS} stop sequences of 1 to {MAX_STOP_LEN} bytes"),
            ));
        }
        Ok(())
    }
}

/// Releases generated text, holding back what might be the start of a stop sequence, and
/// ends it before the first stop sequence, also one spread over several tokens.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    released: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops,
            ..Default::default()
        }
    }

    /// Adds a piece; returns the text now safe to release and whether a stop was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.text.truncate(at);
            let out = self.text[self.released.min(at)..].to_string();
            self.released = self.text.len();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop sequence.
        let mut hold = 0;
        for s in &self.stops {
            for len in (1..s.len()).rev() {
                if len > hold && s.is_char_boundary(len) && self.text.ends_with(&s[..len]) {
                    hold = len;
                    break;
                }
            }
        }
        let end = self.text.len() - hold;
        let out = self.text[self.released.min(end)..end].to_string();
        self.released = self.released.max(end);
        (out, false)
    }

    /// Everything not yet released (generation ended without a stop).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// What a finished generation produced.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: String,
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// stop or length.
    pub finish_reason: &'static str,
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub total_ms: u64,
    /// NEURO charged (0 when the node serves its own wallet).
    pub cost: u64,
}

fn cost_of(tokens: u64) -> u64 {
    tokens.saturating_mul(PRICE_UNITS_PER_TOKEN)
}

/// Refuses with 402 before any work when the caller cannot pay for the prompt plus
/// `max_tokens` (the prompt's token count is bounded by its bytes + 1).
async fn check_funds(
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
        return Err(crate::ledger::LedgerError::InsufficientBalance {
            required,
            available,
        }
        .into());
    }
    Ok(())
}

/// Charges `tokens` to the caller, paid to the node wallet.
async fn charge(state: &AppState, caller: &Caller, id: &str, tokens: u64) -> u64 {
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
            &format!("inference {id}"),
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

/// Runs one generation on the engine; `on_text(piece, index)` sees each released piece and
/// returns false when its reader is gone (generation then stops). Returns what was produced
/// and the tokens delivered.
pub async fn generate(
    state: &AppState,
    req: &InferenceRequest,
    id: &str,
    started: Instant,
    on_text: &mut (dyn FnMut(String, u32) -> bool + Send),
) -> Result<(Generated, u32), ApiError> {
    let pipelined = state
        .training()
        .assignment
        .as_ref()
        .is_some_and(|a| !a.is_full());
    let mut stream = if pipelined {
        Tokens::Pipeline(pipeline_tokens(state, req)?)
    } else {
        Tokens::Engine(Box::new(engine_tokens(state, req, id).await?))
    };
    let mut matcher = StopMatcher::new(req.stop.clone());
    let (mut prompt_tokens, mut tokens, mut delivered) = (0u32, 0u32, 0u32);
    let mut queue_us = 0u64;
    let mut finish = "length";
    let mut first_at = None;
    loop {
        let reply = match stream.next().await? {
            Some(r) => r,
            None => break,
        };
        if reply.index == 0 {
            prompt_tokens = reply.prompt_tokens;
            queue_us = reply.queue_us;
            first_at = Some(Instant::now());
        }
        tokens += 1;
        let (piece, stopped) = matcher.push(&reply.text);
        // Empty pieces (inside a multi-byte character, or held back as a possible stop
        // prefix) are not sent, except the last one.
        let announce = !piece.is_empty() || stopped || !reply.finish_reason.is_empty();
        if announce && !on_text(piece, reply.index) {
            finish = "disconnected";
            break;
        }
        delivered = tokens;
        if stopped {
            finish = "stop";
            break;
        }
        match reply.finish_reason.as_str() {
            "" => {}
            "eos" => {
                finish = "stop";
                break;
            }
            _ => {
                finish = "length";
                break;
            }
        }
    }
    drop(stream);
    if finish != "stop" && finish != "disconnected" {
        let rest = matcher.finish();
        if !rest.is_empty() {
            on_text(rest, tokens.saturating_sub(1));
        }
    }
    let total = started.elapsed();
    let queue_ms = queue_us / 1000;
    let inference_ms = first_at
        .map(|_| (total.as_millis() as u64).saturating_sub(queue_ms))
        .unwrap_or(0);
    Ok((
        Generated {
            id: id.to_string(),
            text: matcher.text().to_string(),
            prompt_tokens,
            completion_tokens: tokens,
            finish_reason: if finish == "disconnected" {
                "length"
            } else {
                finish
            },
            queue_ms,
            inference_ms,
            total_ms: total.as_millis() as u64,
            cost: 0,
        },
        delivered,
    ))
}

/// Where a generation's tokens come from: this node's engine (it holds every layer) or the
/// pipeline through the peers holding the others (`pipeline/infer.rs`).
enum Tokens {
    Engine(Box<crate::engine::TokenStream>),
    Pipeline(crate::pipeline::infer::TokenStream),
}

impl Tokens {
    async fn next(&mut self) -> Result<Option<Token>, ApiError> {
        match self {
            Tokens::Engine(s) => s.next().await.map_err(engine_error),
            Tokens::Pipeline(rx) => match rx.recv().await {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(pipeline_error(e)),
            },
        }
    }
}

async fn engine_tokens(
    state: &AppState,
    req: &InferenceRequest,
    id: &str,
) -> Result<crate::engine::TokenStream, ApiError> {
    let engine = state
        .engine
        .handle()
        .ok_or_else(|| ApiError::unavailable("the engine is restarting; try again shortly"))?;
    engine
        .generate(&req.prompt, req.max_tokens, sampling(req), id)
        .await
        .map_err(engine_error)
}

fn sampling(req: &InferenceRequest) -> Sampling {
    Sampling {
        temperature: req.temperature as f32,
        top_p: req.top_p as f32,
        top_k: req.top_k,
        seed: req.seed,
    }
}

/// Starts a generation through the pipeline (this node lacks some layers).
fn pipeline_tokens(
    state: &AppState,
    req: &InferenceRequest,
) -> Result<crate::pipeline::infer::TokenStream, ApiError> {
    state
        .stage
        .generate_remote(
            state.net.clone(),
            crate::pipeline::infer::InferRequest {
                prompt: req.prompt.clone(),
                max_tokens: req.max_tokens,
                sampling: sampling(req),
            },
        )
        .map_err(pipeline_error)
}

/// A pipeline failure in the error format: 504 when a stage did not answer in time, 502 when
/// one failed or answered nonsense, 503 when the layers are not all reachable now.
fn pipeline_error(e: crate::pipeline::PipeError) -> ApiError {
    use crate::pipeline::PipeError;
    let msg = e.to_string();
    match e {
        PipeError::Timeout(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "PIPELINE_TIMEOUT",
            format!("a pipeline stage did not answer in time ({msg})"),
        ),
        PipeError::Peer { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "PIPELINE_STAGE_FAILED",
            format!("a pipeline stage failed ({msg})"),
        ),
        PipeError::Refused(m) => ApiError::bad_request(m),
        PipeError::NotReady(_) | PipeError::NoRoute(_) | PipeError::Engine(_) => {
            ApiError::unavailable(format!("the pipeline cannot serve this now ({msg})"))
        }
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Invalid(m) => ApiError::bad_request(m),
        EngineError::NotReady(_) => {
            ApiError::unavailable("the model is being loaded; try again shortly")
        }
        // The batch is full or the request's KV cache does not fit the engine's budget.
        EngineError::Busy(m) => ApiError::unavailable(format!("the engine is at capacity: {m}")),
        e => ApiError::unavailable(format!("the engine failed: {e}")),
    }
}

#[derive(Serialize, ToSchema)]
pub struct InferenceResponse {
    pub id: String,
    pub text: String,
    pub tokens_generated: u32,
    /// stop (end of text or a stop sequence) or length (max_tokens or the model's context).
    pub finish_reason: String,
    pub usage: Usage,
    pub cost: Cost,
    pub timing: Timing,
}

#[derive(Serialize, ToSchema, Clone)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Serialize, ToSchema)]
pub struct Cost {
    pub amount: f64,
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct Timing {
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub total_ms: u64,
}

pub fn usage(g: &Generated) -> Usage {
    Usage {
        prompt_tokens: g.prompt_tokens,
        completion_tokens: g.completion_tokens,
        total_tokens: g.prompt_tokens + g.completion_tokens,
    }
}

/// Admission: validation, a place in the queue, funds. Returns the permit to hold.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    req: &InferenceRequest,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max_seq = neuroshard_shared::model::ModelConfig::preset(&state.config().training.model)
        .map(|m| m.max_seq)
        .unwrap_or(2);
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
    check_funds(state, caller, req).await?;
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
        return Ok(stream(state, caller, req, id, started, permit).into_response());
    }
    let (mut g, _) = generate(&state, &req, &id, started, &mut |_, _| true).await?;
    drop(permit);
    g.cost = charge(
        &state,
        &caller,
        &id,
        u64::from(g.prompt_tokens + g.completion_tokens),
    )
    .await;
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

/// Streams `data: {"token", "index"}` events, then `data: {"token": "[DONE]", ...}`. A reader
/// that goes away stops the generation; only delivered tokens are charged.
fn stream(
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

/// Charges a finished (non-streamed) generation and records it.
pub async fn settle(state: &AppState, caller: &Caller, g: &mut Generated, started: Instant) {
    g.cost = charge(
        state,
        caller,
        &g.id,
        u64::from(g.prompt_tokens + g.completion_tokens),
    )
    .await;
    state
        .metrics
        .record_inference(u64::from(g.completion_tokens), started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (r, stop) = m.push(p);
            out.push_str(&r);
            if stop {
                return (out, m.text().to_string(), true);
            }
        }
        out.push_str(&m.finish());
        (out, m.text().to_string(), false)
    }

    #[test]
    fn stops_across_token_boundaries_and_holds_back_prefixes() {
        let (out, text, stopped) = run(&["\n\n"], &["Hello", " world", "\n", "\nmore"]);
        assert_eq!(
            (out.as_str(), text.as_str(), stopped),
            ("Hello world", "Hello world", true)
        );
        let (out, _, stopped) = run(&["END"], &["a", "E", "N", "x", "b"]);
        assert_eq!((out.as_str(), stopped), ("aENxb", false));
        let (out, _, stopped) = run(&["END", "b"], &["aE", "Nb"]);
        assert_eq!((out.as_str(), stopped), ("aEN", true));
        let (out, _, stopped) = run(&[], &["x", "y"]);
        assert_eq!((out.as_str(), stopped), ("xy", false));
        // Stops with multi-byte characters are held back and matched on character boundaries.
        let (out, _, stopped) = run(&["üx"], &["aü", "b"]);
        assert_eq!((out.as_str(), stopped), ("aüb", false));
        let (out, _, stopped) = run(&["\u{202e}ü"], &["a\u{202e}", "ü"]);
        assert_eq!((out.as_str(), stopped), ("a", true));
        // The first stop in the text wins, even when a later-listed one.
        let (out, _, _) = run(&["zz", "y"], &["xyzz"]);
        assert_eq!(out, "x");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = InferenceRequest {
            prompt: "hi".into(),
            max_tokens: 10,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 50,
            stream: false,
            stop: vec![],
            seed: None,
        };
        assert!(ok.validate(128).is_ok());
        for (bad, field) in [
            (
                InferenceRequest {
                    prompt: String::new(),
                    ..ok.clone()
                },
                "prompt",
            ),
            (
                InferenceRequest {
                    max_tokens: 0,
                    ..ok.clone()
                },
                "max_tokens",
            ),
            (
                InferenceRequest {
                    max_tokens: 128,
                    ..ok.clone()
                },
                "max_tokens",
            ),
            (
                InferenceRequest {
                    temperature: 2.5,
                    ..ok.clone()
                },
                "temperature",
            ),
            (
                InferenceRequest {
                    temperature: -0.1,
                    ..ok.clone()
                },
                "temperature",
            ),
            (
                InferenceRequest {
                    top_p: 0.0,
                    ..ok.clone()
                },
                "top_p",
            ),
            (
                InferenceRequest {
                    stop: vec![String::new()],
                    ..ok.clone()
                },
                "stop",
            ),
        ] {
            let e = bad.validate(128).unwrap_err();
            assert_eq!(e.details.unwrap()["field"], field);
        }
    }
}
