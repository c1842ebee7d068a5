//! Keeps an engine connected: spawns it (or finds the one a service manager runs), attaches
//! the shared-memory segment, watches it, and restarts it with exponential backoff when it
//! dies or stops answering. The daemon never goes down with its engine.
//!
//! State flows one way: the supervisor task owns the child and publishes an `EngineStatus`
//! on a watch channel; everyone else reads it (health, status, trainer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_shared::shm::Segment;
use tokio::sync::watch;

use super::handle::{EngineHandle, connect};
use super::types::EngineHealth;
use serde::{Deserialize, Serialize};

/// How the daemon gets its engine (`engine.mode`, `--engine`): it spawns and watches it, or
/// connects to one a service manager runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    Spawn,
    External,
}

/// What the `gpu` health check reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// Connected, attached and answering.
    Ok,
    /// Gone or not answering; the supervisor is bringing it back.
    Restarting,
    /// Not started yet, or the supervisor has stopped.
    Down,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Ok => "ok",
            EngineState::Restarting => "restarting",
            EngineState::Down => "down",
        }
    }
}

/// The published view of the engine.
#[derive(Debug, Clone)]
pub struct EngineStatus {
    pub state: EngineState,
    /// Bumped on every successful (re)connect, so users re-issue LoadModel/Restore.
    pub generation: u64,
    /// The connected engine; `None` unless state is Ok.
    pub handle: Option<EngineHandle>,
    pub pid: Option<u32>,
    pub restarts: u64,
    /// When the current outage began (for the health grace period).
    pub since: Instant,
    pub last_health: Option<EngineHealth>,
}

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub mode: EngineMode,
    pub socket: PathBuf,
    pub binary: PathBuf,
    pub segment_name: String,
    pub device: String,
    pub cpu_threads: u32,
    /// `--weights` of the engine: f32 or int8 decode weights.
    pub serve_weights: String,
    /// `--serve-truncated` of the engine: the adversary build's `truncated_model` cheat.
    pub serve_truncated: bool,
    /// First restart delay; doubles per consecutive failure up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Interval of the liveness probe; `probe_failures` misses in a row count as a hang.
    pub probe_every: Duration,
    pub probe_failures: u32,
}

impl SupervisorConfig {
    pub fn new(mode: EngineMode, socket: PathBuf, binary: PathBuf, segment_name: String) -> Self {
        SupervisorConfig {
            mode,
            socket,
            binary,
            segment_name,
            device: "auto".into(),
            cpu_threads: 0,
            serve_weights: "f32".into(),
            serve_truncated: false,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            probe_every: Duration::from_millis(500),
            probe_failures: 6,
        }
    }
}

/// Handle to the supervisor: read the engine's status, wait for it to be ready.
#[derive(Clone)]
pub struct Engine {
    rx: watch::Receiver<EngineStatus>,
}

