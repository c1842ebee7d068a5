//! The unit of account: integer base units, and NEURO (f64) only for output. Parsing and
//! limits are `amount.rs`'s; every message a user reads (`error.rs`, void and reject reasons)
//! writes amounts with [`format_neuro`].

/// Base units per NEURO. Nine decimals: the smallest reward (0.00001 per data sample) is
/// 10,000 units, and an i64 still holds 9.2 billion NEURO.
pub const UNITS_PER_NEURO: u64 = 1_000_000_000;
/// Decimal places of one unit.
pub const DECIMALS: usize = 9;

/// Units as NEURO for JSON output.
pub fn units_to_neuro(units: u64) -> f64 {
    units as f64 / UNITS_PER_NEURO as f64
}

/// Signed units (history entries) as NEURO for JSON output.
pub fn signed_units_to_neuro(units: i128) -> f64 {
    units as f64 / UNITS_PER_NEURO as f64
}

/// Units as an exact decimal amount of NEURO for messages: "0.001", "12345.67", "0" (no
/// trailing zeros, no rounding: every unit is one of nine decimals).
pub fn format_neuro(units: u64) -> String {
    let whole = units / UNITS_PER_NEURO;
    let frac = units % UNITS_PER_NEURO;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:0width$}", width = DECIMALS);
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neuro_is_written_exactly() {
        assert_eq!(format_neuro(0), "0");
        assert_eq!(format_neuro(1_000_000), "0.001");
        assert_eq!(format_neuro(1), "0.000000001");
        assert_eq!(format_neuro(12_345_670_000_000), "12345.67");
        assert_eq!(format_neuro(100 * UNITS_PER_NEURO), "100");
        assert_eq!(format_neuro(u64::MAX), "18446744073.709551615");
    }
}
