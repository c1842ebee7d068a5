//! The one error type of the identity crate. Messages and codes are the ledger's own (the
//! ledger turns each into its `LedgerError` twin, which the REST layer renders).

/// Every way a key, an address or a keystore can fail. Messages are lowercase, without a
/// trailing period.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid address {input:?}: {reason}")]
    InvalidAddress { input: String, reason: &'static str },
    #[error("invalid message: {reason}")]
    InvalidMessage { reason: String },
    #[error("bad signature on {what}: {reason}")]
    BadSignature { what: &'static str, reason: String },
    #[error("keystore {path}: {reason}")]
    Keystore { path: String, reason: String },
}

impl IdentityError {
    /// Stable machine-readable code, the same as the ledger's for the same failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidAddress { .. } => "INVALID_ADDRESS",
            Self::InvalidMessage { .. } => "INVALID_MESSAGE",
            Self::BadSignature { .. } => "BAD_SIGNATURE",
            Self::Keystore { .. } => "INTERNAL",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = IdentityError::InvalidAddress {
            input: "0x1".into(),
            reason: "must have exactly 40 hex digits after 0x",
        };
        assert_eq!(e.code(), "INVALID_ADDRESS");
        assert_eq!(
            e.to_string(),
            "invalid address \"0x1\": must have exactly 40 hex digits after 0x"
        );
        let e = IdentityError::Keystore {
            path: "/d/wallet.json".into(),
            reason: "wrong passphrase or corrupted keystore".into(),
        };
        assert_eq!(e.code(), "INTERNAL");
        assert_eq!(
            e.to_string(),
            "keystore /d/wallet.json: wrong passphrase or corrupted keystore"
        );
    }
}
