//! Fast cross-entropy over a padded vocabulary: parallel over rows, vectorized max / exp-sum.

use rayon::prelude::*;

use super::simd::{exp, max as simd_max, multiversion};
use crate::KernelError;
use crate::cpu::cross_entropy::check_args;

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
    let total: f64 = logits
        .par_chunks(vp)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            let live = &row[..v_live];
            (row_lse(live) - live[tgt as usize]) as f64
        })
        .sum();
    Ok((total / rows as f64) as f32)
}

multiversion! {
    fn row_lse(row: &[f32]) -> f32 {
        // A NaN logit makes the loss NaN, as in the reference: the max skips it, but
        // exp(NaN - max) is NaN and so is the sum.
        let max = simd_max(row);
        let mut acc = [0.0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += exp(c[l] - max);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for &x in chunks.remainder() {
            sum += exp(x - max);
        }
        max + sum.ln()
    }
}

/// dlogits [Bt,Vp] = (softmax - onehot) * dloss / Bt on live columns, 0 on masked ones
/// (writes, does not accumulate).
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
    if rows == 0 {
        return Ok(());
    }
    let scale = dloss / rows as f32;
    dlogits
        .par_chunks_mut(vp)
        .zip(logits.par_chunks(vp))
        .zip(targets.par_iter())
        .for_each(|((drow, row), &tgt)| backward_row(drow, row, tgt as usize, v_live, scale));
    Ok(())
}

multiversion! {
    fn backward_row(drow: &mut [f32], row: &[f32], tgt: usize, v_live: usize, scale: f32) {
        let lse = row_lse(&row[..v_live]);
        let (live, masked) = drow.split_at_mut(v_live);
        for (d, &x) in live.iter_mut().zip(&row[..v_live]) {
            *d = exp(x - lse) * scale;
        }
        live[tgt] -= scale;
        masked.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cross_entropy as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference_with_masked_vocab() {
        for (seed, rows, vp, v_live) in [
            (600u64, 1usize, 1usize, 1usize),
            (601, 5, 13, 9),
            (602, 33, 264, 259),
            (603, 8, 1024, 1024),
        ] {
            let mut r = rng(seed);
            let mut logits = rand_vec(&mut r, rows * vp, 8.0);
            for row in logits.chunks_exact_mut(vp) {
                row[v_live..].fill(1e30);
            }
            let targets: Vec<u32> = (0..rows).map(|i| ((i * 7 + 3) % v_live) as u32).collect();
            let want =
                reference::cross_entropy_forward(&logits, &targets, rows, vp, v_live).unwrap();
            let got = cross_entropy_forward(&logits, &targets, rows, vp, v_live).unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "loss {got} vs {want}"
            );
            let mut d_r = vec![0.0; rows * vp];
            reference::cross_entropy_backward(&mut d_r, &logits, &targets, rows, vp, v_live, 0.7)
                .unwrap();
            let mut d = vec![f32::NAN; rows * vp];
            cross_entropy_backward(&mut d, &logits, &targets, rows, vp, v_live, 0.7).unwrap();
            assert_close("dlogits", &d, &d_r, 1e-4, 1e-7);
        }
    }

    #[test]
    fn bad_target_is_an_error_and_nan_propagates() {
        let logits = vec![0.0; 2 * 4];
        let err = cross_entropy_forward(&logits, &[0, 3], 2, 4, 3).unwrap_err();
        assert_eq!(err, KernelError::IdOutOfRange { id: 3, limit: 3 });
        let mut nan = logits.clone();
        nan[1] = f32::NAN;
        assert!(
            cross_entropy_forward(&nan, &[0, 0], 2, 4, 3)
                .unwrap()
                .is_nan()
        );
    }
}
