//! Commands that act on the node of a data directory as a process: `stop`, `restart`, `logs`,
//! and `config reset`. They find the node by its runtime file (`node.json`, see
//! [`crate::runfile`]), whatever port it was started with.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::config::Config;
use crate::daemon::{PID_FILE, Paths};
use crate::runfile::{self, Found, Launch, pid_alive};

/// What a node restarted in the background prints besides its log, in the log folder.
const RESTART_OUT: &str = "restart.out";

/// Lines `logs` prints when `-n` is not given.
pub const DEFAULT_LOG_LINES: usize = 50;

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep printing new lines as the node writes them (across log rotations) until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print the last N lines (0: none, only what follows with -f).
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = DEFAULT_LOG_LINES)]
    pub lines: usize,
}

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// Run the restarted node in this terminal (as `start` does) instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Seconds to wait for the restarted node's API to answer.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub wait_secs: u64,
}

/// The pid of the node running on `paths`' data directory: from `node.json`, else from the
/// pid file (a node of an older version).
fn running_pid(paths: &Paths) -> anyhow::Result<i32> {
    if let Some(info) = runfile::running(&paths.data_dir) {
        return Ok(info.pid as i32);
    }
    let pid_path = paths.data_dir.join(PID_FILE);
    let pid: i32 = match std::fs::read_to_string(&pid_path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("{} is not a pid", pid_path.display()))?,
        Err(_) => bail!(
            "no node is running with data directory {}",
            paths.data_dir.display()
        ),
    };
    if !pid_alive(pid) {
        bail!("no node is running (stale pid file {})", pid_path.display());
    }
    Ok(pid)
}

/// Sends SIGTERM to `pid` and waits up to 30 s for it to exit.
fn stop_pid(pid: i32) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        bail!("no node is running (process {pid} is gone)");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid.as_raw()) {
        if Instant::now() > deadline {
            bail!("node {pid} did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `neuroshard stop`: SIGTERM to the running node, waiting for its clean exit.
pub fn stop(paths: &Paths) -> anyhow::Result<()> {
    let pid = running_pid(paths)?;
    stop_pid(pid)?;
    println!("stopped node {pid}");
    Ok(())
}

/// `neuroshard restart`: stops the running node (as `stop` does) and starts it again with the
/// arguments, working directory and non-secret environment of its start. A node that crashed
/// (its runtime file left behind) is started again the same way.
pub fn restart(paths: &Paths, args: &RestartArgs) -> anyhow::Result<()> {
    let (launch, old) = match runfile::read(&paths.data_dir)? {
        Found::Running(info) => {
            stop_pid(info.pid as i32)?;
            println!("stopped node {}", info.pid);
            (info.launch, Some(info.pid))
        }
        Found::Stale(info) => {
            println!(
                "node {} is not running; starting it as it was started",
                info.pid
            );
            (info.launch, None)
        }
        Found::None => bail!(
            "no node has run with data directory {} since its last clean stop: start it with `neuroshard start`",
            paths.data_dir.display()
        ),
    };
    let mut cmd = command(&launch);
    if args.foreground {
        let err = cmd.exec();
        return Err(err).with_context(|| format!("running {}", launch.exe.display()));
    }
    // Its own process group: a Ctrl-C in this terminal does not reach it. It logs to its log
    // file only (`neuroshard logs`); what else it prints (a refused argument, a panic) goes
    // to `logs/restart.out`, started afresh at each restart.
    let out_path = paths
        .data_dir
        .join(crate::logfile::LOG_DIR)
        .join(RESTART_OUT);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let mut child = cmd
        .env(crate::logfile::NO_STDERR_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", launch.exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    loop {
        if let Some(status) = child.try_wait()? {
            let said = std::fs::read_to_string(&out_path).unwrap_or_default();
            bail!(
                "the restarted node exited at once ({status}): {}",
                said.trim()
            );
        }
        if let Ok(Found::Running(info)) = runfile::read(&paths.data_dir)
            && info.pid == child.id()
            && crate::client::Endpoint::local(&paths.data_dir, info.port)
                .and_then(|node| crate::client::call(&node, "GET", "/api/v1/health", None, None))
                .is_ok_and(|a| a.status == 200)
        {
            match old {
                Some(old) => println!(
                    "restarted: node {} on port {} (was {old})",
                    info.pid, info.port
                ),
                None => println!("started: node {} on port {}", info.pid, info.port),
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the restarted node {} did not answer within {} s; see `neuroshard logs`",
                child.id(),
                args.wait_secs
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The command that starts a node as `launch` says.
fn command(launch: &Launch) -> std::process::Command {
    let mut cmd = std::process::Command::new(&launch.exe);
    cmd.args(&launch.args)
        .current_dir(&launch.cwd)
        .envs(&launch.env)
        // A restarted node never opens a browser window.
        .env("NEUROSHARD_NO_BROWSER", "true");
    cmd
}

/// `neuroshard logs [-f] [-n N]`: the node's log file, `<data-dir>/logs/neuroshard.log`.
pub fn logs(paths: &Paths, args: &LogsArgs) -> anyhow::Result<()> {
    let path = crate::logfile::path(&paths.data_dir);
    let lines = crate::logfile::tail(&path, args.lines).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "no log at {} (no node has been started with data directory {})",
                path.display(),
                paths.data_dir.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("reading {}", path.display()))
        }
    })?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    let mut follower = crate::logfile::Follower::at_end(&path)
        .with_context(|| format!("following {}", path.display()))?;
    loop {
        let new = follower
            .poll()
            .with_context(|| format!("following {}", path.display()))?;
        if !new.is_empty() {
            out.write_all(&new)?;
            out.flush()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `neuroshard config reset --yes`: the defaults written atomically over the config file, the
/// old file kept beside it as `<file>.bak`.
pub fn config_reset(config_path: &Path, yes: bool) -> anyhow::Result<()> {
    let backup = backup_path(config_path);
    if !yes {
        bail!(
            "this replaces {} with the defaults (the old file is kept as {}): run `neuroshard config reset --yes` to do it",
            config_path.display(),
            backup.display()
        );
    }
    match std::fs::read(config_path) {
        Ok(old) => {
            crate::config::write_atomic_mode(&backup, &old, 0o600)
                .with_context(|| format!("writing the backup {}", backup.display()))?;
            println!("old config kept as {}", backup.display());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", config_path.display()));
        }
    }
    Config::default().save(config_path)?;
    println!(
        "{} reset to the defaults (a running node takes them at its next start: `neuroshard restart`)",
        config_path.display()
    );
    Ok(())
}

fn backup_path(config_path: &Path) -> std::path::PathBuf {
    let mut s = config_path.as_os_str().to_owned();
    s.push(".bak");
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reset_needs_yes_keeps_a_backup_and_writes_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("neuroshard.toml");
        let old = "port = 9000\n[training]\nbatch_size = 16\n";
        std::fs::write(&path, old).unwrap();

        let err = config_reset(&path, false).unwrap_err().to_string();
        assert!(err.contains("--yes"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), old);
        assert!(!backup_path(&path).exists());

        config_reset(&path, true).unwrap();
        assert_eq!(std::fs::read_to_string(backup_path(&path)).unwrap(), old);
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        // No temp file is left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
