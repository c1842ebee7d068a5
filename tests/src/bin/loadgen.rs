//! Load generator against a real node: starts `neuroshard` (training off, tiny model) in a
//! temporary directory through the test harness, then drives status, wallet reads and
//! inference at increasing concurrency, and prints throughput, p50/p99 latency, errors and
//! the daemon's RSS before and after each step. No assertions: figures go to BENCHMARKS.md.
//!
//!   cargo build --workspace --bins
//!   cargo run -p neuroshard-tests --bin loadgen -- [seconds per step, default 5]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use neuroshard_tests::{Node, NodeOptions};

/// Resident set of `pid` in MiB, from /proc.
fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Step {
    ok: usize,
    /// Failed requests by HTTP status (0: no answer).
    errors: BTreeMap<u16, usize>,
    latencies: Vec<Duration>,
    wall: Duration,
}

fn run_step(url: &str, token: &str, body: Option<&str>, concurrency: usize, secs: u64) -> Step {
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (url, token, body) = (url.to_string(), token.to_string(), body.map(String::from));
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("http client");
                let (mut ok, mut errors, mut lat) = (0, BTreeMap::<u16, usize>::new(), Vec::new());
                while Instant::now() < until {
                    let t = Instant::now();
                    let req = match &body {
                        Some(b) => http
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(b.clone()),
                        None => http.get(&url),
                    };
                    match req.bearer_auth(&token).send().and_then(|r| {
                        let s = r.status();
                        r.bytes().map(|_| s)
                    }) {
                        Ok(s) if s.is_success() => {
                            ok += 1;
                            lat.push(t.elapsed());
                        }
                        Ok(s) => *errors.entry(s.as_u16()).or_default() += 1,
                        Err(_) => *errors.entry(0).or_default() += 1,
                    }
                }
                (ok, errors, lat)
            })
        })
        .collect();
    let mut step = Step {
        ok: 0,
        errors: BTreeMap::new(),
        latencies: Vec::new(),
        wall: Duration::ZERO,
    };
    for w in workers {
        let (ok, errors, lat) = w.join().expect("worker");
        step.ok += ok;
        for (code, n) in errors {
            *step.errors.entry(code).or_default() += n;
        }
        step.latencies.extend(lat);
    }
    step.wall = start.elapsed();
    step.latencies.sort();
    step
}

fn errors_text(errors: &BTreeMap<u16, usize>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = errors.iter().map(|(c, n)| format!("{n} × {c}")).collect();
    parts.join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // Rate limits raised so that the figures measure the node, not the limiter.
    let opts = NodeOptions {
        config:
            "[api]\nrate_limit_per_token = 1000000\n[training]\nenabled = false\nmodel = \"tiny\"\n"
                .into(),
        ..NodeOptions::default()
    };
    let node = Node::start(opts)?;
    node.wait_healthy(Duration::from_secs(60))?;
    let token = node.api_token()?;
    let pid = node.pid().unwrap_or(0);
    let inference = r#"{"prompt": "The river", "max_tokens": 16, "temperature": 0.0}"#;
    let targets: [(&str, &str, Option<&str>); 3] = [
        ("status", "/api/v1/status", None),
        ("wallet balance", "/api/v1/wallet/balance", None),
        (
            "inference (16 tokens)",
            "/api/v1/inference",
            Some(inference),
        ),
    ];
    println!(
        "| endpoint | concurrency | requests/s | p50 ms | p99 ms | errors | RSS before MiB | RSS after MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, path, body) in targets {
        for c in [1, 8, 32, 100] {
            let before = rss_mib(pid);
            let s = run_step(&node.url(path), &token, body, c, secs);
            let after = rss_mib(pid);
            println!(
                "| {name} | {c} | {:.1} | {:.1} | {:.1} | {} | {before:.1} | {after:.1} |",
                s.ok as f64 / s.wall.as_secs_f64(),
                percentile(&s.latencies, 0.50),
                percentile(&s.latencies, 0.99),
                errors_text(&s.errors),
            );
        }
    }
    Ok(())
}
