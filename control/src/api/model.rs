//! `GET /api/v1/model/export?format=gguf|hf`: the network's current model as a download (the
//! body `neuroshard model export` writes to disk). The export is made when asked (see
//! `pipeline/export.rs`: layers this node does not hold come from their holders), in a working
//! folder under `<data-dir>/exports/` that is removed as soon as the file is open, so nothing
//! is left behind whether the download finishes or not.
//!
//! `gguf` answers the GGUF file; `hf` answers an uncompressed tar of the Hugging Face folder
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json at its root). The
//! headers `X-Model-Hash` (the full model's hash) and `X-Layers-From-Peers` say what was
//! exported.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use utoipa::IntoParams;

use super::error::ApiError;
use crate::api::AppState;
use crate::pipeline::PipeError;
use crate::pipeline::export::{ExportFormat, ExportSlot, work_dir};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `gguf` (one GGUF file for llama.cpp) or `hf` (a tar of the Hugging Face Llama folder).
    pub format: String,
}

/// `GET /model/export`: streams the full model in the asked format.
#[utoipa::path(get, path = "/api/v1/model/export", tag = "model", security(("bearer" = [])),
    params(ExportQuery),
    responses((status = 200, description = "The model: a GGUF file (application/octet-stream) or a tar of the Hugging Face folder (application/x-tar); X-Model-Hash names the full model's hash", content_type = "application/octet-stream"),
              (status = 400, description = "Unknown or missing format", body = super::error::ErrorBody),
              (status = 401, description = "No valid token", body = super::error::ErrorBody),
              (status = 503, description = "No model loaded yet, another export running, or layers held by no reachable peer", body = super::error::ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let format = ExportFormat::parse(&q.format).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown format {:?}: gguf or hf",
            q.format.chars().take(32).collect::<String>()
        ))
    })?;
    let _slot = ExportSlot::take().ok_or_else(|| {
        ApiError::unavailable("an export is already running; try again when it has finished")
    })?;
    let work = work_dir(&state.data_dir);
    let made = state.stage.export(&state.net, format, &work).await;
    let result = match made {
        Ok(made) => open_result(format, &made.path, &work)
            .await
            .map(|(file, len, name)| (file, len, name, made)),
        Err(e) => Err(export_error(e)),
    };
    // The open file stays readable after its folder is gone.
    let _ = tokio::fs::remove_dir_all(&work).await;
    let (file, len, name, made) = result?;
    let stream = futures_util::stream::try_unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 256 << 10];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), f)))
    });
    let content_type = match format {
        ExportFormat::Gguf => "application/octet-stream",
        ExportFormat::Hf => "application/x-tar",
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .header("x-model-hash", made.model_hash)
        .header("x-layers-from-peers", made.from_peers.len())
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

/// Opens what the engine wrote (the GGUF file, or a tar made of the HF folder): the open file,
/// its length and the download's file name.
async fn open_result(
    format: ExportFormat,
    path: &Path,
    work: &Path,
) -> Result<(tokio::fs::File, u64, &'static str), ApiError> {
    let (file, name) = match format {
        ExportFormat::Gguf => (path.to_path_buf(), "neurollm.gguf"),
        ExportFormat::Hf => {
            let tar = work.join("neurollm-hf.tar");
            let (dir, out) = (path.to_path_buf(), tar.clone());
            tokio::task::spawn_blocking(move || tar_folder(&dir, &out))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::storage)?;
            (tar, "neurollm-hf.tar")
        }
    };
    let f = tokio::fs::File::open(&file)
        .await
        .map_err(ApiError::storage)?;
    let len = f.metadata().await.map_err(ApiError::storage)?.len();
    Ok((f, len, name))
}

/// Writes the files of `dir` (not recursive) into an uncompressed tar at `out`, at its root.
fn tar_folder(dir: &Path, out: &Path) -> std::io::Result<()> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    for path in names {
        let name = path.file_name().expect("a listed file has a name");
        tar.append_path_with_name(&path, name)?;
    }
    let w = tar.into_inner()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn export_error(e: PipeError) -> ApiError {
    match e {
        PipeError::NotReady(m) | PipeError::NoRoute(m) => ApiError::unavailable(m),
        PipeError::Refused(m) => ApiError::bad_request(m),
        // The engine refused a peer's weights (their hash) or could not write: the operator
        // needs the reason to act on it.
        PipeError::Engine(m) => ApiError::unavailable(format!("the export failed: {m}")),
        other => ApiError::internal(other),
    }
}
