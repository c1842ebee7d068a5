//! `GET /config` and `PATCH /config`.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::ApiError;
use crate::api::AppState;
use crate::auth::Caller;
use crate::config::{Config, ConfigError, needs_restart, redact_url};

/// The effective configuration, plus the node id and the derived peer port.
#[derive(Serialize, ToSchema)]
pub struct ConfigResponse {
    pub node_id: String,
    /// Peer gRPC port: port + 1000.
    pub grpc_port: u16,
    #[serde(flatten)]
    pub config: Config,
}

#[derive(Serialize, ToSchema)]
pub struct ConfigPatchResponse {
    pub success: bool,
    /// Dotted keys whose value changed.
    pub updated: Vec<String>,
    /// True when a changed key only takes effect after a restart (it is saved, and the
    /// running node keeps the old value until then).
    pub restart_required: bool,
}

/// `GET /config`.
#[utoipa::path(get, path = "/api/v1/config", tag = "config", security(("bearer" = [])),
    responses((status = 200, description = "Effective configuration", body = ConfigResponse),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn get_config(State(state): State<AppState>, _caller: Caller) -> Json<ConfigResponse> {
    let mut config = Config::clone(&state.config());
    config.database_url = redact_url(&config.database_url);
    Json(ConfigResponse {
        node_id: state.node_id.clone(),
        grpc_port: config.grpc_port(),
        config,
    })
}

fn config_error(e: ConfigError) -> ApiError {
    let field = match &e {
        ConfigError::Invalid { key, .. } => key.clone(),
        ConfigError::UnknownKey(key) => key.clone(),
        _ => String::new(),
    };
    match e {
        ConfigError::Invalid { .. } | ConfigError::UnknownKey(_) | ConfigError::Parse { .. } => {
            ApiError::bad_request(e.to_string()).with_details(json!({ "field": field }))
        }
        ConfigError::Write { .. } => ApiError::storage(e),
        other => ApiError::internal(other),
    }
}

/// Keeps the leaves of `patch` whose dotted key satisfies `keep`.
fn filter_patch(patch: &Value, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Value {
    let Value::Object(map) = patch else {
        return patch.clone();
    };
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(_) => {
                let inner = filter_patch(v, &key, keep);
                if inner.as_object().is_some_and(|o| !o.is_empty()) {
                    out.insert(k.clone(), inner);
                }
            }
            _ if keep(&key) => {
                out.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    Value::Object(out)
}

/// `PATCH /config`: a partial object of the configuration. Validated as a whole first; an
/// unknown key or a bad value changes nothing. Saved to the config file atomically (only the
/// patched keys: values given by flags or environment stay out of the file); keys that can be
/// applied live take effect at once.
#[utoipa::path(patch, path = "/api/v1/config", tag = "config", security(("bearer" = [])),
    request_body(content = Object, description = "Partial configuration, e.g. {\"training\": {\"batch_size\": 16}}"),
    responses((status = 200, description = "Updated", body = ConfigPatchResponse),
              (status = 400, description = "Unknown key or invalid value", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 503, description = "STORAGE_ERROR: the disk is full or read-only; nothing was changed", body = super::error::ErrorBody)))]
pub async fn patch_config(
    State(state): State<AppState>,
    _caller: Caller,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ConfigPatchResponse>, ApiError> {
    let Json(patch) = body?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    // One writer at a time: validate, save, apply.
    let writer = state.config_write.lock().await;
    let live = writer.borrow().clone();
    let (_, changed) = live.merged(&patch).map_err(config_error)?;
    let file = Config::load(&state.config_path).map_err(config_error)?;
    let (file_new, _) = file.merged(&patch).map_err(config_error)?;
    if !changed.is_empty() {
        file_new.save(&state.config_path).map_err(config_error)?;
        let live_patch = filter_patch(&patch, "", &|k| !needs_restart(k));
        let (applied, _) = live.merged(&live_patch).map_err(config_error)?;
        writer.send_replace(std::sync::Arc::new(applied));
    }
    tracing::info!(updated = ?changed, "configuration patched");
    Ok(Json(ConfigPatchResponse {
        success: true,
        restart_required: changed.iter().any(|k| needs_restart(k)),
        updated: changed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_only_live_keys() {
        let patch = json!({"port": 9000, "training": {"batch_size": 16, "model": "tiny"}});
        let live = filter_patch(&patch, "", &|k| !needs_restart(k));
        assert_eq!(live, json!({"training": {"batch_size": 16}}));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact_url("postgres://ns:secret@db:5432/ledger"),
            "postgres://ns:***@db:5432/ledger"
        );
        assert_eq!(redact_url(""), "");
    }
}
