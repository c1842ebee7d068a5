//! Hostile clients at the socket level, against the real daemon and the real tracker: a flood
//! of half-open connections from one address, idle keep-alive connections, a request body that
//! never finishes, and a slow consumer of a streamed answer. Another client must be served
//! throughout, the flood's connections beyond the per-address cap must be refused at once,
//! and the held ones closed by the header timeout (`control/src/listen.rs`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use neuroshard_tests::{Node, NodeOptions, binary, free_port_pair, wait_for};
use serde_json::json;

/// Connections the flood opens from one address (the figure).
const FLOOD: usize = 20_000;
/// The per-address cap the node under test runs with.
const PER_ADDRESS: usize = 256;
/// Its header timeout (seconds).
const HEADER_TIMEOUT: u64 = 3;

fn options() -> NodeOptions {
    let mut opts = NodeOptions::default();
    opts.config.push_str(&format!(
        "[api]\nmax_connections_per_address = {PER_ADDRESS}\nheader_timeout_secs = {HEADER_TIMEOUT}\nbody_timeout_secs = {HEADER_TIMEOUT}\n"
    ));
    opts
}

/// A TCP connection to `port` on 127.0.0.1 from the source address `from` (a loopback
/// address: the flood and the other client differ by address, as two machines would).
fn connect_from(from: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((from, 0)).into())?;
    socket.connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into(),
        Duration::from_secs(5),
    )?;
    Ok(socket.into())
}

/// `GET path` over a fresh connection from `from`; the status code, or why there is none.
fn get_from(from: Ipv4Addr, port: u16, path: &str) -> Result<u16, String> {
    let mut s = connect_from(from, port).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {answer:?}"))
}

/// Whether the server has closed `s` (EOF or reset), without waiting.
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).ok();
    let mut buf = [0u8; 64];
    let gone = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).ok();
    gone
}

