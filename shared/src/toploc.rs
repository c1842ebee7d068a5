//! A TOPLOC-style commitment of what a model computed for a sequence (after Ong et al.,
//! "TOPLOC: A Locality Sensitive Hashing Scheme for Trustless Verifiable Inference", arXiv
//! 2501.16007): per chunk of [`CHUNK_TOKENS`] positions, the `k` largest entries of the
//! model's last output at the chunk's last position (their indices and bf16 values). The
//! serving node commits while (or right after) it generates; a verifier that holds the same
//! model recomputes the whole sequence with one prefill and compares, chunk by chunk:
//!
//! * **overlap**: the share of the committed indices that are also among the recomputed
//!   top-k (a different model ranks other entries highest);
//! * **exponent mismatches**: committed values whose bf16 exponent differs from the
//!   recomputed value's at the same index;
//! * **mantissa error**: mean and median |mantissa difference| (in bf16 mantissa steps, 0..127)
//!   of the values whose exponents agree.
//!
//! Honest runs differ only in the last bits (decode with a KV cache vs one prefill, CPU vs GPU
//! kernels): all indices agree, no exponent differs and the mantissa error is a fraction of a
//! step. [`Tolerance::default`] is set from the measurements written down in BENCHMARKS.md
//! with a wide margin; a model from another seed, or one that skips its last layer, is far
//! outside it. Unlike TOPLOC we store the indices and values as they are (6 bytes per entry,
//! no polynomial encoding): `k = 32` costs 192 bytes per 32 tokens.

use serde::{Deserialize, Serialize};

/// Positions per committed chunk (TOPLOC's choice).
pub const CHUNK_TOKENS: usize = 32;
/// Entries committed per chunk.
pub const DEFAULT_TOP_K: usize = 32;

/// The committed top-k of one chunk: entry indices and their values as bf16 bits, largest
/// value first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChunkCommit {
    pub indices: Vec<u32>,
    pub values: Vec<u16>,
}

/// The bf16 bits of `x` (round to nearest even), as the commitment stores values.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The positions whose outputs are committed for a sequence of `len` positions: the last of
/// each full or final partial chunk.
pub fn committed_positions(len: usize) -> impl Iterator<Item = usize> {
    (0..len.div_ceil(CHUNK_TOKENS)).map(move |c| ((c + 1) * CHUNK_TOKENS).min(len) - 1)
}

/// The top-`k` entries of one output row (ties broken by the lower index, NaN last).
pub fn commit_row(row: &[f32], k: usize) -> ChunkCommit {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let key = |i: &u32| {
        let v = row[*i as usize];
        if v.is_nan() { f32::NEG_INFINITY } else { v }
    };
    order.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    order.truncate(k.min(row.len()));
    ChunkCommit {
        values: order.iter().map(|i| bf16_bits(row[*i as usize])).collect(),
        indices: order,
    }
}

/// How far a recomputed row is from a committed chunk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct ChunkDistance {
    /// Share of the committed indices among the recomputed top-k (1.0: all).
    pub overlap: f64,
    pub exponent_mismatches: u32,
    /// Mean and median |mantissa difference| in bf16 steps where the exponents agree.
    pub mantissa_mean: f64,
    pub mantissa_median: f64,
}

impl ChunkDistance {
    /// The worst of each measure over `ds` (the least overlap, the most mismatches and
    /// mantissa error); a perfect distance for none.
    pub fn worst(ds: &[ChunkDistance]) -> ChunkDistance {
        ds.iter().fold(
            ChunkDistance {
                overlap: 1.0,
                ..ChunkDistance::default()
            },
            |w, d| ChunkDistance {
                overlap: w.overlap.min(d.overlap),
                exponent_mismatches: w.exponent_mismatches.max(d.exponent_mismatches),
                mantissa_mean: w.mantissa_mean.max(d.mantissa_mean),
                mantissa_median: w.mantissa_median.max(d.mantissa_median),
            },
        )
    }
}

/// Compares a recomputed output row with the chunk committed for it.
pub fn compare_row(commit: &ChunkCommit, row: &[f32]) -> ChunkDistance {
    let k = commit.indices.len();
    if k == 0 || commit.values.len() != k {
        return ChunkDistance {
            overlap: 0.0,
            exponent_mismatches: k as u32,
            mantissa_mean: f64::INFINITY,
            mantissa_median: f64::INFINITY,
        };
    }
    let top = commit_row(row, k);
    let inside = commit
        .indices
        .iter()
        .filter(|i| top.indices.contains(i))
        .count();
    let mut exponent_mismatches = 0u32;
    let mut diffs = Vec::with_capacity(k);
    for (i, committed) in commit.indices.iter().zip(&commit.values) {
        let Some(x) = row.get(*i as usize) else {
            exponent_mismatches += 1;
            continue;
        };
        let got = bf16_bits(*x);
        // Sign and exponent: the top 9 bits.
        if got >> 7 != committed >> 7 {
            exponent_mismatches += 1;
        } else {
            diffs.push(f64::from((got & 0x7f).abs_diff(committed & 0x7f)));
        }
    }
    let (mantissa_mean, mantissa_median) = if diffs.is_empty() {
        (f64::INFINITY, f64::INFINITY)
    } else {
        diffs.sort_by(f64::total_cmp);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        (mean, diffs[diffs.len() / 2])
    };
    ChunkDistance {
        overlap: inside as f64 / k as f64,
        exponent_mismatches,
        mantissa_mean,
        mantissa_median,
    }
}

