//! The REST API of `../shared/reference/http-api.txt`. `app(state)` builds the router, so
//! tests drive it with `oneshot` and production serves the same router on a socket. Every
//! route is registered once, in `routes.rs`, which yields the router, the OpenAPI document and
//! the auth table [`ROUTES`] together.
//!
//! A request flows: `observe` (who is calling, rate limit, metrics) -> `guard` (the route's
//! auth requirement from [`ROUTES`]) -> the handler. Every error, including unknown routes,
//! wrong methods and oversized bodies, is the contract's `{"error": {...}}` body.

mod dashboard;
pub mod error;
pub mod inference;
mod limits;
mod model;
mod network;
mod node;
pub mod openai;
pub mod openapi;
mod routes;
mod settings;
pub mod state;
mod training;
mod wallet;

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

pub use error::ApiError;
pub use limits::{Key, RateLimits};
pub use node::role;
pub use routes::{ROUTES, RouteSpec, RouteTable};
pub use state::AppState;

use crate::auth::Caller;

pub fn app(state: AppState) -> Router {
    let max_body = state.config().api.max_body_kb as usize * 1024;
    routes::router()
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

/// Serves `app` on `listener` until `shutdown` resolves, with `limits` on connections and
/// their timing (`crate::listen`), over TLS with `tls`; the connection figures go to the
/// node's metrics.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: crate::listen::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stats = state.metrics.http.clone();
    crate::listen::serve(listener, app(state), limits, stats, tls, shutdown).await
}
