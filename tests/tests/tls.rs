//! HTTPS where the API leaves the machine (`control/src/tls.rs`), with real clients that
//! verify the certificate: a node bound to 0.0.0.0 (reached on 127.0.0.1) serves its REST API
//! over TLS with the self-signed certificate of its data directory; curl with that certificate
//! as its CA gets health and an authenticated endpoint, curl without it and plain HTTP fail;
//! the OpenAI Python client completes over https; the CLI's `status` pins the certificate the
//! daemon serves. `--insecure-http` serves plain HTTP beyond loopback with a warning. A tracker
//! bound to 0.0.0.0 serves https, and nodes pinning its fingerprint announce to it and find
//! each other, while a node pinning another certificate is refused with both fingerprints and
//! one with no pin is refused by the system's roots.
//! `scripts/test.sh` installs curl; without it these tests fail, they do not skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, binary, free_port_pair, wait_for};
use reqwest::Method;

const START: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(200);
/// The TLS node's header timeout, which bounds a handshake too (seconds).
const HANDSHAKE_TIMEOUT: u64 = 3;

/// `curl -sS ARGS URL`: (exit code, body).
fn curl(args: &[&str], url: &str) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `neuroshard --data-dir DIR ARGS`: (success, stdout + stderr).
fn cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("neuroshard"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the CLI runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn cert_of(dir: &Path) -> PathBuf {
    dir.join(neuroshard::tls::CERT_FILE)
}

/// The SHA-256 fingerprint of the first certificate of the PEM file at `path`.
fn fingerprint(path: &Path) -> String {
    let chain = neuroshard::tls::read_chain(path).expect("a PEM certificate");
    neuroshard::tls::fingerprint(&chain[0])
}

/// Waits until `https://127.0.0.1:port/path` answers 200 to curl trusting `ca`.
fn wait_https(ca: &Path, port: u16, path: &str, logs: impl Fn() -> String) -> String {
    let url = format!("https://127.0.0.1:{port}{path}");
    let ca = ca.to_str().unwrap();
    wait_for("an https answer", START, POLL, || {
        let (code, body) = curl(&["--fail", "--cacert", ca], &url);
        (code == 0).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n--- log ---\n{}", logs()))
}

/// Medians over 20 fresh connections of curl's TLS handshake time (connect to TLS done) and of
/// the whole request, in milliseconds.
fn curl_times(args: &[&str], url: &str) -> (f64, f64) {
    let mut handshakes = Vec::new();
    let mut totals = Vec::new();
    for _ in 0..20 {
        let mut all = vec![
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{time_connect} %{time_appconnect} %{time_total}",
        ];
        all.extend_from_slice(args);
        let (code, out) = curl(&all, url);
        assert_eq!(code, 0, "{out}");
        let t: Vec<f64> = out
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap() * 1000.0)
            .collect();
        handshakes.push((t[1] - t[0]).max(0.0));
        totals.push(t[2]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut handshakes), median(&mut totals))
}

/// The CPU time `pid` has used (user + system), in ms (USER_HZ is 100 on Linux).
fn cpu_ms(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are the 14th and 15th fields; the first two end at the ')'.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks * 10.0
}

/// The daemon's CPU per connection over `n` fresh connections in a row (one curl process,
/// `Connection: close`), less what it used idle for as long: ms. `url` is best a route that
/// does nothing (a 404), so that the connection's cost is what is measured.
fn server_cpu_per_connection(node: &Node, args: &[&str], url: &str, n: usize) -> f64 {
    let pid = node.pid().unwrap();
    let before = cpu_ms(pid);
    let started = std::time::Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-H", "Connection: close"])
        .args(args)
        .args(std::iter::repeat_n(url, n))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let busy = cpu_ms(pid) - before;
    let idle_from = cpu_ms(pid);
    std::thread::sleep(started.elapsed());
    let idle = cpu_ms(pid) - idle_from;
    (busy - idle).max(0.0) / n as f64
}

#[test]
fn a_node_beyond_loopback_serves_https_to_clients_that_verify_it() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions {
        config: format!(
            "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 2\nseq_len = 32\n\
             [api]\nheader_timeout_secs = {HANDSHAKE_TIMEOUT}\n"
        ),
        extra_args: vec!["--host".into(), "0.0.0.0".into()],
        ..NodeOptions::default()
    })?;
    let dir = node.data_dir();
    let cert = cert_of(dir);
    let ca = cert.to_str().unwrap();
    let port = node.port;
    let health = wait_https(&cert, port, "/api/v1/health", || node.logs());
    assert!(health.contains("\"healthy\""), "{health}");
    // The key is the node's alone; the daemon says what it serves.
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join(neuroshard::tls::KEY_FILE);
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let fp = fingerprint(&cert);
    assert!(
        node.logs().contains(&fp),
        "the log names the fingerprint {fp}"
    );

    // A client that starts a handshake and never finishes it is closed by the header timeout.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        // A TLS record header announcing a ClientHello that never comes.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])?;
        s.set_read_timeout(Some(Duration::from_secs(HANDSHAKE_TIMEOUT + 10)))?;
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        let waited = started.elapsed();
        assert!(
            closed && waited >= Duration::from_secs(HANDSHAKE_TIMEOUT) - POLL,
            "closed {closed} after {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(HANDSHAKE_TIMEOUT + 10),
            "{waited:?}"
        );
    }

    // An authenticated endpoint with the bearer token, and without it.
    let token = node.api_token()?;
    let auth = format!("Authorization: Bearer {token}");
    let url = |p: &str| format!("https://127.0.0.1:{port}{p}");
    let (code, body) = curl(
        &["--fail", "--cacert", ca, "-H", &auth],
        &url("/api/v1/wallet/balance"),
    );
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("\"address\""), "{body}");
    let (code, body) = curl(
        &["-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca],
        &url("/api/v1/wallet/balance"),
    );
    assert_eq!((code, body.as_str()), (0, "401"));

    // Without the certificate, curl refuses the server (60: the peer's certificate cannot be
    // verified); plain HTTP to the port gets no HTTP answer.
    let (code, body) = curl(&["--fail"], &url("/api/v1/health"));
    assert_eq!(code, 60, "{body}");
    let (code, body) = curl(
        &["--fail"],
        &format!("http://127.0.0.1:{port}/api/v1/health"),
    );
    assert_ne!(code, 0, "plain http was answered: {body}");
    assert!(!body.contains("healthy"), "{body}");

    // The CLI pins the certificate the daemon serves; `setup` prints the same fingerprint.
    let (ok, out) = cli(dir, &["status", "--port", &port.to_string()]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("api       https, certificate sha256 {fp}")),
        "{out}"
    );
    let (ok, out) = cli(dir, &["setup"]);
    assert!(ok && out.contains(&format!("TLS sha256     {fp}")), "{out}");

    // What a handshake costs a client: curl's connect-to-TLS-done time, 20 fresh connections.
    // Full handshakes: no session resumption (curl would resume the node's TLS 1.3 tickets).
    let full_handshakes = ["--cacert", ca, "--no-sessionid"];
    let (handshake, total) = curl_times(&full_handshakes, &url("/api/v1/health"));
    println!(
        "https health, 20 fresh connections: TLS handshake median {handshake:.2} ms, whole \
         request median {total:.2} ms"
    );

    // The OpenAI Python client over https, verifying with the node's certificate.
    wait_for("the model loaded", START, POLL, || {
        let (_, s) = curl(&["--fail", "--cacert", ca], &url("/api/v1/status"));
        (!s.contains("\"layers\":[]") && s.contains("\"layers\"")).then_some(())
    })?;
    let output = crate::openai_client::run_check(&node, &url("/v1"), Some(&cert))?;
    assert!(output.contains("ok: neurollm-tiny"), "{output}");
    println!("{}", output.trim());
    Ok(())
}

