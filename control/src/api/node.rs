//! Node endpoints: health, status, metrics (JSON and Prometheus text).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineState;
use crate::resources::free_disk;
use crate::state::AppState;

/// How long an engine restart may take before `gpu: restarting` counts as a failed check.
const RESTART_GRACE: Duration = Duration::from_secs(60);

#[derive(Serialize, ToSchema)]
pub struct HealthResponse {
    pub healthy: bool,
    pub checks: HealthChecks,
}

/// Each check is `ok` or says what is wrong.
#[derive(Serialize, ToSchema)]
pub struct HealthChecks {
    /// The engine: ok, restarting, down.
    pub gpu: String,
    /// The peer service: ok or down.
    pub network: String,
    /// The data directory and the ledger database: ok, not_writable, low_disk, database.
    pub storage: String,
    /// ok, or no_peers when seed peers or a tracker are configured and none is connected.
    pub peers: String,
}

/// `GET /health`: HTTP 503 when any check fails. An engine being restarted within the grace
/// period is degraded, not failed: the node keeps serving what it can, so health stays 200
/// with `gpu: restarting`.
#[utoipa::path(get, path = "/api/v1/health", tag = "node",
    responses((status = 200, description = "Every check passed", body = HealthResponse),
              (status = 503, description = "A check failed", body = HealthResponse)))]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let engine = state.engine.status();
    let (gpu, gpu_ok) = match engine.state {
        EngineState::Ok => ("ok", true),
        EngineState::Restarting => ("restarting", engine.since.elapsed() < RESTART_GRACE),
        EngineState::Down => ("down", false),
    };
    let network_ok = state.network.listening.load(Ordering::Relaxed);
    let storage = storage_check(&state).await;
    let cfg = state.config();
    let expects_peers = !cfg.seed_peers.is_empty() || !cfg.tracker_url.is_empty();
    let peers_ok = !expects_peers || state.network.peer_count() > 0;
    let healthy = gpu_ok && network_ok && storage == "ok" && peers_ok;
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthResponse {
        healthy,
        checks: HealthChecks {
            gpu: gpu.into(),
            network: if network_ok { "ok" } else { "down" }.into(),
            storage,
            peers: if peers_ok { "ok" } else { "no_peers" }.into(),
        },
    };
    (code, Json(body))
}

/// Storage is ok when the data directory takes a write, has room left, and the ledger
/// database answers.
async fn storage_check(state: &AppState) -> String {
    let probe = state.data_dir.join(".health-probe");
    if let Err(e) = std::fs::write(&probe, b"ok") {
        return format!("not_writable: {}", e.kind());
    }
    let _ = std::fs::remove_file(&probe);
    let min = state.config().resources.min_free_disk_mb * 1024 * 1024;
    if let Some(free) = free_disk(&state.data_dir)
        && free < min
    {
        return format!("low_disk: {} MB free", free / (1024 * 1024));
    }
    // The probe is a write transaction: it runs on a task of its own, so the 2 s limit stops
    // the wait, never the transaction half-way.
    let store = state.ledger.store().clone();
    let probe = tokio::spawn(async move { store.ping().await });
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(Ok(()))) => "ok".into(),
        Ok(Ok(Err(e))) => format!("database: {e}"),
        Ok(Err(e)) => format!("database: probe task: {e}"),
        Err(_) => "database: no answer within 2 s".into(),
    }
}

#[derive(Serialize, ToSchema)]
pub struct StatusResponse {
    pub node_id: String,
    pub version: String,
    pub uptime_seconds: u64,
    /// running, degraded (engine restarting) or starting.
    pub status: String,
    /// full, driver, worker or validator.
    pub role: String,
    pub layers: Vec<u32>,
    pub peer_count: usize,
    /// The node wallet's address (receives its rewards).
    pub wallet_address: String,
    pub training: StatusTraining,
    pub resources: StatusResources,
}

