//! OpenAI-compatible endpoints, so existing OpenAI clients work against a node unchanged:
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming in OpenAI's
//! chunk format, ending with `data: [DONE]`). Same tokens, price, limits and engine as
//! `POST /api/v1/inference`. Fields clients send that do not apply here (penalties, logprobs,
//! user, ...) are accepted and ignored; `n` above 1 is refused.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::inference::{self, InferenceRequest, Streaming};
use crate::api::AppState;
use crate::auth::Caller;

/// The chat template: a transcript; generation stops when the model starts the next turn.
const USER_TURN: &str = "\nUser:";

fn model_id(state: &AppState) -> String {
    format!("neurollm-{}", state.config().training.model)
}

fn created() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": model_id(&state), "object": "model", "created": state_created(&state), "owned_by": "neuroshard"}],
    }))
}

fn state_created(state: &AppState) -> i64 {
    created() - state.started.elapsed().as_secs() as i64
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Fields both endpoints share.
#[derive(Deserialize)]
pub struct Sampling {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub seed: Option<u64>,
}

impl Sampling {
    fn request(
        &self,
        state: &AppState,
        prompt: String,
        extra_stop: Option<&str>,
    ) -> Result<InferenceRequest, ApiError> {
        if let Some(m) = &self.model
            && *m != model_id(state)
        {
            return Err(ApiError::not_found(format!(
                "model {m:?} is not served here (GET /v1/models lists {:?})",
                model_id(state)
            ))
            .with_details(json!({"field": "model"})));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported")
                .with_details(json!({"field": "n"})));
        }
        let mut stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if let Some(s) = extra_stop {
            stop.push(s.to_string());
        }
        Ok(InferenceRequest {
            prompt,
            max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(16),
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            stream: self.stream,
            stop,
            seed: self.seed,
        })
    }
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub sampling: Sampling,
}

fn usage_json(u: &inference::Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(body) = body?;
    let prompts = body.prompt.into_vec();
    let [prompt] = <[String; 1]>::try_from(prompts).map_err(|_| {
        ApiError::bad_request("exactly one prompt is supported")
            .with_details(json!({"field": "prompt"}))
    })?;
    let req = body.sampling.request(&state, prompt, None)?;
    serve(state, caller, req, Kind::Completion, started).await
}

/// Which OpenAI object an answer is: the only difference between the two endpoints once the
/// prompt is built.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// The fields every object and chunk of one answer shares.
#[derive(Debug, Clone)]
struct Header {
    kind: Kind,
    id: String,
    model: String,
    created: i64,
}

impl Header {
    fn object(&self, object: &str, choice: Value) -> Value {
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice]})
    }

    /// The chunks of a released piece of text (the chat stream opens with the role).
    fn piece(&self, text: String, index: u32) -> Vec<String> {
        match self.kind {
            Kind::Completion => vec![
                self.object(
                    "text_completion",
                    json!({"text": text, "index": 0, "logprobs": null, "finish_reason": null}),
                )
                .to_string(),
            ],
            Kind::Chat => {
                let chunk = |delta: Value| {
                    self.object(
                        "chat.completion.chunk",
                        json!({"index": 0, "delta": delta, "finish_reason": null}),
                    )
                    .to_string()
                };
                let mut out = Vec::new();
                if index == 0 {
                    out.push(chunk(json!({"role": "assistant", "content": ""})));
                }
                if !text.is_empty() {
                    out.push(chunk(json!({"content": text})));
                }
                out
            }
        }
    }

    /// The closing chunks: finish reason and usage, then `[DONE]`.
    fn end(&self, finish_reason: &str, usage: &inference::Usage) -> Vec<String> {
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"text": "", "index": 0, "logprobs": null, "finish_reason": finish_reason}),
            ),
            Kind::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": {}, "finish_reason": finish_reason}),
            ),
        };
        let mut last = self.object(object, choice);
        last["usage"] = usage_json(usage);
        vec![last.to_string(), "[DONE]".to_string()]
    }

    /// The whole answer of a request that did not stream.
    fn whole(&self, g: &inference::Generated) -> Value {
        let mut out = match self.kind {
            Kind::Completion => self.object(
                "text_completion",
                json!({"text": g.text, "index": 0, "logprobs": null, "finish_reason": g.finish_reason}),
            ),
            Kind::Chat => self.object(
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": g.text.trim_start()},
                    "finish_reason": g.finish_reason}),
            ),
        };
        out["usage"] = usage_json(&inference::usage(g));
        out
    }
}

/// Admits, generates (streamed or whole), charges and answers one request.
async fn serve(
    state: AppState,
    caller: Caller,
    req: InferenceRequest,
    kind: Kind,
    started: Instant,
) -> Result<Response, ApiError> {
    let permit = inference::admit(&state, &caller, &req).await?;
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let header = Header {
        kind,
        id: format!("{prefix}-{}", &inference::new_id()[4..]),
        model: model_id(&state),
        created: created(),
    };
    if req.stream {
        let closing = header.clone();
        let s = Streaming {
            state,
            caller,
            req,
            id: header.id.clone(),
            started,
            permit,
        };
        return Ok(inference::stream_events(
            s,
            move |text, index| header.piece(text, index),
            move |g, usage, _| closing.end(g.finish_reason, &usage),
        )
        .into_response());
    }
    let (mut g, _) =
        inference::generate(&state, &req, &header.id, started, &mut |_, _| true).await?;
    drop(permit);
    inference::settle(&state, &caller, &mut g, started).await;
    Ok(Json(header.whole(&g)).into_response())
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Value,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// The transcript the model continues: one line per turn, then `Assistant:`.
pub fn chat_prompt(messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty")
            .with_details(json!({"field": "messages"})));
    }
    let mut out = String::new();
    for m in messages {
        let who = match m.role.as_str() {
            "system" | "developer" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(ApiError::bad_request(format!("unknown role {other:?}"))
                    .with_details(json!({"field": "messages.role"})));
            }
        };
        // Content is a string, or a list of parts of which the text parts count.
        let text = match &m.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            Value::Null => String::new(),
            _ => {
                return Err(
                    ApiError::bad_request("content must be a string or a list of parts")
                        .with_details(json!({"field": "messages.content"})),
                );
            }
        };
        out.push_str(&format!("{who}: {}\n", text.trim()));
    }
    out.push_str("Assistant:");
    Ok(out)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(body) = body?;
    let prompt = chat_prompt(&body.messages)?;
    let req = body.sampling.request(&state, prompt, Some(USER_TURN))?;
    serve(state, caller, req, Kind::Chat, started).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template() {
        let msgs = vec![
            ChatMessage {
                role: "system".into(),
                content: json!("Be brief."),
            },
            ChatMessage {
                role: "user".into(),
                content: json!([{"type": "text", "text": "Hi"}]),
            },
        ];
        assert_eq!(
            chat_prompt(&msgs).unwrap(),
            "System: Be brief.\nUser: Hi\nAssistant:"
        );
        let bad = vec![ChatMessage {
            role: "robot".into(),
            content: json!("x"),
        }];
        assert!(chat_prompt(&bad).is_err());
        assert!(chat_prompt(&[]).is_err());
    }
}
