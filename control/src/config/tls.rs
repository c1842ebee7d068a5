//! The `[tls]` section: the certificate the REST API serves beyond loopback, and the explicit
//! opt-out; with it the checks of `tracker_url` and `tracker_fingerprint` (how the node
//! verifies an https tracker). Served by `crate::tls`; takes effect at the next start.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate (or chain, leaf first) the REST API serves when `host` is beyond
    /// loopback; empty: the self-signed `tls.crt` of the data directory, made at
    /// `neuroshard setup` or at the first such start.
    pub cert: String,
    /// PEM private key of `cert`; empty: `tls.key` of the data directory.
    pub key: String,
    /// Serve plain HTTP even beyond loopback: tokens then cross the network in clear (for a
    /// TLS-terminating reverse proxy in front). Logged as a warning at every start.
    pub insecure_http: bool,
}

/// Parses a SHA-256 fingerprint: 64 hex digits, colons allowed anywhere, either case.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    hex::decode(digits).ok()?.try_into().ok()
}

/// Checks `[tls]`, `tracker_url` and `tracker_fingerprint`.
pub(super) fn validate(cfg: &Config) -> Result<(), ConfigError> {
    let bad = |key: &str, message: String| {
        Err(ConfigError::Invalid {
            key: key.into(),
            message,
        })
    };
    if cfg.tls.cert.is_empty() != cfg.tls.key.is_empty() {
        return bad(
            if cfg.tls.cert.is_empty() {
                "tls.cert"
            } else {
                "tls.key"
            },
            "tls.cert and tls.key are given together (or both left empty for the data \
             directory's self-signed pair)"
                .into(),
        );
    }
    let url = &cfg.tracker_url;
    if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
        return bad(
            "tracker_url",
            format!("{url:?} is not an http:// or https:// URL"),
        );
    }
    let pin = &cfg.tracker_fingerprint;
    if !pin.is_empty() {
        if parse_fingerprint(pin).is_none() {
            return bad(
                "tracker_fingerprint",
                format!(
                    "{pin:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed, as \
                     `neuroshard setup` prints it)"
                ),
            );
        }
        if !url.starts_with("https://") {
            return bad(
                "tracker_fingerprint",
                "only an https:// tracker_url has a certificate to pin".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_urls_pins_and_pairs_are_checked() {
        let cfg = Config::default();
        let key = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key(cfg.with_key("tracker_url", "ftp://x")), "tracker_url");
        assert!(
            cfg.with_key("tracker_url", "https://t.example:8765")
                .is_ok()
        );
        assert!(cfg.with_key("tracker_url", "http://t.example:8765").is_ok());
        let https = cfg.with_key("tracker_url", "https://t.example").unwrap();
        let pin = ["ab"; 32].join(":");
        assert!(https.with_key("tracker_fingerprint", &pin).is_ok());
        assert!(
            https
                .with_key("tracker_fingerprint", &"AB".repeat(32))
                .is_ok()
        );
        assert_eq!(
            key(https.with_key("tracker_fingerprint", "abcd")),
            "tracker_fingerprint"
        );
        let http = cfg.with_key("tracker_url", "http://t.example").unwrap();
        assert_eq!(
            key(http.with_key("tracker_fingerprint", &pin)),
            "tracker_fingerprint"
        );
        assert_eq!(key(cfg.with_key("tls.cert", "/etc/c.pem")), "tls.key");
        assert_eq!(key(cfg.with_key("tls.key", "/etc/k.pem")), "tls.cert");
        let both = cfg.with_key("tls.cert", "/etc/c.pem");
        assert!(both.is_err());
        let mut pair = Config::default();
        pair.tls.cert = "/etc/c.pem".into();
        pair.tls.key = "/etc/k.pem".into();
        assert!(pair.validate().is_ok());
    }
}
