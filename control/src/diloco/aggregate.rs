//! Robust aggregation of pseudo-gradients.
//!
//! Every aggregator takes the contributions as flat f32 vectors of one length, **in canonical
//! order** (sorted by sender), and returns one vector. Every loop runs in a fixed order with
//! fixed accumulator types, so the same inputs give the same bits on every node: that is what
//! lets honest replicas end a DiLoCo round with identical weights.
//!
//! Defaults follow the original: trimmed mean (10% each side) is the default; Krum assumes
//! `f` Byzantine senders; the geometric median runs Weiszfeld (100 iterations, tol 1e-6).
//! One deliberate difference: the number trimmed each side is `ceil(trim · n)` (at least one
//! value as soon as three remain), not `floor`, so a small group (3–9 replicas) is still
//! protected against one attacker.

use serde::{Deserialize, Serialize};

/// Which rule combines the pseudo-gradients of a round (`training.aggregator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum AggregatorKind {
    Mean,
    WeightedMean,
    Median,
    #[default]
    TrimmedMean,
    Krum,
    MultiKrum,
    GeometricMedian,
}

impl AggregatorKind {
    pub const ALL: [AggregatorKind; 7] = [
        AggregatorKind::Mean,
        AggregatorKind::WeightedMean,
        AggregatorKind::Median,
        AggregatorKind::TrimmedMean,
        AggregatorKind::Krum,
        AggregatorKind::MultiKrum,
        AggregatorKind::GeometricMedian,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AggregatorKind::Mean => "mean",
            AggregatorKind::WeightedMean => "weighted_mean",
            AggregatorKind::Median => "median",
            AggregatorKind::TrimmedMean => "trimmed_mean",
            AggregatorKind::Krum => "krum",
            AggregatorKind::MultiKrum => "multi_krum",
            AggregatorKind::GeometricMedian => "geometric_median",
        }
    }
}

/// An aggregator with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregator {
    pub kind: AggregatorKind,
    /// Share trimmed on each side by the trimmed mean.
    pub trim: f32,
    /// Byzantine senders Krum and Multi-Krum tolerate.
    pub byzantine: usize,
    /// Weiszfeld iterations and relative tolerance of the geometric median.
    pub max_iters: usize,
    pub tol: f64,
}

impl Aggregator {
    pub fn new(kind: AggregatorKind) -> Aggregator {
        Aggregator {
            kind,
            trim: 0.1,
            byzantine: 1,
            max_iters: 100,
            tol: 1e-6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("no contributions to aggregate")]
    Empty,
    #[error("contribution {index} has {got} values, {expected} expected")]
    Length {
        index: usize,
        got: usize,
        expected: usize,
    },
}

/// One sender's pseudo-gradient, flattened, with its weight (batches it trained on).
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub values: &'a [f32],
    pub weight: f32,
}

/// An aggregation's result, and which contributions it outvoted.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregated {
    pub values: Vec<f32>,
    /// Indices (into the inputs) of the contributions the rule set aside: not chosen by
    /// Krum / Multi-Krum, or trimmed away (outside the kept values) by the median / trimmed
    /// mean in at least 90% of the coordinates where it and another contribution are not
    /// zero. The mean and the geometric median set none aside.
    pub outvoted: Vec<usize>,
}

/// Share of the coordinates (in tenths) a contribution must be trimmed in to count as
/// outvoted. An honest one among three is trimmed in about two thirds of them (the median
/// keeps one value of three); one far from the others is trimmed in all of them.
const OUTVOTED_TENTHS: usize = 9;

impl Aggregator {
    /// The fewest contributions with which this rule outvotes one bad sender: three for the
    /// median, the trimmed mean (when it trims) and the geometric median, `2f + 1` (at
    /// least three) for Krum and Multi-Krum, one for the plain and weighted means (which
    /// outvote no one). With fewer, a bad delta can decide the round on its own: two
    /// contributions are averaged whatever they hold.
    pub fn min_contributions(&self) -> usize {
        match self.kind {
            AggregatorKind::Mean | AggregatorKind::WeightedMean => 1,
            AggregatorKind::TrimmedMean if self.trim <= 0.0 => 1,
            AggregatorKind::Median
            | AggregatorKind::TrimmedMean
            | AggregatorKind::GeometricMedian => 3,
            AggregatorKind::Krum | AggregatorKind::MultiKrum => (2 * self.byzantine + 1).max(3),
        }
    }

