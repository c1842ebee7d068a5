//! Durable storage through sqlx: SQLite (WAL, synchronous FULL) by default, PostgreSQL by URL.
//! The store is an append-only set of signed blocks plus locally refused proofs; balances are
//! derived from it in memory (`state`), so a crash can only lose what was never acknowledged.

use std::path::Path;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, Connection, Row};

use super::block::SignedBlock;
use super::error::{LedgerError, db};
use super::keys::Hash32;

/// Takes a connection whose write transaction failed out of the pool and closes it (which rolls
/// back whatever SQLite still holds open). A COMMIT refused for a full disk can leave SQLite's
/// transaction and sqlx's count of open transactions disagreeing; handed out again, such a
/// connection turned the next transactions into savepoints of a transaction that never
/// commits: acknowledged writes vanished at the next restart, and the write lock it kept made
/// other connections wait (found by `tests/tests/storage.rs`).
async fn discard(conn: PoolConnection<Any>) {
    if let Err(e) = conn.detach().close().await {
        tracing::warn!(error = %e, "closing a failed database connection");
    }
}

/// A pooled connection that is not inside a transaction. One that is (a transaction left open
/// by a failed or interrupted write) is closed: written on, its `BEGIN` would become a
/// savepoint and its `COMMIT` a savepoint release, acknowledging a write that never commits.
async fn acquire_outside_transaction(pool: &AnyPool) -> Result<PoolConnection<Any>, LedgerError> {
    for _ in 0..3 {
        let conn = pool.acquire().await.map_err(db("acquire"))?;
        if !conn.is_in_transaction() {
            return Ok(conn);
        }
        tracing::error!("a pooled database connection was still inside a transaction: closed");
        discard(conn).await;
    }
    Err(LedgerError::Database {
        op: "acquire",
        source: sqlx::Error::Protocol("pooled connections stay inside a transaction".into()),
    })
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub use crate::db::Backend;

/// A locally refused proof, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub proof_id: String,
    pub node_id: String,
    pub proof_type: String,
    pub reason_code: String,
    pub reason: String,
    pub proof_timestamp: i64,
    pub recorded_at: i64,
}

/// The sqlx pool and the next sequence numbers (one writer per database: the ledger's lock).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// The default SQLite URL for a data directory.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}/ledger.db?mode=rwc", data_dir.display())
}

