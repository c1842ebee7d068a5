//! Helpers shared by the ledger integration tests: databases (SQLite temp dirs and, when
//! NEUROSHARD_TEST_POSTGRES_URL is set, a fresh PostgreSQL database per test) and proofs.
#![allow(dead_code)]

use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::receipt::{attest_forward, attest_heartbeats};
use neuroshard_ledger::{Ledger, ProofType, Rules, SignedProof, Wallet};

/// Rules without a challenge window, for tests about other things than the window.
pub fn instant() -> Rules {
    Rules::new(0, 1024).expect("valid rules")
}

pub const T0: i64 = 1_733_313_600; // 2024-12-04T12:00:00Z

/// A ledger on some backend, with what must be cleaned up.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    /// Opens the ledger with no challenge window: rewards are spendable at once.
    pub async fn open(&self) -> Ledger {
        self.open_with(instant()).await
    }

    pub async fn open_with(&self, rules: Rules) -> Ledger {
        Ledger::open(&self.url, rules).await.expect("open ledger")
    }

    pub async fn drop_db(self) {
        if let Some((admin, name)) = &self.pg_admin {
            use sqlx::any::AnyPoolOptions;
            if let Ok(pool) = AnyPoolOptions::new()
                .max_connections(1)
                .connect(admin)
                .await
            {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                pool.close().await;
            }
        }
    }
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = neuroshard_ledger::store::sqlite_url(dir.path());
    TestDb {
        url,
        _dir: Some(dir),
        pg_admin: None,
    }
}

/// A fresh PostgreSQL database, or None (with a clear message) when
/// NEUROSHARD_TEST_POSTGRES_URL is unset. Under CI=true an unset variable fails the test.
pub async fn postgres_db(test: &str) -> Option<TestDb> {
    let Ok(admin) = std::env::var("NEUROSHARD_TEST_POSTGRES_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: postgres not configured: set NEUROSHARD_TEST_POSTGRES_URL (CI=true)");
        }
        eprintln!(
            "{test}: postgres not configured (NEUROSHARD_TEST_POSTGRES_URL unset): skipping the postgres half"
        );
        return None;
    };
    sqlx::any::install_default_drivers();
    use rand::RngCore;
    let name = format!("ns_ledger_{:016x}", rand::rng().next_u64());
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot connect to NEUROSHARD_TEST_POSTGRES_URL: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot create database {name}: {e}"));
    pool.close().await;
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (admin.clone(), String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[scheme_end..].find('/') {
        Some(i) => base[..scheme_end + i].to_string(),
        None => base.clone(),
    };
    Some(TestDb {
        url: format!("{prefix}/{name}{query}"),
        _dir: None,
        pg_admin: Some((admin, name)),
    })
}

/// A training proof worth 0.0005 * 600 batches * `layers` (+ uptime), signed by `w`.
pub fn proof(w: &Wallet, timestamp: i64, layers: u32) -> SignedProof {
    SignedProof::sign(
        Proof {
            node_id: w.address(),
            proof_type: ProofType::Training,
            timestamp,
            nonce: timestamp as u64,
            uptime_seconds: 60,
            tokens_processed: 600 * 2048,
            training_batches: 600,
            data_samples: 0,
            request_id: String::new(),
            model_hash: "ab".repeat(32),
            layers_held: (0..layers).collect(),
            holds_embedding: false,
            holds_lm_head: false,
            epoch_id: Proof::epoch_of(timestamp),
            model_hash_start: format!("{timestamp:064x}"),
            model_hash_end: format!("{:064x}", timestamp + 1),
            gradient_commitment: "cc".repeat(32),
            current_loss: 2.0,
            // All its batches, attested by the stage after its layers; the previous epoch's
            // uptime, attested by two peers.
            receipts: vec![
                attest_forward(
                    &Wallet::from_seed(9_999),
                    w.address(),
                    Proof::epoch_of(timestamp),
                    600,
                    layers,
                ),
                attest_heartbeats(
                    &Wallet::from_seed(9_998),
                    w.address(),
                    Proof::epoch_of(timestamp) - 1,
                    6,
                ),
                attest_heartbeats(
                    &Wallet::from_seed(9_997),
                    w.address(),
                    Proof::epoch_of(timestamp) - 1,
                    6,
                ),
            ],
        },
        w,
    )
}

/// Mints at least `neuro` NEURO to `w` through accepted proofs (one per epoch from `now`).
/// Returns the time after the last proof.
pub async fn fund(ledger: &Ledger, w: &Wallet, neuro: u64, mut now: i64) -> i64 {
    let want = neuro * neuroshard_ledger::UNITS_PER_NEURO;
    loop {
        let have = ledger.balance(&w.address(), now).await.available;
        if have >= want {
            return now;
        }
        ledger
            .submit_proof(w, proof(w, now, 1023), now)
            .await
            .expect("funding proof accepted");
        now += 60;
    }
}

/// Copies every block of `from` into `to` (gossip), returning how many were new.
pub async fn sync(from: &Ledger, to: &Ledger, now: i64) -> usize {
    let mut after = 0;
    let mut new = 0;
    loop {
        let page = from
            .messages_since(after, 500)
            .await
            .expect("messages_since");
        let Some((last, _)) = page.last() else {
            return new;
        };
        after = *last;
        for (_, msg) in page {
            let applied = to.apply(&msg, now).await.expect("apply gossiped block");
            new += applied.blocks.iter().filter(|(_, n, _)| *n).count();
        }
    }
}