impl Engine {
    pub fn status(&self) -> EngineStatus {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<EngineStatus> {
        self.rx.clone()
    }

    /// The connected engine, if it is up right now.
    pub fn handle(&self) -> Option<EngineHandle> {
        self.rx.borrow().handle.clone()
    }
}

/// Starts the supervisor task; it runs until `shutdown` flips to true, then stops the engine
/// it spawned (SIGTERM, then SIGKILL after a grace period) and removes the socket file.
pub fn start(
    cfg: SupervisorConfig,
    segment: Arc<Segment>,
    shutdown: watch::Receiver<bool>,
) -> (Engine, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(EngineStatus {
        state: EngineState::Down,
        generation: 0,
        handle: None,
        pid: None,
        restarts: 0,
        since: Instant::now(),
        last_health: None,
    });
    let task = tokio::spawn(run(Arc::new(cfg), segment, tx, shutdown));
    (Engine { rx }, task)
}

async fn run(
    cfg: Arc<SupervisorConfig>,
    segment: Arc<Segment>,
    tx: watch::Sender<EngineStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut child: Option<tokio::process::Child> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let started = Instant::now();
        let why = tokio::select! {
            o = one_life(&cfg, &segment, &tx, &mut child) => o,
            _ = shutdown.changed() => break,
        };
        // Whatever ended this life, the old process must be gone before the next one starts.
        if let Some(mut c) = child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        // A life that lasted a while resets the backoff: a crash after hours of work
        // should be retried at once, a crash loop should slow down.
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        let delay = cfg
            .base_backoff
            .saturating_mul(1u32 << failures.min(16))
            .min(cfg.max_backoff);
        failures = failures.saturating_add(1);
        tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "engine lost; restarting");
        tx.send_modify(|s| {
            if s.state == EngineState::Ok {
                s.since = Instant::now();
            }
            s.state = EngineState::Restarting;
            s.handle = None;
            s.pid = None;
            s.restarts += 1;
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    tx.send_modify(|s| {
        s.state = EngineState::Down;
        s.handle = None;
    });
    if let Some(c) = child.take() {
        stop_gracefully(c).await;
    }
    if cfg.mode == EngineMode::Spawn {
        let _ = std::fs::remove_file(&cfg.socket);
    }
}

/// SIGTERM, then SIGKILL if the engine has not exited within 3 s.
async fn stop_gracefully(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        tracing::warn!("engine ignored SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

/// One engine lifetime: start (or find) it, attach, watch it until it dies or hangs; returns
/// why it ended. A
/// spawned child is stored in `child` so the caller can stop it however this life ends.
async fn one_life(
    cfg: &SupervisorConfig,
    segment: &Arc<Segment>,
    tx: &watch::Sender<EngineStatus>,
    child: &mut Option<tokio::process::Child>,
) -> String {
    if cfg.mode == EngineMode::Spawn {
        match spawn_engine(cfg) {
            Ok(c) => *child = Some(c),
            Err(e) => return format!("spawning {}: {e}", cfg.binary.display()),
        }
    }
    let pid = child.as_ref().and_then(|c| c.id());

    // Wait for the socket to answer Health (the child may still be starting).
    let deadline = Instant::now() + Duration::from_secs(15);
    let engine = loop {
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return format!("engine exited during start-up: {status}");
        }
        if let Ok(c) = connect(cfg.socket.clone()).await {
            let e = EngineHandle::new(c, segment.clone());
            if e.health().await.is_ok() {
                break e;
            }
        }
        if Instant::now() > deadline {
            return "engine did not answer within 15 s".into();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Err(e) = engine.attach(&cfg.segment_name).await {
        return format!("attach failed: {e}");
    }
    let health = engine.health().await.ok();
    tracing::info!(pid = ?pid, device = ?health.as_ref().map(|h| &h.device), "engine ready");
    tx.send_modify(|s| {
        s.state = EngineState::Ok;
        s.generation += 1;
        s.handle = Some(engine.clone());
        s.pid = pid.or(health.as_ref().map(|h| h.pid));
        s.last_health = health;
    });

    // Watch: child exit, or too many missed probes in a row (hung or gone external engine).
    let mut missed = 0;
    let mut probe = tokio::time::interval(cfg.probe_every);
    loop {
        tokio::select! {
            status = wait_child(child) => {
                return format!("engine exited: {status}");
            }
            _ = probe.tick() => {
                let answer = tokio::time::timeout(cfg.probe_every * 2, engine.health()).await;
                match answer {
                    Ok(Ok(reply)) => {
                        missed = 0;
                        // A restarted external engine has lost the mapping: attach again.
                        if !reply.attached {
                            return "engine lost its shared-memory attachment".into();
                        }
                        tx.send_modify(|s| s.last_health = Some(reply));
                    }
                    _ => {
                        missed += 1;
                        if missed >= cfg.probe_failures {
                            if let Some(c) = child.as_mut() {
                                let _ = c.start_kill();
                            }
                            return format!("engine missed {missed} health probes");
                        }
                    }
                }
            }
        }
    }
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> String {
    match child {
        Some(c) => match c.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        },
        None => std::future::pending().await,
    }
}

pub(super) fn spawn_engine(cfg: &SupervisorConfig) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&cfg.binary);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&cfg.socket)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .arg("--device")
        .arg(&cfg.device)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if cfg.cpu_threads > 0 {
        cmd.arg("--threads").arg(cfg.cpu_threads.to_string());
    }
    if cfg.serve_weights != "f32" {
        cmd.arg("--weights").arg(&cfg.serve_weights);
    }
    if cfg.serve_truncated {
        cmd.arg("--serve-truncated");
    }
    let child = cmd.spawn()?;
    tracing::info!(pid = ?child.id(), binary = %cfg.binary.display(), "engine spawned");
    Ok(child)
}

/// The engine binary next to the running daemon, else `neuroshard-engine` on PATH.
pub fn default_engine_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("neuroshard-engine")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("neuroshard-engine"))
}
