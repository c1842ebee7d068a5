//! The OpenAPI 3.1 document, generated from the handlers' annotations and served at
//! `/api/v1/openapi.json`.

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use super::{network, node, settings, training, wallet};

#[derive(OpenApi)]
#[openapi(
    info(title = "NeuroShard node API", description = "REST API of a NeuroShard node. Errors use {\"error\": {\"code\", \"message\", \"details\"}}; codes are listed in docs/errors.md."),
    paths(
        node::status, node::metrics, node::health,
        network::peers, network::layers, network::network,
        settings::get_config, settings::patch_config,
        wallet::balance, wallet::send, wallet::transactions, wallet::stake, wallet::unstake,
        wallet::proofs,
        super::inference::inference,
        training::training_global, training::training_verify, training::history,
    ),
    components(schemas(super::error::ErrorBody)),
    modifiers(&Bearer),
)]
pub struct ApiDoc;

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

/// The document as JSON.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
