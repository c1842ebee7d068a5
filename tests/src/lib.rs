//! Integration harness: runs real `neuroshard` / `neuroshard-engine` processes, each node in
//! its own temporary directory with free ports, waits by polling (never fixed sleeps), kills
//! its children on drop and prints their logs when a test fails. A node keeps its ledger in
//! SQLite or, with [`Backend::Postgres`], in a PostgreSQL database of its own. Every scenario
//! starts with [`scenario`]: the scenarios of one file run in parallel, those of different
//! files one file after another.

mod database;
pub mod lab;
mod scenario;
pub mod transport_bench;

pub use database::{Backend, POSTGRES_URL_VAR, PgDatabase};
pub use scenario::{Scenario, scenario};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Directory holding the built binaries: `$NEUROSHARD_BIN_DIR`, else the cargo target
/// directory this test binary was built into (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEUROSHARD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a built binary; panics with the command to build it when missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A port `p` such that both `p` (REST) and `p + 1000` (peer service) are free right now.
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let p = l.local_addr().expect("local addr").port();
        if p > 64000 {
            continue;
        }
        if std::net::TcpListener::bind(("0.0.0.0", p + 1000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair found");
}

/// Set when a [`wait_for`] timed out: a test that returns that error (rather than panicking)
/// still gets its processes' logs printed as they are dropped.
static TIMED_OUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A new group of scenarios starts with no timeout behind it (see [`scenario`]).
fn clear_timed_out() {
    TIMED_OUT.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this test is failing: a panic in progress or a [`wait_for`] of its group of
/// scenarios (of the process, outside a [`scenario`]) timed out.
/// Drop impls print logs when it is true, and always when `NEUROSHARD_TEST_LOGS=1` (to read
/// what the nodes did in a passing run).
pub fn failing() -> bool {
    std::thread::panicking()
        || TIMED_OUT.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var_os("NEUROSHARD_TEST_LOGS").is_some_and(|v| v == "1")
}

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            TIMED_OUT.store(true, std::sync::atomic::Ordering::Relaxed);
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at the state in /proc too.
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Children of `pid` whose executable name is `name`.
pub fn children_named(pid: i32, name: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(-1);
        // comm is truncated to 15 characters.
        if ppid == pid && state != "Z" && name.starts_with(comm) && !comm.is_empty() {
            found.push(child);
        }
    }
    found
}

/// The `[ledger]` keys of a test node that sets none: a development network where rewards are
/// spendable at once and a node training alone earns (most scenarios fund a user from the
/// node's first reward); the window and the receipts have scenarios of their own.
pub const INSTANT_LEDGER: &str = "challenge_window_secs = 0\naccept_unattested_training = true\n";

/// Options for a node under test.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Extra lines for `neuroshard.toml` (TOML).
    pub config: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where the ledger lives. PostgreSQL: [`Node::start`] creates a database for the node
    /// and writes its `database_url`; check [`Backend::available`] first.
    pub backend: Backend,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            config: "[training]\nenabled = false\nmodel = \"tiny\"\n".into(),
            extra_args: Vec::new(),
            env: Vec::new(),
            backend: Backend::Sqlite,
        }
    }
}

impl NodeOptions {
    /// The same options with `seed_peers` set (`host:port` of peer services), written as a
    /// top-level key before the tables of `config`.
    pub fn with_seed_peers(mut self, peers: &[String]) -> Self {
        let list: Vec<String> = peers.iter().map(|p| format!("{p:?}")).collect();
        self.config = format!("seed_peers = [{}]\n{}", list.join(", "), self.config);
        self
    }

    /// The same options with the ledger on `backend`.
    pub fn on(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
}

/// A running `neuroshard start` in its own data directory.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    log: PathBuf,
    http: reqwest::blocking::Client,
    opts: NodeOptions,
    /// The node's PostgreSQL database; dropped after the node's processes (fields drop after
    /// `Drop::drop`).
    database: Option<PgDatabase>,
}

impl Node {
    pub fn start(opts: NodeOptions) -> anyhow::Result<Node> {
        Node::start_in(&std::env::temp_dir(), opts)
    }

