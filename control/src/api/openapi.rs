//! The OpenAPI 3.1 document, served at `/api/v1/openapi.json`. Its paths and schemas come
//! from the handlers' `#[utoipa::path]` annotations as `routes.rs` registers them; this
//! module gives the rest (title, description, the error schema, the bearer scheme).

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(title = "NeuroShard node API", description = "REST API of a NeuroShard node. Errors use {\"error\": {\"code\", \"message\", \"details\"}}; codes are listed in docs/errors.md."),
    components(schemas(super::error::ErrorBody)),
    modifiers(&Bearer),
)]
struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document without paths, which the route registration fills.
pub(super) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The whole document.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    super::routes::document()
}

pub async fn serve() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}
