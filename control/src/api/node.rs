//! Node endpoints: health and status.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::resources::free_disk;
use crate::state::AppState;
use crate::supervisor::EngineState;

/// How long an engine restart may take before `gpu: restarting` counts as a failed check.
const RESTART_GRACE: Duration = Duration::from_secs(60);

/// `GET /health`: each check is `ok` or says what is wrong; HTTP 503 when any check fails.
/// An engine being restarted within the grace period is degraded, not failed: the node
/// keeps serving what it can, so health stays 200 with `gpu: restarting`.
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let engine = state.engine.status();
    let (gpu, gpu_ok) = match engine.state {
        EngineState::Ok => ("ok", true),
        EngineState::Restarting => ("restarting", engine.since.elapsed() < RESTART_GRACE),
        EngineState::Down => ("down", false),
    };
    let network_ok = state
        .network
        .listening
        .load(std::sync::atomic::Ordering::Relaxed);
    let network = if network_ok { "ok" } else { "down" };
    let storage = storage_check(&state);
    let cfg = state.config();
    let expects_peers = !cfg.seed_peers.is_empty() || !cfg.tracker_url.is_empty();
    let peers_ok = !expects_peers || state.network.peer_count() > 0;
    let peers = if peers_ok { "ok" } else { "no_peers" };
    let healthy = gpu_ok && network_ok && storage == "ok" && peers_ok;
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "healthy": healthy,
            "checks": {"gpu": gpu, "network": network, "storage": storage, "peers": peers},
        })),
    )
}

/// Storage is ok when the data directory takes a write and has room left.
fn storage_check(state: &AppState) -> String {
    let probe = state.data_dir.join(".health-probe");
    if let Err(e) = std::fs::write(&probe, b"ok") {
        return format!("not_writable: {}", e.kind());
    }
    let _ = std::fs::remove_file(&probe);
    let min = state.config().resources.min_free_disk_mb * 1024 * 1024;
    match free_disk(&state.data_dir) {
        Some(free) if free < min => format!("low_disk: {} MB free", free / (1024 * 1024)),
        _ => "ok".into(),
    }
}

/// `GET /status`.
pub async fn status(State(state): State<AppState>) -> Json<serde_json::Value> {
    let cfg = state.config();
    let engine = state.engine.status();
    let training = state.training();
    let res = state.resources.latest();
    let layers: Vec<u32> = if training.model_loaded {
        crate::trainer::held_layers(&cfg).collect()
    } else {
        Vec::new()
    };
    let (gpu_used, gpu_total) = engine
        .last_health
        .as_ref()
        .map(|h| (h.memory_used, h.memory_total))
        .unwrap_or((0, 0));
    let status = match engine.state {
        EngineState::Ok => "running",
        EngineState::Restarting => "degraded",
        EngineState::Down => "starting",
    };
    Json(json!({
        "node_id": state.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "status": status,
        "role": "full",
        "layers": layers,
        "peer_count": state.network.peer_count(),
        "training": {
            "enabled": cfg.training.enabled,
            "epoch": training.step / cfg.training.diloco_steps.max(1) as u64,
            "step": training.step,
            "loss": training.loss,
        },
        "resources": {
            "gpu_memory_used": gpu_used,
            "gpu_memory_total": gpu_total,
            "cpu_percent": (res.cpu_percent * 10.0).round() / 10.0,
            "ram_used": res.ram_used,
        },
    }))
}
