//! Crash safety of the ledger with real processes: the daemon is SIGKILLed in the middle of a
//! burst of concurrent transfers; after a restart every acknowledged transfer is there and the
//! ledger invariant (minted = available + staked + pending + burned) holds. Once on SQLite,
//! once on PostgreSQL.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neuroshard_tests::{Backend, Node, NodeOptions, wait_for};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Every transaction id of the token's account, page by page (at most 1000 a page).
fn transaction_ids(node: &Node, token: &str) -> HashSet<String> {
    let http = reqwest::blocking::Client::new();
    let (mut ids, mut offset) = (HashSet::new(), 0);
    loop {
        let page: Value = http
            .get(node.url(&format!(
                "/api/v1/wallet/transactions?limit=1000&offset={offset}"
            )))
            .bearer_auth(token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let txs = page["transactions"].as_array().unwrap();
        if txs.is_empty() {
            return ids;
        }
        // Newest first: an entry recorded meanwhile shifts the pages, so one is read twice,
        // never skipped.
        offset += txs.len();
        ids.extend(txs.iter().map(|t| t["id"].as_str().unwrap().to_string()));
    }
}

/// What a client of [`burst_then_kill`] does after a refusal.
enum Refusal {
    /// Fails the test.
    Unexpected,
    /// Ends this client.
    Stop,
    /// Tries again.
    Retry,
}

/// Clients POST their body to their path (one thread each, as fast as they can) while the
/// daemon is SIGKILLed `kill_after` from now; the path and 200 answer of every operation
/// acknowledged before it died. `refusal` says what a non-200 answer to a path means.
fn burst_then_kill(
    node: &mut Node,
    cookie: &str,
    clients: Vec<(&'static str, Value)>,
    kill_after: Duration,
    refusal: fn(&str, u16, &Value) -> Refusal,
) -> Vec<(&'static str, Value)> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = clients
        .into_iter()
        .map(|(path, body)| {
            let (acked, url, cookie) = (acked.clone(), node.url(path), cookie.to_string());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                // Bounded: the daemon is killed long before this.
                let give_up = Instant::now() + Duration::from_secs(30);
                while Instant::now() < give_up {
                    let Ok(r) = http.post(&url).bearer_auth(&cookie).json(&body).send() else {
                        return; // the daemon is gone
                    };
                    let status = r.status().as_u16();
                    let Ok(reply) = r.json::<Value>() else {
                        return; // cut off mid-answer: not acknowledged
                    };
                    if status == 200 {
                        acked.lock().unwrap().push((path, reply));
                        continue;
                    }
                    match refusal(path, status, &reply) {
                        Refusal::Stop => return,
                        Refusal::Retry => {}
                        Refusal::Unexpected => panic!("{path} answered {status}: {reply}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(kill_after);
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).unwrap();
    for t in threads {
        t.join().unwrap();
    }
    std::mem::take(&mut *acked.lock().unwrap())
}

/// Starts the daemon again after a kill; its new cookie.
fn restart(node: &mut Node, old_cookie: &str) -> String {
    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_for(
        "a new cookie",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let c = node.api_token().ok()?;
            (c != old_cookie).then_some(c)
        },
    )
    .unwrap()
}

/// Fails the test, saying what the node holds, unless every id of `acked` is in the
/// wallet's history.
fn assert_held(node: &Node, cookie: &str, acked: &[String], what: &str) {
    let held = transaction_ids(node, cookie);
    let missing: Vec<&String> = acked.iter().filter(|id| !held.contains(*id)).collect();
    if missing.is_empty() {
        return;
    }
    // So that a failure tells a lost write from a wrong read-back.
    let (_, balance) = node
        .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .unwrap_or_default();
    let (_, network) = node.get("/api/v1/network").unwrap_or_default();
    panic!(
        "{} of {} acknowledged {what} lost (the node lists {} entries for its wallet; \
         balance {balance}; network {network}): {:?}",
        missing.len(),
        acked.len(),
        held.len(),
        &missing[..missing.len().min(20)]
    );
}

fn ids(replies: &[(&str, Value)]) -> Vec<String> {
    replies
        .iter()
        .map(|(_, r)| r["transaction_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sigkill_during_concurrent_sends_loses_no_acknowledged_transfer_sqlite() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_concurrent_sends_loses_no_acknowledged_transfer(Backend::Sqlite);
}

#[test]
fn sigkill_during_concurrent_sends_loses_no_acknowledged_transfer_postgres() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_concurrent_sends_loses_no_acknowledged_transfer(Backend::Postgres);
}

fn sigkill_during_concurrent_sends_loses_no_acknowledged_transfer(backend: Backend) {
    if !backend.available("sigkill_during_concurrent_sends_loses_no_acknowledged_transfer") {
        return;
    }
    // The burst is about crash safety, not rate limits: a fast store answers more than the
    // default 600 sends per token before the kill, and a 429 would end the burst early.
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n\
                 [api]\nrate_limit_per_token = 1000000\n"
            .into(),
        backend,
        ..NodeOptions::default()
    };
    let mut node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let cookie = node.api_token().unwrap();
    let recipients: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| node.new_wallet(n).unwrap().1)
        .collect();
    node.wait_available(0.05, Duration::from_secs(200)).unwrap();

    // Four clients send as fast as they can; the daemon is killed while they do.
    let clients = (0..4)
        .map(|i| {
            let to = &recipients[i % recipients.len()];
            let body = json!({"to": to, "amount": 0.00001, "memo": format!("burst {i}")});
            ("/api/v1/wallet/send", body)
        })
        .collect();
    let cookie = cookie.trim().to_string();
    let replies = burst_then_kill(
        &mut node,
        &cookie,
        clients,
        Duration::from_millis(1500),
        |_, _, _| Refusal::Unexpected,
    );
    let acked = ids(&replies);
    eprintln!("{} transfers acknowledged before the kill", acked.len());
    assert!(
        acked.len() >= 10,
        "only {} transfers before the kill",
        acked.len()
    );

    let cookie = restart(&mut node, &cookie);
    assert_held(&node, cookie.trim(), &acked, "transfers");
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
    node.assert_database_settings();
}

fn proofs(node: &Node, token: &str) -> Value {
    let http = reqwest::blocking::Client::new();
    http.get(node.url("/api/v1/proofs?limit=1000"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn proof_ids(page: &Value) -> HashSet<String> {
    page["proofs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Seconds into the current wall-clock minute (epochs are whole minutes of unix time).
fn second_of_minute() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs_f64() % 60.0
}

/// The node mints its proof one second after each 60 s epoch turns (`control/src/work.rs`);
/// epochs are a consensus rule (every peer checks `epoch_id == timestamp / 60` and one reward
/// per node per epoch), so the test does not shorten them: it times its kill to land on the
/// minting, while transfers, stakes and unstakes are in flight.
#[test]
fn sigkill_during_sends_stakes_unstakes_and_proof_minting_loses_nothing_acknowledged_sqlite() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_sends_stakes_unstakes_and_proof_minting(Backend::Sqlite);
}

#[test]
fn sigkill_during_sends_stakes_unstakes_and_proof_minting_loses_nothing_acknowledged_postgres() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_sends_stakes_unstakes_and_proof_minting(Backend::Postgres);
}

fn sigkill_during_sends_stakes_unstakes_and_proof_minting(backend: Backend) {
    if !backend.available("sigkill_during_sends_stakes_unstakes_and_proof_minting") {
        return;
    }
    // Five clients as fast as they can for three seconds go past the default 600 a minute.
    let opts = NodeOptions {
        config: "[api]\nrate_limit_per_token = 100000\n[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n"
            .into(),
        backend,
        ..NodeOptions::default()
    };
    let mut node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let cookie = node.api_token().unwrap();
    let recipients: Vec<String> = ["dave", "erin"]
        .iter()
        .map(|n| node.new_wallet(n).unwrap().1)
        .collect();
    node.wait_available(0.05, Duration::from_secs(200)).unwrap();

    // Start the burst two seconds before an epoch turns and kill 1.3 s after it: the node is
    // then building, signing and storing its proof for the epoch that just ended.
    wait_for(
        "two seconds before an epoch turns",
        Duration::from_secs(70),
        Duration::from_millis(20),
        || (57.5..58.0).contains(&second_of_minute()).then_some(()),
    )
    .unwrap();
    let proofs_before = proof_ids(&proofs(&node, &cookie));
    let kill_at = Instant::now() + Duration::from_secs_f64(60.0 + 1.3 - second_of_minute());

    // Two clients send, two stake, one unstakes (refused: the stakes lock for a day).
    let clients = (0..5)
        .map(|i| match i {
            0 | 1 => {
                let to = &recipients[i % recipients.len()];
                let body = json!({"to": to, "amount": 0.00001, "memo": format!("crash {i}")});
                ("/api/v1/wallet/send", body)
            }
            2 | 3 => (
                "/api/v1/wallet/stake",
                json!({"amount": 0.00002, "duration_days": 1}),
            ),
            _ => ("/api/v1/wallet/unstake", json!({"amount": 0.00001})),
        })
        .collect();
    let replies = burst_then_kill(
        &mut node,
        &cookie,
        clients,
        kill_at.saturating_duration_since(Instant::now()),
        |path, status, _| match (path, status) {
            // Locked for a day (or nothing staked yet): refused, not acknowledged.
            ("/api/v1/wallet/unstake", 402 | 409) => Refusal::Retry,
            _ => Refusal::Unexpected,
        },
    );
    let acked = ids(&replies);
    let stakes: Vec<f64> = replies
        .iter()
        .filter(|(path, _)| *path == "/api/v1/wallet/stake")
        .map(|(_, r)| r["new_balance"]["staked"].as_f64().unwrap())
        .collect();
    let max_staked = stakes.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "acknowledged before the kill: {} operations ({} stakes, staked {max_staked} NEURO)",
        acked.len(),
        stakes.len(),
    );
    assert!(
        stakes.len() >= 3,
        "only {} stakes before the kill",
        stakes.len()
    );
    assert!(
        acked.len() >= 10,
        "only {} operations before the kill",
        acked.len()
    );

    let restarted_at = Instant::now();
    let cookie = restart(&mut node, &cookie);
    // Every acknowledged transfer and stake is there, confirmed.
    assert_held(&node, &cookie, &acked, "operations");
    let (_, balance) = node
        .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();
    let staked = balance["balances"]["staked"].as_f64().unwrap();
    assert!(
        staked + 1e-9 >= max_staked,
        "staked {staked} NEURO after the restart, an acknowledged stake reported {max_staked}"
    );
    // Every proof minted before the burst survived; the ledger adds up.
    let after = proofs(&node, &cookie);
    let after_ids = proof_ids(&after);
    let lost: Vec<&String> = proofs_before.difference(&after_ids).collect();
    assert!(lost.is_empty(), "proofs lost: {lost:?}");
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");

    // Minting carries on after the crash: a new proof is verified in a later epoch, and the
    // ledger still adds up with it.
    let verified = after["stats"]["total_verified"].as_u64().unwrap();
    wait_for(
        "a proof minted after the restart",
        Duration::from_secs(150),
        Duration::from_millis(500),
        || {
            let page = proofs(&node, &cookie);
            (page["stats"]["total_verified"].as_u64()? > verified).then_some(())
        },
    )
    .unwrap();
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
    eprintln!(
        "restart to first new verified proof: {:?}",
        restarted_at.elapsed()
    );
    node.assert_database_settings();
}

/// libfaketime, which shifts the clock a process reads (`apt-get install faketime`).
fn libfaketime() -> Option<String> {
    if let Ok(path) = std::env::var("NS_LIBFAKETIME") {
        return Some(path);
    }
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .map(str::to_string)
}

/// Stakes lock for at least a day, so unstakes need a clock past the unlock date: the node
/// stakes, stops, and starts again with its clock two days ahead (libfaketime: the wall
/// clock only, timers keep the real monotonic clock), as a node does when it is restarted
/// days later. Then clients unstake concurrently and the daemon is SIGKILLed among them:
/// after a restart every acknowledged unstake is there, its funds in cooldown, and the
/// ledger adds up.
#[test]
fn sigkill_during_unstakes_loses_no_acknowledged_unstake_sqlite() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_unstakes_loses_no_acknowledged_unstake(Backend::Sqlite);
}

#[test]
fn sigkill_during_unstakes_loses_no_acknowledged_unstake_postgres() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    sigkill_during_unstakes_loses_no_acknowledged_unstake(Backend::Postgres);
}

fn sigkill_during_unstakes_loses_no_acknowledged_unstake(backend: Backend) {
    let test = "sigkill_during_unstakes_loses_no_acknowledged_unstake";
    if !backend.available(test) {
        return;
    }
    let Some(faketime) = libfaketime() else {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{test}: libfaketime not found (apt-get install faketime, or set NS_LIBFAKETIME)"
        );
        eprintln!("{test}: libfaketime not found (apt-get install faketime): skipping");
        return;
    };
    let opts = NodeOptions {
        config: "[api]\nrate_limit_per_token = 1000000\n[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n"
            .into(),
        backend,
        ..NodeOptions::default()
    };
    let mut node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    node.wait_available(0.02, Duration::from_secs(200)).unwrap();
    // Room for 1,000 unstakes: far more than the clients get through before the kill.
    const STAKES: usize = 10;
    const STAKE: f64 = 0.001;
    const UNSTAKE: f64 = 0.00001;
    let stake = json!({"amount": STAKE, "duration_days": 1});
    for _ in 0..STAKES {
        let (code, body) = node
            .authed(
                reqwest::Method::POST,
                "/api/v1/wallet/stake",
                Some(stake.clone()),
            )
            .unwrap();
        assert_eq!(code, 200, "{body}");
    }
    let (code, body) = node
        .authed(
            reqwest::Method::POST,
            "/api/v1/wallet/unstake",
            Some(json!({"amount": UNSTAKE})),
        )
        .unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("STAKE_LOCKED")),
        "{body}"
    );

    // Two days later.
    node.signal(Signal::SIGTERM).unwrap();
    node.wait_exit(Duration::from_secs(20)).unwrap();
    node.set_env("LD_PRELOAD", &faketime);
    node.set_env("FAKETIME", "+2d");
    node.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let cookie = wait_for(
        "the restarted node's token",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            node.authed(reqwest::Method::GET, "/api/v1/status", None)
                .filter(|(c, _)| *c == 200)?;
            node.api_token().ok()
        },
    )
    .unwrap();
    let (_, before) = node
        .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();
    let staked_before = before["balances"]["staked"].as_f64().unwrap();
    assert!(
        (staked_before - STAKES as f64 * STAKE).abs() < 1e-9,
        "{before}"
    );

    // Four clients unstake as fast as they can; the daemon is killed while they do.
    let clients = (0..4)
        .map(|_| ("/api/v1/wallet/unstake", json!({"amount": UNSTAKE})))
        .collect();
    // 402/409: every stake unstaked already; refused, not acknowledged.
    let replies = burst_then_kill(
        &mut node,
        &cookie,
        clients,
        Duration::from_millis(500),
        |_, status, _| match status {
            402 | 409 => Refusal::Stop,
            _ => Refusal::Unexpected,
        },
    );
    for (_, r) in &replies {
        assert_eq!(r["unstake"]["cooldown_days"], 7, "{r}");
    }
    let acked = ids(&replies);
    eprintln!("{} unstakes acknowledged before the kill", acked.len());
    assert!(
        (3..(STAKES as f64 * STAKE / UNSTAKE) as usize).contains(&acked.len()),
        "{} unstakes acknowledged before the kill: the kill must land among them",
        acked.len()
    );

    let cookie = restart(&mut node, &cookie);
    assert_held(&node, &cookie, &acked, "unstakes");
    // Their funds left the stake for the cooldown (an unstake stored but cut off before its
    // answer may have left too).
    let (_, balance) = node
        .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();
    let staked = balance["balances"]["staked"].as_f64().unwrap();
    let pending = balance["balances"]["pending"].as_f64().unwrap();
    let unstaked = acked.len() as f64 * UNSTAKE;
    assert!(
        staked <= staked_before - unstaked + 1e-9,
        "staked {staked} after {} acknowledged unstakes from {staked_before}: {balance}",
        acked.len()
    );
    assert!(pending + 1e-9 >= unstaked, "{balance}");
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
    node.assert_database_settings();
}
