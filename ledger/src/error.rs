//! The one error type of the ledger module, with the codes and HTTP statuses the REST layer
//! renders as `{"error":{"code","message","details"}}`.

use neuroshard_identity::IdentityError;
use serde_json::{Value, json};

use super::units::{format_neuro, units_to_neuro};

/// An amount for a message: "0.001" (the caller writes " NEURO" after it).
fn neuro(units: &u64) -> String {
    format_neuro(*units)
}

/// Every way a ledger operation can fail. Messages are lowercase, without a trailing period.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "not enough NEURO for this operation: required {} NEURO, available {} NEURO",
        neuro(.required),
        neuro(.available)
    )]
    InsufficientBalance { required: u64, available: u64 },
    #[error(
        "not enough staked NEURO: requested {} NEURO, staked {} NEURO",
        neuro(.requested),
        neuro(.staked)
    )]
    InsufficientStake { requested: u64, staked: u64 },
    #[error("stake is locked until {}", super::dates::timestamp_string(*.unlock_at))]
    StakeLocked { unlock_at: i64 },
    #[error("invalid address {input:?}: {reason}")]
    InvalidAddress { input: String, reason: &'static str },
    #[error("invalid amount: {reason}")]
    InvalidAmount { reason: String },
    #[error("invalid staking duration {days} days: must be between {min} and {max}")]
    InvalidDuration { days: i64, min: u32, max: u32 },
    #[error("cannot send to your own address {address}")]
    SelfTransfer { address: String },
    #[error("memo is {len} bytes, at most {max} allowed")]
    MemoTooLong { len: usize, max: usize },
    #[error("invalid message: {reason}")]
    InvalidMessage { reason: String },
    #[error("bad signature on {what}: {reason}")]
    BadSignature { what: &'static str, reason: String },
    #[error("block timestamp {timestamp} is more than {max_ahead} s ahead of local time {now}")]
    FutureTimestamp {
        timestamp: i64,
        now: i64,
        max_ahead: i64,
    },
    #[error("account {account} is frozen for equivocation at height {fork_height}")]
    AccountFrozen { account: String, fork_height: u64 },
    #[error("proof {proof_id} rejected: {reason}")]
    ProofRejected { proof_id: String, reason: String },
    #[error("keystore {path}: {reason}")]
    Keystore { path: String, reason: String },
    #[error("database {op}: {source}")]
    Database {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration: {source}")]
    Migration {
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("stored message {seq} is corrupt: {reason}")]
    CorruptStore { seq: i64, reason: String },
    #[error("amount overflow in {op}")]
    Overflow { op: &'static str },
}

impl LedgerError {
    /// Stable machine-readable code for the REST error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InsufficientBalance { .. } => "INSUFFICIENT_BALANCE",
            Self::InsufficientStake { .. } => "INSUFFICIENT_STAKE",
            Self::StakeLocked { .. } => "STAKE_LOCKED",
            Self::InvalidAddress { .. } => "INVALID_ADDRESS",
            Self::InvalidAmount { .. } => "INVALID_AMOUNT",
            Self::InvalidDuration { .. } => "INVALID_DURATION",
            Self::SelfTransfer { .. } => "SELF_TRANSFER",
            Self::MemoTooLong { .. } => "INVALID_MEMO",
            Self::InvalidMessage { .. } => "INVALID_MESSAGE",
            Self::BadSignature { .. } => "BAD_SIGNATURE",
            Self::FutureTimestamp { .. } => "FUTURE_TIMESTAMP",
            Self::AccountFrozen { .. } => "ACCOUNT_FROZEN",
            Self::ProofRejected { .. } => "PROOF_REJECTED",
            Self::Overflow { .. } => "INVALID_AMOUNT",
            Self::Keystore { .. }
            | Self::Database { .. }
            | Self::Migration { .. }
            | Self::CorruptStore { .. } => "INTERNAL",
        }
    }

    /// The store refused a write for want of room or write access (disk full, read-only file
    /// system or database file, I/O error): the operation changed nothing and can be retried.
    pub fn is_storage(&self) -> bool {
        let Self::Database { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::Io(_) => true,
            sqlx::Error::Database(e) => e.code().is_some_and(|c| is_storage_code(&c)),
            _ => false,
        }
    }

    /// HTTP status the REST layer should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InsufficientBalance { .. } | Self::InsufficientStake { .. } => 402,
            Self::StakeLocked { .. } | Self::AccountFrozen { .. } => 409,
            Self::InvalidAddress { .. }
            | Self::InvalidAmount { .. }
            | Self::InvalidDuration { .. }
            | Self::SelfTransfer { .. }
            | Self::MemoTooLong { .. }
            | Self::InvalidMessage { .. }
            | Self::BadSignature { .. }
            | Self::FutureTimestamp { .. }
            | Self::ProofRejected { .. }
            | Self::Overflow { .. } => 400,
            Self::Keystore { .. }
            | Self::Database { .. }
            | Self::Migration { .. }
            | Self::CorruptStore { .. } => 500,
        }
    }

    /// The `details` object of the REST error body (amounts in NEURO as JSON numbers).
    pub fn details(&self) -> Value {
        match self {
            Self::InsufficientBalance {
                required,
                available,
            } => json!({
                "required": units_to_neuro(*required),
                "available": units_to_neuro(*available),
            }),
            Self::InsufficientStake { requested, staked } => json!({
                "requested": units_to_neuro(*requested),
                "staked": units_to_neuro(*staked),
            }),
            Self::StakeLocked { unlock_at } => json!({
                "unlock_date": super::dates::date_string(*unlock_at),
            }),
            Self::InvalidAddress { input, reason } => {
                json!({ "field": "to", "input": input, "reason": reason })
            }
            Self::InvalidAmount { reason } => json!({ "field": "amount", "reason": reason }),
            Self::InvalidDuration { days, min, max } => {
                json!({ "field": "duration_days", "value": days, "min": min, "max": max })
            }
            Self::MemoTooLong { len, max } => json!({ "field": "memo", "len": len, "max": max }),
            Self::AccountFrozen {
                account,
                fork_height,
            } => json!({ "account": account, "fork_height": fork_height }),
            Self::ProofRejected { proof_id, reason } => {
                json!({ "proof_id": proof_id, "reason": reason })
            }
            _ => json!({}),
        }
    }
}