/// What a verifier accepts as the same computation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub min_overlap: f64,
    pub max_exponent_mismatches: u32,
    pub max_mantissa_mean: f64,
    pub max_mantissa_median: f64,
}

impl Default for Tolerance {
    /// Honest CPU runs (decode vs prefill) measured all-overlap, no exponent mismatch and a
    /// mean mantissa error of at most a small fraction of a step (BENCHMARKS.md); these bounds
    /// leave room for GPU kernels and bf16 weights while a foreign model fails every one.
    fn default() -> Self {
        Tolerance {
            min_overlap: 0.75,
            max_exponent_mismatches: 4,
            max_mantissa_mean: 8.0,
            max_mantissa_median: 6.0,
        }
    }
}

impl ChunkDistance {
    pub fn within(&self, t: &Tolerance) -> bool {
        self.overlap >= t.min_overlap
            && self.exponent_mismatches <= t.max_exponent_mismatches
            && self.mantissa_mean <= t.max_mantissa_mean
            && self.mantissa_median <= t.max_mantissa_median
    }
}

/// The commitment of a whole sequence: one chunk per [`committed_positions`] entry, made from
/// the output rows at those positions (`row(position)`).
pub fn commit_sequence<'a>(
    len: usize,
    k: usize,
    row: impl Fn(usize) -> &'a [f32],
) -> Vec<ChunkCommit> {
    committed_positions(len)
        .map(|p| commit_row(row(p), k))
        .collect()
}

/// Compares a recomputed sequence with its commitment: the distance of every chunk, or `None`
/// when the commitment does not have one chunk per chunk of the sequence.
pub fn compare_sequence<'a>(
    commits: &[ChunkCommit],
    len: usize,
    row: impl Fn(usize) -> &'a [f32],
) -> Option<Vec<ChunkDistance>> {
    let positions: Vec<usize> = committed_positions(len).collect();
    (positions.len() == commits.len()).then(|| {
        positions
            .iter()
            .zip(commits)
            .map(|(p, c)| compare_row(c, row(*p)))
            .collect()
    })
}

/// Bytes a commitment of `tokens` positions takes with `k` entries per chunk (4-byte index,
/// 2-byte value).
pub fn commitment_bytes(tokens: usize, k: usize) -> usize {
    tokens.div_ceil(CHUNK_TOKENS) * k * 6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0
            })
            .collect()
    }

    #[test]
    fn bf16_rounds_to_nearest() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
    }

    #[test]
    fn positions_are_chunk_ends() {
        assert_eq!(committed_positions(64).collect::<Vec<_>>(), vec![31, 63]);
        assert_eq!(
            committed_positions(70).collect::<Vec<_>>(),
            vec![31, 63, 69]
        );
        assert_eq!(committed_positions(1).collect::<Vec<_>>(), vec![0]);
        assert_eq!(committed_positions(0).count(), 0);
        assert_eq!(commitment_bytes(1000, 32), 32 * 32 * 6);
    }

    #[test]
    fn the_same_row_is_at_distance_zero_and_tiny_noise_stays_within() {
        let r = row(1, 512);
        let c = commit_row(&r, DEFAULT_TOP_K);
        assert_eq!(c.indices.len(), DEFAULT_TOP_K);
        assert!(r[c.indices[0] as usize] >= r[c.indices[1] as usize]);
        let d = compare_row(&c, &r);
        assert_eq!(d.overlap, 1.0);
        assert_eq!(d.exponent_mismatches, 0);
        assert_eq!(d.mantissa_mean, 0.0);
        // Relative noise of 1e-5 (far more than float reordering gives).
        let noisy: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, x)| x * (1.0 + 1e-5 * ((i % 7) as f32 - 3.0)))
            .collect();
        assert!(compare_row(&c, &noisy).within(&Tolerance::default()));
    }

    #[test]
    fn another_row_or_a_scaled_row_is_refused() {
        let r = row(1, 512);
        let c = commit_row(&r, DEFAULT_TOP_K);
        let t = Tolerance::default();
        let other = compare_row(&c, &row(2, 512));
        assert!(other.overlap < 0.5, "{other:?}");
        assert!(!other.within(&t));
        // The same ranking with values 10% off: the ranking survives, the values do not.
        let scaled: Vec<f32> = r.iter().map(|x| x * 1.1).collect();
        let d = compare_row(&c, &scaled);
        assert_eq!(d.overlap, 1.0);
        assert!(!d.within(&t), "{d:?}");
        // Malformed commitments never pass and never panic.
        let empty = ChunkCommit {
            indices: vec![],
            values: vec![],
        };
        assert!(!compare_row(&empty, &r).within(&t));
        let beyond = ChunkCommit {
            indices: vec![9_999],
            values: vec![0x3f80],
        };
        assert!(!compare_row(&beyond, &r).within(&t));
        let ragged = ChunkCommit {
            indices: vec![1, 2],
            values: vec![0x3f80],
        };
        assert!(!compare_row(&ragged, &r).within(&t));
    }

    #[test]
    fn sequences_commit_per_chunk() {
        let rows: Vec<Vec<f32>> = (0..70).map(|i| row(i, 64)).collect();
        let commits = commit_sequence(70, 8, |p| &rows[p]);
        assert_eq!(commits.len(), 3);
        let d = compare_sequence(&commits, 70, |p| &rows[p]).unwrap();
        assert!(d.iter().all(|d| d.within(&Tolerance::default())));
        assert!(compare_sequence(&commits, 64, |p| &rows[p]).is_none());
    }
}
