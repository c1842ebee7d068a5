//! Where a node under test keeps its ledger: SQLite in its data directory (the node's default)
//! or a fresh PostgreSQL database of its own, created from `NEUROSHARD_TEST_POSTGRES_URL`
//! (`scripts/postgres-test-server.sh` starts a server and sets it) and dropped with the node.

use std::hash::{BuildHasher, Hasher};

use anyhow::Context;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The admin URL of the PostgreSQL server the tests may create databases on.
pub const POSTGRES_URL_VAR: &str = "NEUROSHARD_TEST_POSTGRES_URL";

/// The ledger storage of a node under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `ledger.db` in the node's data directory (no `database_url`).
    #[default]
    Sqlite,
    /// A database of its own on the server of `NEUROSHARD_TEST_POSTGRES_URL`.
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// Whether `test` can run on this backend. PostgreSQL needs `NEUROSHARD_TEST_POSTGRES_URL`:
    /// without it the test says so on stderr and is skipped, except under `CI=true`, where a
    /// check that did not run must not count as passed, so it fails.
    pub fn available(self, test: &str) -> bool {
        if self == Backend::Sqlite || std::env::var_os(POSTGRES_URL_VAR).is_some() {
            return true;
        }
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{test}: postgres not configured: set {POSTGRES_URL_VAR} (CI=true)"
        );
        eprintln!("{test}: postgres not configured ({POSTGRES_URL_VAR} unset): skipping");
        false
    }
}

/// A PostgreSQL database created for one node; dropped (connections and all) on drop.
#[derive(Debug)]
pub struct PgDatabase {
    admin: String,
    name: String,
    /// What the node is given as `database_url`.
    pub url: String,
    /// The password in `url`, which must never reach the node's logs. When the admin URL has
    /// none and the server does not check passwords (the test server trusts loopback), this
    /// is a random one, so the check still has something to look for.
    pub password: Option<String>,
}

impl PgDatabase {
    /// Creates an empty database named `ns_node_<random>` on the server of
    /// `NEUROSHARD_TEST_POSTGRES_URL`.
    pub fn create() -> anyhow::Result<PgDatabase> {
        let admin = std::env::var(POSTGRES_URL_VAR)
            .with_context(|| format!("{POSTGRES_URL_VAR} is not set"))?;
        let name = format!("ns_node_{:016x}", random_u64());
        let url = with_database(&admin, &name)
            .with_context(|| format!("{POSTGRES_URL_VAR} is not a postgres:// URL"))?;
        let (admin_url, db_name) = (admin.clone(), name.clone());
        block_on(async move {
            let (admin, name) = (admin_url, db_name);
            let mut conn = PgConnection::connect(&admin)
                .await
                .with_context(|| format!("connecting to {POSTGRES_URL_VAR}"))?;
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .with_context(|| format!("creating database {name}"))?;
            conn.close().await.ok();
            anyhow::Ok(())
        })?;
        let mut db = PgDatabase {
            admin,
            name,
            password: password_of(&url).map(String::from),
            url,
        };
        if db.password.is_none() {
            let secret = format!("ns-secret-{:016x}", random_u64());
            if let Some(candidate) = with_password(&db.url, &secret) {
                let url = candidate.clone();
                let accepted = block_on(async move {
                    let conn = PgConnection::connect(&url).await?;
                    conn.close().await
                });
                if accepted.is_ok() {
                    db.url = candidate;
                    db.password = Some(secret);
                }
            }
        }
        Ok(db)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = block_on(async move {
            let mut conn = PgConnection::connect(&admin).await?;
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
            conn.close().await
        });
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e:#}", self.name);
        }
    }
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own (so callers inside
/// another runtime, or a `Drop` during a panic, are fine).
fn block_on<T, E, F>(fut: F) -> anyhow::Result<T>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Into<anyhow::Error> + Send + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(fut).map_err(Into::into)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("database helper thread panicked"))?
}

fn random_u64() -> u64 {
    // Each RandomState has fresh random keys: a random number without another dependency.
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// `scheme://[user[:password]@]host[:port]` and the rest (`/db?query`) of a URL.
fn split_authority(url: &str) -> Option<(&str, &str)> {
    let scheme = url.find("://")? + 3;
    let end = url[scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme + i);
    Some((&url[..end], &url[end..]))
}

/// `url` naming database `name` instead of its own, keeping its query.
fn with_database(url: &str, name: &str) -> Option<String> {
    let (authority, rest) = split_authority(url)?;
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    Some(format!("{authority}/{name}{query}"))
}

/// The password of `url`'s user info, if it has one.
fn password_of(url: &str) -> Option<&str> {
    let (authority, _) = split_authority(url)?;
    let info = &authority[..authority.rfind('@')?];
    let info = &info[info.find("://")? + 3..];
    info.split_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
}

/// `url` with `password` for its user; None when it names no user.
fn with_password(url: &str, password: &str) -> Option<String> {
    let (authority, rest) = split_authority(url)?;
    let at = authority.rfind('@')?;
    let scheme = authority.find("://")? + 3;
    let user = authority[scheme..at].split(':').next()?;
    Some(format!(
        "{}{user}:{password}{}{rest}",
        &authority[..scheme],
        &authority[at..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_created_for_a_node_and_dropped_after_it() {
        if !Backend::Postgres.available("a_database_is_created_for_a_node_and_dropped_after_it") {
            return;
        }
        let db = PgDatabase::create().unwrap();
        assert!(db.url.contains(&db.name), "{}", db.url);
        if let Some(p) = &db.password {
            assert_eq!(password_of(&db.url), Some(p.as_str()));
        }
        let url = db.url.clone();
        block_on(async move { PgConnection::connect(&url).await?.close().await })
            .expect("the new database accepts connections");
        let url = db.url.clone();
        drop(db);
        let gone = block_on(async move { PgConnection::connect(&url).await?.close().await });
        assert!(gone.is_err(), "the database outlived its PgDatabase");
    }

    #[test]
    fn urls_name_another_database() {
        let admin = "postgres://postgres@127.0.0.1:5432/neuroshard_test";
        assert_eq!(
            with_database(admin, "n1").as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/n1")
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "n1").as_deref(),
            Some("postgresql://u:p@h/n1?sslmode=disable")
        );
        assert_eq!(
            with_database("postgres://h:5432", "n1").as_deref(),
            Some("postgres://h:5432/n1")
        );
        assert_eq!(with_database("not a url", "n1"), None);
    }

    #[test]
    fn passwords_are_found_and_set() {
        assert_eq!(password_of("postgres://u:pw@h/db"), Some("pw"));
        assert_eq!(password_of("postgres://u@h/db"), None);
        assert_eq!(password_of("postgres://h/db"), None);
        assert_eq!(password_of("postgres://u:@h/db"), None);
        assert_eq!(
            with_password("postgres://u@h:1/db?x=1", "s").as_deref(),
            Some("postgres://u:s@h:1/db?x=1")
        );
        assert_eq!(
            with_password("postgres://u:old@h/db", "s").as_deref(),
            Some("postgres://u:s@h/db")
        );
        assert_eq!(with_password("postgres://h/db", "s"), None);
    }
}