    /// Like [`Node::start`], with the data directory made under `parent` (a small file
    /// system, for instance).
    pub fn start_in(parent: &Path, opts: NodeOptions) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix("nsnode-")
            .tempdir_in(parent)?;
        let database = match opts.backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create()?),
        };
        let mut config = match &database {
            // A top-level key, so before the tables of `config`.
            Some(db) => format!("database_url = {:?}\n{}", db.url, opts.config),
            None => opts.config.clone(),
        };
        // A development network's ledger unless a scenario sets its own rules.
        if !config.contains("[ledger]") {
            config.push_str(&format!("\n[ledger]\n{INSTANT_LEDGER}"));
        }
        std::fs::write(dir.path().join("neuroshard.toml"), config)?;
        let mut node = Node {
            log: dir.path().join("daemon.log"),
            dir,
            port: free_port_pair(),
            child: None,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            opts,
            database,
        };
        node.spawn()?;
        Ok(node)
    }

    /// Starts the daemon again in the same data directory (after a kill or stop).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.start_command();
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().context("spawning neuroshard")?);
        Ok(())
    }

    /// `neuroshard start` for this node (data directory, port, options, environment), its
    /// output not yet directed: [`Node::spawn`] sends it to the node's log.
    pub fn start_command(&self) -> Command {
        let mut cmd = Command::new(binary("neuroshard"));
        cmd.arg("--data-dir")
            .arg(self.dir.path())
            .arg("start")
            .arg("--port")
            .arg(self.port.to_string())
            .args(&self.opts.extra_args)
            .env("RUST_LOG", "info")
            .env("NEUROSHARD_ENGINE_BINARY", binary("neuroshard-engine"))
            .stdin(Stdio::null());
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sets (or replaces) an environment variable of the daemon's next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.opts.env.retain(|(k, _)| k != key);
        self.opts.env.push((key.to_string(), value.to_string()));
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// `host:port` of the node's peer gRPC service (HTTP port + 1000) on loopback.
    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port + 1000)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// GET `path`: status code and JSON body; `None` if the node did not answer.
    pub fn get(&self, path: &str) -> Option<(u16, Value)> {
        let r = self.http.get(self.url(path)).send().ok()?;
        let code = r.status().as_u16();
        Some((code, r.json().unwrap_or(Value::Null)))
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().ok()?;
        let code = r.status().as_u16();
        Some((code, r.json().unwrap_or(Value::Null)))
    }

    /// The API token the daemon wrote for this start (`<data_dir>/api.cookie`).
    pub fn api_token(&self) -> anyhow::Result<String> {
        let path = self.dir.path().join("api.cookie");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text.trim().to_string())
    }

    /// A new wallet with its own API token, made as a user would (`neuroshard token create
    /// --new-wallet`): returns (token, wallet address).
    pub fn new_wallet(&self, name: &str) -> anyhow::Result<(String, String)> {
        let out = Command::new(binary("neuroshard"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["token", "create", "--name", name, "--new-wallet"])
            .output()?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let token = stdout
            .lines()
            .nth(1)
            .context("token create printed no token line")?
            .trim()
            .to_string();
        let balance: Value = self
            .http
            .get(self.url("/api/v1/wallet/balance"))
            .bearer_auth(&token)
            .send()?
            .json()?;
        let address = balance["address"]
            .as_str()
            .context("balance has no address")?
            .to_string();
        Ok((token, address))
    }

    /// Waits until the node's own wallet has more than `min` NEURO available (its training
    /// rewards arrive once per 60 s epoch); the available amount.
    pub fn wait_available(&self, min: f64, timeout: Duration) -> anyhow::Result<f64> {
        wait_for(
            "funds from a training reward",
            timeout,
            Duration::from_millis(500),
            || {
                let (code, b) =
                    self.authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)?;
                (code == 200).then_some(())?;
                b["balances"]["available"].as_f64().filter(|a| *a > min)
            },
        )
    }

    /// Sends `amount` NEURO from the node's own wallet to `to`, confirmed.
    pub fn send_from_node(&self, to: &str, amount: f64) -> anyhow::Result<()> {
        let (code, body) = self
            .authed(
                reqwest::Method::POST,
                "/api/v1/wallet/send",
                Some(serde_json::json!({"to": to, "amount": amount})),
            )
            .context("send: no answer")?;
        if code != 200 || body["status"] != "confirmed" {
            bail!("send of {amount} NEURO to {to} answered {code}: {body}");
        }
        Ok(())
    }

    /// Like [`Node::request`], with the node's own API token as bearer.
    pub fn authed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let token = self.api_token().ok()?;
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().ok()?;
        let code = r.status().as_u16();
        Some((code, r.json().unwrap_or(Value::Null)))
    }

    /// `method path` with `token` as bearer and a 20 s deadline (long enough for a generation
    /// on a loaded machine); the answer's JSON. Panics when there is no JSON answer.
    pub fn call_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut req = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                self.url(path),
            )
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().unwrap().json().unwrap()
    }

    /// Waits until `/api/v1/health` says healthy with the engine ok.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Value> {
        wait_for("node healthy", timeout, Duration::from_millis(50), || {
            let (code, body) = self.get("/api/v1/health")?;
            (code == 200 && body["healthy"] == true && body["checks"]["gpu"] == "ok")
                .then_some(body)
        })
    }

    /// Waits until the engine has the model loaded (status lists layers); inference answers
    /// 503 before that.
    pub fn wait_model_loaded(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            "the model loaded",
            timeout,
            Duration::from_millis(20),
            || {
                let (_, s) = self.get("/api/v1/status")?;
                (!s["layers"].as_array()?.is_empty()).then_some(())
            },
        )
    }

    /// The engine process the daemon spawned (there must be exactly one).
    pub fn engine_pid(&self) -> Option<i32> {
        let kids = children_named(self.pid()?, "neuroshard-engine");
        (kids.len() == 1).then(|| kids[0])
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("daemon not running")?;
        kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    /// Waits for the daemon to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().context("daemon not running")?;
        let status = wait_for("daemon exit", timeout, Duration::from_millis(20), || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status.code())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where this node keeps its ledger.
    pub fn backend(&self) -> Backend {
        self.opts.backend
    }

    /// Checks that the node keeps its ledger where its options say (the `database_url` of its
    /// config answer: empty for SQLite) and that neither that answer nor its logs show the
    /// database password.
    pub fn assert_database_settings(&self) {
        let (code, body) = self
            .authed(reqwest::Method::GET, "/api/v1/config", None)
            .expect("the node answers GET /api/v1/config");
        assert_eq!(code, 200, "{body}");
        let shown = body["database_url"].as_str().unwrap_or_default();
        match self.opts.backend {
            Backend::Sqlite => assert_eq!(shown, "", "{body}"),
            Backend::Postgres => assert!(shown.starts_with("postgres"), "{body}"),
        }
        if let Some(password) = self.database.as_ref().and_then(|d| d.password.as_deref()) {
            assert!(
                !shown.contains(password),
                "config answer shows the password: {body}"
            );
            assert!(
                !self.logs().contains(password),
                "node on port {} logged its database password",
                self.port
            );
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let engines = children_named(child.id() as i32, "neuroshard-engine");
            // Ask for a clean stop first (it removes the segment and socket), then insist.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let stopped = wait_for(
                "daemon stop",
                Duration::from_secs(10),
                Duration::from_millis(20),
                || child.try_wait().ok().flatten(),
            );
            if stopped.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
            for pid in engines {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // A test that killed the daemon leaves its segment behind: do not leak it.
        let _ = neuroshard_shared::shm::Segment::unlink(&neuroshard_shared::shm::segment_name_for(
            self.dir.path(),
        ));
        if failing() {
            eprintln!(
                "----- logs of node on port {} -----\n{}",
                self.port,
                self.logs()
            );
        }
    }
}

/// A `neuroshard-engine serve` started directly (as a service manager would).
pub struct EngineProcess {
    pub child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl EngineProcess {
    pub fn start(socket: &Path, log: &Path) -> anyhow::Result<EngineProcess> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(binary("neuroshard-engine"))
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--device")
            .arg("cpu")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()?;
        Ok(EngineProcess {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if failing() {
            eprintln!("----- engine logs -----\n{}", self.logs());
        }
    }
}

/// Files in /dev/shm whose names start with `prefix`.
pub fn shm_entries(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
