//! A real `neuroshard tracker` and two real nodes that know no peer: both announce to the
//! tracker, learn each other from it and connect. The tracker refuses forged, replayed and
//! malformed announcements with the API's error body, keeps its list across a restart, and
//! stops listing a node that went away.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use neuroshard::tracker::Announce;
use neuroshard_ledger::Wallet;
use neuroshard_tests::{Node, NodeOptions, binary, failing, free_port_pair, wait_for};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

const START: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
/// The tracker under test lists a node this long after its last announcement: twice the
/// announce interval, so one lost round does not drop a live node.
const TTL_SECS: u64 = 20;
/// Polls of the tracker: well under its per-IP rate limit (the nodes share the address).
const TRACKER_POLL: Duration = Duration::from_secs(1);

struct Tracker {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    http: reqwest::blocking::Client,
}

impl Tracker {
    fn start(dir: &Path, port: u16) -> anyhow::Result<Tracker> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tracker.log"))?;
        let child = Command::new(binary("neuroshard"))
            .arg("--data-dir")
            .arg(dir)
            .args([
                "tracker",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["--ttl-secs", &TTL_SECS.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let t = Tracker {
            child,
            port,
            log: dir.join("tracker.log"),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        wait_for("the tracker to answer", START, POLL, || {
            t.get("/health").filter(|(c, _)| *c == 200)
        })?;
        Ok(t)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn get(&self, path: &str) -> Option<(u16, Value)> {
        let r = self.http.get(self.url(path)).send().ok()?;
        Some((r.status().as_u16(), r.json().unwrap_or(Value::Null)))
    }

    fn post(&self, path: &str, body: String) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("tracker answers");
        (r.status().as_u16(), r.json().unwrap_or(Value::Null))
    }

    /// Node ids the tracker lists now.
    fn listed(&self) -> Vec<String> {
        self.get("/peers")
            .map(|(_, b)| {
                b["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["node_id"].as_str().map(str::to_ascii_lowercase))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.kill();
        if failing() {
            eprintln!(
                "----- tracker log -----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The node's identity on the peer network: its wallet address (what its own API token's
/// balance shows).
fn node_id(node: &Node) -> String {
    let (_, b) = node
        .authed(Method::GET, "/api/v1/wallet/balance", None)
        .expect("balance answers");
    b["address"]
        .as_str()
        .expect("balance has the address")
        .to_ascii_lowercase()
}

/// Ids of the peers `node` is connected to.
fn peer_ids(node: &Node) -> Vec<String> {
    node.authed(Method::GET, "/api/v1/peers", None)
        .map(|(_, b)| {
            b["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["id"].as_str().map(str::to_ascii_lowercase))
                .collect()
        })
        .unwrap_or_default()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn nodes_find_each_other_through_a_tracker() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir()?;
    let port = free_port_pair();
    let mut tracker = Tracker::start(dir.path(), port)?;

    let opts = NodeOptions {
        config: format!(
            "tracker_url = \"http://127.0.0.1:{port}\"\n{}",
            NodeOptions::default().config
        ),
        ..NodeOptions::default()
    };
    let a = Node::start(opts.clone())?;
    let mut b = Node::start(opts)?;
    for n in [&a, &b] {
        wait_for("the node's API", START, POLL, || {
            n.get("/api/v1/status").filter(|(c, _)| *c == 200)
        })?;
    }
    let (id_a, id_b) = (node_id(&a), node_id(&b));

    // Both announce; the tracker lists both at their loopback peer addresses.
    let listed = wait_for(
        "the tracker to list both nodes",
        START,
        TRACKER_POLL,
        || {
            let (_, body) = tracker.get("/peers")?;
            let peers = body["peers"].as_array()?.clone();
            (peers.len() == 2).then_some(peers)
        },
    )?;
    for p in &listed {
        let id = p["node_id"].as_str().unwrap_or("").to_ascii_lowercase();
        let node = if id == id_a { &a } else { &b };
        assert!(id == id_a || id == id_b, "unexpected node listed: {p}");
        assert_eq!(p["address"], json!(node.peer_addr()), "{p}");
        assert_eq!(p["api_port"], json!(node.port), "{p}");
        assert_eq!(p["role"], json!("full"), "{p}");
    }
    let (_, excluded) = tracker
        .get(&format!("/peers?exclude={id_a}"))
        .expect("answers");
    assert_eq!(excluded["count"], json!(1), "{excluded}");

    // Neither node was given a seed: they connect through what the tracker told them.
    wait_for(
        "A and B to connect through the tracker",
        START,
        POLL,
        || (peer_ids(&a).contains(&id_b) && peer_ids(&b).contains(&id_a)).then_some(()),
    )?;

    // Hostile announcements: each refused with the API's error body, nothing listed.
    let outsider = Wallet::from_seed(77);
    let now = neuroshard_net::now_ms();
    let good = Announce::signed(&outsider, 9999, 8999, None, "worker", vec![1], now);
    let mut forged = good.clone();
    forged.node_id = id_a.clone(); // claims to be A, signed by someone else
    let (code, body) = tracker.post("/announce", serde_json::to_string(&forged)?);
    assert_eq!(
        (code, error_code(&body)),
        (400, "INVALID_REQUEST"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("signed by"),
        "{body}"
    );
    let stale = Announce::signed(
        &outsider,
        9999,
        8999,
        None,
        "worker",
        vec![1],
        now - 600_000,
    );
    let (code, body) = tracker.post("/announce", serde_json::to_string(&stale)?);
    assert_eq!(code, 400, "{body}");
    for garbage in ["{", "[]", "{\"node_id\": 5}", "null"] {
        let (code, body) = tracker.post("/announce", garbage.into());
        assert_eq!(
            (code, error_code(&body)),
            (400, "INVALID_REQUEST"),
            "{garbage}: {body}"
        );
    }
    let (code, body) = tracker.get("/peers?limit=0").expect("answers");
    assert_eq!(
        (code, error_code(&body)),
        (400, "INVALID_REQUEST"),
        "{body}"
    );
    let (code, body) = tracker.get("/nowhere").expect("answers");
    assert_eq!((code, error_code(&body)), (404, "NOT_FOUND"), "{body}");
    // The genuine announcement is taken once; the same bytes again are a replay.
    let (code, body) = tracker.post("/announce", serde_json::to_string(&good)?);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["address"], json!("127.0.0.1:9999"), "{body}");
    let (code, body) = tracker.post("/announce", serde_json::to_string(&good)?);
    assert_eq!((code, error_code(&body)), (409, "CONFLICT"), "{body}");
    assert!(
        tracker
            .listed()
            .contains(&outsider.address().to_string().to_ascii_lowercase())
    );
    // A's entry still points at A.
    let (_, body) = tracker.get("/peers").expect("answers");
    let a_entry = body["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node_id"].as_str().map(str::to_ascii_lowercase) == Some(id_a.clone()))
        .cloned()
        .expect("A still listed");
    assert_eq!(a_entry["address"], json!(a.peer_addr()));

    // The tracker keeps its table across a restart (SQLite in its data directory); the
    // nodes stay connected while it is away.
    tracker.kill();
    assert!(peer_ids(&a).contains(&id_b));
    tracker = Tracker::start(dir.path(), port)?;
    let after = tracker.listed();
    assert!(after.contains(&id_a) && after.contains(&id_b), "{after:?}");

    // B goes away: it stops announcing and leaves the list after the TTL.
    b.signal(Signal::SIGKILL)?;
    b.wait_exit(Duration::from_secs(10))?;
    wait_for(
        "the tracker to stop listing B",
        Duration::from_secs(TTL_SECS * 4),
        TRACKER_POLL,
        || {
            let l = tracker.listed();
            (!l.contains(&id_b) && l.contains(&id_a)).then_some(())
        },
    )?;
    Ok(())
}

/// `start --observer --announce-ip --announce-port`: the tracker lists the observer at the
/// address it announced, with no layers; a full node that connects to it sees an observer
/// holding nothing (so the layer pool never counts it), and the observer trains nothing.
#[test]
fn an_observer_announces_its_address_and_holds_no_layers() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir()?;
    let port = free_port_pair();
    let tracker = Tracker::start(dir.path(), port)?;
    let config = format!(
        "tracker_url = \"http://127.0.0.1:{port}\"\n{}",
        NodeOptions::default().config
    );
    let observer = Node::start(NodeOptions {
        config: config.clone(),
        extra_args: [
            "--observer",
            "--announce-ip",
            "203.0.113.7",
            "--announce-port",
            "40123",
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    })?;
    // Healthy only once it has a peer (it expects some, having a tracker).
    wait_for("the observer's API", START, POLL, || {
        observer.get("/api/v1/status").filter(|(c, _)| *c == 200)
    })?;
    let id = node_id(&observer);
    // The announced address is not where it listens (a NAT's outside address, say): the full
    // node is given the real one as a seed.
    let full = Node::start(
        NodeOptions {
            config,
            ..NodeOptions::default()
        }
        .with_seed_peers(&[observer.peer_addr()]),
    )?;

    let entry = wait_for(
        "the tracker to list the observer",
        START,
        TRACKER_POLL,
        || {
            let (_, body) = tracker.get("/peers")?;
            body["peers"]
                .as_array()?
                .iter()
                .find(|p| p["node_id"].as_str().map(str::to_ascii_lowercase) == Some(id.clone()))
                .cloned()
        },
    )?;
    assert_eq!(entry["address"], json!("203.0.113.7:40123"), "{entry}");
    assert_eq!(entry["role"], json!("observer"), "{entry}");
    assert_eq!(entry["layers"], json!([]), "{entry}");

    // The full node sees the observer as one holding no layers.
    let seen = wait_for("the full node to meet the observer", START, POLL, || {
        let (_, b) = full.authed(Method::GET, "/api/v1/peers", None)?;
        b["peers"]
            .as_array()?
            .iter()
            .find(|p| p["id"].as_str().map(str::to_ascii_lowercase) == Some(id.clone()))
            .cloned()
    })?;
    assert_eq!(seen["role"], json!("observer"), "{seen}");
    assert_eq!(seen["layers"], json!([]), "{seen}");

    let (_, status) = observer.get("/api/v1/status").expect("status answers");
    assert_eq!(status["role"], json!("observer"), "{status}");
    assert_eq!(status["layers"], json!([]), "{status}");
    assert_eq!(status["training"]["enabled"], json!(false), "{status}");
    assert_eq!(status["training"]["step"], json!(0), "{status}");
    Ok(())
}
