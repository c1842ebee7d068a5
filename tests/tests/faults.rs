//! Fault injection with real processes: the engine is SIGKILLed again and again, during
//! training and during streamed inference. The daemon answers every health request throughout,
//! training resumes from the last checkpoint each time, the ledger loses nothing, and an
//! interrupted stream ends with a clean error and is charged for no more than it delivered.
//!
//! `NEUROSHARD_LONG_TESTS=1` runs 100 kills instead of 20.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

fn step(node: &Node) -> Option<u64> {
    node.get("/api/v1/status")?.1["training"]["step"].as_u64()
}

#[test]
fn engine_sigkills_during_training_and_streaming_lose_nothing() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let kills = if std::env::var_os("NEUROSHARD_LONG_TESTS").is_some() {
        100
    } else {
        20
    };
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\ncheckpoint_every = 5\n".into(),
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let cookie = node.api_token().unwrap();

    // A paying user: funded from the node's first training reward.
    let (user, user_addr) = node.new_wallet("user").unwrap();
    node.wait_available(0.05, Duration::from_secs(200)).unwrap();
    node.send_from_node(&user_addr, 0.04).unwrap();

    // Health is polled all along; every poll must be answered with 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (polls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let poller = {
        let (stop, polls, failures, url) = (
            stop.clone(),
            polls.clone(),
            failures.clone(),
            node.url("/api/v1/health"),
        );
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                polls.fetch_add(1, Ordering::Relaxed);
                // Within the restart grace period health stays 200 (gpu "restarting").
                if http
                    .get(&url)
                    .send()
                    .map_or(true, |r| r.status().as_u16() != 200)
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut interrupted_streams = 0;
    for k in 0..kills {
        node.wait_healthy(Duration::from_secs(60)).unwrap();
        // The model is back in the engine when status lists its layers again.
        wait_for(
            "the model loaded",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || {
                let (_, s) = node.get("/api/v1/status")?;
                (!s["layers"].as_array()?.is_empty()).then_some(())
            },
        )
        .unwrap();
        let before = wait_for(
            "training steps",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || step(&node).filter(|s| *s > 0),
        )
        .unwrap();
        let history_before =
            node.call_as(&cookie, "GET", "/api/v1/wallet/transactions?limit=1", None)["total"]
                .as_u64()
                .unwrap();
        // (A killed engine may linger a moment as a zombie until the supervisor reaps it.)
        let engine = wait_for(
            "one engine process",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || node.engine_pid(),
        )
        .unwrap();
        if k % 2 == 1 {
            // Kill it in the middle of a paid stream, after the first token arrived.
            let balance_before =
                node.call_as(&user, "GET", "/api/v1/wallet/balance", None)["balances"]["total"]
                    .as_f64()
                    .unwrap();
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let r = http.post(node.url("/api/v1/inference")).bearer_auth(&user)
                .json(&json!({"prompt": "The river", "max_tokens": 120, "temperature": 0.8, "stream": true}))
                .send().unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut lines = BufReader::new(r).lines();
            let mut delivered = 0u64;
            let mut last = Value::Null;
            let mut killed = false;
            while let Some(Ok(line)) = lines.next() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                let event: Value = serde_json::from_str(data).unwrap();
                if event.get("index").is_some() {
                    delivered += 1;
                    if !killed {
                        kill(Pid::from_raw(engine), Signal::SIGKILL).unwrap();
                        killed = true;
                    }
                } else {
                    last = event;
                }
            }
            assert!(killed, "no token before the stream ended: {last}");
            // Either the kill landed mid-stream (clean error) or the stream had finished.
            if last.get("error").is_some() {
                assert!(
                    last["error"]["code"].is_string() && last["error"]["message"].is_string(),
                    "{last}"
                );
                interrupted_streams += 1;
            } else {
                assert_eq!(last["token"], "[DONE]", "{last}");
            }
            let balance_after =
                node.call_as(&user, "GET", "/api/v1/wallet/balance", None)["balances"]["total"]
                    .as_f64()
                    .unwrap();
            let charged = balance_before - balance_after;
            let most = (delivered + 130) as f64 * 0.0001 * 1.001 + 1e-9;
            assert!(
                charged >= -1e-9 && charged <= most,
                "charged {charged} NEURO for {delivered} delivered tokens"
            );
        } else {
            kill(Pid::from_raw(engine), Signal::SIGKILL).unwrap();
        }
        // Back (a new engine process), and training continues from the last checkpoint, not
        // from scratch.
        wait_for(
            "a new engine",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || node.engine_pid().filter(|p| *p != engine),
        )
        .unwrap();
        node.wait_healthy(Duration::from_secs(60)).unwrap();
        let resumed = wait_for(
            "training resumed",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || step(&node),
        )
        .unwrap();
        assert!(
            resumed + 6 >= before,
            "kill {k}: step {before} before, {resumed} after the restart"
        );
        let history_after =
            node.call_as(&cookie, "GET", "/api/v1/wallet/transactions?limit=1", None)["total"]
                .as_u64()
                .unwrap();
        assert!(
            history_after >= history_before,
            "kill {k}: ledger history shrank"
        );
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let (polls, failures) = (
        polls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!(
        "{kills} engine kills, {interrupted_streams} interrupted streams, {polls} health polls"
    );
    assert_eq!(
        failures, 0,
        "{failures} of {polls} health requests got no answer"
    );
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true);
    assert!(!node.logs().contains("panicked"));
}
