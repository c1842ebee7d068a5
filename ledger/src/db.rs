//! Opening a database for the ledger and the tracker: a `sqlite:` or `postgres:` URL, one
//! `sqlx` Any pool, SQLite switched to WAL.

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of `url`, or None when it is neither `sqlite:` nor `postgres(ql):`.
    pub fn of(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// What a URL that names no known database is told.
pub const BAD_URL: &str = "database_url must start with sqlite: or postgres:";

/// A pool on `url` with at most `sqlite_connections` connections on SQLite (4 on PostgreSQL);
/// SQLite in WAL mode (kept in the file; `synchronous` stays FULL, the default, so a committed
/// transaction survives a crash or power loss).
pub async fn connect(
    url: &str,
    backend: Backend,
    sqlite_connections: u32,
) -> sqlx::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => sqlite_connections,
            Backend::Postgres => 4,
        })
        .connect(url)
        .await?;
    if backend == Backend::Sqlite {
        sqlx::query("PRAGMA journal_mode=WAL")
            .fetch_all(&pool)
            .await?;
    }
    Ok(pool)
}
