//! Amounts: integer base units everywhere (1 NEURO = 10^9 units); f64 only at the JSON edge.

use super::error::LedgerError;
pub use super::units::{
    DECIMALS, UNITS_PER_NEURO, format_neuro, signed_units_to_neuro, units_to_neuro,
};

/// Largest amount a single message may carry (fits an i64 with room for sums).
pub const MAX_AMOUNT: u64 = i64::MAX as u64 / 4;
/// Transfer fee: 1 part per 1000 (the contract's example: 0.1 on 100), rounded up to a whole
/// unit, burned.
pub const FEE_PER_MILLE: u64 = 1;

/// The fee burned by a transfer of `amount` units: ceil(amount / 1000).
pub fn transfer_fee(amount: u64) -> u64 {
    amount.div_ceil(1000) * FEE_PER_MILLE
}

/// Parses an amount given as a JSON number. Rejects NaN, infinities, zero, negatives, values
/// above [`MAX_AMOUNT`] and more than nine decimals (judged on the shortest decimal form of the
/// f64, which is what the client wrote).
pub fn parse_neuro_f64(value: f64) -> Result<u64, LedgerError> {
    if !value.is_finite() {
        return Err(invalid("amount must be a finite number"));
    }
    if value <= 0.0 {
        return Err(invalid("amount must be greater than zero"));
    }
    parse_neuro_str(&format!("{value}"))
}

/// Parses a positive decimal amount of NEURO ("100", "0.000000001") into units.
pub fn parse_neuro_str(text: &str) -> Result<u64, LedgerError> {
    let text = text.trim();
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() && frac_part.is_empty() || !digits_ok(int_part) || !digits_ok(frac_part)
    {
        return Err(invalid("amount must be a positive decimal number"));
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > DECIMALS {
        return Err(invalid("amount has more than 9 decimal places"));
    }
    let int_value: u64 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| invalid("amount is too large"))?
    };
    let mut frac_value: u64 = 0;
    for (i, b) in frac_trimmed.bytes().enumerate() {
        frac_value += u64::from(b - b'0') * 10u64.pow((DECIMALS - 1 - i) as u32);
    }
    let units = int_value
        .checked_mul(UNITS_PER_NEURO)
        .and_then(|v| v.checked_add(frac_value))
        .ok_or_else(|| invalid("amount is too large"))?;
    if units == 0 {
        return Err(invalid("amount must be greater than zero"));
    }
    if units > MAX_AMOUNT {
        return Err(invalid("amount is too large"));
    }
    Ok(units)
}

fn invalid(reason: &str) -> LedgerError {
    LedgerError::InvalidAmount {
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_fee_example() {
        let amount = parse_neuro_f64(100.0).unwrap();
        assert_eq!(amount, 100 * UNITS_PER_NEURO);
        assert_eq!(units_to_neuro(transfer_fee(amount)), 0.1);
        assert_eq!(transfer_fee(1), 1);
        assert_eq!(transfer_fee(1000), 1);
        assert_eq!(transfer_fee(1001), 2);
    }

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!(parse_neuro_f64(0.1).unwrap(), 100_000_000);
        assert_eq!(parse_neuro_f64(12345.67).unwrap(), 12_345_670_000_000);
        assert_eq!(parse_neuro_f64(0.000000001).unwrap(), 1);
        assert_eq!(parse_neuro_str("1.500000000000").unwrap(), 1_500_000_000);
        assert_eq!(parse_neuro_str(".5").unwrap(), 500_000_000);
    }

    #[test]
    fn rejects_bad_amounts() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, -0.0, 0.0000000001, 1e30] {
            let err = parse_neuro_f64(bad).unwrap_err();
            assert_eq!(err.code(), "INVALID_AMOUNT", "{bad}");
        }
        for bad in ["", ".", "1e5", "-3", "1.2.3", "abc", "0", "0.0000000001"] {
            assert!(parse_neuro_str(bad).is_err(), "{bad}");
        }
    }
}
