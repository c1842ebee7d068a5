//! Dates as the contract writes them (UTC).

use chrono::{DateTime, SecondsFormat, Utc};

/// `YYYY-MM-DD` (UTC) of unix seconds, as the contract's staking dates.
pub fn date_string(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// RFC 3339 (UTC, `Z`) of unix seconds, as the contract's timestamps.
pub fn timestamp_string(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}