/// A key, address or keystore failure as the ledger's error of the same code and message
/// (identity's variants are the ledger's, one for one).
impl From<IdentityError> for LedgerError {
    fn from(e: IdentityError) -> LedgerError {
        match e {
            IdentityError::InvalidAddress { input, reason } => {
                LedgerError::InvalidAddress { input, reason }
            }
            IdentityError::InvalidMessage { reason } => LedgerError::InvalidMessage { reason },
            IdentityError::BadSignature { what, reason } => {
                LedgerError::BadSignature { what, reason }
            }
            IdentityError::Keystore { path, reason } => LedgerError::Keystore { path, reason },
        }
    }
}

/// SQLite result codes (extended codes keep the primary one in the low byte): READONLY (8),
/// IOERR (10), FULL (13), CANTOPEN (14); PostgreSQL SQLSTATEs: disk_full (53100),
/// read_only_sql_transaction (25006), io_error (58030).
fn is_storage_code(code: &str) -> bool {
    if let Ok(n) = code.parse::<u32>()
        && code.len() < 5
    {
        return matches!(n & 0xff, 8 | 10 | 13 | 14);
    }
    matches!(code, "53100" | "25006" | "58030")
}

pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
    move |source| LedgerError::Database { op, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_balance_renders_contract_details() {
        let e = LedgerError::InsufficientBalance {
            required: 100_000_000_000,
            available: 50_000_000_000,
        };
        assert_eq!(e.code(), "INSUFFICIENT_BALANCE");
        assert_eq!(e.http_status(), 402);
        assert_eq!(e.details(), json!({"required": 100.0, "available": 50.0}));
        assert!(e.to_string().starts_with("not enough NEURO"));
    }

    #[test]
    fn full_or_read_only_storage_is_recognised() {
        for code in ["13", "8", "1032", "10", "778", "14", "53100", "25006"] {
            assert!(is_storage_code(code), "{code}");
        }
        for code in ["1", "5", "19", "2067", "23505", "40001"] {
            assert!(!is_storage_code(code), "{code}");
        }
        let io = LedgerError::Database {
            op: "append",
            source: sqlx::Error::Io(std::io::Error::other("no space left on device")),
        };
        assert!(io.is_storage());
        let missing = LedgerError::Database {
            op: "read",
            source: sqlx::Error::RowNotFound,
        };
        assert!(!missing.is_storage());
    }

    #[test]
    fn identity_errors_keep_their_code_and_message() {
        let parse = crate::Address::parse("0x12").unwrap_err();
        let (code, text) = (parse.code(), parse.to_string());
        let e = LedgerError::from(parse);
        assert_eq!((e.code(), e.to_string()), (code, text));
        assert_eq!(e.code(), "INVALID_ADDRESS");
        assert_eq!(e.http_status(), 400);
        assert_eq!(e.details()["field"], "to");
        let sig = crate::keys::recover_signer(&crate::Hash32::ZERO, &crate::Sig65([0; 65]), "test")
            .unwrap_err();
        let (code, text) = (sig.code(), sig.to_string());
        let e = LedgerError::from(sig);
        assert_eq!((e.code(), e.to_string()), (code, text));
        assert_eq!((e.code(), e.http_status()), ("BAD_SIGNATURE", 400));
        let hash = crate::Hash32::from_hex("zz").unwrap_err();
        let e = LedgerError::from(hash);
        assert_eq!((e.code(), e.http_status()), ("INVALID_MESSAGE", 400));
        let key = crate::Wallet::from_secret(&[0; 32]).unwrap_err();
        let text = key.to_string();
        let e = LedgerError::from(key);
        assert_eq!(
            (e.code(), e.http_status(), e.to_string()),
            ("INTERNAL", 500, text)
        );
    }

    #[test]
    fn internal_errors_are_500() {
        let e = LedgerError::CorruptStore {
            seq: 3,
            reason: "x".into(),
        };
        assert_eq!(e.http_status(), 500);
        assert_eq!(e.code(), "INTERNAL");
    }

    /// Every message with an amount writes it in NEURO (the example: an unstake of
    /// 0.001 NEURO with nothing staked once read "requested 1000000 units, staked 0").
    #[test]
    fn messages_give_amounts_in_neuro() {
        let e = LedgerError::InsufficientStake {
            requested: 1_000_000,
            staked: 0,
        };
        assert_eq!(
            e.to_string(),
            "not enough staked NEURO: requested 0.001 NEURO, staked 0 NEURO"
        );
        let e = LedgerError::InsufficientBalance {
            required: 100_100_000_000,
            available: 12_345_670_000_000,
        };
        assert_eq!(
            e.to_string(),
            "not enough NEURO for this operation: required 100.1 NEURO, available 12345.67 NEURO"
        );
        let e = LedgerError::StakeLocked {
            unlock_at: 1_733_313_600,
        };
        assert_eq!(e.to_string(), "stake is locked until 2024-12-04T12:00:00Z");
        assert_eq!(e.details()["unlock_date"], "2024-12-04");
    }
}
