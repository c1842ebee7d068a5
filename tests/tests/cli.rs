//! The original's command line, run as a user runs it: the operator commands find the node
//! of a data directory whatever port it was started with (its `node.json`), `logs [-f] [-n]`,
//! `restart`, `config reset`, and the flags of `start` (`--memory`, `--max-storage`,
//! `--wallet`, the refused `--token`).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, binary, pid_alive, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const START: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// `neuroshard --data-dir DIR args...` with the engine binary the harness uses.
fn cli(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("neuroshard"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("NEUROSHARD_ENGINE_BINARY", binary("neuroshard-engine"))
        .env_remove("NEUROSHARD_PORT")
        .stdin(Stdio::null());
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    cli(dir, args).output().expect("run neuroshard")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "neuroshard {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_file(dir: &Path) -> Option<Value> {
    let text = std::fs::read(dir.join("node.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Kills, at the end of a test, a node the harness did not start itself (a restarted one).
struct Restarted<'a>(&'a Path);

impl Drop for Restarted<'_> {
    fn drop(&mut self) {
        let Some(pid) = run_file(self.0).and_then(|f| f["pid"].as_i64()) else {
            return;
        };
        let pid = pid as i32;
        let engines = neuroshard_tests::children_named(pid, "neuroshard-engine");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        for e in engines {
            let _ = kill(Pid::from_raw(e), Signal::SIGKILL);
        }
        if neuroshard_tests::failing() {
            let log = std::fs::read_to_string(self.0.join("logs/neuroshard.log"));
            eprintln!("----- log file -----\n{}", log.unwrap_or_default());
        }
    }
}

/// `neuroshard logs -f` running in the background, its output collected.
struct Follow {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
}

impl Follow {
    fn start(dir: &Path) -> Follow {
        let mut child = cli(dir, &["logs", "-f", "-n", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn logs -f");
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Follow { child, out }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn commands_find_the_node_on_its_data_directory_and_restart_and_logs_follow_it() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // The config says nothing of the port (8000 by default); the node runs on another one.
    let mut node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let dir = node.data_dir().to_path_buf();
    let _cleanup = Restarted(&dir);

    let info = run_file(&dir).expect("node.json written at start");
    assert_eq!(info["pid"].as_i64(), node.pid().map(i64::from), "{info}");
    assert_eq!(info["port"], node.port, "{info}");
    assert_eq!(info["peer_port"], node.port + 1000, "{info}");
    assert_eq!(info["scheme"], "http", "{info}");
    assert!(
        info["started_at"].as_str().unwrap().ends_with('Z'),
        "{info}"
    );

    // status, peers and wallet find it without --port.
    let status: Value = serde_json::from_str(&ok(&dir, &["status", "--json"])).unwrap();
    let (_, direct) = node.get("/api/v1/status").unwrap();
    assert_eq!(status["node_id"], direct["node_id"]);
    let human = ok(&dir, &["status"]);
    assert!(
        human.contains(direct["node_id"].as_str().unwrap()),
        "{human}"
    );
    let peers: Value = serde_json::from_str(&ok(&dir, &["peers", "--json"])).unwrap();
    assert_eq!(peers["total"], 0, "{peers}");
    let balance: Value = serde_json::from_str(&ok(&dir, &["wallet", "--json", "balance"])).unwrap();
    assert_eq!(balance["address"], direct["wallet_address"], "{balance}");

    // logs: the last lines of the node's own log file.
    let last3 = ok(&dir, &["logs", "-n", "3"]);
    assert_eq!(last3.lines().count(), 3, "{last3}");
    let all = ok(&dir, &["logs", "-n", "100000"]);
    assert!(all.contains("node running"), "{all}");
    // The node may have logged more in between: the three lines are there, in order.
    assert!(all.contains(last3.trim_end()), "{last3}");
    let default = ok(&dir, &["logs"]);
    assert!(default.lines().count() <= 50, "{default}");

    // restart: the old process stops cleanly, a new one runs with the same arguments.
    let follow = Follow::start(&dir);
    let old = node.pid().unwrap();
    let said = ok(&dir, &["restart"]);
    assert!(said.contains("restarted"), "{said}");
    assert_eq!(node.wait_exit(Duration::from_secs(30)).unwrap(), Some(0));
    assert!(!pid_alive(old));
    let info = run_file(&dir).expect("node.json of the restarted node");
    let new = info["pid"].as_i64().unwrap() as i32;
    assert_ne!(new, old);
    assert!(pid_alive(new));
    assert_eq!(info["port"], node.port, "same arguments, same port: {info}");
    node.wait_healthy(START).unwrap();
    let status: Value = serde_json::from_str(&ok(&dir, &["status", "--json"])).unwrap();
    assert_eq!(status["node_id"], direct["node_id"]);

    // logs -f saw the old node stop and the new one start.
    wait_for("logs -f to show the restart", START, POLL, || {
        let text = follow.text();
        let stopped = text.find("stopped")?;
        text[stopped..].contains("node running").then_some(())
    })
    .unwrap();

    // restart --foreground: this process becomes the node, as `start` runs.
    let mut fg = cli(&dir, &["restart", "--foreground"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fg_pid = fg.id() as i32;
    wait_for(
        "the foreground restart to run the node",
        START,
        POLL,
        || {
            let info = run_file(&dir)?;
            (info["pid"].as_i64()? == i64::from(fg_pid)).then_some(())
        },
    )
    .unwrap();
    assert!(!pid_alive(new));
    node.wait_healthy(START).unwrap();

    // stop finds it too, and its runtime file goes with it.
    let said = ok(&dir, &["stop"]);
    assert!(said.contains(&format!("stopped node {fg_pid}")), "{said}");
    assert!(fg.wait().unwrap().success());
    assert!(run_file(&dir).is_none());
    let out = run(&dir, &["restart"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neuroshard start"), "{err}");
}

#[test]
fn a_stale_runtime_file_is_ignored_config_reset_asks_and_token_is_refused() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config_port = neuroshard_tests::free_port_pair();
    std::fs::write(
        dir.join("neuroshard.toml"),
        format!("port = {config_port}\n[training]\nbatch_size = 16\n"),
    )
    .unwrap();

    // A runtime file left by a node that is gone: ignored, said so, the config's port used.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = serde_json::json!({
        "pid": dead, "host": "127.0.0.1", "port": 1, "peer_port": 1001, "scheme": "http",
        "started_at": "2026-01-01T00:00:00Z",
        "launch": {"exe": "/bin/false", "args": [], "cwd": "/", "env": {}}
    });
    std::fs::write(dir.join("node.json"), stale.to_string()).unwrap();
    let out = run(dir, &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ignoring") && err.contains("node.json"),
        "{err}"
    );
    assert!(
        err.contains(&format!("no node answering on 127.0.0.1:{config_port}")),
        "{err}"
    );
    let out = run(dir, &["stop"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node is running"));

    // config reset: nothing without --yes; with it the defaults, the old file kept.
    let old = std::fs::read_to_string(dir.join("neuroshard.toml")).unwrap();
    let out = run(dir, &["config", "reset"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(
        std::fs::read_to_string(dir.join("neuroshard.toml")).unwrap(),
        old
    );
    ok(dir, &["config", "reset", "--yes"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("neuroshard.toml.bak")).unwrap(),
        old
    );
    let now = neuroshard::config::Config::load(&dir.join("neuroshard.toml")).unwrap();
    assert_eq!(now, neuroshard::config::Config::default());

    // logs before any start: a clear error.
    let out = run(dir, &["logs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no log at"));

    // The original's --token: refused, pointing at --wallet; nothing started.
    let out = run(dir, &["start", "--token", "secret-on-the-command-line"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token is not taken") && err.contains("--wallet"),
        "{err}"
    );
    assert!(!dir.join("neuroshard.pid").exists());
}

#[test]
fn start_flags_set_memory_storage_and_the_wallet() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // A wallet made elsewhere (as `setup` makes it), run by a new node with --wallet.
    let other = tempfile::tempdir().unwrap();
    let said = ok(other.path(), &["setup"]);
    let address = said
        .lines()
        .find_map(|l| l.strip_prefix("node wallet"))
        .unwrap()
        .trim()
        .to_string();
    let keystore = other.path().join("wallet.json");

    // The smallest --memory that holds one layer of the tiny model: the node takes one.
    let model: neuroshard::config::ModelPreset = "tiny".parse().unwrap();
    let mut cfg = neuroshard::config::Config::default();
    let mb = (1..100_000u64)
        .find(|mb| {
            cfg.resources.max_memory_gb = *mb as f64 / 1024.0;
            neuroshard::pipeline::assign::capacity(&cfg, model.config()) == 1
        })
        .expect("some memory holds exactly one layer");

    let opts = NodeOptions {
        extra_args: vec![
            "--memory".into(),
            mb.to_string(),
            "--max-storage".into(),
            "64".into(),
            "--wallet".into(),
            keystore.display().to_string(),
        ],
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(START).unwrap();
    let (_, status) = node.get("/api/v1/status").unwrap();
    assert_eq!(status["wallet_address"], address.as_str(), "{status}");
    let (code, config) = node
        .authed(reqwest::Method::GET, "/api/v1/config", None)
        .unwrap();
    assert_eq!(code, 200, "{config}");
    assert_eq!(
        config["resources"]["max_memory_gb"].as_f64(),
        Some(mb as f64 / 1024.0)
    );
    assert_eq!(config["resources"]["max_storage_mb"], 64);
    // The memory it offers sets the layers it takes: one.
    wait_for("the node to hold one layer", START, POLL, || {
        let (_, s) = node.get("/api/v1/status")?;
        (s["layers"] == serde_json::json!([0])).then_some(())
    })
    .unwrap();
    // The node's data directory made no wallet of its own.
    assert!(!node.data_dir().join("wallet.json").exists());
}
