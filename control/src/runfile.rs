//! The runtime file `<data-dir>/node.json`: what the running daemon of a data directory is
//! (pid, ports, scheme, start time) and how it was started (arguments, working directory,
//! non-secret environment), so that the operator commands find the node whatever port it was
//! started with, and `restart` can start it again the same way.
//!
//! Written atomically (private to the user, like the rest of the data directory) once both
//! listeners are bound, removed at a clean stop. A file left by a crash is stale: its pid is
//! no longer a live process, and readers ignore it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const RUN_FILE: &str = "node.json";

/// Environment variables a restart does not replay: secrets (read again from the shell that
/// runs `restart`) and `restart`'s own setting for a node in the background.
const NOT_REPLAYED: [&str; 3] = [
    "NEUROSHARD_WALLET_PASSPHRASE",
    "NEUROSHARD_TOKEN",
    crate::logfile::NO_STDERR_ENV,
];

#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a node runtime file: {message}")]
    Parse { path: PathBuf, message: String },
}

/// How the node was started: enough to start it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The `neuroshard` binary that runs the node.
    pub exe: PathBuf,
    /// Its arguments after the program name (`--data-dir D start --port P ...`).
    pub args: Vec<String>,
    /// The working directory relative paths in `args` are resolved from.
    pub cwd: PathBuf,
    /// `NEUROSHARD_*` and `RUST_LOG` variables of the start, secrets left out.
    pub env: BTreeMap<String, String>,
}

impl Launch {
    /// This process's own launch (called by the `start` command).
    pub fn current() -> Launch {
        Launch {
            exe: std::env::current_exe()
                .map(|p| upgraded(&p))
                .unwrap_or_else(|_| PathBuf::from("neuroshard")),
            args: std::env::args().skip(1).collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: kept_env(std::env::vars()),
        }
    }
}

/// The path of the running binary: after an upgrade replaced the file, Linux names it
/// `PATH (deleted)`; a restart runs the new binary at `PATH`.
fn upgraded(exe: &Path) -> PathBuf {
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe.to_path_buf(),
    }
}

/// The variables of `vars` a restart replays: `NEUROSHARD_*` and `RUST_LOG`, not secrets.
fn kept_env(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter(|(k, _)| k.starts_with("NEUROSHARD_") || k == "RUST_LOG")
        .filter(|(k, _)| !NOT_REPLAYED.contains(&k.as_str()))
        .collect()
}

/// The content of `node.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub pid: u32,
    /// Address the REST API binds.
    pub host: String,
    /// REST API port.
    pub port: u16,
    /// Peer service port.
    pub peer_port: u16,
    /// `http` (or `https` when the API serves TLS).
    pub scheme: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// The address of the wallet the node runs as (`--wallet` or the data directory's).
    #[serde(default)]
    pub wallet: String,
    pub launch: Launch,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(RUN_FILE)
}

/// Writes `info` atomically; the returned guard removes the file when dropped (clean stop).
pub fn write(data_dir: &Path, info: &RunInfo) -> Result<RunFileGuard, RunFileError> {
    let path = path(data_dir);
    let text = serde_json::to_vec_pretty(info).map_err(|e| RunFileError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    crate::config::write_atomic_mode(&path, &text, 0o600).map_err(|source| RunFileError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(RunFileGuard { path })
}

/// Removes `node.json` when dropped.
pub struct RunFileGuard {
    path: PathBuf,
}

impl Drop for RunFileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a data directory's runtime file says.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// No file: no node was started here since the last clean stop.
    None,
    /// A file whose pid is a live process.
    Running(RunInfo),
    /// A file left by a node that is gone (crashed or killed).
    Stale(RunInfo),
}

/// Reads the runtime file of `data_dir` and tells a live node from a stale file.
pub fn read(data_dir: &Path) -> Result<Found, RunFileError> {
    let path = path(data_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::None),
        Err(source) => return Err(RunFileError::Io { path, source }),
    };
    let info: RunInfo = serde_json::from_slice(&text).map_err(|e| RunFileError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let pid = i32::try_from(info.pid).unwrap_or(i32::MAX);
    Ok(if pid_alive(pid) && pid != 0 {
        Found::Running(info)
    } else {
        Found::Stale(info)
    })
}

/// The running node of `data_dir`, if its runtime file names a live process; a stale file is
/// reported on stderr and otherwise ignored, an unreadable one likewise.
pub fn running(data_dir: &Path) -> Option<RunInfo> {
    match read(data_dir) {
        Ok(Found::Running(info)) => Some(info),
        Ok(Found::Stale(info)) => {
            eprintln!(
                "note: ignoring {} left by node {} (no longer running)",
                path(data_dir).display(),
                info.pid
            );
            None
        }
        Ok(Found::None) => None,
        Err(e) => {
            eprintln!("note: ignoring {e}");
            None
        }
    }
}

/// Whether `pid` is a live process (an exited one waiting to be reaped, a zombie, is not).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32) -> RunInfo {
        RunInfo {
            pid,
            host: "127.0.0.1".into(),
            port: 18555,
            peer_port: 19555,
            scheme: "http".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            wallet: String::new(),
            launch: Launch::current(),
        }
    }

    #[test]
    fn a_live_pid_is_running_a_dead_one_is_stale_and_the_guard_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::None);
        let me = info(std::process::id());
        let guard = write(dir.path(), &me).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Running(me.clone()));
        assert_eq!(running(dir.path()), Some(me));
        drop(guard);
        assert!(!path(dir.path()).exists());

        // A child that has exited and been reaped: its pid is no live process.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = info(pid);
        let _guard = write(dir.path(), &gone).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Stale(gone));
        assert_eq!(running(dir.path()), None);
    }

    #[test]
    fn a_garbled_file_is_an_error_naming_it_and_secrets_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{not json").unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("node.json is not a node runtime file"),
            "{err}"
        );
        assert_eq!(running(dir.path()), None);
        let vars = [
            ("NEUROSHARD_WALLET_PASSPHRASE", "hunter2"),
            ("NEUROSHARD_TOKEN", "nst_secret"),
            ("NEUROSHARD_PORT", "18555"),
            ("RUST_LOG", "debug"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let kept: Vec<String> = kept_env(vars.into_iter()).into_keys().collect();
        assert_eq!(kept, ["NEUROSHARD_PORT", "RUST_LOG"]);
        // A restart after an upgrade runs the new binary.
        assert_eq!(
            upgraded(Path::new("/usr/bin/neuroshard (deleted)")),
            Path::new("/usr/bin/neuroshard")
        );
        assert_eq!(
            upgraded(Path::new("/x/neuroshard")),
            Path::new("/x/neuroshard")
        );
    }
}