    /// Combines `inputs` (canonical order) into one vector.
    pub fn aggregate(&self, inputs: &[Input<'_>]) -> Result<Vec<f32>, AggregateError> {
        self.aggregate_report(inputs).map(|a| a.values)
    }

    /// Combines `inputs` (canonical order) into one vector and says whom it outvoted.
    pub fn aggregate_report(&self, inputs: &[Input<'_>]) -> Result<Aggregated, AggregateError> {
        let first = inputs.first().ok_or(AggregateError::Empty)?;
        let len = first.values.len();
        for (index, x) in inputs.iter().enumerate() {
            if x.values.len() != len {
                return Err(AggregateError::Length {
                    index,
                    got: x.values.len(),
                    expected: len,
                });
            }
        }
        let rows: Vec<&[f32]> = inputs.iter().map(|x| x.values).collect();
        let all_but = |kept: &[usize]| -> Vec<usize> {
            (0..rows.len()).filter(|i| !kept.contains(i)).collect()
        };
        let from_trim = |(values, dropped, spoke): (Vec<f32>, Vec<usize>, Vec<usize>)| Aggregated {
            values,
            outvoted: (0..dropped.len())
                .filter(|&i| spoke[i] > 0 && dropped[i] * 10 >= spoke[i] * OUTVOTED_TENTHS)
                .collect(),
        };
        Ok(match self.kind {
            AggregatorKind::Mean => Aggregated {
                values: mean(&rows),
                outvoted: vec![],
            },
            AggregatorKind::WeightedMean => {
                let w: Vec<f32> = inputs.iter().map(|x| x.weight).collect();
                Aggregated {
                    values: weighted_mean(&rows, &w),
                    outvoted: vec![],
                }
            }
            AggregatorKind::Median => from_trim(trimmed(&rows, |n| (n - 1) / 2)),
            AggregatorKind::TrimmedMean => {
                let trim = self.trim.clamp(0.0, 0.5);
                from_trim(trimmed(&rows, |n| {
                    ((trim * n as f32).ceil() as usize).min((n - 1) / 2)
                }))
            }
            AggregatorKind::Krum => {
                let i = krum_order(&rows, self.byzantine)[0];
                Aggregated {
                    values: rows[i].to_vec(),
                    outvoted: all_but(&[i]),
                }
            }
            AggregatorKind::MultiKrum => {
                let keep = rows.len().saturating_sub(self.byzantine).max(1);
                let mut chosen = krum_order(&rows, self.byzantine);
                chosen.truncate(keep);
                // Average in canonical order, whatever order the scores gave.
                chosen.sort_unstable();
                let picked: Vec<&[f32]> = chosen.iter().map(|&i| rows[i]).collect();
                Aggregated {
                    values: mean(&picked),
                    outvoted: all_but(&chosen),
                }
            }
            AggregatorKind::GeometricMedian => Aggregated {
                values: geometric_median(&rows, self.max_iters, self.tol),
                outvoted: vec![],
            },
        })
    }
}

/// Plain mean, summed in input order.
pub fn mean(rows: &[&[f32]]) -> Vec<f32> {
    let w = vec![1.0; rows.len()];
    weighted_mean(rows, &w)
}

/// Weighted mean; non-positive or non-finite weights count as zero; all-zero weights fall
/// back to the plain mean.
pub fn weighted_mean(rows: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    let len = rows.first().map_or(0, |r| r.len());
    let w: Vec<f64> = weights
        .iter()
        .map(|&w| {
            if w.is_finite() && w > 0.0 {
                w as f64
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = w.iter().sum();
    let (w, total) = if total > 0.0 {
        (w, total)
    } else {
        (vec![1.0; rows.len()], rows.len() as f64)
    };
    let mut out = vec![0.0f32; len];
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f64;
        for (row, wi) in rows.iter().zip(&w) {
            acc += row[j] as f64 * wi;
        }
        *o = (acc / total) as f32;
    }
    out
}

/// Per coordinate: sort the values, drop `k(n)` from each side, average the rest. With
/// `k = (n-1)/2` this is the median (the mean of the two middle values for even n). Also
/// counts, per row, the coordinates where its value was dropped (equal values: the later
/// row is dropped from the top, the earlier from the bottom).
fn trimmed(rows: &[&[f32]], k: impl Fn(usize) -> usize) -> (Vec<f32>, Vec<usize>, Vec<usize>) {
    let n = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let k = if n >= 3 { k(n) } else { 0 };
    let mut col: Vec<(f32, usize)> = vec![(0.0, 0); n];
    let mut out = vec![0.0f32; len];
    let mut dropped = vec![0usize; n];
    let mut spoke = vec![0usize; n];
    for (j, o) in out.iter_mut().enumerate() {
        for (i, (c, row)) in col.iter_mut().zip(rows).enumerate() {
            *c = (row[j], i);
        }
        col.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let kept = &col[k..n - k];
        // A sender's value counts where it is not zero and another sender's is not either
        // ("spoke"), and against it ("dropped") only where it lies outside the kept values:
        // sparse (topk) contributions are zero in most coordinates, and which of equal
        // values the sort trims, or a value no one else sent, says nothing about a sender.
        let nonzero = col.iter().filter(|c| c.0 != 0.0).count();
        if nonzero >= 2 {
            let (lo, hi) = (kept[0].0, kept[kept.len() - 1].0);
            for (pos, &(v, i)) in col.iter().enumerate() {
                if v == 0.0 {
                    continue;
                }
                spoke[i] += 1;
                let trimmed = pos < k || pos >= n - k;
                if trimmed && (v.total_cmp(&lo).is_lt() || v.total_cmp(&hi).is_gt()) {
                    dropped[i] += 1;
                }
            }
        }
        let sum: f64 = kept.iter().map(|&(v, _)| v as f64).sum();
        *o = (sum / kept.len() as f64) as f32;
    }
    (out, dropped, spoke)
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum()
}

/// Indices ordered by Krum score (sum of squared distances to the `n - f - 2` nearest
/// others; at least one neighbour), best first; ties go to the lower index.
fn krum_order(rows: &[&[f32]], f: usize) -> Vec<usize> {
    let n = rows.len();
    if n == 1 {
        return vec![0];
    }
    let neighbours = n.saturating_sub(f + 2).max(1).min(n - 1);
    let mut d = vec![vec![0.0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let v = sq_dist(rows[i], rows[j]);
            d[i][j] = v;
            d[j][i] = v;
        }
    }
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            others.sort_unstable_by(f64::total_cmp);
            others[..neighbours].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order
}

/// Weiszfeld's algorithm from the coordinate-wise median; stops when a step moves the
/// estimate by less than `tol` relative to its norm.
fn geometric_median(rows: &[&[f32]], max_iters: usize, tol: f64) -> Vec<f32> {
    let len = rows.first().map_or(0, |r| r.len());
    let mut z: Vec<f64> = trimmed(rows, |n| (n - 1) / 2)
        .0
        .into_iter()
        .map(f64::from)
        .collect();
    for _ in 0..max_iters {
        let mut num = vec![0.0f64; len];
        let mut den = 0.0f64;
        for row in rows {
            let dist = row
                .iter()
                .zip(&z)
                .map(|(&x, &zj)| (x as f64 - zj) * (x as f64 - zj))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            let w = 1.0 / dist;
            den += w;
            for (nj, &x) in num.iter_mut().zip(row.iter()) {
                *nj += w * x as f64;
            }
        }
        let mut moved = 0.0f64;
        let mut norm = 0.0f64;
        for (zj, nj) in z.iter_mut().zip(&num) {
            let next = nj / den;
            moved += (next - *zj) * (next - *zj);
            norm += next * next;
            *zj = next;
        }
        if moved.sqrt() <= tol * norm.sqrt().max(1e-12) {
            break;
        }
    }
    z.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 64;

    /// `n` honest vectors: a shared direction plus small deterministic per-sender noise.
    fn honest(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..DIM)
                    .map(|j| {
                        let base = ((j as f32) * 0.37).sin() * 0.01;
                        let noise = (((i * 131 + j * 17) % 23) as f32 - 11.0) * 1e-5;
                        base + noise
                    })
                    .collect()
            })
            .collect()
    }

    fn dist(a: &[f32], b: &[f32]) -> f64 {
        sq_dist(a, b).sqrt()
    }

    fn norm(a: &[f32]) -> f64 {
        a.iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// Every row with weight 1.
    fn inputs(rows: &[Vec<f32>]) -> Vec<Input<'_>> {
        rows.iter()
            .map(|r| Input {
                values: r,
                weight: 1.0,
            })
            .collect()
    }

    fn run(kind: AggregatorKind, rows: &[Vec<f32>]) -> Vec<f32> {
        Aggregator::new(kind).aggregate(&inputs(rows)).unwrap()
    }

    /// `honest` honest rows, then one attacker row per function in `attacks` (each given
    /// the honest mean); also returns that mean.
    type Attack<'a> = &'a dyn Fn(&[f32]) -> Vec<f32>;

    fn with_attackers(honest_rows: usize, attacks: &[Attack]) -> (Vec<Vec<f32>>, Vec<f32>) {
        let mut rows = honest(honest_rows);
        let target = honest_mean(&rows, honest_rows);
        for attack in attacks {
            rows.push(attack(&target));
        }
        (rows, target)
    }

    fn robust() -> [AggregatorKind; 5] {
        [
            AggregatorKind::Median,
            AggregatorKind::TrimmedMean,
            AggregatorKind::Krum,
            AggregatorKind::MultiKrum,
            AggregatorKind::GeometricMedian,
        ]
    }

    /// Honest mean of the first `h` rows.
    fn honest_mean(rows: &[Vec<f32>], h: usize) -> Vec<f32> {
        let r: Vec<&[f32]> = rows[..h].iter().map(|r| r.as_slice()).collect();
        mean(&r)
    }

    /// Runs every aggregator with 4 honest senders and one attacker made by `attack`;
    /// robust ones stay within 10% of the honest mean's norm, the plain mean does not.
    fn check_attack(name: &str, attack: impl Fn(&[f32]) -> Vec<f32>) {
        let (rows, target) = with_attackers(4, &[&attack]);
        let scale = norm(&target);
        for kind in robust() {
            let got = run(kind, &rows);
            assert!(
                dist(&got, &target) < 0.1 * scale,
                "{name}: {} strayed {} from the honest mean (norm {scale})",
                kind.name(),
                dist(&got, &target)
            );
        }
        let m = run(AggregatorKind::Mean, &rows);
        assert!(
            dist(&m, &target) > 0.5 * scale,
            "{name}: the plain mean was expected to be pulled away"
        );
    }

    #[test]
    fn honest_inputs_all_agree_with_the_mean() {
        let rows = honest(5);
        let target = honest_mean(&rows, 5);
        for kind in AggregatorKind::ALL {
            let got = run(kind, &rows);
            assert!(
                dist(&got, &target) < 0.05 * norm(&target),
                "{} differs from the mean on honest inputs",
                kind.name()
            );
        }
    }

    #[test]
    fn scaled_attacker_is_contained() {
        check_attack("scaled x100", |t| t.iter().map(|v| v * 100.0).collect());
    }

    #[test]
    fn sign_flipped_attacker_is_contained() {
        check_attack("sign flip x10", |t| t.iter().map(|v| -10.0 * v).collect());
    }

    #[test]
    fn outlier_attacker_is_contained() {
        check_attack("huge outlier", |t| {
            t.iter()
                .enumerate()
                .map(|(j, _)| if j % 2 == 0 { 1e4 } else { -1e4 })
                .collect()
        });
    }

    #[test]
    fn nan_contribution_wrecks_the_mean_but_not_the_median() {
        // Validation rejects NaN before aggregation; this shows why it must.
        let mut rows = honest(4);
        let target = honest_mean(&rows, 4);
        rows.push(vec![f32::NAN; DIM]);
        assert!(run(AggregatorKind::Mean, &rows).iter().any(|v| v.is_nan()));
        // total_cmp sorts positive NaN above everything: trimmed away.
        for kind in [AggregatorKind::Median, AggregatorKind::TrimmedMean] {
            let got = run(kind, &rows);
            assert!(got.iter().all(|v| v.is_finite()), "{}", kind.name());
            assert!(dist(&got, &target) < 0.1 * norm(&target), "{}", kind.name());
        }
    }

    #[test]
    fn two_attackers_out_of_seven() {
        let (rows, target) = with_attackers(
            5,
            &[
                &|t: &[f32]| t.iter().map(|v| v * 50.0).collect(),
                &|t: &[f32]| t.iter().map(|v| -50.0 * v).collect(),
            ],
        );
        for kind in robust() {
            let agg = Aggregator {
                byzantine: 2,
                trim: 0.2,
                ..Aggregator::new(kind)
            };
            let got = agg.aggregate(&inputs(&rows)).unwrap();
            assert!(
                dist(&got, &target) < 0.1 * norm(&target),
                "{} strayed",
                kind.name()
            );
        }
    }

    #[test]
    fn the_attacker_is_reported_outvoted() {
        let (rows, _) = with_attackers(4, &[&|t: &[f32]| t.iter().map(|v| -10.0 * v).collect()]);
        let report = |kind| {
            Aggregator::new(kind)
                .aggregate_report(&inputs(&rows))
                .unwrap()
        };
        // The trimmed mean drops one value each side: the attacker's, always, and an honest
        // one on the other side, spread over the four.
        assert_eq!(report(AggregatorKind::TrimmedMean).outvoted, vec![4]);
        assert!(report(AggregatorKind::Median).outvoted.contains(&4));
        let krum = report(AggregatorKind::Krum);
        assert_eq!(krum.outvoted.len(), 4);
        assert!(krum.outvoted.contains(&4));
        assert_eq!(report(AggregatorKind::MultiKrum).outvoted, vec![4]);
        assert!(report(AggregatorKind::Mean).outvoted.is_empty());
        // Honest senders alone: the trimmed mean sets no one aside.
        let agg = Aggregator::new(AggregatorKind::TrimmedMean);
        let honest_rows = honest(4);
        assert!(
            agg.aggregate_report(&inputs(&honest_rows))
                .unwrap()
                .outvoted
                .is_empty()
        );
    }

    #[test]
    fn robust_rules_need_three_contributions_to_outvote_one() {
        for kind in robust() {
            assert_eq!(
                Aggregator::new(kind).min_contributions(),
                3,
                "{}",
                kind.name()
            );
        }
        for kind in [AggregatorKind::Mean, AggregatorKind::WeightedMean] {
            assert_eq!(Aggregator::new(kind).min_contributions(), 1);
        }
        let untrimmed = Aggregator {
            trim: 0.0,
            ..Aggregator::new(AggregatorKind::TrimmedMean)
        };
        assert_eq!(untrimmed.min_contributions(), 1);
        let krum2 = Aggregator {
            byzantine: 2,
            ..Aggregator::new(AggregatorKind::Krum)
        };
        assert_eq!(krum2.min_contributions(), 5);
    }

    #[test]
    fn weighted_mean_follows_the_weights() {
        let a = vec![0.0f32; 4];
        let b = vec![4.0f32; 4];
        let got = weighted_mean(&[&a, &b], &[3.0, 1.0]);
        assert_eq!(got, vec![1.0; 4]);
        // Bad weights count as zero; all bad falls back to the plain mean.
        let got = weighted_mean(&[&a, &b], &[f32::NAN, -1.0]);
        assert_eq!(got, vec![2.0; 4]);
    }

    #[test]
    fn median_and_trimmed_mean_on_small_groups() {
        let rows: Vec<Vec<f32>> = vec![vec![1.0], vec![2.0], vec![100.0]];
        assert_eq!(run(AggregatorKind::Median, &rows), vec![2.0]);
        assert_eq!(run(AggregatorKind::TrimmedMean, &rows), vec![2.0]);
        let rows: Vec<Vec<f32>> = vec![vec![1.0], vec![2.0], vec![3.0], vec![-100.0]];
        assert_eq!(run(AggregatorKind::Median, &rows), vec![1.5]);
        assert_eq!(run(AggregatorKind::TrimmedMean, &rows), vec![1.5]);
        // Two or one contributions: nothing can be trimmed.
        let rows: Vec<Vec<f32>> = vec![vec![1.0], vec![3.0]];
        assert_eq!(run(AggregatorKind::TrimmedMean, &rows), vec![2.0]);
        assert_eq!(run(AggregatorKind::Krum, &rows[..1]), vec![1.0]);
    }

    #[test]
    fn krum_picks_an_honest_contribution() {
        let mut rows = honest(4);
        rows.insert(0, vec![5.0; DIM]);
        let got = run(AggregatorKind::Krum, &rows);
        assert!(rows[1..].iter().any(|r| r == &got));
    }

    #[test]
    fn result_does_not_depend_on_anything_but_the_inputs() {
        let mut rows = honest(6);
        rows.push(vec![3.0; DIM]);
        for kind in AggregatorKind::ALL {
            let a = run(kind, &rows);
            let b = run(kind, &rows);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{}", kind.name());
        }
    }

    #[test]
    fn mismatched_lengths_and_empty_input_are_errors() {
        let a = vec![1.0f32; 3];
        let b = vec![1.0f32; 2];
        let agg = Aggregator::new(AggregatorKind::Mean);
        assert_eq!(agg.aggregate(&[]), Err(AggregateError::Empty));
        let err = agg
            .aggregate(&[
                Input {
                    values: &a,
                    weight: 1.0,
                },
                Input {
                    values: &b,
                    weight: 1.0,
                },
            ])
            .unwrap_err();
        assert!(matches!(err, AggregateError::Length { index: 1, .. }));
    }
}
