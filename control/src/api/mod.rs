//! The REST API of `../shared/reference/http-api.txt`. `app(state)` builds the router, so
//! tests drive it with `oneshot` and production serves the same router on a socket.
//!
//! A request flows: `observe` (who is calling, rate limit, metrics) -> `guard` (the route's
//! auth requirement from [`ROUTES`]) -> the handler. Every error, including unknown routes,
//! wrong methods and oversized bodies, is the contract's `{"error": {...}}` body.

mod dashboard;
pub mod error;
pub mod inference;
mod limits;
mod network;
mod node;
pub mod openai;
pub mod openapi;
mod settings;
mod training;
mod wallet;

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use error::ApiError;
pub use limits::{Key, RateLimits};
pub use node::role;

use crate::auth::Caller;
use crate::state::AppState;

/// One endpoint and whether it needs a token. The router and the auth guard both come from
/// this table, so a route cannot exist without a declared requirement.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: bool,
}

const fn r(method: &'static str, path: &'static str, auth: bool) -> RouteSpec {
    RouteSpec { method, path, auth }
}

/// Every endpoint. `auth` follows the contract: endpoints it shows with an Authorization
/// header need a token.
pub const ROUTES: &[RouteSpec] = &[
    r("GET", "/", false),
    r("GET", "/api/v1/training/history", false),
    r("GET", "/api/v1/status", false),
    r("GET", "/api/v1/metrics", false),
    r("GET", "/api/v1/health", false),
    r("GET", "/api/v1/network", false),
    r("GET", "/api/v1/peers", true),
    r("GET", "/api/v1/layers", true),
    r("GET", "/api/v1/config", true),
    r("PATCH", "/api/v1/config", true),
    r("GET", "/api/v1/proofs", true),
    r("GET", "/api/v1/wallet/balance", true),
    r("POST", "/api/v1/wallet/send", true),
    r("GET", "/api/v1/wallet/transactions", true),
    r("POST", "/api/v1/wallet/stake", true),
    r("POST", "/api/v1/wallet/unstake", true),
    r("POST", "/api/v1/inference", true),
    r("GET", "/api/training/global", false),
    r("GET", "/api/training/verify", false),
    r("GET", "/api/v1/openapi.json", false),
    r("GET", "/v1/models", true),
    r("POST", "/v1/completions", true),
    r("POST", "/v1/chat/completions", true),
    r("GET", "/metrics", false),
];

pub fn app(state: AppState) -> Router {
    let max_body = state.config().api.max_body_kb as usize * 1024;
    Router::new()
        .route("/", get(dashboard::page))
        .route("/api/v1/training/history", get(training::history))
        .route("/api/v1/status", get(node::status))
        .route("/api/v1/metrics", get(node::metrics))
        .route("/api/v1/health", get(node::health))
        .route("/api/v1/network", get(network::network))
        .route("/api/v1/peers", get(network::peers))
        .route("/api/v1/layers", get(network::layers))
        .route(
            "/api/v1/config",
            get(settings::get_config).patch(settings::patch_config),
        )
        .route("/api/v1/proofs", get(wallet::proofs))
        .route("/api/v1/wallet/balance", get(wallet::balance))
        .route("/api/v1/wallet/send", post(wallet::send))
        .route("/api/v1/wallet/transactions", get(wallet::transactions))
        .route("/api/v1/wallet/stake", post(wallet::stake))
        .route("/api/v1/wallet/unstake", post(wallet::unstake))
        .route("/api/v1/inference", post(inference::inference))
        .route("/api/training/global", get(training::training_global))
        .route("/api/training/verify", get(training::training_verify))
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/metrics", get(node::prometheus))
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn(guard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The identity `observe` found for a request: `None` without a valid token.
#[derive(Clone)]
struct Identity(Option<Caller>);

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Resolves the caller, spends its rate-limit budget (per token, or per client address
/// without a valid token) and records the request in the metrics.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let caller = bearer(&req).and_then(|t| state.auth.verify(t));
    let key = match (&caller, req.extensions().get::<ConnectInfo<SocketAddr>>()) {
        (Some(c), _) => Key::Token(c.token_id.clone()),
        (None, Some(ConnectInfo(addr))) => Key::Ip(addr.ip()),
        (None, None) => Key::Ip(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    // Health is exempt: load balancers and supervisors poll it, and it must always answer.
    let limited = req.uri().path() != "/api/v1/health";
    let verdict = if limited {
        state.limits.check(&state.config().api, &key)
    } else {
        Ok(())
    };
    let response = match verdict {
        Err(wait) => {
            ApiError::rate_limited(wait.as_secs_f64().ceil().max(1.0) as u64).into_response()
        }
        Ok(()) => {
            req.extensions_mut().insert(Identity(caller));
            next.run(req).await
        }
    };
    state
        .metrics
        .record_api(response.status().as_u16(), started.elapsed());
    response
}

/// Refuses requests without a valid token on routes that need one. A route missing from
/// [`ROUTES`] needs one (fail closed).
async fn guard(path: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let needs_token = path.as_ref().is_none_or(|p| {
        ROUTES
            .iter()
            .find(|r| r.path == p.as_str() && r.method == req.method().as_str())
            .is_none_or(|r| r.auth)
    });
    let authed = req
        .extensions()
        .get::<Identity>()
        .is_some_and(|i| i.0.is_some());
    if needs_token && !authed {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Identity>()
            .and_then(|i| i.0.clone())
            .ok_or_else(ApiError::unauthorized)
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint at {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
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
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
