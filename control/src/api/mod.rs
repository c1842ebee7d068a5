//! The REST API of `../shared/reference/http-api.txt`. `app(state)` builds the router, so
//! tests drive it with `oneshot` and production serves the same router on a socket.

pub mod error;
mod node;

use axum::Router;
use axum::routing::get;

pub use error::ApiError;

use crate::state::AppState;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/health", get(node::health))
        .route("/api/v1/status", get(node::status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint at {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
