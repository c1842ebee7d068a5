//! Hostile clients at the socket level, against the real daemon and the real tracker: a flood
//! of half-open connections from one address (on the REST port, the tracker and the peer
//! port), idle keep-alive connections, a request body that never finishes, and a slow consumer
//! of a streamed answer. Other clients must be served throughout, the flood's connections
//! beyond the per-address cap must be refused at once, and the held ones closed by the header
//! timeout (`control/src/listen.rs`) or, on the peer port, the preface timeout
//! (`net/src/incoming.rs`).

use crate::network_common::Observer;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use neuroshard_tests::{Node, NodeOptions, binary, free_port_pair, wait_for};
use reqwest::Method;
use serde_json::json;

/// Connections the flood opens from one address (the figure).
const FLOOD: usize = 20_000;
/// The per-address cap the node under test runs with.
const PER_ADDRESS: usize = 256;
/// The flood sorts its connections every this many: a batch must take well under the
/// server's timeout, or a connection refused at once would be old when first looked at.
const SWEEP_EVERY: usize = 100;

/// The floods of this file run one at a time (the tests of one file run in parallel): two at
/// once on a 2-core machine slowed each past its own checks.
static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_flood_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    FLOODS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Its header timeout (seconds).
const HEADER_TIMEOUT: u64 = 3;

/// Unrated new connections (the floods measure the caps and timeouts; the rate has its own
/// test).
const UNRATED: u32 = 1_000_000;