/// The sample of `/metrics` named `neuroshard_<name>` (no labels).
fn metric(node: &Node, name: &str) -> f64 {
    let text = reqwest::blocking::get(node.url("/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("neuroshard_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Opens `count` connections from `from` that each send the first line of a request and
/// then nothing, and keeps those the server keeps (an attacker's held connections). Every
/// 1000 connections it sorts them: closed within a second of their connect (refused at
/// accept), closed later (by the header timeout: their age is kept), still open. Another
/// client at `other` asks for `path` at each sweep and must be answered 200 every time.
fn flood(
    from: Ipv4Addr,
    other: Ipv4Addr,
    port: u16,
    count: usize,
    cap: usize,
    path: &str,
) -> Flood {
    let header_timeout = Duration::from_secs(HEADER_TIMEOUT);
    let mut f = Flood {
        held: Vec::new(),
        refused: 0,
        timed_out: Vec::new(),
        connect_errors: 0,
        most_open: 0,
        other_answers: Vec::new(),
        other_latency: Vec::new(),
    };
    let mut pending: Vec<(TcpStream, Instant)> = Vec::new();
    for i in 0..count {
        match connect_from(from, port) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\n");
                pending.push((s, Instant::now()));
            }
            Err(_) => f.connect_errors += 1,
        }
        if (i + 1) % 1000 == 0 || i + 1 == count {
            f.sweep(&mut pending, cap, header_timeout);
            let asked = Instant::now();
            f.other_answers.push(get_from(other, port, path));
            f.other_latency.push(asked.elapsed());
        }
    }
    f
}

struct Flood {
    /// Open connections and when each was made.
    held: Vec<(TcpStream, Instant)>,
    /// Connections the server closed within a second of their connect.
    refused: usize,
    /// Lifetimes of the connections the server closed after holding them.
    timed_out: Vec<Duration>,
    connect_errors: usize,
    /// Most connections open at once, seen at a sweep.
    most_open: usize,
    other_answers: Vec<Result<u16, String>>,
    /// How long each of the other client's requests took.
    other_latency: Vec<Duration>,
}

impl Flood {
    /// Sorts the new connections (`pending`) and the held ones, as [`flood`] says. New ones
    /// get up to a second to be accepted and refused, while more than `cap` are open.
    fn sweep(
        &mut self,
        pending: &mut Vec<(TcpStream, Instant)>,
        cap: usize,
        header_timeout: Duration,
    ) {
        let settle = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let mut i = 0;
            while i < self.held.len() {
                if closed(&mut self.held[i].0) {
                    let (_, opened) = self.held.swap_remove(i);
                    self.timed_out.push(opened.elapsed());
                } else {
                    i += 1;
                }
            }
            pending.retain_mut(|(s, opened)| {
                let gone = closed(s);
                if gone {
                    // A batch of connects can take longer than the header timeout on a busy
                    // machine: an old one closed was held, then timed out.
                    let age = opened.elapsed();
                    if age + Duration::from_millis(300) < header_timeout {
                        self.refused += 1;
                    } else {
                        self.timed_out.push(age);
                    }
                }
                !gone
            });
            if self.held.len() + pending.len() <= cap || settle.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        self.held.append(pending);
        self.most_open = self.most_open.max(self.held.len());
    }

    /// The flood was shed as promised: every other-client request answered, never more than
    /// `cap` connections open from the flood's address, a held connection closed only by the
    /// header timeout, most of the flood refused at once.
    fn check(&self, count: usize, cap: usize, header_timeout: Duration) {
        let failed: Vec<_> = self
            .other_answers
            .iter()
            .filter(|a| **a != Ok(200))
            .collect();
        assert!(
            failed.is_empty(),
            "the other client was not served during the flood: {failed:?}"
        );
        assert!(
            self.most_open <= cap,
            "{} connections open at once from one address (cap {cap})",
            self.most_open
        );
        assert_eq!(
            self.held.len() + self.refused + self.timed_out.len() + self.connect_errors,
            count,
            "every connection is held, refused or timed out"
        );
        let early: Vec<_> = self
            .timed_out
            .iter()
            .filter(|age| **age + Duration::from_millis(300) < header_timeout)
            .collect();
        assert!(
            early.is_empty(),
            "held connections closed before the header timeout: {early:?}"
        );
        assert!(
            self.refused >= count / 2,
            "only {} of {count} refused at once",
            self.refused
        );
    }

    /// The other client's median and slowest answer during the flood (ms).
    fn other_latency_ms(&self) -> (f64, f64) {
        let mut ms: Vec<f64> = self
            .other_latency
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        (
            ms.get(ms.len() / 2).copied().unwrap_or(0.0),
            ms.last().copied().unwrap_or(0.0),
        )
    }

    /// The held connections are all closed by the server within `within`.
    fn wait_closed(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        wait_for(
            "the held connections closed",
            within,
            Duration::from_millis(100),
            || {
                self.held.retain_mut(|(s, _)| !closed(s));
                self.held.is_empty().then_some(())
            },
        )
        .unwrap();
        started.elapsed()
    }
}

#[test]
fn rest_port_sheds_a_flood_of_half_open_connections() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(options()).unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let attacker = Ipv4Addr::new(127, 0, 0, 7);
    let other = Ipv4Addr::new(127, 0, 0, 8);
    let started = Instant::now();
    let mut f = flood(
        attacker,
        other,
        node.port,
        FLOOD,
        PER_ADDRESS,
        "/api/v1/health",
    );
    let flood_secs = started.elapsed().as_secs_f64();
    f.check(FLOOD, PER_ADDRESS, Duration::from_secs(HEADER_TIMEOUT));
    let held = f.held.len();
    let refused_metric = metric(&node, "http_connections_refused_total");
    assert!(
        refused_metric >= f.refused as f64,
        "the node counted {refused_metric} refusals, the client saw {}",
        f.refused
    );
    let shed = f.wait_closed(Duration::from_secs(HEADER_TIMEOUT * 4 + 5));
    // And the attacker's address may connect again (its connections were released).
    assert_eq!(get_from(attacker, node.port, "/api/v1/health"), Ok(200));
    let (p50, slowest) = f.other_latency_ms();
    println!(
        "flood of {FLOOD} from one address in {flood_secs:.1} s: at most {} open at once, {} \
         refused at once, {} closed by the header timeout, {} connect errors; the {held} still \
         held closed {:.1} s after the flood; health from another address during it: median \
         {p50:.1} ms, slowest {slowest:.1} ms",
        f.most_open,
        f.refused,
        f.timed_out.len(),
        f.connect_errors,
        shed.as_secs_f64()
    );
}