impl Store {
    /// Connects, switches SQLite to WAL, and runs the migrations.
    pub async fn open(url: &str) -> Result<Store, LedgerError> {
        let backend = Backend::of(url).ok_or_else(|| LedgerError::InvalidMessage {
            reason: crate::db::BAD_URL.into(),
        })?;
        // Writes are serialized by the ledger's lock; a second connection serves reads.
        let pool = crate::db::connect(url, backend, 2)
            .await
            .map_err(db("connect"))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| LedgerError::Migration { source })?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// SQLite's journal mode (for tests and diagnostics); None on PostgreSQL.
    pub async fn journal_mode(&self) -> Result<Option<String>, LedgerError> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let row = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await
            .map_err(db("journal mode"))?;
        Ok(Some(
            row.try_get::<String, _>(0).map_err(db("journal mode"))?,
        ))
    }

    /// Checks the database answers and takes writes: a write statement that changes nothing,
    /// rolled back (a read-only database or file refuses it).
    pub async fn ping(&self) -> Result<(), LedgerError> {
        let mut conn = acquire_outside_transaction(&self.pool).await?;
        let result = async {
            let mut tx = conn.begin().await.map_err(db("health begin"))?;
            sqlx::query("DELETE FROM proof_rejections WHERE id < 0")
                .execute(&mut *tx)
                .await
                .map_err(db("health write"))?;
            tx.rollback().await.map_err(db("health rollback"))
        }
        .await;
        if result.is_err() {
            discard(conn).await;
        }
        result
    }

    /// Highest sequence numbers in use: (messages, rejections).
    pub async fn max_seqs(&self) -> Result<(i64, i64), LedgerError> {
        let m = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM ledger_messages")
            .fetch_one(&self.pool)
            .await
            .map_err(db("max seq"))?;
        let r = sqlx::query("SELECT COALESCE(MAX(id), 0) AS m FROM proof_rejections")
            .fetch_one(&self.pool)
            .await
            .map_err(db("max rejection id"))?;
        Ok((
            m.try_get::<i64, _>("m").map_err(db("max seq"))?,
            r.try_get::<i64, _>("m").map_err(db("max rejection id"))?,
        ))
    }

    /// Stores blocks in one transaction, numbered from `first_seq`.
    pub async fn insert_blocks(
        &self,
        first_seq: i64,
        blocks: &[(Hash32, &SignedBlock)],
        received_at: i64,
    ) -> Result<(), LedgerError> {
        let mut conn = acquire_outside_transaction(&self.pool).await?;
        let result = async {
            let mut tx = conn.begin().await.map_err(db("begin"))?;
            for (i, (hash, block)) in blocks.iter().enumerate() {
                let body = serde_json::to_string(block).expect("blocks always serialize");
                sqlx::query(
                    "INSERT INTO ledger_messages (seq, hash, account, height, kind, body, received_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(first_seq + i as i64)
                .bind(hash.to_hex())
                .bind(block.block.account.to_checksum())
                .bind(block.block.height as i64)
                .bind(block.block.op.kind())
                .bind(body)
                .bind(received_at)
                .execute(&mut *tx)
                .await
                .map_err(db("insert block"))?;
            }
            tx.commit().await.map_err(db("commit"))?;
            // Only the outermost COMMIT makes the blocks durable.
            if conn.is_in_transaction() {
                return Err(LedgerError::Database {
                    op: "commit",
                    source: sqlx::Error::Protocol("commit left the connection in a transaction".into()),
                });
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            discard(conn).await;
        }
        result
    }

    /// Blocks with seq > `after`, oldest first, at most `limit`.
    pub async fn blocks_since(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, SignedBlock)>, LedgerError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM ledger_messages WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("select blocks"))?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(db("read seq"))?;
                let body: String = row.try_get("body").map_err(db("read body"))?;
                let block = serde_json::from_str(&body).map_err(|e| LedgerError::CorruptStore {
                    seq,
                    reason: e.to_string(),
                })?;
                Ok((seq, block))
            })
            .collect()
    }

    pub async fn insert_rejection(&self, id: i64, r: &Rejection) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO proof_rejections (id, proof_id, node_id, proof_type, reason_code, reason, \
             proof_timestamp, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(&r.proof_id)
        .bind(&r.node_id)
        .bind(&r.proof_type)
        .bind(&r.reason_code)
        .bind(&r.reason)
        .bind(r.proof_timestamp)
        .bind(r.recorded_at)
        .execute(&self.pool)
        .await
        .map_err(db("insert rejection"))?;
        Ok(())
    }

    /// Refused proofs of one node, newest first.
    pub async fn rejections(&self, node_id: &str) -> Result<Vec<Rejection>, LedgerError> {
        let rows = sqlx::query(
            "SELECT proof_id, node_id, proof_type, reason_code, reason, proof_timestamp, recorded_at \
             FROM proof_rejections WHERE node_id = $1 ORDER BY id DESC",
        )
        .bind(node_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("select rejections"))?;
        rows.iter()
            .map(|row| {
                let get = |c: &str| row.try_get::<String, _>(c).map_err(db("read rejection"));
                Ok(Rejection {
                    proof_id: get("proof_id")?,
                    node_id: get("node_id")?,
                    proof_type: get("proof_type")?,
                    reason_code: get("reason_code")?,
                    reason: get("reason")?,
                    proof_timestamp: row
                        .try_get("proof_timestamp")
                        .map_err(db("read rejection"))?,
                    recorded_at: row.try_get("recorded_at").map_err(db("read rejection"))?,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