fn options() -> NodeOptions {
    let mut opts = NodeOptions::default();
    opts.config.push_str(&format!(
        "[api]\nmax_connections_per_address = {PER_ADDRESS}\nheader_timeout_secs = {HEADER_TIMEOUT}\nbody_timeout_secs = {HEADER_TIMEOUT}\nconnection_rate_per_address = {UNRATED}\n"
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

/// Whether the server has closed `s` (EOF or reset), without waiting. What the server sent
/// first (the peer port's SETTINGS frame) is read and dropped.
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).ok();
    let mut buf = [0u8; 256];
    let gone = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
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

/// The first line of an HTTP/1 request: what a REST flood sends before going silent.
const REQUEST_LINE: &[u8] = b"GET / HTTP/1.1\r\n";
/// The first message of a libp2p connection over TCP: multistream-select's header (a varint
/// length, then the protocol line); a peer-port flood sends its first half. The peer port
/// answers the whole header with its own.
const MULTISTREAM_HEADER: &[u8] = b"\x13/multistream/1.0.0\n";

/// The other client's check for [`flood`]: `GET path` from `from` answers 200.
fn answers_200(from: Ipv4Addr, port: u16, path: &str) -> impl FnMut() -> Result<(), String> {
    let path = path.to_string();
    move || match get_from(from, port, &path) {
        Ok(200) => Ok(()),
        other => Err(format!("{path}: {other:?}")),
    }
}

/// Opens `count` connections from `from` that each send `opening` and then nothing, and
/// keeps those the server keeps (an attacker's held connections). Every `SWEEP_EVERY` connections it
/// sorts them: closed within a second of their connect (refused at accept), closed later (by
/// the server's `timeout`: their age is kept), still open. At each sweep the other clients'
/// check (`other`) runs and must succeed every time.
fn flood(
    from: Ipv4Addr,
    port: u16,
    count: usize,
    cap: usize,
    opening: &[u8],
    timeout: Duration,
    mut other: impl FnMut() -> Result<(), String>,
) -> Flood {
    let mut f = Flood {
        held: Vec::new(),
        refused: 0,
        timed_out: Vec::new(),
        connect_errors: 0,
        most_open: 0,
        timeout,
        other_answers: Vec::new(),
        other_latency: Vec::new(),
        duration: Duration::ZERO,
    };
    let started = Instant::now();
    let mut pending: Vec<(TcpStream, Instant)> = Vec::new();
    for i in 0..count {
        match connect_from(from, port) {
            Ok(mut s) => {
                let _ = s.write_all(opening);
                pending.push((s, Instant::now()));
            }
            Err(_) => f.connect_errors += 1,
        }
        if (i + 1) % SWEEP_EVERY == 0 || i + 1 == count {
            f.sweep(&mut pending, cap);
            let asked = Instant::now();
            f.other_answers.push(other());
            f.other_latency.push(asked.elapsed());
        }
    }
    f.duration = started.elapsed();
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
    /// How long the server may hold a connection that does not finish its opening.
    timeout: Duration,
    other_answers: Vec<Result<(), String>>,
    /// How long each of the other client's requests took.
    other_latency: Vec<Duration>,
    /// How long the flood took.
    duration: Duration,
}

impl Flood {
    /// Sorts the new connections (`pending`) and the held ones, as [`flood`] says. New ones
    /// get up to a second to be accepted and refused, while more than `cap` are open.
    fn sweep(&mut self, pending: &mut Vec<(TcpStream, Instant)>, cap: usize) {
        let timeout = self.timeout;
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
                    // A batch of connects can take longer than the timeout on a busy machine:
                    // an old one closed was held, then timed out.
                    let age = opened.elapsed();
                    if age + Duration::from_millis(300) < timeout {
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

    /// The flood was shed as promised: every other-client check passed, never more than `cap`
    /// connections open from the flood's address, a held connection closed only by the
    /// timeout, most of the flood refused at once.
    fn check(&self, count: usize, cap: usize) {
        let failed: Vec<_> = self.other_answers.iter().filter(|a| a.is_err()).collect();
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
            .filter(|age| **age + Duration::from_millis(300) < self.timeout)
            .collect();
        assert!(
            early.is_empty(),
            "held connections closed before the timeout: {early:?}"
        );
        // The server holds at most `cap` at once, each for the timeout: over the flood's
        // duration at most one new set of `cap` per timeout (and the one still open at the
        // end) was let in; everything else must have been refused at once. (A bound from the
        // measured duration, not a speed: a slower flood lets more sets in.)
        let sets = (self.duration.as_secs_f64() / self.timeout.as_secs_f64()).ceil() as usize + 2;
        let let_in = self.held.len() + self.timed_out.len();
        assert!(
            let_in <= cap * sets,
            "{let_in} of {count} connections let in over {:?} (at most {cap} per {:?}); \
             {} refused at once",
            self.duration,
            self.timeout,
            self.refused
        );
        assert!(self.refused > 0, "nothing of the flood was refused");
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
    let _flood = one_flood_at_a_time();
    let node = Node::start(options()).unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let attacker = Ipv4Addr::new(127, 0, 0, 7);
    let other = Ipv4Addr::new(127, 0, 0, 8);
    let started = Instant::now();
    let mut f = flood(
        attacker,
        node.port,
        FLOOD,
        PER_ADDRESS,
        REQUEST_LINE,
        Duration::from_secs(HEADER_TIMEOUT),
        answers_200(other, node.port, "/api/v1/health"),
    );
    let flood_secs = started.elapsed().as_secs_f64();
    f.check(FLOOD, PER_ADDRESS);
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
    let _flood = one_flood_at_a_time();
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
        .args(["--connection-rate-per-address", &UNRATED.to_string()])
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
        port,
        count,
        cap,
        REQUEST_LINE,
        Duration::from_secs(HEADER_TIMEOUT),
        answers_200(other, port, "/peers"),
    );
    f.check(count, cap);
    f.wait_closed(Duration::from_secs(HEADER_TIMEOUT * 4 + 5));
    let _ = tracker.kill();
    let _ = tracker.wait();
}

/// The identities (lowercase) in `node`'s peer table, as its REST API lists them.
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
fn peer_port_sheds_a_flood_of_half_handshakes() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let _flood = one_flood_at_a_time();
    // Not the default (64): the test shows the config key reaches the peer port.
    let cap = 48;
    let mut opts = NodeOptions::default();
    opts.config.push_str(&format!(
        "[peer]\nmax_connections_per_address = {cap}\nconnection_rate_per_address = {UNRATED}\n"
    ));
    let a = Node::start(opts).unwrap();
    a.wait_healthy(Duration::from_secs(60)).unwrap();
    // A real peer, connected before the flood; it must stay connected through it.
    let b = Node::start(NodeOptions::default().with_seed_peers(&[a.peer_addr()])).unwrap();
    b.wait_healthy(Duration::from_secs(60)).unwrap();
    let observer = Observer::new().unwrap();
    let a_id = observer
        .connect(&a)
        .unwrap()
        .id
        .to_string()
        .to_ascii_lowercase();
    wait_for(
        "the second node connected to the first",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || peer_ids(&b).contains(&a_id).then_some(()),
    )
    .unwrap();

    let peer_port = a.port + 1000;
    let attacker = Ipv4Addr::new(127, 0, 0, 12);
    let other = Ipv4Addr::new(127, 0, 0, 13);
    let timeout = neuroshard_net::PREFACE_TIMEOUT;
    let count = 5_000;
    let mut health = answers_200(other, a.port, "/api/v1/health");
    let started = Instant::now();
    // At each sweep: the node's health answers, the second node still lists it, and a new
    // peer (the observer, from 127.0.0.1) completes a handshake with it.
    let mut f = flood(
        attacker,
        peer_port,
        count,
        cap,
        &MULTISTREAM_HEADER[..10],
        timeout,
        || {
            health()?;
            if !peer_ids(&b).contains(&a_id) {
                return Err("the second node lost its peer".into());
            }
            observer
                .connect(&a)
                .map(drop)
                .map_err(|e| format!("a fresh handshake failed: {e:#}"))
        },
    );
    let flood_secs = started.elapsed().as_secs_f64();
    f.check(count, cap);
    let refused_metric = metric(&a, "peer_connections_refused_total");
    assert!(
        refused_metric >= f.refused as f64,
        "the node counted {refused_metric} refusals, the client saw {}",
        f.refused
    );
    let held = f.held.len();
    let shed = f.wait_closed(timeout * 4 + Duration::from_secs(5));
    // Every connection the client saw closed was refused or timed out at the node (a refused
    // one seen late counts as timed out on the client's side, so compare the sums); the ones
    // held at the end were closed by the preface timeout.
    let timeouts_metric = metric(&a, "peer_handshake_timeouts_total");
    let refused_metric = metric(&a, "peer_connections_refused_total");
    assert!(
        timeouts_metric >= held as f64
            && refused_metric + timeouts_metric >= (f.refused + f.timed_out.len() + held) as f64,
        "the node counted {refused_metric} refusals and {timeouts_metric} preface timeouts, \
         the client saw {} refused, {} timed out and {held} held",
        f.refused,
        f.timed_out.len()
    );
    // After the flood: the second node is still connected (its connection, older than the
    // preface timeout, was never cut), and the attacker's address is admitted again (it gets
    // the server's SETTINGS frame, not a close).
    assert!(
        peer_ids(&b).contains(&a_id),
        "the second node lost its peer"
    );
    let mut s = connect_from(attacker, peer_port).unwrap();
    s.write_all(MULTISTREAM_HEADER).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut header = [0u8; 20];
    s.read_exact(&mut header).unwrap();
    assert_eq!(
        &header[..],
        MULTISTREAM_HEADER,
        "the peer port answers with multistream-select's header"
    );
    let (p50, slowest) = f.other_latency_ms();
    println!(
        "peer-port flood of {count} half transport handshakes from one address in {flood_secs:.1} s: at \
         most {} open at once (cap {cap}), {} refused at once, {} closed by the preface \
         timeout, {} connect errors; the {held} still held closed {:.1} s after the flood; \
         health, the second node's peer list and a fresh handshake from another address \
         during it: median {p50:.1} ms, slowest {slowest:.1} ms; the node counted \
         {refused_metric} refusals and {timeouts_metric} preface timeouts",
        f.most_open,
        f.refused,
        f.timed_out.len(),
        f.connect_errors,
        shed.as_secs_f64()
    );
}

#[test]
fn new_connections_beyond_the_rate_are_refused_while_another_address_is_served() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let _flood = one_flood_at_a_time();
    // 20 new connections a second per address, in bursts of BURST_SECONDS worth.
    let rate = 20u32;
    let burst = (rate * neuroshard_net::admission::BURST_SECONDS) as usize;
    let mut opts = NodeOptions::default();
    opts.config
        .push_str(&format!("[api]\nconnection_rate_per_address = {rate}\n"));
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let attacker = Ipv4Addr::new(127, 0, 0, 20);
    let other = Ipv4Addr::new(127, 0, 0, 21);
    // One address opens connections in a tight loop, each a whole request; a refused one is
    // closed at once without an answer. Every 50, another address asks for health.
    let count = 600;
    let (mut served, mut refused) = (0usize, 0usize);
    let started = Instant::now();
    for i in 0..count {
        match get_from(attacker, node.port, "/api/v1/health") {
            Ok(200) => served += 1,
            Ok(code) => panic!("the attacker got {code}"),
            Err(_) => refused += 1,
        }
        if i % 50 == 0 {
            assert_eq!(get_from(other, node.port, "/api/v1/health"), Ok(200));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // At most the burst plus what the rate refilled meanwhile (and one for rounding).
    let allowed = burst + (f64::from(rate) * secs).ceil() as usize + 1;
    assert!(
        served >= burst.min(count) && served <= allowed,
        "{served} of {count} served in {secs:.2} s (burst {burst}, {rate}/s: at most {allowed})"
    );
    assert_eq!(served + refused, count);
    let counted = metric(&node, "http_connections_refused_total");
    assert!(
        counted >= refused as f64,
        "the node counted {counted} refusals, the client saw {refused}"
    );
    // The other address was served throughout; the attacker's bucket refills with time.
    assert_eq!(get_from(other, node.port, "/api/v1/health"), Ok(200));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get_from(attacker, node.port, "/api/v1/health"), Ok(200));
    // This machine's own tools (127.0.0.1) are never rated.
    let local_started = Instant::now();
    for _ in 0..burst * 3 {
        assert_eq!(
            get_from(Ipv4Addr::LOCALHOST, node.port, "/api/v1/health"),
            Ok(200)
        );
    }
    println!(
        "rate {rate}/s per address (burst {burst}): {count} connections from one address in a \
         tight loop in {secs:.2} s: {served} served, {refused} refused at once; health from \
         another address answered throughout; {} from 127.0.0.1 all served in {:.2} s",
        burst * 3,
        local_started.elapsed().as_secs_f64()
    );
}
