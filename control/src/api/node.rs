//! Node endpoints: health, status, metrics (JSON and Prometheus text).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::engine::EngineState;
use crate::metrics::{Exposition, Metrics};
use crate::resources::free_disk;

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
    let peers_ok = !expects_peers || !state.net.peers.is_empty();
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
    if state.config().node.observer {
        return "observer";
    }
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
        crate::stats::live_layers(&cfg, &training).collect()
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
        peer_count: state.net.peers.len(),
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
    /// Of [`Figures::peers`], those reached through a relay only.
    pub peers_relayed: usize,
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
    let neuro = |u: u128| u as f64 / neuroshard_ledger::UNITS_PER_NEURO as f64;
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
                active_connections: state.net.peers.len() as u64,
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
        peers: state.net.peers.len(),
        peers_relayed: state.net.relayed_peer_count(),
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
    let text = exposition(&figures(&state).await, &state.metrics, &state.network);
    ([(header::CONTENT_TYPE, Exposition::CONTENT_TYPE)], text)
}

/// The `/metrics` text of one snapshot. Counters are named without `_total` here: the encoder
/// appends it (`api_requests` is exposed as `neuroshard_api_requests_total`). The rewards
/// earned since start are a gauge so that their name keeps its `_total_neuro` ending.
fn exposition(f: &Figures, a: &Metrics, net: &neuroshard_net::PeerState) -> String {
    let m = &f.metrics;
    let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let mut e = Exposition::default();
    e.gauge(
        "uptime_seconds",
        "Seconds since the daemon started",
        f.uptime_seconds,
    );
    e.counter("api_requests", "REST requests answered", c(&a.api_requests));
    e.counter(
        "api_client_errors",
        "REST answers 4xx other than 401 and 429",
        c(&a.api_client_errors),
    );
    e.counter(
        "api_unauthorized",
        "REST answers 401",
        c(&a.api_unauthorized),
    );
    e.counter(
        "api_rate_limited",
        "REST answers 429",
        c(&a.api_rate_limited),
    );
    e.counter(
        "api_server_errors",
        "REST answers 5xx",
        c(&a.api_server_errors),
    );
    e.gauge(
        "api_requests_per_minute",
        "REST requests per minute over 5 minutes",
        f.api.per_minute,
    );
    e.gauge(
        "api_latency_p50_ms",
        "REST latency median over 5 minutes",
        f.api.p50_ms,
    );
    e.gauge(
        "api_latency_p99_ms",
        "REST latency p99 over 5 minutes",
        f.api.p99_ms,
    );
    e.counter(
        "inference_requests",
        "Inference requests finished",
        m.inference.requests_total,
    );
    e.gauge(
        "inference_requests_per_minute",
        "Inference requests per minute over 5 minutes",
        m.inference.requests_per_minute,
    );
    e.gauge(
        "inference_latency_avg_ms",
        "Inference latency mean over 5 minutes",
        m.inference.avg_latency_ms,
    );
    e.gauge(
        "inference_latency_p99_ms",
        "Inference latency p99 over 5 minutes",
        m.inference.p99_latency_ms,
    );
    e.counter(
        "tokens_generated",
        "Tokens generated",
        m.inference.tokens_generated,
    );
    e.counter(
        "training_steps",
        "Optimizer steps of the held layers",
        m.training.steps_total,
    );
    e.gauge(
        "training_steps_per_hour",
        "Training steps per hour over the last hour",
        m.training.steps_per_hour,
    );
    e.gauge(
        "training_loss",
        "Latest training loss (NaN before the first step)",
        f.loss.map_or(f64::NAN, f64::from),
    );
    e.gauge(
        "training_model_loaded",
        "1 when the engine holds the model",
        i64::from(f.model_loaded),
    );
    e.counter(
        "gradients_submitted",
        "Pseudo-gradients sent to replicas",
        m.training.gradients_submitted,
    );
    e.counter(
        "gradients_accepted",
        "Pseudo-gradients accepted from replicas",
        m.training.gradients_accepted,
    );
    e.gauge(
        "engine_up",
        "1 when the engine answers",
        i64::from(f.engine_up),
    );
    e.counter(
        "engine_restarts",
        "Engine restarts by the supervisor",
        f.engine_restarts,
    );
    e.gauge(
        "engine_memory_used_bytes",
        "Device memory the engine uses",
        f.engine_memory_used,
    );
    e.gauge("peers", "Connected peers", f.peers);
    e.gauge(
        "peers_direct",
        "Connected peers reached on a direct connection",
        f.peers.saturating_sub(f.peers_relayed),
    );
    e.gauge(
        "peers_relayed",
        "Connected peers reached through a relay only",
        f.peers_relayed,
    );
    e.counter(
        "peer_bytes_sent",
        "Bytes sent by the peer service",
        m.network.bytes_sent,
    );
    e.counter(
        "peer_bytes_received",
        "Bytes received by the peer service",
        m.network.bytes_received,
    );
    let paths = &net.stream_bytes;
    for (name, help, v) in [
        (
            "peer_stream_bytes_sent_direct",
            "Peer stream bytes sent to peers on a direct connection",
            &paths.direct_sent,
        ),
        (
            "peer_stream_bytes_received_direct",
            "Peer stream bytes received from peers on a direct connection",
            &paths.direct_received,
        ),
        (
            "peer_stream_bytes_sent_relayed",
            "Peer stream bytes sent to peers reached through a relay only",
            &paths.relayed_sent,
        ),
        (
            "peer_stream_bytes_received_relayed",
            "Peer stream bytes received from peers reached through a relay only",
            &paths.relayed_received,
        ),
    ] {
        e.counter(name, help, c(v));
    }
    e.counter(
        "peer_rpc_calls",
        "Peer RPC calls served and made",
        m.network.rpc_calls,
    );
    e.gauge(
        "rewards_earned_total_neuro",
        "NEURO minted to the node wallet",
        m.rewards.earned_total,
    );
    e.gauge(
        "rewards_earned_today_neuro",
        "NEURO minted to the node wallet since 00:00 UTC",
        m.rewards.earned_today,
    );
    e.gauge(
        "rewards_pending_neuro",
        "NEURO in cooldown or unclaimed",
        m.rewards.pending,
    );
    e.gauge("ledger_blocks", "Ledger blocks held", f.ledger_blocks);
    e.counter(
        "http_connections_accepted",
        "REST connections accepted",
        c(&a.http.accepted),
    );
    e.counter(
        "http_connections_refused",
        "REST connections refused at accept (per-address or total cap)",
        a.http.refused(),
    );
    e.gauge(
        "http_connections_open",
        "REST connections open",
        c(&a.http.open),
    );
    e.counter(
        "peer_connections_accepted",
        "Peer-port connections accepted",
        c(&net.connections.accepted),
    );
    e.counter(
        "peer_connections_refused",
        "Peer-port connections refused at accept (per-address or total cap)",
        net.connections.refused(),
    );
    e.gauge(
        "peer_connections_open",
        "Peer-port connections open",
        c(&net.connections.open),
    );
    e.counter(
        "peer_handshake_timeouts",
        "Peer-port connections that failed their transport handshake (garbage, a bad key, or too slow)",
        c(&net.handshake_timeouts),
    );
    e.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition keeps every name the hand-written one had.
    #[test]
    fn exposition_keeps_the_metric_names() {
        let f = Figures {
            metrics: MetricsResponse {
                timestamp: String::new(),
                inference: InferenceMetrics {
                    requests_total: 5,
                    requests_per_minute: 1.5,
                    avg_latency_ms: 20.25,
                    p99_latency_ms: 40.0,
                    tokens_generated: 70,
                },
                training: TrainingMetrics {
                    steps_total: 9,
                    steps_per_hour: 120.0,
                    gradients_submitted: 2,
                    gradients_accepted: 1,
                },
                network: NetworkMetrics {
                    bytes_sent: 1000,
                    bytes_received: 2000,
                    active_connections: 1,
                    rpc_calls: 30,
                },
                rewards: RewardMetrics {
                    earned_today: 0.5,
                    earned_total: 2.5,
                    pending: 0.0,
                },
            },
            api: crate::metrics::WindowFigures::default(),
            loss: None,
            model_loaded: true,
            engine_up: true,
            engine_restarts: 3,
            engine_memory_used: 1 << 30,
            uptime_seconds: 61,
            peers: 2,
            peers_relayed: 1,
            ledger_blocks: 4,
        };
        let a = Metrics::default();
        a.record_api(401, Duration::from_millis(3));
        let text = exposition(&f, &a, &neuroshard_net::PeerState::default());
        let samples: Vec<(&str, &str)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let counters = [
            "api_requests_total",
            "api_client_errors_total",
            "api_unauthorized_total",
            "api_rate_limited_total",
            "api_server_errors_total",
            "inference_requests_total",
            "tokens_generated_total",
            "training_steps_total",
            "gradients_submitted_total",
            "gradients_accepted_total",
            "engine_restarts_total",
            "peer_bytes_sent_total",
            "peer_bytes_received_total",
            "peer_rpc_calls_total",
            "peer_stream_bytes_sent_direct_total",
            "peer_stream_bytes_received_direct_total",
            "peer_stream_bytes_sent_relayed_total",
            "peer_stream_bytes_received_relayed_total",
            "http_connections_accepted_total",
            "http_connections_refused_total",
            "peer_connections_accepted_total",
            "peer_connections_refused_total",
            "peer_handshake_timeouts_total",
        ];
        let gauges = [
            "uptime_seconds",
            "api_requests_per_minute",
            "api_latency_p50_ms",
            "api_latency_p99_ms",
            "inference_requests_per_minute",
            "inference_latency_avg_ms",
            "inference_latency_p99_ms",
            "training_steps_per_hour",
            "training_loss",
            "training_model_loaded",
            "engine_up",
            "engine_memory_used_bytes",
            "peers",
            "peers_direct",
            "peers_relayed",
            "rewards_earned_total_neuro",
            "rewards_earned_today_neuro",
            "rewards_pending_neuro",
            "ledger_blocks",
            "http_connections_open",
            "peer_connections_open",
        ];
        assert_eq!(types.len(), counters.len() + gauges.len(), "{text}");
        for (names, kind) in [(&counters[..], "counter"), (&gauges[..], "gauge")] {
            for name in names {
                let full = format!("neuroshard_{name}");
                assert!(
                    types.contains(&(full.as_str(), kind)),
                    "{full} {kind}\n{text}"
                );
                assert!(samples.iter().any(|(n, _)| *n == full), "{full}\n{text}");
            }
        }
        for (name, value) in [
            ("neuroshard_api_requests_total", "1"),
            ("neuroshard_api_unauthorized_total", "1"),
            ("neuroshard_uptime_seconds", "61"),
            ("neuroshard_engine_up", "1"),
            ("neuroshard_engine_memory_used_bytes", "1073741824"),
            ("neuroshard_training_loss", "NaN"),
            ("neuroshard_inference_latency_avg_ms", "20.25"),
            ("neuroshard_rewards_earned_total_neuro", "2.5"),
        ] {
            assert!(samples.contains(&(name, value)), "{name} {value}\n{text}");
        }
        assert!(text.contains(
            "# HELP neuroshard_api_client_errors_total REST answers 4xx other than 401 and 429.\n"
        ));
    }
}
