//! A lab node: a real `neuroshard start` (and the engine it spawns) inside its own network
//! namespace and CPU cgroup, in a data directory of its own, as the harness's [`crate::Node`]
//! runs one on loopback. Every node uses the same ports (8000 REST, 9000 peer) at its own
//! address; the REST API binds 0.0.0.0 with `tls.insecure_http` so the lab, in the public
//! namespace, reads it in plain HTTP.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{binary, children_named, wait_for};

pub const REST_PORT: u16 = 8000;
pub const PEER_PORT: u16 = REST_PORT + 1000;

pub struct LabNode {
    pub index: usize,
    pub ns: String,
    pub ip: Ipv4Addr,
    dir: PathBuf,
    procs: PathBuf,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

/// Resident and proportional set size of a process, in KiB (PSS shares the pages processes
/// have in common, such as the binaries' code, among them: the honest per-node figure).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, o: Memory) -> Memory {
        Memory {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
        }
    }
}

fn memory_of(pid: i32) -> Memory {
    let field = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Memory {
        rss_kib: field(&rollup, "Rss:"),
        pss_kib: field(&rollup, "Pss:"),
    }
}

/// Makes `cmd` start inside namespace `ns` and the cgroup whose `cgroup.procs` is `procs`
/// (before it execs, so whatever it spawns is there too).
pub fn enter(cmd: &mut Command, ns: &str, procs: &Path) -> anyhow::Result<()> {
    let netns = std::fs::File::open(super::net::ns_path(ns))
        .with_context(|| format!("opening namespace {ns}"))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    // SAFETY: between fork and exec the child only makes two system calls on descriptors
    // opened before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            // "0": the writing process itself (cgroup v1 and v2).
            nix::unistd::write(procs.as_fd(), b"0")?;
            Ok(())
        });
    }
    Ok(())
}

impl LabNode {
    /// Writes `config` (TOML; the lab's keys are added) into `dir` and starts the node in
    /// namespace `ns` at `ip`, its processes in the cgroup whose `cgroup.procs` is `procs`.
    pub fn start(
        index: usize,
        ns: String,
        ip: Ipv4Addr,
        dir: PathBuf,
        procs: PathBuf,
        config: &str,
    ) -> anyhow::Result<LabNode> {
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "host = \"0.0.0.0\"\n{config}\n[tls]\ninsecure_http = true\n[ledger]\n{}",
            crate::INSTANT_LEDGER
        );
        std::fs::write(dir.join("neuroshard.toml"), config)?;
        let mut node = LabNode {
            index,
            ns,
            ip,
            dir,
            procs,
            child: None,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        node.spawn()?;
        Ok(node)
    }

    /// Starts the daemon (again) in its data directory, namespace and cgroup.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let mut cmd = Command::new(binary("neuroshard"));
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["start", "--port", &REST_PORT.to_string()])
            .env("RUST_LOG", "info")
            .env("NEUROSHARD_ENGINE_BINARY", binary("neuroshard-engine"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        enter(&mut cmd, &self.ns, &self.procs)?;
        self.child = Some(
            cmd.spawn()
                .context("spawning neuroshard in its namespace")?,
        );
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.pid().is_some_and(crate::pid_alive)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// `ip:9000`, the node's peer service.
    pub fn peer_addr(&self) -> String {
        format!("{}:{PEER_PORT}", self.ip)
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        let url = format!("http://{}:{REST_PORT}{path}", self.ip);
        let r = self.http.get(url).send().ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().ok()
    }

    /// POSTs `body` to `path` with the API token the daemon wrote for this start: the status
    /// and the answer (None when nothing answered).
    pub fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let token = std::fs::read_to_string(self.dir.join("api.cookie")).ok()?;
        let url = format!("http://{}:{REST_PORT}{path}", self.ip);
        let r = self
            .http
            .post(url)
            .bearer_auth(token.trim())
            .json(body)
            .send()
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.json().unwrap_or(Value::Null)))
    }

    /// Waits until the API answers with the model loaded.
    pub fn wait_up(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            &format!("lab node {} up", self.index),
            timeout,
            Duration::from_millis(250),
            || {
                let s = self.get("/api/v1/status")?;
                (!s["layers"].as_array()?.is_empty()).then_some(())
            },
        )
    }

    /// Daemon and engine memory.
    pub fn memory(&self) -> Memory {
        let Some(pid) = self.pid() else {
            return Memory::default();
        };
        children_named(pid, "neuroshard-engine")
            .into_iter()
            .fold(memory_of(pid), |m, e| m + memory_of(e))
    }

    /// Kills daemon and engine at once (a crash or a pulled plug).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let engines = children_named(child.id() as i32, "neuroshard-engine");
            let _ = child.kill();
            let _ = child.wait();
            for pid in engines {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = neuroshard_shared::shm::Segment::unlink(&neuroshard_shared::shm::segment_name_for(
            &self.dir,
        ));
    }

    /// Asks the daemon to stop (SIGTERM), kills it after 10 s.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = wait_for(
                "daemon stop",
                Duration::from_secs(10),
                Duration::from_millis(50),
                || child.try_wait().ok().flatten(),
            );
        }
        self.kill();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.stop();
    }
}
