//! Wallet API semantics on a real database (SQLite temp dir; PostgreSQL when
//! NEUROSHARD_TEST_POSTGRES_URL is set): send with fee, history paging, errors with codes,
//! staking with lock and cooldown, durability across reopen.

mod ledger_support;

use ledger_support::{T0, TestDb, fund, postgres_db, proof, sqlite_db};
use neuroshard_ledger::rewards::SECONDS_PER_DAY;
use neuroshard_ledger::{Address, UNITS_PER_NEURO, Wallet, units_to_neuro};

const N: u64 = UNITS_PER_NEURO;

macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::sqlite_db()).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(db) = super::postgres_db(concat!(stringify!($name), "::postgres")).await
                {
                    super::$name(db).await;
                }
            }
        }
    };
}

on_both_backends!(send_fee_and_history);
async fn send_fee_and_history(db: TestDb) {
    let ledger = db.open().await;
    let (a, b) = (Wallet::from_seed(11), Wallet::from_seed(12));
    let now = fund(&ledger, &a, 1000, T0).await;
    let before = ledger.balance(&a.address(), now).await;
    let receipt = ledger
        .send(&a, b.address(), 100 * N, "Payment for services", now)
        .await
        .unwrap();
    assert_eq!(units_to_neuro(receipt.fee), 0.1);
    assert_eq!(receipt.status, "confirmed");
    assert!(receipt.transaction_id.starts_with("tx_"));
    let after = ledger.balance(&a.address(), now).await;
    assert_eq!(after.available, before.available - 100 * N - N / 10);
    // Unclaimed, the transfer is pending for B; claimed, it is available.
    let pending = ledger.balance(&b.address(), now).await;
    assert_eq!(
        (pending.available, pending.pending, pending.total),
        (0, 100 * N, 100 * N)
    );
    assert_eq!((pending.unclaimed, pending.cooling), (100 * N, 0));
    // ... and B's history shows it as pending, under the send's id, until B claims it.
    let waiting = ledger.transactions(&b.address(), 10, 0).await;
    assert_eq!(waiting.total, 1);
    let line = &waiting.transactions[0];
    assert_eq!((line.kind, line.pending), ("receive", true));
    assert_eq!(line.id, receipt.transaction_id);
    assert_eq!(line.amount, i128::from(100 * N));
    assert_eq!(line.counterparty, Some(a.address()));
    assert_eq!(line.memo.as_deref(), Some("Payment for services"));
    let claimed = ledger.claim_incoming(&b, now + 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let got = ledger.balance(&b.address(), now + 1).await;
    assert_eq!((got.available, got.pending), (100 * N, 0));
    // History: newest first, total counts everything, paging works.
    let page = ledger.transactions(&a.address(), 10, 0).await;
    assert_eq!(page.transactions[0].kind, "send");
    assert_eq!(page.transactions[0].amount, -i128::from(100 * N));
    assert_eq!(page.transactions[0].fee, N / 10);
    assert_eq!(page.transactions[0].counterparty, Some(b.address()));
    assert_eq!(
        page.transactions[0].memo.as_deref(),
        Some("Payment for services")
    );
    let rewards = page.total - 1;
    assert!(rewards >= 1);
    assert!(
        page.transactions[1..]
            .iter()
            .all(|t| t.kind == "reward" && t.amount > 0)
    );
    assert_eq!(page.transactions[1].details["role"], "worker");
    let second = ledger.transactions(&a.address(), 2, 1).await;
    assert_eq!(second.transactions.len(), 2.min(page.total - 1));
    assert_eq!(second.transactions[0], page.transactions[1]);
    assert_eq!(second.total, page.total);
    let theirs = ledger.transactions(&b.address(), 10, 0).await;
    assert_eq!(theirs.total, 1);
    assert_eq!(theirs.transactions[0].kind, "receive");
    assert_eq!(theirs.transactions[0].amount, i128::from(100 * N));
    assert_eq!(theirs.transactions[0].counterparty, Some(a.address()));
    assert!(!theirs.transactions[0].pending);
    ledger.check_invariant().await.unwrap();
    let (minted, burned) = ledger.totals().await;
    assert_eq!(burned, u128::from(N / 10));
    assert!(minted >= u128::from(1000 * N));
    ledger.close().await;
    db.drop_db().await;
}

on_both_backends!(errors_carry_codes_and_details);
async fn errors_carry_codes_and_details(db: TestDb) {
    let ledger = db.open().await;
    let (a, b) = (Wallet::from_seed(21), Wallet::from_seed(22));
    let now = fund(&ledger, &a, 50, T0).await;
    let have = ledger.balance(&a.address(), now).await.available;
    let e = ledger
        .send(&a, b.address(), have, "", now)
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.http_status()), ("INSUFFICIENT_BALANCE", 402));
    let required = have + neuroshard_ledger::transfer_fee(have);
    assert_eq!(e.details()["required"], units_to_neuro(required));
    assert_eq!(e.details()["available"], units_to_neuro(have));
    let e = ledger.send(&a, a.address(), N, "", now).await.unwrap_err();
    assert_eq!((e.code(), e.http_status()), ("SELF_TRANSFER", 400));
    let e = ledger.send(&a, b.address(), 0, "", now).await.unwrap_err();
    assert_eq!(e.code(), "INVALID_AMOUNT");
    let e = ledger
        .send(&a, b.address(), N, &"m".repeat(300), now)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "INVALID_MEMO");
    assert_eq!(
        Address::parse("0x123").unwrap_err().code(),
        "INVALID_ADDRESS"
    );
    let e = ledger.stake(&a, N, 0, now).await.unwrap_err();
    assert_eq!(e.code(), "INVALID_DURATION");
    let e = ledger.stake(&a, have + 1, 30, now).await.unwrap_err();
    assert_eq!(e.code(), "INSUFFICIENT_BALANCE");
    let e = ledger.unstake(&a, N / 1000, now).await.unwrap_err();
    assert_eq!((e.code(), e.http_status()), ("INSUFFICIENT_STAKE", 402));
    // Amounts in messages are NEURO, never base units.
    assert_eq!(
        e.to_string(),
        "not enough staked NEURO: requested 0.001 NEURO, staked 0 NEURO"
    );
    let e = ledger
        .send(
            &a,
            b.address(),
            neuroshard_ledger::amount::MAX_AMOUNT + 1,
            "",
            now,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "INVALID_AMOUNT");
    assert!(e.to_string().ends_with(" NEURO"), "{e}");
    assert!(!e.to_string().contains("units"), "{e}");
    // Nothing of that reached the ledger.
    assert_eq!(ledger.balance(&a.address(), now).await.available, have);
    ledger.check_invariant().await.unwrap();
    ledger.close().await;
    db.drop_db().await;
}

