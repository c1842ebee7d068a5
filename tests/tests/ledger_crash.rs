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

#[test]
fn sigkill_during_concurrent_sends_loses_no_acknowledged_transfer_sqlite() {
    sigkill_during_concurrent_sends_loses_no_acknowledged_transfer(Backend::Sqlite);
}

#[test]
fn sigkill_during_concurrent_sends_loses_no_acknowledged_transfer_postgres() {
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
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (acked, url, cookie) = (
                acked.clone(),
                node.url("/api/v1/wallet/send"),
                cookie.clone(),
            );
            let to = recipients[i % recipients.len()].clone();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                while Instant::now() < stop_at + Duration::from_secs(2) {
                    let r = http
                        .post(&url)
                        .bearer_auth(cookie.trim())
                        .json(&json!({"to": to, "amount": 0.00001, "memo": format!("burst {i}")}))
                        .send();
                    match r {
                        Ok(r) if r.status().as_u16() == 200 => {
                            let body: Value = r.json().unwrap();
                            acked
                                .lock()
                                .unwrap()
                                .push(body["transaction_id"].as_str().unwrap().to_string());
                        }
                        Ok(r) => panic!(
                            "send refused: {} {}",
                            r.status(),
                            r.text().unwrap_or_default()
                        ),
                        Err(_) => return, // the daemon is gone
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} transfers acknowledged before the kill", acked.len());
    assert!(
        acked.len() >= 10,
        "only {} transfers before the kill",
        acked.len()
    );

    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let cookie = wait_for(
        "a new cookie",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let c = node.api_token().ok()?;
            (c != cookie).then_some(c)
        },
    )
    .unwrap();
    let held = transaction_ids(&node, cookie.trim());
    let missing: Vec<&String> = acked.iter().filter(|id| !held.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged transfers lost: {missing:?}",
        missing.len(),
        acked.len()
    );
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
    node.assert_database_settings();
}

/// One kind of ledger operation a client keeps sending during the crash test.
#[derive(Clone, Copy, Debug)]
enum Op {
    Send,
    Stake,
    Unstake,
}

/// What the clients saw acknowledged (HTTP 200) before the daemon died.
#[derive(Default)]
struct Acked {
    transaction_ids: Vec<String>,
    stakes: usize,
    /// The largest `new_balance.staked` an acknowledged stake reported.
    max_staked: f64,
    /// Unstakes refused with 409 `STAKE_LOCKED` (the stakes are locked for a day).
    unstakes_refused_locked: usize,
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
    sigkill_during_sends_stakes_unstakes_and_proof_minting(Backend::Sqlite);
}