#[test]
fn insecure_http_serves_plain_http_beyond_loopback_with_a_warning() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions {
        extra_args: vec!["--host".into(), "0.0.0.0".into(), "--insecure-http".into()],
        ..NodeOptions::default()
    })?;
    node.wait_healthy(START)?;
    assert!(
        node.logs()
            .contains("serving plain HTTP beyond loopback (tls.insecure_http)"),
        "{}",
        node.logs()
    );
    assert!(!node.data_dir().join(neuroshard::tls::SERVED_FILE).exists());
    let (ok, out) = cli(
        node.data_dir(),
        &["status", "--port", &node.port.to_string()],
    );
    assert!(ok && out.contains("api       http\n"), "{out}");
    // Bound to loopback (the harness's default), nothing is said.
    let local = Node::start(NodeOptions::default())?;
    local.wait_healthy(START)?;
    assert!(!local.logs().contains("plain HTTP beyond loopback"));

    // What TLS costs the daemon: its CPU per fresh connection, plain HTTP (this node) against
    // full TLS handshakes (a node beyond loopback), both idle (no training).
    let tls = Node::start(NodeOptions {
        extra_args: vec!["--host".into(), "0.0.0.0".into()],
        ..NodeOptions::default()
    })?;
    let cert = cert_of(tls.data_dir());
    wait_https(&cert, tls.port, "/api/v1/health", || tls.logs());
    let full = ["--cacert", cert.to_str().unwrap(), "--no-sessionid"];
    let n = 1000;
    let plain_cpu = server_cpu_per_connection(&node, &[], &node.url("/none"), n);
    let tls_url = format!("https://127.0.0.1:{}/none", tls.port);
    let tls_cpu = server_cpu_per_connection(&tls, &full, &tls_url, n);
    let (_, plain_total) = curl_times(&[], &node.url("/api/v1/health"));
    println!(
        "the daemon's CPU per fresh connection ({n} in a row to a route that does nothing): \
         plain http {plain_cpu:.3} ms, https with a full handshake {tls_cpu:.3} ms; plain http \
         health, 20 fresh connections: whole request median {plain_total:.2} ms"
    );
    Ok(())
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

