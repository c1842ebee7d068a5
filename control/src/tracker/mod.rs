//! `neuroshard tracker`: a rendezvous point for nodes that know no peer yet. Nodes started
//! with `--tracker URL` announce themselves every [`ANNOUNCE_INTERVAL`] (`POST /announce`, a
//! signed [`Announce`]) and ask for others (`GET /peers`); from there the peer network's own
//! handshake, peer exchange and heartbeats take over, so a tracker that goes away stops only
//! new nodes from finding the network.
//!
//! The tracker keeps the last announcement of each node in a database through sqlx (SQLite in
//! its data directory by default, PostgreSQL by `--database-url`) and lists a node for
//! [`TrackerOptions::ttl`] after its last announcement. It answers errors in the REST API's
//! error body.

pub mod announce;
pub mod client;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use neuroshard_ledger::db;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

pub use announce::{Announce, PeerList, TrackedPeer};

use crate::api::error::ApiError;

/// How often a node announces itself (at most: each wait is shortened by up to a fifth at
/// random, so nodes started together do not announce in lockstep).
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10);
/// How far an announcement's timestamp may be from the tracker's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(120);
/// Largest `POST /announce` body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most peers one `GET /peers` answer lists.
pub const MAX_LIST: usize = 200;
/// Most nodes the tracker keeps; announcements of new nodes beyond it get 503.
pub const MAX_NODES: i64 = 100_000;
/// Requests per minute from one client address.
pub const RATE_PER_IP: u32 = 120;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./tracker-migrations");

#[derive(Clone)]
pub struct TrackerOptions {
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// A node is listed this long after its last announcement.
    pub ttl: Duration,
    /// Connection limits and timeouts of the tracker's port.
    pub limits: crate::listen::Limits,
    /// HTTPS (a tracker bound beyond loopback, `crate::tls`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The tracker's database of announcements.
#[derive(Debug, Clone)]
pub struct TrackerStore {
    pool: AnyPool,
}

impl TrackerStore {
    /// Connects and runs the tracker's migrations.
    pub async fn open(url: &str) -> anyhow::Result<TrackerStore> {
        let backend = db::Backend::of(url).ok_or_else(|| anyhow::anyhow!(db::BAD_URL))?;
        // SQLite: one connection. Two deferred transactions that both read and then write
        // make SQLite answer one of them "database is locked" at once (no busy wait can
        // resolve that), and nodes that started together announce in the same millisecond.
        // A tracker's writes are tiny; serializing them costs nothing.
        let pool = db::connect(url, backend, 1).await?;
        MIGRATOR.run(&pool).await?;
        Ok(TrackerStore { pool })
    }