#[test]
fn sigkill_during_sends_stakes_unstakes_and_proof_minting_loses_nothing_acknowledged_postgres() {
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

    let acked = Arc::new(Mutex::new(Acked::default()));
    let ops = [Op::Send, Op::Send, Op::Stake, Op::Stake, Op::Unstake];
    let clients: Vec<_> = ops
        .iter()
        .enumerate()
        .map(|(i, &op)| {
            let (acked, cookie) = (acked.clone(), cookie.clone());
            let to = recipients[i % recipients.len()].clone();
            let (url, body) = match op {
                Op::Send => (
                    node.url("/api/v1/wallet/send"),
                    json!({"to": to, "amount": 0.00001, "memo": format!("crash {i}")}),
                ),
                Op::Stake => (
                    node.url("/api/v1/wallet/stake"),
                    json!({"amount": 0.00002, "duration_days": 1}),
                ),
                Op::Unstake => (
                    node.url("/api/v1/wallet/unstake"),
                    json!({"amount": 0.00001}),
                ),
            };
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
                    let mut acked = acked.lock().unwrap();
                    match (op, status) {
                        (_, 200) => {
                            acked
                                .transaction_ids
                                .push(reply["transaction_id"].as_str().unwrap().to_string());
                            if let Op::Stake = op {
                                acked.stakes += 1;
                                let staked = reply["new_balance"]["staked"].as_f64().unwrap();
                                acked.max_staked = acked.max_staked.max(staked);
                            }
                        }
                        (Op::Unstake, 409 | 402) => {
                            // Locked for a day (or nothing staked yet): refused, not acked.
                            if reply["error"]["code"] == "STAKE_LOCKED" {
                                acked.unstakes_refused_locked += 1;
                            }
                        }
                        _ => panic!("{op:?} answered {status}: {reply}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "acknowledged before the kill: {} operations ({} stakes, staked {} NEURO); {} unstakes \
         refused as locked",
        acked.transaction_ids.len(),
        acked.stakes,
        acked.max_staked,
        acked.unstakes_refused_locked
    );
    assert!(
        acked.stakes >= 3,
        "only {} stakes before the kill",
        acked.stakes
    );
    assert!(
        acked.transaction_ids.len() >= 10,
        "only {} operations before the kill",
        acked.transaction_ids.len()
    );

    let restarted_at = Instant::now();
    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let cookie = wait_for(
        "a new cookie",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let c = node.api_token().ok()?;
            (c != cookie).then_some(c)
        },
    )
    .unwrap();

    // Every acknowledged transfer and stake is there, confirmed.
    let held = transaction_ids(&node, &cookie);
    let missing: Vec<&String> = acked
        .transaction_ids
        .iter()
        .filter(|id| !held.contains(*id))
        .collect();
    if !missing.is_empty() {
        // Say what the node holds, so a failure tells a lost write from a wrong read-back.
        let (_, balance) = node
            .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
            .unwrap_or_default();
        let (_, network) = node.get("/api/v1/network").unwrap_or_default();
        panic!(
            "{} of {} acknowledged operations lost (the node lists {} entries for its wallet; \
             balance {balance}; network {network}): {:?}",
            missing.len(),
            acked.transaction_ids.len(),
            held.len(),
            &missing[..missing.len().min(20)]
        );
    }
    let (_, balance) = node
        .authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();
    let staked = balance["balances"]["staked"].as_f64().unwrap();
    assert!(
        staked + 1e-9 >= acked.max_staked,
        "staked {staked} NEURO after the restart, an acknowledged stake reported {}",
        acked.max_staked
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
    sigkill_during_unstakes_loses_no_acknowledged_unstake(Backend::Sqlite);
}

#[test]
fn sigkill_during_unstakes_loses_no_acknowledged_unstake_postgres() {
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
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let kill_at = Instant::now() + Duration::from_millis(500);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (acked, url, cookie) = (
                acked.clone(),
                node.url("/api/v1/wallet/unstake"),
                cookie.clone(),
            );
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                // Bounded: the daemon is killed long before this.
                let give_up = Instant::now() + Duration::from_secs(30);
                while Instant::now() < give_up {
                    let Ok(r) = http
                        .post(&url)
                        .bearer_auth(&cookie)
                        .json(&json!({"amount": UNSTAKE}))
                        .send()
                    else {
                        return; // the daemon is gone
                    };
                    let status = r.status().as_u16();
                    let Ok(reply) = r.json::<Value>() else {
                        return; // cut off mid-answer: not acknowledged
                    };
                    match status {
                        200 => {
                            assert_eq!(reply["unstake"]["cooldown_days"], 7, "{reply}");
                            acked
                                .lock()
                                .unwrap()
                                .push(reply["transaction_id"].as_str().unwrap().to_string());
                        }
                        // Every stake unstaked already: refused, not acknowledged.
                        402 | 409 => return,
                        _ => panic!("unstake answered {status}: {reply}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} unstakes acknowledged before the kill", acked.len());
    assert!(
        (3..(STAKES as f64 * STAKE / UNSTAKE) as usize).contains(&acked.len()),
        "{} unstakes acknowledged before the kill: the kill must land among them",
        acked.len()
    );

    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    let cookie = wait_for(
        "a new cookie",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let c = node.api_token().ok()?;
            (c != cookie).then_some(c)
        },
    )
    .unwrap();
    let held = transaction_ids(&node, &cookie);
    let missing: Vec<&String> = acked.iter().filter(|id| !held.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged unstakes lost: {missing:?}",
        missing.len(),
        acked.len()
    );
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