#[derive(Serialize, ToSchema)]
pub struct StatusTraining {
    pub enabled: bool,
    /// Completed DiLoCo rounds' worth of inner steps: step / diloco_steps.
    pub epoch: u64,
    pub step: u64,
    /// Latest training loss; null before the first step.
    pub loss: Option<f32>,
}

#[derive(Serialize, ToSchema)]
pub struct StatusResources {
    pub gpu_memory_used: u64,
    pub gpu_memory_total: u64,
    pub cpu_percent: f32,
    pub ram_used: u64,
}

/// The node's role from what it holds (the notes' roles).
pub fn role(state: &AppState) -> &'static str {
    let training = state.training();
    if let Some(a) = training.assignment.as_ref().filter(|a| !a.is_full()) {
        a.role().as_str()
    } else if training.model_loaded {
        "full"
    } else {
        "worker"
    }
}

/// `GET /status`.
#[utoipa::path(get, path = "/api/v1/status", tag = "node",
    responses((status = 200, description = "Node status", body = StatusResponse)))]
pub async fn status(State(state): State<AppState>) -> Json<StatusResponse> {
    let cfg = state.config();
    let engine = state.engine.status();
    let training = state.training();
    let res = state.resources.latest();
    let layers: Vec<u32> = if training.model_loaded {
        crate::trainer::live_layers(&cfg, &training).collect()
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
    Json(StatusResponse {
        node_id: state.node_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: state.started.elapsed().as_secs(),
        status: status.into(),
        role: role(&state).into(),
        layers,
        peer_count: state.network.peer_count(),
        wallet_address: state.wallet.address().to_checksum(),
        training: StatusTraining {
            enabled: cfg.training.enabled,
            epoch: training.step / u64::from(cfg.training.diloco_steps.max(1)),
            step: training.step,
            loss: training.loss,
        },
        resources: StatusResources {
            gpu_memory_used: gpu_used,
            gpu_memory_total: gpu_total,
            cpu_percent: (res.cpu_percent * 10.0).round() / 10.0,
            ram_used: res.ram_used,
        },
    })
}

#[derive(Serialize, ToSchema)]
pub struct MetricsResponse {
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub inference: InferenceMetrics,
    pub training: TrainingMetrics,
    pub network: NetworkMetrics,
    pub rewards: RewardMetrics,
}

/// Inference requests over the last 5 minutes (rate, latency) and since start (totals).
#[derive(Serialize, ToSchema)]
pub struct InferenceMetrics {
    pub requests_total: u64,
    pub requests_per_minute: f64,
    pub avg_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub tokens_generated: u64,
}

#[derive(Serialize, ToSchema)]
pub struct TrainingMetrics {
    pub steps_total: u64,
    /// Steps over the last hour (extrapolated while the node is younger than an hour).
    pub steps_per_hour: f64,
    pub gradients_submitted: u64,
    pub gradients_accepted: u64,
}

/// Traffic of the peer service, as server and client, since start.
#[derive(Serialize, ToSchema)]
pub struct NetworkMetrics {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub active_connections: u64,
    pub rpc_calls: u64,
}

/// NEURO earned by the node wallet.
#[derive(Serialize, ToSchema)]
pub struct RewardMetrics {
    /// Rewards minted since 00:00 UTC today.
    pub earned_today: f64,
    pub earned_total: f64,
    /// Funds on their way: unstaked funds in cooldown plus unclaimed transfers.
    pub pending: f64,
}

/// Everything the metrics endpoints report, computed once.
pub struct Figures {
    pub metrics: MetricsResponse,
    pub api: crate::metrics::WindowFigures,
    pub loss: Option<f32>,
    pub model_loaded: bool,
    pub engine_up: bool,
    pub engine_restarts: u64,
    pub engine_memory_used: u64,
    pub uptime_seconds: u64,
    pub peers: usize,
    pub ledger_blocks: usize,
}

pub async fn figures(state: &AppState) -> Figures {
    let m = &state.metrics;
    let alive = state.started.elapsed();
    let inference = m.inference_window(alive);
    let training = state.training();
    let now = chrono::Utc::now();
    let address = state.wallet.address();
    let today = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc().timestamp())
        .unwrap_or(0);
    let (earned_total, earned_today) = state
        .ledger
        .with_state(|s| {
            s.account(&address).map_or((0u128, 0u128), |a| {
                a.proofs
                    .iter()
                    .filter(|p| p.verified)
                    .fold((0, 0), |(t, d), p| {
                        let r = u128::from(p.reward);
                        (t + r, d + if p.timestamp >= today { r } else { 0 })
                    })
            })
        })
        .await;
    let balance = state.ledger.balance(&address, now.timestamp()).await;
    let blocks = state.ledger.with_state(|s| s.block_count()).await;
    let neuro = |u: u128| u as f64 / crate::ledger::UNITS_PER_NEURO as f64;
    let engine = state.engine.status();
    let net = &state.network;
    Figures {
        metrics: MetricsResponse {
            timestamp: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            inference: InferenceMetrics {
                requests_total: m.inference_requests.load(Ordering::Relaxed),
                requests_per_minute: round2(inference.per_minute),
                avg_latency_ms: round2(inference.avg_ms),
                p99_latency_ms: round2(inference.p99_ms),
                tokens_generated: m.tokens_generated.load(Ordering::Relaxed),
            },
            training: TrainingMetrics {
                steps_total: training.step,
                steps_per_hour: round2(training.rate.per_hour(std::time::Instant::now())),
                gradients_submitted: m.gradients_submitted.load(Ordering::Relaxed),
                gradients_accepted: m.gradients_accepted.load(Ordering::Relaxed),
            },
            network: NetworkMetrics {
                bytes_sent: net.bytes_sent.load(Ordering::Relaxed),
                bytes_received: net.bytes_received.load(Ordering::Relaxed),
                active_connections: net.active_connections.load(Ordering::Relaxed),
                rpc_calls: net.rpc_calls.load(Ordering::Relaxed),
            },
            rewards: RewardMetrics {
                earned_today: neuro(earned_today),
                earned_total: neuro(earned_total),
                pending: neuro(u128::from(balance.pending)),
            },
        },
        api: m.api_window(alive),
        loss: training.loss,
        model_loaded: training.model_loaded,
        engine_up: engine.state == EngineState::Ok,
        engine_restarts: engine.restarts,
        engine_memory_used: engine.last_health.as_ref().map_or(0, |h| h.memory_used),
        uptime_seconds: alive.as_secs(),
        peers: net.peer_count(),
        ledger_blocks: blocks,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/api/v1/metrics", tag = "node",
    responses((status = 200, description = "Performance metrics", body = MetricsResponse)))]