    /// Stores `a` (already verified) as seen at `address`. Returns false when a newer or
    /// equal announcement of the node is already stored (a replay), or when the tracker is
    /// full and the node is new.
    pub async fn upsert(&self, a: &Announce, address: &str, now_ms: i64) -> sqlx::Result<bool> {
        let layers: Vec<String> = a.layers.iter().map(u32::to_string).collect();
        let mut tx = self.pool.begin().await?;
        let known: i64 = sqlx::query("SELECT COUNT(*) FROM tracker_peers WHERE node_id = $1")
            .bind(&a.node_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if known == 0 {
            let total: i64 = sqlx::query("SELECT COUNT(*) FROM tracker_peers")
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if total >= MAX_NODES {
                return Ok(false);
            }
        }
        let changed = sqlx::query(
            "INSERT INTO tracker_peers \
               (node_id, address, api_port, role, layers, announced_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (node_id) DO UPDATE SET \
               address = excluded.address, api_port = excluded.api_port, role = excluded.role, \
               layers = excluded.layers, announced_ms = excluded.announced_ms, \
               last_seen_ms = excluded.last_seen_ms \
             WHERE tracker_peers.announced_ms < excluded.announced_ms",
        )
        .bind(&a.node_id)
        .bind(address)
        .bind(i64::from(a.api_port))
        .bind(&a.role)
        .bind(layers.join(","))
        .bind(a.timestamp)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(changed == 1)
    }

    /// Nodes seen since `since_ms`, most recent first.
    pub async fn fresh(&self, since_ms: i64) -> sqlx::Result<Vec<TrackedPeer>> {
        let rows = sqlx::query(
            "SELECT node_id, address, api_port, role, layers, last_seen_ms FROM tracker_peers \
             WHERE last_seen_ms >= $1 ORDER BY last_seen_ms DESC, node_id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let layers: String = r.try_get(4)?;
                Ok(TrackedPeer {
                    node_id: r.try_get(0)?,
                    address: r.try_get(1)?,
                    api_port: u16::try_from(r.try_get::<i64, _>(2)?).unwrap_or(0),
                    role: r.try_get(3)?,
                    layers: layers.split(',').filter_map(|l| l.parse().ok()).collect(),
                    last_seen: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Forgets nodes not seen since `before_ms`; returns how many.
    pub async fn expire(&self, before_ms: i64) -> sqlx::Result<u64> {
        Ok(
            sqlx::query("DELETE FROM tracker_peers WHERE last_seen_ms < $1")
                .bind(before_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

struct Tracker {
    store: TrackerStore,
    ttl: Duration,
    limiter: DefaultKeyedRateLimiter<std::net::IpAddr>,
}

type Shared = Arc<Tracker>;

/// Builds the tracker's HTTP router over an opened store.
pub fn router(store: TrackerStore, ttl: Duration) -> Router {
    let quota = Quota::per_minute(NonZeroU32::new(RATE_PER_IP).unwrap_or(NonZeroU32::MIN));
    let shared = Arc::new(Tracker {
        store,
        ttl,
        limiter: RateLimiter::keyed(quota),
    });
    Router::new()
        .route("/announce", post(announce))
        .route("/peers", get(peers))
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// Runs the tracker on `listener` until `shutdown` resolves; expires old entries meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: TrackerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = TrackerStore::open(&opts.database_url).await?;
    let expiry = {
        let store = store.clone();
        let ttl = opts.ttl;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl.max(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                let before = now_ms() - ttl.as_millis() as i64;
                match store.expire(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "tracker forgot silent nodes"),
                    Err(e) => tracing::warn!(error = %e, "tracker expiry failed"),
                }
            }
        })
    };
    let app = router(store, opts.ttl);
    let stats = Arc::new(neuroshard_net::admission::ConnStats::default());
    let result = crate::listen::serve(listener, app, opts.limits, stats, opts.tls, shutdown).await;
    expiry.abort();
    Ok(result?)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn limited(t: &Tracker, from: &SocketAddr) -> Result<(), ApiError> {
    t.limiter
        .check_key(&from.ip())
        .map_err(|_| ApiError::rate_limited(60 / u64::from(RATE_PER_IP).max(1) + 1))
}

fn storage(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "tracker database error");
    ApiError::unavailable("tracker storage is unavailable")
}

async fn announce(
    State(t): State<Shared>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    body: Result<Json<Announce>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    limited(&t, &from)?;
    let Json(a) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let now = now_ms();
    a.verify(now, MAX_CLOCK_SKEW.as_millis() as i64)
        .map_err(|reason| ApiError::bad_request(format!("announcement refused: {reason}")))?;
    let host = match &a.host {
        Some(h) => h.clone(),
        None => from.ip().to_canonical().to_string(),
    };
    let address = neuroshard_net::manager::join_host_port_str(&host, a.peer_port);
    if !t.store.upsert(&a, &address, now).await.map_err(storage)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            "a newer announcement of this node is stored (replay), or the tracker is full",
        ));
    }
    tracing::debug!(node = %a.node_id, %address, role = %a.role, "announced");
    Ok(Json(json!({
        "node_id": a.node_id,
        "address": address,
        "interval_secs": ANNOUNCE_INTERVAL.as_secs(),
        "ttl_secs": t.ttl.as_secs(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersQuery {
    limit: Option<usize>,
    /// Only nodes holding this layer.
    layer: Option<u32>,
    /// Leave this node out (the caller itself).
    exclude: Option<String>,
}

async fn peers(
    State(t): State<Shared>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    query: Result<Query<PeersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PeerList>, ApiError> {
    limited(&t, &from)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(
            ApiError::bad_request(format!("limit must be 1..={MAX_LIST}"))
                .with_details(json!({ "field": "limit" })),
        );
    }
    let since = now_ms() - t.ttl.as_millis() as i64;
    let exclude = q.exclude.map(|e| e.to_ascii_lowercase());
    let peers: Vec<TrackedPeer> = t
        .store
        .fresh(since)
        .await
        .map_err(storage)?
        .into_iter()
        .filter(|p| q.layer.is_none_or(|l| p.layers.contains(&l)))
        .filter(|p| exclude.as_deref() != Some(p.node_id.to_ascii_lowercase().as_str()))
        .take(limit)
        .collect();
    Ok(Json(PeerList {
        count: peers.len(),
        peers,
    }))
}

async fn health(State(t): State<Shared>) -> Result<Json<Value>, ApiError> {
    let since = now_ms() - t.ttl.as_millis() as i64;
    let n = t.store.fresh(since).await.map_err(storage)?.len();
    Ok(Json(json!({ "status": "ok", "nodes": n })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_ledger::Wallet;

    /// Nodes started together announce in the same instant: every concurrent announcement
    /// is stored (SQLite once answered one of two "database is locked").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_announcements_are_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let store = TrackerStore::open(&url).await.unwrap();
        let now = now_ms();
        for round in 0..5i64 {
            let tasks: Vec<_> = (0..8u64)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let w = Wallet::from_seed(100 + i);
                        let a =
                            Announce::signed(&w, 9000, 8000, None, "full", vec![0], now + round);
                        store.upsert(&a, "127.0.0.1:9000", now + round).await
                    })
                })
                .collect();
            for t in tasks {
                assert!(t.await.unwrap().unwrap(), "an announcement was not stored");
            }
        }
        assert_eq!(store.fresh(now - 1).await.unwrap().len(), 8);
    }
}