on_both_backends!(stake_lock_cooldown_and_multiplier);
async fn stake_lock_cooldown_and_multiplier(db: TestDb) {
    let ledger = db.open().await;
    let (a, b) = (Wallet::from_seed(31), Wallet::from_seed(32));
    let now = fund(&ledger, &a, 11_000, T0).await;
    let before = ledger.balance(&a.address(), now).await;
    let r = ledger.stake(&a, 10_000 * N, 30, now).await.unwrap();
    assert_eq!(r.stake.amount, 10_000 * N);
    assert_eq!(r.stake.duration_days, 30);
    assert_eq!(r.stake.unlock_at, now + 30 * SECONDS_PER_DAY);
    assert_eq!((r.stake.multiplier * 100.0).round() / 100.0, 1.50);
    assert_eq!(r.available, before.available - 10_000 * N);
    assert_eq!(r.staked, 10_000 * N);
    // Rewards now carry the multiplier.
    let plain = {
        let w = Wallet::from_seed(33);
        ledger
            .submit_proof(&w, proof(&w, now, 10), now)
            .await
            .unwrap()
            .reward
    };
    let boosted = ledger
        .submit_proof(&a, proof(&a, now, 10), now)
        .await
        .unwrap()
        .reward;
    let ratio = boosted as f64 / plain as f64;
    assert!(
        (ratio - r.stake.multiplier).abs() < 1e-6,
        "{ratio} vs {}",
        r.stake.multiplier
    );
    // Locked until the unlock date.
    let day29 = now + 29 * SECONDS_PER_DAY;
    let e = ledger.unstake(&a, 5_000 * N, day29).await.unwrap_err();
    assert_eq!(e.code(), "STAKE_LOCKED");
    let day30 = now + 30 * SECONDS_PER_DAY;
    let u = ledger.unstake(&a, 5_000 * N, day30).await.unwrap();
    assert_eq!(u.cooldown_days, 7);
    assert_eq!(u.available_at, day30 + 7 * SECONDS_PER_DAY);
    let mid = ledger
        .balance(&a.address(), day30 + 3 * SECONDS_PER_DAY)
        .await;
    assert_eq!(mid.staked, 5_000 * N);
    assert_eq!(mid.pending, 5_000 * N);
    // All of it cooling, released when the cooldown ends.
    assert_eq!(
        (mid.cooling, mid.cooling_until, mid.unclaimed),
        (5_000 * N, Some(day30 + 7 * SECONDS_PER_DAY), 0)
    );
    assert_eq!(mid.total, mid.available + mid.staked + mid.pending);
    // Cooling funds cannot be spent before the cooldown ends.
    let spend = mid.available + 1_000 * N;
    let e = ledger
        .send(&a, b.address(), spend, "", day30 + 6 * SECONDS_PER_DAY)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "INSUFFICIENT_BALANCE");
    let done = day30 + 7 * SECONDS_PER_DAY;
    let after = ledger.balance(&a.address(), done).await;
    assert_eq!(after.pending, 0);
    assert_eq!(after.available, mid.available + 5_000 * N);
    ledger.send(&a, b.address(), spend, "", done).await.unwrap();
    ledger.check_invariant().await.unwrap();
    ledger.close().await;
    db.drop_db().await;
}

