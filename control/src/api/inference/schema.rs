//! The request and answer of `POST /inference`, and the request's validation.

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::Generated;
use crate::api::ApiError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