pub async fn metrics(State(state): State<AppState>) -> Json<MetricsResponse> {
    Json(figures(&state).await.metrics)
}

/// `GET /metrics` outside `/api/v1`: the same figures in the Prometheus text format.
pub async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    let f = figures(&state).await;
    let m = &f.metrics;
    let a = &state.metrics;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP neuroshard_{name} {help}");
        let _ = writeln!(out, "# TYPE neuroshard_{name} {kind}");
        let _ = writeln!(out, "neuroshard_{name} {value}");
    };
    let c = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed) as f64;
    put(
        "uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        f.uptime_seconds as f64,
    );
    put(
        "api_requests_total",
        "counter",
        "REST requests answered.",
        c(&a.api_requests),
    );
    put(
        "api_client_errors_total",
        "counter",
        "REST answers 4xx other than 401 and 429.",
        c(&a.api_client_errors),
    );
    put(
        "api_unauthorized_total",
        "counter",
        "REST answers 401.",
        c(&a.api_unauthorized),
    );
    put(
        "api_rate_limited_total",
        "counter",
        "REST answers 429.",
        c(&a.api_rate_limited),
    );
    put(
        "api_server_errors_total",
        "counter",
        "REST answers 5xx.",
        c(&a.api_server_errors),
    );
    put(
        "api_requests_per_minute",
        "gauge",
        "REST requests per minute over 5 minutes.",
        f.api.per_minute,
    );
    put(
        "api_latency_p50_ms",
        "gauge",
        "REST latency median over 5 minutes.",
        f.api.p50_ms,
    );
    put(
        "api_latency_p99_ms",
        "gauge",
        "REST latency p99 over 5 minutes.",
        f.api.p99_ms,
    );
    put(
        "inference_requests_total",
        "counter",
        "Inference requests finished.",
        m.inference.requests_total as f64,
    );
    put(
        "inference_requests_per_minute",
        "gauge",
        "Inference requests per minute over 5 minutes.",
        m.inference.requests_per_minute,
    );
    put(
        "inference_latency_avg_ms",
        "gauge",
        "Inference latency mean over 5 minutes.",
        m.inference.avg_latency_ms,
    );
    put(
        "inference_latency_p99_ms",
        "gauge",
        "Inference latency p99 over 5 minutes.",
        m.inference.p99_latency_ms,
    );
    put(
        "tokens_generated_total",
        "counter",
        "Tokens generated.",
        m.inference.tokens_generated as f64,
    );
    put(
        "training_steps_total",
        "counter",
        "Optimizer steps of the held layers.",
        m.training.steps_total as f64,
    );
    put(
        "training_steps_per_hour",
        "gauge",
        "Training steps per hour over the last hour.",
        m.training.steps_per_hour,
    );
    put(
        "training_loss",
        "gauge",
        "Latest training loss (NaN before the first step).",
        f.loss.map_or(f64::NAN, f64::from),
    );
    put(
        "training_model_loaded",
        "gauge",
        "1 when the engine holds the model.",
        f64::from(u8::from(f.model_loaded)),
    );
    put(
        "gradients_submitted_total",
        "counter",
        "Pseudo-gradients sent to replicas.",
        m.training.gradients_submitted as f64,
    );
    put(
        "gradients_accepted_total",
        "counter",
        "Pseudo-gradients accepted from replicas.",
        m.training.gradients_accepted as f64,
    );
    put(
        "engine_up",
        "gauge",
        "1 when the engine answers.",
        f64::from(u8::from(f.engine_up)),
    );
    put(
        "engine_restarts_total",
        "counter",
        "Engine restarts by the supervisor.",
        f.engine_restarts as f64,
    );
    put(
        "engine_memory_used_bytes",
        "gauge",
        "Device memory the engine uses.",
        f.engine_memory_used as f64,
    );
    put("peers", "gauge", "Connected peers.", f.peers as f64);
    put(
        "peer_bytes_sent_total",
        "counter",
        "Bytes sent by the peer service.",
        m.network.bytes_sent as f64,
    );
    put(
        "peer_bytes_received_total",
        "counter",
        "Bytes received by the peer service.",
        m.network.bytes_received as f64,
    );
    put(
        "peer_rpc_calls_total",
        "counter",
        "Peer RPC calls served and made.",
        m.network.rpc_calls as f64,
    );
    put(
        "rewards_earned_total_neuro",
        "counter",
        "NEURO minted to the node wallet.",
        m.rewards.earned_total,
    );
    put(
        "rewards_earned_today_neuro",
        "gauge",
        "NEURO minted to the node wallet since 00:00 UTC.",
        m.rewards.earned_today,
    );
    put(
        "rewards_pending_neuro",
        "gauge",
        "NEURO in cooldown or unclaimed.",
        m.rewards.pending,
    );
    put(
        "ledger_blocks",
        "gauge",
        "Ledger blocks held.",
        f.ledger_blocks as f64,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
