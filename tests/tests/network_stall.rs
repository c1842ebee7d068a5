//! A peer that answers slowly, then stalls, with real nodes on loopback: node A reaches node B
//! only through a TCP proxy in this test that first delays every chunk, then stops forwarding
//! bytes while keeping both sockets open; A also has a seed that accepts connections and never
//! answers. Throughout, A keeps answering health and status, keeps training, and completes
//! inference; the slow peer stays connected, the stalled one leaves the peer table within the
//! documented bound (`DROP_BOUND`), the silent seed never enters it, and B comes back once the
//! proxy forwards again.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use neuroshard_net::DROP_BOUND;
use neuroshard_tests::{Node, NodeOptions, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const PASS: u8 = 0;
const SLOW: u8 = 1;
const STALL: u8 = 2;
/// Delay of every chunk, each way, while the proxy is slow: well inside the 2 s ping deadline.
const SLOW_DELAY: Duration = Duration::from_millis(150);
const POLL: Duration = Duration::from_millis(250);

/// A loopback TCP proxy to `target` whose behaviour the test switches live.
struct Proxy {
    addr: String,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pump(client, upstream, m.clone());
                pump(u2, c2, m.clone());
            }
        });
        Proxy { addr, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` chunk by chunk, as the mode says: at once, late, or not at all (the
/// bytes wait in the socket buffers, both connections stay open).
fn pump(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while mode.load(Ordering::SeqCst) == STALL {
                std::thread::sleep(Duration::from_millis(20));
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if mode.load(Ordering::SeqCst) == SLOW {
                std::thread::sleep(SLOW_DELAY);
            }
            while mode.load(Ordering::SeqCst) == STALL {
                std::thread::sleep(Duration::from_millis(20));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Accepts connections and never reads or writes a byte.
fn black_hole() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

fn peer_count(node: &Node) -> Option<usize> {
    let (code, body) = node.authed(Method::GET, "/api/v1/peers", None)?;
    (code == 200).then(|| body["peers"].as_array().map_or(0, Vec::len))
}

fn training_step(node: &Node) -> u64 {
    let (code, status) = node
        .authed(Method::GET, "/api/v1/status", None)
        .expect("status answers");
    assert_eq!(code, 200, "{status}");
    status["training"]["step"].as_u64().unwrap()
}

/// Health answers (200, or 503 only for want of peers) with the engine and storage fine.
fn assert_serving(node: &Node) {
    let (code, health) = node.get("/api/v1/health").expect("health answers");
    assert!(
        code == 200 || health["checks"]["peers"] == "no_peers",
        "{code} {health}"
    );
    assert_eq!(health["checks"]["gpu"], "ok", "{health}");
    assert_eq!(health["checks"]["storage"], "ok", "{health}");
}

fn generate(node: &Node) {
    let (code, body) = node
        .authed(
            Method::POST,
            "/api/v1/inference",
            Some(json!({"prompt": "The river", "max_tokens": 8, "temperature": 0.0})),
        )
        .expect("inference answers");
    assert_eq!(code, 200, "{body}");
    assert!(
        body["tokens_generated"].as_u64().is_some_and(|n| n > 0),
        "{body}"
    );
}

#[test]
fn slow_then_stalled_peer_neither_hangs_training_inference_nor_the_api() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let b = Node::start(NodeOptions::default()).unwrap();
    b.wait_healthy(Duration::from_secs(60)).unwrap();
    let proxy = Proxy::start(b.peer_addr());
    let silent = black_hole();
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n"
            .into(),
        ..NodeOptions::default()
    }
    .with_seed_peers(&[proxy.addr.clone(), silent]);
    let a = Node::start(opts).unwrap();
    // Healthy with seeds means a peer is connected: B, through the proxy.
    a.wait_healthy(Duration::from_secs(60)).unwrap();
    assert_eq!(peer_count(&a), Some(1));
    wait_for("training to start", Duration::from_secs(60), POLL, || {
        (training_step(&a) > 0).then_some(())
    })
    .unwrap();

    // Slow: every chunk 150 ms late each way. B stays in the table past the drop time.
    proxy.set(SLOW);
    let step = training_step(&a);
    let until = Instant::now() + neuroshard_net::DROP_AFTER + Duration::from_secs(2);
    while Instant::now() < until {
        assert_serving(&a);
        assert_eq!(peer_count(&a), Some(1), "a slow peer was dropped");
        std::thread::sleep(POLL);
    }
    generate(&a);
    assert!(
        training_step(&a) > step,
        "training stopped behind a slow peer"
    );

    // Stalled: not a byte goes through, the sockets stay open.
    proxy.set(STALL);
    let stalled_at = Instant::now();
    let step = training_step(&a);
    wait_for(
        "the stalled peer to be dropped",
        DROP_BOUND + Duration::from_secs(10),
        POLL,
        || {
            assert_serving(&a);
            (peer_count(&a)? == 0).then_some(())
        },
    )
    .unwrap();
    eprintln!("stalled peer dropped after {:?}", stalled_at.elapsed());
    // Still stalled (and redialed into the stall): the node trains and generates.
    generate(&a);
    wait_for(
        "training steps behind a stalled peer",
        Duration::from_secs(60),
        POLL,
        || {
            assert_serving(&a);
            (training_step(&a) > step).then_some(())
        },
    )
    .unwrap();
    let (_, health) = a.get("/api/v1/health").unwrap();
    assert_eq!(health["checks"]["peers"], "no_peers", "{health}");

    // The proxy forwards again: B comes back (the redial backs off up to 30 s).
    proxy.set(PASS);
    wait_for("the peer back", Duration::from_secs(60), POLL, || {
        (peer_count(&a)? == 1).then_some(())
    })
    .unwrap();
    a.wait_healthy(Duration::from_secs(10)).unwrap();
    let (_, health): (u16, Value) = b.get("/api/v1/health").unwrap();
    assert_eq!(health["checks"]["gpu"], "ok", "B stayed fine: {health}");
}