#[test]
fn idle_keep_alive_and_unfinished_bodies_are_closed() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(options()).unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let from = Ipv4Addr::new(127, 0, 0, 9);

    // A keep-alive connection: one request answered, then silence.
    let mut s = connect_from(from, node.port).unwrap();
    write!(s, "GET /api/v1/health HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(HEADER_TIMEOUT * 4)))
        .unwrap();
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    let waited = idle.elapsed();
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the idle connection was not closed: {end:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(HEADER_TIMEOUT) - Duration::from_millis(200),
        "closed after {waited:?}, before the idle timeout"
    );

    // A request whose body never finishes: the connection is closed after the body timeout.
    let mut s = connect_from(from, node.port).unwrap();
    let token = node.api_token().unwrap();
    write!(
        s,
        "POST /api/v1/wallet/send HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"to\":"
    )
    .unwrap();
    let sent = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(HEADER_TIMEOUT * 4)))
        .unwrap();
    let mut answer = Vec::new();
    let end = s.read_to_end(&mut answer);
    let waited = sent.elapsed();
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the unfinished body's connection was not closed: {end:?} after {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    // If an answer came, it is the contract's error body, not a 5xx.
    if let Some(code) = answer.split_whitespace().nth(1) {
        assert!(code.starts_with('4'), "{answer}");
        assert!(answer.contains("\"error\""), "{answer}");
    }
    assert_eq!(get_from(from, node.port, "/api/v1/health"), Ok(200));
}

#[test]
fn a_slow_stream_consumer_is_served() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(options()).unwrap();
    node.wait_model_loaded(Duration::from_secs(120)).unwrap();
    // The node's own wallet pays nothing for its own generation.
    let token = node.api_token().unwrap();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = http
        .post(node.url("/api/v1/inference"))
        .bearer_auth(&token)
        .json(&json!({"prompt": "The river", "max_tokens": 100, "temperature": 0, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let started = Instant::now();
    let mut reader = std::io::BufReader::new(r);
    let mut tokens = 0;
    let mut last = String::new();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            last = data.to_string();
            if data.contains("\"index\"") {
                tokens += 1;
            }
            // Slower than the header timeout over the whole stream.
            std::thread::sleep(Duration::from_millis(60));
        }
        line.clear();
    }
    assert!(last.contains("[DONE]"), "the stream ended with {last}");
    assert!(tokens >= 1);
    assert!(
        started.elapsed() > Duration::from_secs(HEADER_TIMEOUT),
        "the consumer was not slower than the header timeout ({:?})",
        started.elapsed()
    );
}

#[test]
fn tracker_sheds_a_flood_of_half_open_connections() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let cap = 32;
    let log = std::fs::File::create(dir.path().join("tracker.log")).unwrap();
    let mut tracker = std::process::Command::new(binary("neuroshard"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "tracker",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["--max-connections-per-address", &cap.to_string()])
        .args(["--header-timeout-secs", &HEADER_TIMEOUT.to_string()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let other = Ipv4Addr::new(127, 0, 0, 11);
    wait_for(
        "the tracker",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || get_from(other, port, "/peers").ok().filter(|c| *c == 200),
    )
    .unwrap();
    let count = 5_000;
    let mut f = flood(
        Ipv4Addr::new(127, 0, 0, 10),
        other,
        port,
        count,
        cap,
        "/peers",
    );
    f.check(count, cap, Duration::from_secs(HEADER_TIMEOUT));
    f.wait_closed(Duration::from_secs(HEADER_TIMEOUT * 4 + 5));
    let _ = tracker.kill();
    let _ = tracker.wait();
}
