//! The one route list. Every endpoint is registered once, in [`register`], through a
//! [`Registry`] that builds, from the same call, the router, the OpenAPI document and the auth
//! table [`ROUTES`] the `guard` middleware reads:
//!
//! - [`Registry::documented`] takes a `#[utoipa::path]` handler (`routes!(module::handler)`):
//!   the route, its operation in the document and its row in the table all come from that one
//!   annotation. It needs a token exactly when the annotation declares a `security`
//!   requirement, so the document cannot show a route as public while the guard protects it,
//!   or the reverse.
//! - [`Registry::undocumented`] is for routes outside the document (the dashboard, Prometheus
//!   `/metrics`, the document itself, the OpenAI-compatible `/v1/` endpoints, which OpenAI's own
//!   specification describes): its [`Auth`] is an argument, so it cannot be left out.
//!
//! `app` takes its routes only from here. A route added to the router some other way would
//! have no row in the table, and the guard asks for a token on any route the table lacks
//! (fail closed).

use std::sync::LazyLock;

use axum::Router;
use axum::handler::Handler;
use utoipa::openapi::path::{HttpMethod, PathItem};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::{PathItemExt, routes};

use super::{
    dashboard, inference, model, network, node, openai, openapi, settings, training, wallet,
};
use crate::api::AppState;

/// One endpoint and whether it needs a token (a row of [`ROUTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: bool,
}

/// Whether a route outside the OpenAPI document needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Refused with 401 without a valid token.
    Token,
    /// Open to anyone.
    Public,
}

/// Every endpoint, in registration order. The contract's endpoints shown with an
/// Authorization header need a token.
fn register(r: Registry) -> Registry {
    use HttpMethod::{Get, Post};
    r.undocumented(Get, "/", Auth::Public, dashboard::page)
        .documented(routes!(training::history))
        .documented(routes!(node::status))
        .documented(routes!(node::metrics))
        .documented(routes!(node::health))
        .documented(routes!(network::network))
        .documented(routes!(network::peers))
        .documented(routes!(network::layers))
        .documented(routes!(settings::get_config, settings::patch_config))
        .documented(routes!(wallet::proofs))
        .documented(routes!(wallet::balance))
        .documented(routes!(wallet::send))
        .documented(routes!(wallet::transactions))
        .documented(routes!(wallet::stake))
        .documented(routes!(wallet::unstake))
        .documented(routes!(inference::inference))
        .documented(routes!(training::training_global))
        .documented(routes!(training::training_verify))
        .documented(routes!(model::export))
        .undocumented(Get, "/api/v1/openapi.json", Auth::Public, openapi::serve)
        .undocumented(Get, "/v1/models", Auth::Token, openai::models)
        .undocumented(Post, "/v1/completions", Auth::Token, openai::completions)
        .undocumented(
            Post,
            "/v1/chat/completions",
            Auth::Token,
            openai::chat_completions,
        )
        .undocumented(Get, "/metrics", Auth::Public, node::prometheus)
}

/// The router, the document and the auth table being built, always together.
pub struct Registry {
    router: OpenApiRouter<AppState>,
    table: Vec<RouteSpec>,
}

impl Registry {
    /// A route of the OpenAPI document: method, path and auth requirement (`security` declared)
    /// from its `#[utoipa::path]` annotation.
    pub fn documented(mut self, route: UtoipaMethodRouter<AppState>) -> Registry {
        for (path, item) in &route.1.paths {
            // Registered once per process (see `BUILT`), so the leak is bounded.
            let path: &'static str = Box::leak(path.clone().into_boxed_str());
            for (method, op) in operations(item) {
                self.table.push(RouteSpec {
                    method: method_name(&method),
                    path,
                    auth: op.security.is_some(),
                });
            }
        }
        self.router = self.router.routes(route);
        self
    }

    /// A route left out of the OpenAPI document, with its auth requirement.
    pub fn undocumented<H, T>(
        mut self,
        method: HttpMethod,
        path: &'static str,
        auth: Auth,
        handler: H,
    ) -> Registry
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.table.push(RouteSpec {
            method: method_name(&method),
            path,
            auth: auth == Auth::Token,
        });
        self.router = self
            .router
            .route(path, axum::routing::on(method.to_method_filter(), handler));
        self
    }
}

fn operations(
    item: &PathItem,
) -> impl Iterator<Item = (HttpMethod, &utoipa::openapi::path::Operation)> {
    [
        (HttpMethod::Get, &item.get),
        (HttpMethod::Put, &item.put),
        (HttpMethod::Post, &item.post),
        (HttpMethod::Delete, &item.delete),
        (HttpMethod::Options, &item.options),
        (HttpMethod::Head, &item.head),
        (HttpMethod::Patch, &item.patch),
        (HttpMethod::Trace, &item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
}

fn method_name(m: &HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "GET",
        HttpMethod::Put => "PUT",
        HttpMethod::Post => "POST",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Head => "HEAD",
        HttpMethod::Patch => "PATCH",
        HttpMethod::Trace => "TRACE",
    }
}

/// What [`register`] built: run once per process; `app` clones the router.
struct Built {
    router: Router<AppState>,
    document: utoipa::openapi::OpenApi,
    table: Vec<RouteSpec>,
}

static BUILT: LazyLock<Built> = LazyLock::new(|| {
    let Registry { router, table } = register(Registry {
        router: OpenApiRouter::with_openapi(openapi::base()),
        table: Vec::new(),
    });
    let (router, document) = router.split_for_parts();
    Built {
        router,
        document,
        table,
    }
});

/// The router of every endpoint, without middleware or state.
pub fn router() -> Router<AppState> {
    BUILT.router.clone()
}

/// The OpenAPI document of the documented routes.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    &BUILT.document
}

/// The auth table: every endpoint, its method and whether it needs a token. Iterate it
/// (`for r in ROUTES`, `ROUTES.iter()`) like a slice of [`RouteSpec`].
pub const ROUTES: RouteTable = RouteTable;

/// The type of [`ROUTES`]: the table [`register`] filled.
#[derive(Debug, Clone, Copy)]
pub struct RouteTable;

impl std::ops::Deref for RouteTable {
    type Target = [RouteSpec];

    fn deref(&self) -> &'static [RouteSpec] {
        &BUILT.table
    }
}

impl IntoIterator for RouteTable {
    type Item = &'static RouteSpec;
    type IntoIter = std::slice::Iter<'static, RouteSpec>;

    fn into_iter(self) -> Self::IntoIter {
        BUILT.table.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each operation of the document is a row of the table with the document's auth, and
    /// no route is in the table twice.
    #[test]
    fn the_table_and_the_document_agree() {
        let doc = document();
        let mut documented = 0;
        for (path, item) in &doc.paths.paths {
            for (method, op) in operations(item) {
                let row = ROUTES
                    .iter()
                    .find(|r| r.path == path && r.method == method_name(&method))
                    .unwrap_or_else(|| panic!("{path} missing from the table"));
                assert_eq!(row.auth, op.security.is_some(), "{path}");
                documented += 1;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method, r.path)),
                "{} {} twice",
                r.method,
                r.path
            );
        }
        // The undocumented ones: dashboard, Prometheus, the document, the OpenAI endpoints.
        assert_eq!(ROUTES.len(), documented + 6);
        assert!(ROUTES.contains(&RouteSpec {
            method: "PATCH",
            path: "/api/v1/config",
            auth: true
        }));
    }
}
