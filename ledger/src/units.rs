//! The unit of account: integer base units, and NEURO (f64) only for output. Parsing and
//! limits are `amount.rs`'s; the error messages (`error.rs`) show amounts through this.

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
