//! Where a generation's tokens come from (this node's engine or the pipeline through the
//! peers) and the loop that turns them into released text.

use std::time::Instant;

use axum::http::StatusCode;

use super::{InferenceRequest, StopMatcher};
use crate::api::ApiError;
use crate::api::AppState;
use crate::engine::{EngineError, Sampling, Token};

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
    /// What a verifier needs to check the generation (`evidence.rs`), when this node's
    /// engine generated it: `model_hash` is the hash the weights had as it began (empty if
    /// unknown), `served_at` is unset.
    pub evidence: Option<crate::evidence::Evidence>,
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
    // The weights' hash as the generation begins, asked beside it (off the token path).
    let mut hash_before = None;
    let mut stream = if pipelined {
        Tokens::Pipeline(pipeline_tokens(state, req)?)
    } else {
        if let Some(engine) = state.engine.handle() {
            hash_before = Some(tokio::spawn(async move { engine.model_hash().await }));
        }
        Tokens::Engine(Box::new(engine_tokens(state, req, id).await?))
    };
    let mut evidence = (!pipelined).then(|| crate::evidence::Evidence {
        request_id: id.to_string(),
        served_at: 0,
        model_hash: String::new(),
        prompt_ids: Vec::new(),
        generated: Vec::new(),
        commits: Vec::new(),
        temperature: req.temperature as f32,
        top_p: req.top_p as f32,
        top_k: req.top_k,
        seed: req.seed,
    });
    let mut matcher = StopMatcher::new(req.stop.clone());
    let (mut prompt_tokens, mut tokens, mut delivered) = (0u32, 0u32, 0u32);
    let mut queue_us = 0u64;
    let mut finish = "length";
    let mut first_at = None;
    loop {
        let mut reply = match stream.next().await? {
            Some(r) => r,
            None => break,
        };
        if reply.index == 0 {
            prompt_tokens = reply.prompt_tokens;
            queue_us = reply.queue_us;
            first_at = Some(Instant::now());
        }
        if let Some(ev) = evidence.as_mut() {
            if reply.index == 0 {
                ev.prompt_ids = std::mem::take(&mut reply.prompt_ids);
            }
            ev.generated.push(reply.token_id);
            if let Some(c) = reply.commit.take() {
                ev.commits.push(c);
            }
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
    if let (Some(ev), Some(h)) = (evidence.as_mut(), hash_before)
        && let Ok(Ok(hash)) = h.await
    {
        ev.model_hash = hash;
    }
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
            evidence,
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
        .generate(
            &req.prompt,
            req.max_tokens,
            sampling(req),
            id,
            neuroshard_shared::toploc::DEFAULT_TOP_K as u32,
        )
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
