//! Runs the peer-to-peer stacks' bench binaries (`bench/p2p/`, issue 21 item 1) on the NAT
//! lab: a relay on the public bridge, a server and a client on hosts placed as asked, the
//! client's JSON report back. Used by the `p2p-bench` binary (the measurement) and the
//! `nat::` scenario (the chosen stack through real NATs).
//!
//! Both binaries take the same arguments: `relay --ip --dir`, `server --dir --name`,
//! `client --dir --name --bytes --wait-direct [--relay-only] --connect-timeout`; the relay and
//! the server leave what a client needs to reach them as files in `dir`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::nat::{Host, NatLab};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stack {
    Iroh,
    Libp2p,
}

impl Stack {
    pub fn binary_name(self) -> &'static str {
        match self {
            Stack::Iroh => "iroh-bench",
            Stack::Libp2p => "libp2p-bench",
        }
    }

    /// The file the relay writes once it serves.
    fn relay_ready_file(self) -> &'static str {
        match self {
            Stack::Iroh => "relay.url",
            Stack::Libp2p => "relay.addr",
        }
    }
}

/// `bench/p2p/target/release/<binary>` (or under `$NEUROSHARD_P2P_BENCH_DIR`); an error
/// naming the command that builds it when it is not there.
pub fn binary(stack: Stack) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("NEUROSHARD_P2P_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/p2p/target/release"),
    };
    let path = dir.join(stack.binary_name());
    if !path.exists() {
        bail!(
            "{} is not built: cargo build --release --manifest-path bench/p2p/Cargo.toml -p {} \
             (scripts/test.sh does it)",
            path.display(),
            stack.binary_name()
        );
    }
    Ok(path)
}

/// One stack's relay and servers on a [`NatLab`]; files and logs in a temporary directory.
pub struct P2pRun {
    pub stack: Stack,
    pub dir: tempfile::TempDir,
    program: PathBuf,
    relay: Option<usize>,
}

fn wait_file(path: &Path, within: Duration, lab: &mut NatLab, child: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if let Ok(Some(status)) = lab.child(child).try_wait() {
            bail!("exited ({status}) before writing {}", path.display());
        }
        if Instant::now() > deadline {
            bail!("{} not written within {within:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl P2pRun {
    /// Starts the stack's relay on the lab's relay host and waits until it serves.
    pub fn start(lab: &mut NatLab, stack: Stack) -> anyhow::Result<P2pRun> {
        let program = binary(stack)?;
        let dir = tempfile::Builder::new().prefix("nsp2p-").tempdir()?;
        let mut run = P2pRun {
            stack,
            dir,
            program,
            relay: None,
        };
        run.start_relay(lab)?;
        Ok(run)
    }

    /// (Re)starts the relay.
    pub fn start_relay(&mut self, lab: &mut NatLab) -> anyhow::Result<()> {
        let ready = self.dir.path().join(self.stack.relay_ready_file());
        let _ = std::fs::remove_file(&ready);
        let relay = lab.relay.clone();
        let args = vec![
            "relay".into(),
            "--ip".into(),
            relay.ip.to_string(),
            "--dir".into(),
            self.dir.path().display().to_string(),
        ];
        let log = self.dir.path().join("relay.log");
        let child = lab.spawn(&relay, &self.program, &args, &log)?;
        self.relay = Some(child);
        wait_file(&ready, Duration::from_secs(30), lab, child)
            .with_context(|| format!("the {:?} relay: {}", self.stack, self.log("relay")))
    }

    /// The relay process's CPU seconds so far (user + system, from `/proc`).
    pub fn relay_cpu_seconds(&self, lab: &mut NatLab) -> Option<f64> {
        let pid = lab.child(self.relay?).id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): utime and stime are the
        // 12th and 13th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
        Some(ticks / hz.max(1) as f64)
    }

    /// Kills the relay.
    pub fn stop_relay(&mut self, lab: &mut NatLab) {
        if let Some(c) = self.relay.take() {
            lab.kill(c);
        }
    }

    /// The last lines of `<name>.log`.
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts a server named `name` on `host`; returns once it is reachable through the relay.
    pub fn start_server(&self, lab: &mut NatLab, host: &Host, name: &str) -> anyhow::Result<usize> {
        let addr = self.dir.path().join(format!("{name}.addr"));
        let args = vec![
            "server".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--name".into(),
            name.into(),
        ];
        let log = self.dir.path().join(format!("{name}.log"));
        let child = lab.spawn(host, &self.program, &args, &log)?;
        wait_file(&addr, Duration::from_secs(40), lab, child)
            .with_context(|| format!("server {name}: {}", self.log(name)))?;
        Ok(child)
    }

    /// Runs a client on `host` against server `name`; its report, or an error with its
    /// message (or "hung" when it outlives `within`).
    pub fn client(
        &self,
        lab: &mut NatLab,
        host: &Host,
        name: &str,
        opts: &ClientOptions,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let mut args = vec![
            "client".to_string(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--name".into(),
            name.into(),
            "--bytes".into(),
            opts.bytes.to_string(),
            "--wait-direct".into(),
            opts.wait_direct_s.to_string(),
            "--connect-timeout".into(),
            opts.connect_timeout_s.to_string(),
        ];
        if opts.relay_only {
            args.push("--relay-only".into());
        }
        let log_name = format!("client-{name}");
        let log = self.dir.path().join(format!("{log_name}.log"));
        let relay_cpu0 = self.relay_cpu_seconds(lab);
        let child = lab.spawn(host, &self.program, &args, &log)?;
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = lab.child(child).try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                lab.kill(child);
                bail!(
                    "the {:?} client hung: still running after {within:?}\n{}",
                    self.stack,
                    self.log(&log_name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut s) = lab.child(child).stdout.take() {
            use std::io::Read;
            s.read_to_string(&mut out)?;
        }
        let line = out.lines().last().unwrap_or_default();
        let mut report: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "the client ({status}) printed no report: {out:?}\n{}",
                self.log(&log_name)
            )
        })?;
        if let Some(e) = report.get("error") {
            bail!(
                "the {:?} client failed: {}",
                self.stack,
                e.as_str().unwrap_or_default()
            );
        }
        if !status.success() {
            bail!("the client exited with {status}: {line}");
        }
        // What relaying cost the relay (its whole process, the client's connection included).
        if let (Some(a), Some(b)) = (relay_cpu0, self.relay_cpu_seconds(lab)) {
            report["relay_cpu_s"] = serde_json::json!(b - a);
        }
        Ok(report)
    }
}

/// What a client does.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub bytes: u64,
    /// How long it waits for a direct path before it measures.
    pub wait_direct_s: f64,
    /// Only the relay (no IP transport on the client).
    pub relay_only: bool,
    pub connect_timeout_s: f64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            bytes: 64 << 20,
            wait_direct_s: 10.0,
            relay_only: false,
            connect_timeout_s: 20.0,
        }
    }
}