#[test]
fn nodes_announce_to_a_tracker_over_https_pinning_its_certificate() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir()?;
    let port = free_port_pair();
    let log_path = dir.path().join("tracker.log");
    let log = std::fs::File::create(&log_path)?;
    let mut tracker = Command::new(binary("neuroshard"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["tracker", "--host", "0.0.0.0", "--port", &port.to_string()])
        .args(["--ttl-secs", "30"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let cert = cert_of(dir.path());
    wait_https(&cert, port, "/health", logs);
    let fp = fingerprint(&cert);
    assert!(
        logs().contains(&format!("sha256 {fp}")),
        "the tracker prints its fingerprint: {}",
        logs()
    );
    let url = format!("https://127.0.0.1:{port}");
    let pinned = |pin: &str| NodeOptions {
        config: format!(
            "tracker_url = {url:?}\ntracker_fingerprint = {pin:?}\n{}",
            NodeOptions::default().config
        ),
        ..NodeOptions::default()
    };
    let a = Node::start(pinned(&fp))?;
    let b = Node::start(pinned(&fp.to_ascii_lowercase().replace(':', "")))?;
    // A node pinning another certificate never gets through, and says why.
    let wrong = Node::start(pinned(&["AB"; 32].join(":")))?;
    // Nor does one without a pin: the system's roots do not vouch for a self-signed tracker.
    let unpinned = Node::start(pinned(""))?;
    // Not `wait_healthy`: a node with a tracker is unhealthy until it has a peer.
    for n in [&a, &b, &wrong, &unpinned] {
        wait_for("the node's API", START, POLL, || {
            n.get("/api/v1/status").filter(|(c, _)| *c == 200)
        })?;
    }
    let ca = cert.to_str().unwrap();
    let listed = wait_for("the tracker to list both nodes", START, POLL, || {
        let (code, body) = curl(&["--fail", "--cacert", ca], &format!("{url}/peers"));
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 0 && v["peers"].as_array()?.len() == 2).then_some(v)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- tracker ---\n{}\n--- a ---\n{}",
            logs(),
            a.logs()
        )
    });
    let id = |n: &Node| {
        n.authed(Method::GET, "/api/v1/wallet/balance", None)
            .and_then(|(_, b)| b["address"].as_str().map(str::to_ascii_lowercase))
            .unwrap_or_default()
    };
    let (id_a, id_b) = (id(&a), id(&b));
    let listed_ids: Vec<String> = listed["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["node_id"].as_str().map(str::to_ascii_lowercase))
        .collect();
    assert!(
        listed_ids.contains(&id_a) && listed_ids.contains(&id_b),
        "{listed}"
    );
    wait_for(
        "A and B to connect through the tracker",
        START,
        POLL,
        || (peer_ids(&a).contains(&id_b) && peer_ids(&b).contains(&id_a)).then_some(()),
    )?;
    wait_for("the mismatch in the log", START, POLL, || {
        wrong.logs().contains("is not the pinned one").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", wrong.logs()));
    assert!(wrong.logs().contains(&fp), "both fingerprints are named");
    wait_for("the unverified tracker in the log", START, POLL, || {
        let logs = unpinned.logs();
        (logs.contains("tracker unreachable") && logs.contains("certificate")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", unpinned.logs()));
    for n in [&wrong, &unpinned] {
        let logs = n.logs();
        let line = logs.lines().find(|l| l.contains("tracker unreachable"));
        println!("{}", line.unwrap_or_default());
    }
    // Neither was listed.
    let (_, body) = curl(&["--fail", "--cacert", ca], &format!("{url}/peers"));
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["peers"].as_array().map(Vec::len), Some(2), "{v}");
    let _ = tracker.kill();
    let _ = tracker.wait();
    Ok(())
}
