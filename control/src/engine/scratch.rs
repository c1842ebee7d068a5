//! A short-lived second engine process for recomputing a peer's work (issue #19): the same
//! binary as the node's own engine, on its own socket and a one-slot shared-memory segment in
//! a temporary directory, so the node's engine and its training state are never touched. The
//! process ends when the `Scratch` is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_shared::shm::{Segment, segment_name_for};

use super::error::EngineError;
use super::handle::{EngineHandle, connect};
use super::supervisor::{EngineMode, SupervisorConfig, spawn_engine};

/// How long a scratch engine may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running scratch engine; killed on drop.
pub struct Scratch {
    pub engine: EngineHandle,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Scratch {
    /// Starts `binary` on the CPU with `threads` threads (0: the engine's default) in a fresh
    /// directory under `parent`, and attaches a small segment.
    pub async fn start(binary: &Path, threads: u32, parent: &Path) -> Result<Scratch, EngineError> {
        Self::start_with(binary, threads, parent, 1, 4096).await
    }

    /// As [`Scratch::start`], with a segment of `slots` slots of `slot_bytes` each (a replay
    /// of pipeline commands passes tensors through the training slots).
    pub async fn start_with(
        binary: &Path,
        threads: u32,
        parent: &Path,
        slots: u32,
        slot_bytes: u64,
    ) -> Result<Scratch, EngineError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            EngineError::Unavailable(format!("scratch engine: {what}: {e}"))
        };
        std::fs::create_dir_all(parent).map_err(|e| failed("data directory", &e))?;
        let dir = tempfile::Builder::new()
            .prefix("scratch-")
            .tempdir_in(parent)
            .map_err(|e| failed("temporary directory", &e))?;
        let socket: PathBuf = dir.path().join("engine.sock");
        let name = segment_name_for(dir.path());
        // Started as the supervisor starts the node's engine, on the CPU.
        let mut cfg = SupervisorConfig::new(
            EngineMode::Spawn,
            socket.clone(),
            binary.into(),
            name.clone(),
        );
        cfg.device = "cpu".into();
        cfg.cpu_threads = threads;
        let child = spawn_engine(&cfg).map_err(|e| failed("spawn", &e))?;
        let started = Instant::now();
        let client = loop {
            match connect(socket.clone()).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() > START_TIMEOUT => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (segment, _) =
            Segment::create(&name, slots, slot_bytes).map_err(|e| failed("segment", &e))?;
        let engine = EngineHandle::new(client, Arc::new(segment));
        engine.attach(&name).await?;
        Ok(Scratch {
            engine,
            _child: child,
            _dir: dir,
        })
    }
}
