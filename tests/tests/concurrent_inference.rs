//! 100 inference requests at once against a real node while it trains: every one is answered
//! 200 or refused cleanly (429 or 503 in the contract's error format), the engine's continuous
//! batch serves them without a crash or a restart, the node stays healthy, and the resident
//! memory of both processes stays bounded. 10 requests are paid by a funded user token, the
//! others use the node's own token (served free).

use std::sync::{Arc, Barrier};
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions};
use serde_json::{Value, json};

const REQUESTS: usize = 100;
const PAID: usize = 10;

/// Resident set size of `pid` in KiB, from /proc/<pid>/status.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_hundred_concurrent_requests_are_served_or_refused_cleanly() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\ncheckpoint_every = 50\n".into(),
        // A small engine batch and wait queue, so the engine's own refusal is exercised too.
        env: vec![
            ("NEUROSHARD_MAX_BATCH".into(), "8".into()),
            ("NEUROSHARD_MAX_WAITING".into(), "16".into()),
        ],
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let cookie = node.api_token().unwrap();

    // A paying user, funded from the node's first training reward.
    let (user, user_addr) = node.new_wallet("user").unwrap();
    node.wait_available(0.05, Duration::from_secs(200)).unwrap();
    node.send_from_node(&user_addr, 0.04).unwrap();
    // The model is in the engine when status lists its layers.
    node.wait_model_loaded(Duration::from_secs(60)).unwrap();

    let daemon = node.pid().unwrap();
    let engine = node.engine_pid().unwrap();
    let (daemon_before, engine_before) = (rss_kib(daemon), rss_kib(engine));

    let barrier = Arc::new(Barrier::new(REQUESTS));
    let workers: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let barrier = barrier.clone();
            let url = node.url("/api/v1/inference");
            let token = if i < PAID {
                user.clone()
            } else {
                cookie.clone()
            };
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let body = json!({
                    "prompt": format!("Request {i}:"),
                    "max_tokens": 8 + (i % 9),
                    "temperature": if i % 2 == 0 { 0.0 } else { 0.8 },
                    "seed": i,
                });
                barrier.wait();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .unwrap();
                let code = r.status().as_u16();
                (code, r.json::<Value>().unwrap_or(Value::Null))
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let mut served = 0;
    let mut refused = 0;
    for (i, (code, body)) in results.iter().enumerate() {
        match code {
            200 => {
                served += 1;
                assert!(body["text"].is_string(), "request {i}: {body}");
                let n = body["tokens_generated"].as_u64().unwrap();
                assert!((1..=16).contains(&n), "request {i}: {body}");
                assert!(body["finish_reason"].is_string(), "request {i}: {body}");
            }
            429 | 503 => {
                refused += 1;
                let e = &body["error"];
                assert!(
                    e["code"].is_string() && e["message"].is_string(),
                    "request {i}: {code} {body}"
                );
                assert!(
                    body.as_object().unwrap().len() == 1,
                    "request {i}: only the error object: {body}"
                );
            }
            other => panic!("request {i}: unexpected {other}: {body}\n{}", node.logs()),
        }
    }
    eprintln!("{served} served, {refused} refused");
    assert_eq!(served + refused, REQUESTS);
    assert!(served >= 8, "a full batch at least is served: {served}");

    // The node stays healthy, on the same engine (no crash, no restart).
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    assert_eq!(node.engine_pid(), Some(engine), "{}", node.logs());
    let (code, _) = node.get("/api/v1/status").unwrap();
    assert_eq!(code, 200);
    // After the burst the node serves again.
    let again = node.call_as(
        &cookie,
        "POST",
        "/api/v1/inference",
        Some(json!({"prompt": "After", "max_tokens": 4})),
    );
    assert!(again["text"].is_string(), "{again}");

    // Memory stays bounded: the batch reserves at most its KV budget, a refused request
    // keeps nothing (generous bounds: this is about leaks and runaway queues, not tuning).
    let (daemon_after, engine_after) = (rss_kib(daemon), rss_kib(engine));
    eprintln!(
        "RSS KiB: daemon {daemon_before} -> {daemon_after}, engine {engine_before} -> {engine_after}"
    );
    assert!(daemon_after < 512 * 1024, "daemon RSS {daemon_after} KiB");
    assert!(engine_after < 1024 * 1024, "engine RSS {engine_after} KiB");
    assert!(
        daemon_after < daemon_before + 256 * 1024,
        "daemon grew from {daemon_before} to {daemon_after} KiB"
    );
    assert!(
        engine_after < engine_before + 512 * 1024,
        "engine grew from {engine_before} to {engine_after} KiB"
    );
}
