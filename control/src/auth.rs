//! API tokens: bearer tokens bound to wallet accounts.
//!
//! Tokens live in `<data_dir>/tokens.json` (mode 0600) as SHA-256 hashes only; the secret is
//! shown once, by `neuroshard token create`. The daemon re-reads the file when it changes, so
//! tokens created or revoked while it runs take effect at the next request. At every start the
//! daemon also writes a fresh *cookie* token to `<data_dir>/api.cookie` (mode 0600, bound to the
//! node wallet, valid while that daemon runs) for the local CLI.
//!
//! A presented token is hashed and compared against every stored hash in constant time, so the
//! answer time says nothing about how close a guess was.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use neuroshard_ledger::Address;

pub const TOKENS_FILE: &str = "tokens.json";
pub const COOKIE_FILE: &str = "api.cookie";
const TOKEN_PREFIX: &str = "nst_";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no token with id or name {0:?}")]
    NotFound(String),
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    #[error("token name {0:?} must be 1-64 characters of letters, digits, '-', '_' or '.'")]
    BadName(String),
}

/// One stored token: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    /// The wallet account the token acts for.
    pub account: Address,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

fn hash_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()))
}

pub fn tokens_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKENS_FILE)
}

fn read_file(path: &Path) -> Result<TokenFile, AuthError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(TokenFile {
                version: 1,
                tokens: Vec::new(),
            });
        }
        Err(source) => {
            return Err(AuthError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let file: TokenFile = serde_json::from_str(&text).map_err(|e| AuthError::Malformed {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if file.version != 1 {
        return Err(AuthError::Malformed {
            path: path.into(),
            reason: format!("unknown version {}", file.version),
        });
    }
    Ok(file)
}

fn write_file(path: &Path, file: &TokenFile) -> Result<(), AuthError> {
    let text = serde_json::to_vec_pretty(file).map_err(|e| AuthError::Malformed {
        path: path.into(),
        reason: e.to_string(),
    })?;
    crate::config::write_atomic_mode(path, &text, 0o600).map_err(|source| AuthError::Io {
        path: path.into(),
        source,
    })
}

/// Stored tokens, oldest first.
pub fn list(data_dir: &Path) -> Result<Vec<TokenRecord>, AuthError> {
    Ok(read_file(&tokens_path(data_dir))?.tokens)
}

/// Creates a token for `account`; returns the record and the secret (shown once).
pub fn create(
    data_dir: &Path,
    name: &str,
    account: Address,
) -> Result<(TokenRecord, String), AuthError> {
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(AuthError::BadName(name.into()));
    }
    let path = tokens_path(data_dir);
    let mut file = read_file(&path)?;
    if file.tokens.iter().any(|t| t.name == name) {
        return Err(AuthError::NameTaken(name.into()));
    }
    let secret = new_secret();
    let record = TokenRecord {
        id: format!("tok_{}", hex::encode(rand::random::<[u8; 6]>())),
        name: name.into(),
        account,
        hash: hash_hex(&secret),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    file.version = 1;
    file.tokens.push(record.clone());
    write_file(&path, &file)?;
    Ok((record, secret))
}

/// Removes the token with this id or name.
pub fn revoke(data_dir: &Path, id_or_name: &str) -> Result<TokenRecord, AuthError> {
    let path = tokens_path(data_dir);
    let mut file = read_file(&path)?;
    let pos = file
        .tokens
        .iter()
        .position(|t| t.id == id_or_name || t.name == id_or_name)
        .ok_or_else(|| AuthError::NotFound(id_or_name.into()))?;
    let record = file.tokens.remove(pos);
    write_file(&path, &file)?;
    Ok(record)
}

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token id (`cookie` for the daemon's cookie token); the rate-limit key.
    pub token_id: String,
    pub account: Address,
}

struct Cached {
    stamp: Option<(SystemTime, u64)>,
    tokens: Vec<TokenRecord>,
}

/// The daemon's view of the valid tokens.
pub struct Authenticator {
    path: PathBuf,
    cookie_hash: [u8; 32],
    node_account: Address,
    cache: Mutex<Cached>,
}

impl Authenticator {
    /// Writes a fresh cookie token for the node wallet and loads the token file.
    pub fn start(data_dir: &Path, node_account: Address) -> Result<Authenticator, AuthError> {
        let cookie = new_secret();
        let cookie_path = data_dir.join(COOKIE_FILE);
        crate::config::write_atomic_mode(&cookie_path, cookie.as_bytes(), 0o600).map_err(
            |source| AuthError::Io {
                path: cookie_path,
                source,
            },
        )?;
        let auth = Authenticator {
            path: tokens_path(data_dir),
            cookie_hash: Sha256::digest(cookie.as_bytes()).into(),
            node_account,
            cache: Mutex::new(Cached {
                stamp: None,
                tokens: Vec::new(),
            }),
        };
        // A malformed token file is reported now, and every token in it refused until fixed.
        if let Err(e) = read_file(&auth.path) {
            tracing::error!(error = %e, "token file unreadable: only the cookie token is accepted");
        }
        Ok(auth)
    }

    /// Re-reads the token file when its modification time or size changed.
    fn refresh(&self, cache: &mut Cached) {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == cache.stamp && cache.stamp.is_some() {
            return;
        }
        cache.tokens = match read_file(&self.path) {
            Ok(f) => f.tokens,
            Err(e) => {
                tracing::error!(error = %e, "token file unreadable: its tokens are refused");
                Vec::new()
            }
        };
        cache.stamp = stamp;
    }

    /// The caller a bearer secret stands for, if any.
    pub fn verify(&self, secret: &str) -> Option<Caller> {
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        if bool::from(presented.ct_eq(&self.cookie_hash)) {
            found = Some(Caller {
                token_id: "cookie".into(),
                account: self.node_account,
            });
        }
        let mut cache = self.cache.lock();
        self.refresh(&mut cache);
        for t in &cache.tokens {
            let mut stored = [0u8; 32];
            if hex::decode_to_slice(&t.hash, &mut stored).is_err() {
                continue;
            }
            // No early exit: every stored hash is compared.
            if bool::from(presented.ct_eq(&stored)) && found.is_none() {
                found = Some(Caller {
                    token_id: t.id.clone(),
                    account: t.account,
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let node = neuroshard_ledger::Wallet::from_seed(1).address();
        let other = neuroshard_ledger::Wallet::from_seed(2).address();
        let auth = Authenticator::start(dir.path(), node).unwrap();
        let cookie = std::fs::read_to_string(dir.path().join(COOKIE_FILE)).unwrap();
        assert_eq!(auth.verify(&cookie).unwrap().account, node);
        assert_eq!(auth.verify("nst_wrong"), None);

        let (rec, secret) = create(dir.path(), "alice", other).unwrap();
        assert!(
            !std::fs::read_to_string(tokens_path(dir.path()))
                .unwrap()
                .contains(&secret)
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(tokens_path(dir.path()))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let caller = auth.verify(&secret).unwrap();
        assert_eq!(
            (caller.token_id.as_str(), caller.account),
            (rec.id.as_str(), other)
        );
        assert!(matches!(
            create(dir.path(), "alice", other),
            Err(AuthError::NameTaken(_))
        ));
        assert!(matches!(
            create(dir.path(), "bad name", other),
            Err(AuthError::BadName(_))
        ));
        revoke(dir.path(), "alice").unwrap();
        // Same second, same size is possible: the stamp includes the length, and the file
        // shrank, so the revocation is seen.
        assert_eq!(auth.verify(&secret), None);
        assert!(matches!(
            revoke(dir.path(), "alice"),
            Err(AuthError::NotFound(_))
        ));
    }
}