on_both_backends!(state_survives_reopen);
async fn state_survives_reopen(db: TestDb) {
    let (a, b) = (Wallet::from_seed(41), Wallet::from_seed(42));
    let (root, bal, hist, now) = {
        let ledger = db.open().await;
        if let Some(mode) = ledger.store().journal_mode().await.unwrap() {
            assert_eq!(mode.to_lowercase(), "wal");
        }
        let now = fund(&ledger, &a, 500, T0).await;
        ledger
            .send(&a, b.address(), 123 * N, "x", now)
            .await
            .unwrap();
        ledger.claim_incoming(&b, now).await.unwrap();
        ledger.stake(&a, 100 * N, 3, now).await.unwrap();
        let out = (
            ledger.root_hash().await,
            ledger.balance(&a.address(), now).await,
            ledger.transactions(&a.address(), 100, 0).await,
            now,
        );
        ledger.close().await;
        out
    };
    let ledger = db.open().await;
    assert_eq!(ledger.root_hash().await, root);
    assert_eq!(ledger.balance(&a.address(), now).await, bal);
    assert_eq!(ledger.transactions(&a.address(), 100, 0).await, hist);
    // The reopened ledger keeps appending after the stored sequence numbers.
    ledger.send(&b, a.address(), N, "", now + 60).await.unwrap();
    let seqs: Vec<i64> = ledger
        .messages_since(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    ledger.check_invariant().await.unwrap();
    ledger.close().await;
    db.drop_db().await;
}

on_both_backends!(concurrent_sends_all_land_once);
async fn concurrent_sends_all_land_once(db: TestDb) {
    let ledger = std::sync::Arc::new(db.open().await);
    let a = Wallet::from_seed(51);
    let now = fund(&ledger, &a, 600, T0).await;
    let before = ledger.balance(&a.address(), now).await.available;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let (ledger, a) = (ledger.clone(), a.clone());
        let to = Wallet::from_seed(60 + i % 6).address();
        tasks.push(tokio::spawn(async move {
            ledger.send(&a, to, (i + 1) * N, "burst", now).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut spent = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.amount, (i as u64 + 1) * N);
        spent += r.amount + r.fee;
        assert!(ids.insert(r.transaction_id));
    }
    assert_eq!(
        ledger.balance(&a.address(), now).await.available,
        before - spent
    );
    ledger.check_invariant().await.unwrap();
    let root = ledger.root_hash().await;
    ledger.close().await;
    let reopened = db.open().await;
    assert_eq!(reopened.root_hash().await, root);
    assert_eq!(
        reopened.transactions(&a.address(), 1, 0).await.total,
        ids.len() + 2
    );
    reopened.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn keystore_wallet_drives_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let w = Wallet::load_or_create(dir.path()).unwrap();
    let ledger = neuroshard_ledger::Ledger::open_data_dir(dir.path(), ledger_support::instant())
        .await
        .unwrap();
    fund(&ledger, &w, 1, T0).await;
    let again = Wallet::load_or_create(dir.path()).unwrap();
    assert_eq!(again.address(), w.address());
    assert!(ledger.balance(&again.address(), T0 + 600).await.available >= N);
    assert!(dir.path().join("ledger.db").exists());
}

#[tokio::test]
async fn rewards_stay_pending_through_the_challenge_window() {
    let db = sqlite_db();
    // Bond 0: every account is bonded and waits one window (the unbonded wait is below).
    let rules = neuroshard_ledger::Rules::new(600, 1024)
        .unwrap()
        .with_bond(0, 144)
        .unwrap();
    let ledger = db.open_with(rules).await;
    let w = Wallet::from_seed(41);
    let accepted = ledger
        .submit_proof(&w, proof(&w, T0, 1023), T0)
        .await
        .unwrap();
    let minted = accepted.reward;
    assert!(minted > 0);
    let b = ledger.balance(&w.address(), T0 + 599).await;
    assert_eq!(
        (b.available, b.pending_rewards, b.pending),
        (0, minted, minted)
    );
    assert_eq!(b.total, minted);
    assert_eq!(b.rewards_next_release_at, Some(T0 + 600));
    assert_eq!(b.rewards_released_at, Some(T0 + 600));
    // Nothing to spend inside the window ...
    let to = Wallet::from_seed(42).address();
    let err = ledger.send(&w, to, 1, "", T0 + 30).await;
    assert!(err.is_err(), "spent a pending reward: {err:?}");
    // ... everything after it.
    let b = ledger.balance(&w.address(), T0 + 600).await;
    assert_eq!((b.available, b.pending_rewards, b.pending), (minted, 0, 0));
    ledger
        .send(&w, to, UNITS_PER_NEURO, "", T0 + 600)
        .await
        .unwrap();
    // The window is a rule of the state: reopened, the same figures.
    ledger.close().await;
    let reopened = db.open_with(rules).await;
    let b = reopened.balance(&w.address(), T0 + 600).await;
    assert!(b.available < minted && b.pending_rewards == 0);
    reopened.check_invariant().await.unwrap();
    reopened.close().await;
    db.drop_db().await;

    // The default bond: a node with nothing staked waits 144 windows (a day) for the same reward.
    let db = sqlite_db();
    let ledger = db
        .open_with(neuroshard_ledger::Rules::new(600, 1024).unwrap())
        .await;
    ledger
        .submit_proof(&w, proof(&w, T0, 1023), T0)
        .await
        .unwrap();
    let b = ledger.balance(&w.address(), T0 + 600).await;
    assert_eq!((b.available, b.pending_rewards), (0, minted));
    assert_eq!(b.rewards_next_release_at, Some(T0 + 86_400));
    ledger.close().await;
    db.drop_db().await;
}
