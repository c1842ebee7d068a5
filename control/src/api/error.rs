//! The one error type of the REST edge: logs the cause, answers the contract's error body
//! `{"error": {"code", "message", "details"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid or expired API token",
        )
    }

    pub fn rate_limited(retry_after_secs: u64) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "Too many requests",
        )
        .with_details(json!({ "retry_after": retry_after_secs }))
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            message,
        )
    }

    /// The node could not write to its data directory or database (disk full, read-only file
    /// system): nothing was changed, reads still work, the write can be retried once there is
    /// room again. The cause is logged, never returned.
    pub fn storage(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(%cause, "storage refused a write");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORAGE_ERROR",
            "the node cannot write to its data directory (disk full or read-only); nothing was changed, reads still work",
        )
    }

    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(%cause, "internal error answering a request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(details) = self.details {
            error["details"] = details;
        }
        let retry_after = (self.status == StatusCode::TOO_MANY_REQUESTS)
            .then(|| error["details"]["retry_after"].as_u64())
            .flatten();
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> ApiError {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body is larger than the limit (api.max_body_kb)",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "expected a body with Content-Type: application/json",
            ),
            _ => ApiError::bad_request(r.body_text()),
        }
    }
}

impl From<neuroshard_ledger::LedgerError> for ApiError {
    fn from(e: neuroshard_ledger::LedgerError) -> ApiError {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if e.is_storage() {
            return ApiError::storage(e);
        }
        if status.is_server_error() {
            return ApiError::internal(e);
        }
        let details = e.details();
        let mut err = ApiError::new(status, e.code(), e.to_string());
        if details.as_object().is_some_and(|o| !o.is_empty()) {
            err = err.with_details(details);
        }
        err
    }
}

/// A key or address error answers as the ledger error of the same code and message.
impl From<neuroshard_ledger::IdentityError> for ApiError {
    fn from(e: neuroshard_ledger::IdentityError) -> ApiError {
        neuroshard_ledger::LedgerError::from(e).into()
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::bad_request(r.body_text())
    }
}

/// The error body of every failed request (for the OpenAPI document).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code, listed in docs/errors.md.
    pub code: String,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}
