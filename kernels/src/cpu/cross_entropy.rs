//! Softmax cross-entropy over a padded vocabulary, mean over rows.
//!
//! logits [Bt,Vp] where Vp is the padded vocabulary; columns `>= v_live` are masked (treated
//! as -inf: zero probability, zero gradient). targets [Bt] must be `< v_live`; a target at or
//! above it returns [`KernelError::IdOutOfRange`] (checked before anything is computed).

use crate::KernelError;

pub(crate) fn check_args(
    logits: usize,
    targets: &[u32],
    rows: usize,
    vp: usize,
    v_live: usize,
) -> Result<(), KernelError> {
    assert!(
        v_live >= 1 && v_live <= vp,
        "cross_entropy: v_live {v_live} not in 1..={vp}"
    );
    assert_eq!(logits, rows * vp, "cross_entropy: logits are not [Bt, Vp]");
    assert_eq!(targets.len(), rows, "cross_entropy: targets are not [Bt]");
    match targets.iter().find(|&&t| t as usize >= v_live) {
        Some(&id) => Err(KernelError::IdOutOfRange { id, limit: v_live }),
        None => Ok(()),
    }
}

/// Log-sum-exp of one row's live logits.
pub(crate) fn row_lse(row: &[f32]) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for &x in row {
        max = max.max(x);
    }
    let mut sum = 0.0f32;
    for &x in row {
        sum += (x - max).exp();
    }
    max + sum.ln()
}

/// Mean over rows of `lse(logits[r, ..v_live]) - logits[r, targets[r]]`; 0 for zero rows.
pub fn cross_entropy_forward(
    logits: &[f32],
    targets: &[u32],
    rows: usize,
    vp: usize,
    v_live: usize,
) -> Result<f32, KernelError> {
    check_args(logits.len(), targets, rows, vp, v_live)?;
    if rows == 0 {
        return Ok(0.0);
    }
    let mut total = 0.0f64;
    for r in 0..rows {
        let row = &logits[r * vp..r * vp + v_live];
        total += (row_lse(row) - row[targets[r] as usize]) as f64;
    }
    Ok((total / rows as f64) as f32)
}

/// dlogits [Bt,Vp] = (softmax - onehot(target)) * dloss / Bt on live columns, 0 on masked
/// columns. WRITES dlogits (does not accumulate): it is the start of the backward pass.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    rows: usize,
    vp: usize,
    v_live: usize,
    dloss: f32,
) -> Result<(), KernelError> {
    check_args(logits.len(), targets, rows, vp, v_live)?;
    assert_eq!(
        dlogits.len(),
        logits.len(),
        "cross_entropy: dlogits are not [Bt, Vp]"
    );
    let scale = dloss / rows.max(1) as f32;
    for r in 0..rows {
        let row = &logits[r * vp..r * vp + v_live];
        let lse = row_lse(row);
        let drow = &mut dlogits[r * vp..(r + 1) * vp];
        for j in 0..v_live {
            drow[j] = (row[j] - lse).exp() * scale;
        }
        drow[targets[r] as usize] -= scale;
        drow[v_live..].fill(0.0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn uniform_logits_give_log_v_and_masked_columns_are_ignored() {
        let (rows, vp, v_live) = (3, 8, 5);
        let mut logits = vec![0.0; rows * vp];
        // Huge masked logits must not matter.
        for r in 0..rows {
            logits[r * vp + 6] = 1e30;
        }
        let loss = cross_entropy_forward(&logits, &[0, 4, 2], rows, vp, v_live).unwrap();
        assert!((loss - (5f32).ln()).abs() < 1e-6, "loss {loss}");
    }

    #[test]
    fn backward_matches_finite_differences_with_masked_vocab() {
        // rtol 1e-2, atol 1e-4 with h = 1e-2 (loss accumulated in f64).
        let mut r = rng(17);
        let (rows, vp, v_live) = (4, 11, 7);
        let logits = rand_vec(&mut r, rows * vp, 3.0);
        let targets = [6u32, 0, 3, 3];
        let dloss = 1.7;
        let mut dlogits = vec![9.0; rows * vp];
        cross_entropy_backward(&mut dlogits, &logits, &targets, rows, vp, v_live, dloss).unwrap();
        for row in dlogits.chunks_exact(vp) {
            assert!(row[v_live..].iter().all(|&x| x == 0.0));
            let s: f32 = row.iter().sum();
            assert!(s.abs() < 1e-6, "row gradient sums to {s}");
        }
        check_grad("dlogits", &logits, &dlogits, 1e-2, 1e-2, 1e-4, |x| {
            dloss as f64 * cross_entropy_forward(x, &targets, rows, vp, v_live).unwrap() as f64
        });
    }

    #[test]
    fn target_at_or_above_live_vocab_is_an_error() {
        let logits = vec![0.0; 2 * 6];
        let err = cross_entropy_forward(&logits, &[1, 4], 2, 6, 4).unwrap_err();
        assert_eq!(err, KernelError::IdOutOfRange { id: 4, limit: 4 });
        let mut d = vec![0.0; 12];
        let err = cross_entropy_backward(&mut d, &logits, &[7, 0], 2, 6, 4, 1.0).unwrap_err();
        assert_eq!(err, KernelError::IdOutOfRange { id: 7, limit: 4 });
    }
}
