use super::*;
use crate::diloco::aggregate::{Aggregator, AggregatorKind, Input};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gaussian_like(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 0.01)
        .collect()
}

#[test]
fn params_come_from_ratio_and_bits() {
    assert_eq!(TopK::new(0.01, 2).unwrap(), TopK { keep: 41, bits: 2 });
    assert_eq!(TopK::new(0.03, 4).unwrap(), TopK { keep: 123, bits: 4 });
    assert_eq!(TopK::new(1e-9, 2).unwrap().keep, 1);
    assert_eq!(TopK::new(1.0, 8).unwrap().keep, CHUNK as u16);
    assert_eq!(TopK::new(0.0, 2), Err(TopKError::Ratio(0.0)));
    assert_eq!(TopK::new(1.5, 2), Err(TopKError::Ratio(1.5)));
    assert!(TopK::new(f64::NAN, 2).is_err());
    assert_eq!(TopK::new(0.01, 1), Err(TopKError::Bits(1)));
    assert_eq!(TopK::new(0.01, 9), Err(TopKError::Bits(9)));
    assert_eq!(TopK::default(), TopK::new(0.01, 2).unwrap());
}

#[test]
fn sends_the_largest_values_of_each_chunk_in_the_stated_bytes() {
    let p = TopK::new(0.01, 4).unwrap();
    // Two full chunks and a partial one.
    let n = 2 * CHUNK + 1000;
    let x = gaussian_like(n, 1);
    let mut residual = Vec::new();
    let bytes = encode(p, &x, &mut residual);
    assert_eq!(bytes.len(), p.encoded_len(n));
    // 41 values of a full chunk: 4 (scale) + 62 (12-bit offsets) + 21 (4-bit codes).
    assert_eq!(p.encoded_len(CHUNK), 3 + 4 + 62 + 21);
    let y = decode(&bytes, n).unwrap();
    for (c, (xc, yc)) in x.chunks(CHUNK).zip(y.chunks(CHUNK)).enumerate() {
        let k = p.kept(xc.len());
        let sent: Vec<usize> = (0..yc.len()).filter(|&i| yc[i] != 0.0).collect();
        assert_eq!(sent.len(), k, "chunk {c}");
        // Every sent value is at least as large as every unsent one.
        let smallest_sent = sent.iter().map(|&i| xc[i].abs()).fold(f32::MAX, f32::min);
        let largest_unsent = (0..xc.len())
            .filter(|i| !sent.contains(i))
            .map(|i| xc[i].abs())
            .fold(0.0f32, f32::max);
        assert!(smallest_sent >= largest_unsent, "chunk {c}");
        // Signs are kept, and each value is within half a level of what was meant.
        let max = sent.iter().map(|&i| xc[i].abs()).fold(0.0f32, f32::max);
        let step = max / 8.0;
        for &i in &sent {
            assert_eq!(xc[i].signum(), yc[i].signum());
            assert!(
                (xc[i] - yc[i]).abs() <= step / 2.0 + 1e-9,
                "chunk {c} value {i}"
            );
        }
    }
    // What was not sent is exactly the residual.
    for i in 0..n {
        assert!((x[i] - y[i] - residual[i]).abs() <= 1e-9, "{i}");
    }
}

#[test]
fn ratio_one_at_eight_bits_is_close_to_the_input() {
    let p = TopK::new(1.0, 8).unwrap();
    let x = gaussian_like(5000, 2);
    let y = decode(&encode(p, &x, &mut Vec::new()), 5000).unwrap();
    // 128 magnitude levels of max/128 each and no zero level (a kept value is never zero):
    // within half a level, or one level for values below the first.
    let level = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 128.0;
    for (a, b) in x.iter().zip(&y) {
        let bound = if a.abs() < level { level } else { level / 2.0 };
        assert!((a - b).abs() <= bound * 1.0001, "{a} vs {b}");
        assert_eq!(a.signum(), b.signum());
    }
}

#[test]
fn error_feedback_loses_nothing_over_rounds() {
    // The same pseudo-gradient every round: what was received plus what the sender still
    // holds is exactly what was meant, and the received sum approaches it.
    let p = TopK::new(0.03, 2).unwrap();
    let n = CHUNK + 500;
    let x = gaussian_like(n, 3);
    let mut residual = Vec::new();
    let mut sent = vec![0.0f64; n];
    let rel_err = |sent: &[f64], rounds: usize| {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (s, v) in sent.iter().zip(&x) {
            let want = rounds as f64 * f64::from(*v);
            num += (s - want).powi(2);
            den += want.powi(2);
        }
        (num / den).sqrt()
    };
    let mut early = 0.0;
    for round in 1..=400 {
        let y = decode(&encode(p, &x, &mut residual), n).unwrap();
        for (s, v) in sent.iter_mut().zip(&y) {
            *s += f64::from(*v);
        }
        if round == 20 {
            early = rel_err(&sent, round);
        }
    }
    for i in 0..n {
        let want = 400.0 * f64::from(x[i]);
        let held = f64::from(residual[i]);
        assert!(
            (sent[i] + held - want).abs() <= 1e-3,
            "{i}: {} + {held} vs {want}",
            sent[i]
        );
    }
    let late = rel_err(&sent, 400);
    assert!(
        late < 0.1 && late < early / 4.0,
        "early {early}, late {late}"
    );
}

#[test]
fn encoding_and_decoding_are_functions_of_their_inputs() {
    let p = TopK::new(0.02, 4).unwrap();
    let x = gaussian_like(9000, 4);
    let (mut r1, mut r2) = (Vec::new(), Vec::new());
    let a = encode(p, &x, &mut r1);
    let b = encode(p, &x, &mut r2);
    assert_eq!(a, b);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(decode(&a, 9000).unwrap()),
        bits(decode(&b, 9000).unwrap())
    );
}

#[test]
fn small_empty_and_constant_tensors() {
    let p = TopK::new(0.01, 2).unwrap();
    // Empty: only the header.
    let bytes = encode(p, &[], &mut Vec::new());
    assert_eq!(bytes.len(), 3);
    assert_eq!(decode(&bytes, 0).unwrap(), Vec::<f32>::new());
    // Fewer values than one chunk: at least one is kept.
    let y = decode(&encode(p, &[0.0, -3.0, 1.0], &mut Vec::new()), 3).unwrap();
    assert_eq!(y, vec![0.0, -3.0, 0.0]);
    // All zero: scale 0, zeros out, nothing carried.
    let mut residual = Vec::new();
    let y = decode(&encode(p, &[0.0; 100], &mut residual), 100).unwrap();
    assert!(y.iter().all(|v| *v == 0.0) && residual.iter().all(|v| *v == 0.0));
    // A non-finite value is never sent; it stays with the sender.
    let mut residual = Vec::new();
    let y = decode(&encode(p, &[f32::NAN, 2.0], &mut residual), 2).unwrap();
    assert_eq!(y, vec![0.0, 2.0]);
    assert!(residual[0].is_nan());
}

/// A valid encoding of 5000 values to corrupt.
fn valid() -> Vec<u8> {
    encode(
        TopK::new(0.01, 2).unwrap(),
        &gaussian_like(5000, 5),
        &mut Vec::new(),
    )
}

#[test]
fn hostile_headers_lengths_scales_and_offsets_are_clear_errors() {
    let good = valid();
    assert!(decode(&good, 5000).is_ok());
    assert_eq!(
        decode(&good[..2], 5000).unwrap_err().to_string(),
        "topk tensor of 5000 values needs at least 3 bytes, got 2"
    );
    // The same bytes for another tensor size do not fit.
    for n in [4096, 9000, 0] {
        assert!(
            matches!(decode(&good, n), Err(SparseError::Length { .. })),
            "{n}"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        decode(&long, 5000),
        Err(SparseError::Length { .. })
    ));
    for bits in [0u8, 1, 9, 255] {
        let mut bad = good.clone();
        bad[0] = bits;
        assert!(matches!(decode(&bad, 5000), Err(SparseError::Params(_))));
    }
    for keep in [0u16, 4097, u16::MAX] {
        let mut bad = good.clone();
        bad[1..3].copy_from_slice(&keep.to_le_bytes());
        assert!(matches!(decode(&bad, 5000), Err(SparseError::Params(_))));
    }
    for scale in [f32::NAN, f32::INFINITY, -1.0] {
        let mut bad = good.clone();
        bad[3..7].copy_from_slice(&scale.to_le_bytes());
        assert!(matches!(
            decode(&bad, 5000),
            Err(SparseError::Scale { chunk: 0, .. })
        ));
    }
    // Offsets: the first two 12-bit offsets of chunk 0 made equal (not increasing).
    let mut bad = good.clone();
    let first = u16::from(bad[7]) | (u16::from(bad[8] & 0x0f) << 8);
    bad[8] = (bad[8] & 0x0f) | (((first & 0x0f) as u8) << 4);
    bad[9] = (first >> 4) as u8;
    assert!(matches!(
        decode(&bad, 5000),
        Err(SparseError::Offset { chunk: 0, .. })
    ));
    // The last chunk holds 904 values: an offset of 4095 there is out of range.
    let p = TopK::new(0.01, 2).unwrap();
    let tail = 3 + p.chunk_bytes(CHUNK) + 4;
    let mut bad = good.clone();
    bad[tail] = 0xff;
    bad[tail + 1] |= 0x0f;
    assert!(matches!(
        decode(&bad, 5000),
        Err(SparseError::Offset { chunk: 1, .. })
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), n in 0usize..10_000) {
        let _ = decode(&bytes, n);
    }

    #[test]
    fn corrupted_encodings_decode_or_fail_cleanly(
        flips in proptest::collection::vec((0usize..10_000, any::<u8>()), 1..8),
        cut in 0usize..4,
    ) {
        let mut bytes = valid();
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] ^= v;
        }
        bytes.truncate(bytes.len() - cut);
        if let Ok(values) = decode(&bytes, 5000) {
            prop_assert_eq!(values.len(), 5000);
        }
    }

    #[test]
    fn any_input_round_trips_to_the_stated_length(
        x in proptest::collection::vec(-1e3f32..1e3, 0..9000),
        ratio in 0.001f64..1.0,
        bits in 2u32..=8,
    ) {
        let p = TopK::new(ratio, bits).unwrap();
        let mut residual = Vec::new();
        let bytes = encode(p, &x, &mut residual);
        prop_assert_eq!(bytes.len(), p.encoded_len(x.len()));
        let y = decode(&bytes, x.len()).unwrap();
        for i in 0..x.len() {
            prop_assert!((x[i] - y[i] - residual[i]).abs() <= 1e-3 * x[i].abs().max(1.0));
        }
    }
}

/// Replicas whose pseudo-gradients share a direction (plus their own noise), encoded as
/// `topk`, then decoded as every node does.
fn sparse_replicas(n: usize, dim: usize, p: TopK) -> (Vec<f32>, Vec<Vec<f32>>) {
    let shared = gaussian_like(dim, 10);
    let rows = (0..n)
        .map(|r| {
            let noise = gaussian_like(dim, 100 + r as u64);
            let x: Vec<f32> = shared
                .iter()
                .zip(&noise)
                .map(|(s, e)| s + 0.3 * e)
                .collect();
            decode(&encode(p, &x, &mut Vec::new()), dim).unwrap()
        })
        .collect();
    (shared, rows)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn robust_aggregators_on_sparse_contributions_are_sane() {
    let p = TopK::new(0.03, 4).unwrap();
    let dim = 2 * CHUNK;
    let (shared, mut rows) = sparse_replicas(5, dim, p);
    let honest_mean = {
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        crate::diloco::aggregate::mean(&refs)
    };
    let largest_honest = rows.iter().map(|r| norm(r)).fold(0.0, f64::max);
    // An attacker: a sparse contribution a thousand times too large, at other coordinates.
    let attack: Vec<f32> = rows[0].iter().rev().map(|v| v * -1000.0).collect();
    rows.push(attack);
    let inputs: Vec<Input<'_>> = rows
        .iter()
        .map(|r| Input {
            values: r,
            weight: 1.0,
        })
        .collect();
    for kind in [AggregatorKind::Median, AggregatorKind::TrimmedMean] {
        let mut agg = Aggregator::new(kind);
        agg.trim = 0.2;
        let report = agg.aggregate_report(&inputs).unwrap();
        let v = &report.values;
        // The attacker moves nothing much: the result is no larger than an honest one,
        // points where the honest replicas agree, and no honest replica is set aside.
        assert!(
            norm(v) <= largest_honest,
            "{}: norm {}",
            kind.name(),
            norm(v)
        );
        assert!(norm(v) > 0.0, "{}: nothing left", kind.name());
        assert!(
            cosine(v, &honest_mean) > 0.8,
            "{}: {}",
            kind.name(),
            cosine(v, &honest_mean)
        );
        assert!(
            cosine(v, &shared) > 0.3,
            "{}: {}",
            kind.name(),
            cosine(v, &shared)
        );
        assert!(
            report.outvoted.iter().all(|&i| i == 5),
            "{}: honest replicas outvoted {:?}",
            kind.name(),
            report.outvoted
        );
    }
    // The attack of the DiLoCo scenarios: the honest update's sign flipped and scaled up
    // (dense where any honest replica sent): outvoted, no honest one with it.
    let flipped: Vec<f32> = honest_mean.iter().map(|v| v * -20.0).collect();
    let mut with_flip: Vec<Input<'_>> = inputs[..5].to_vec();
    with_flip.push(Input {
        values: &flipped,
        weight: 1.0,
    });
    for kind in [AggregatorKind::Median, AggregatorKind::TrimmedMean] {
        let report = Aggregator::new(kind).aggregate_report(&with_flip).unwrap();
        assert_eq!(report.outvoted, vec![5], "{}", kind.name());
    }
    // Without the attacker, three honest sparse replicas: none is outvoted although two of
    // three are "trimmed" in every coordinate where all send zero.
    let three: Vec<Input<'_>> = inputs[..3].to_vec();
    for kind in [AggregatorKind::Median, AggregatorKind::TrimmedMean] {
        let report = Aggregator::new(kind).aggregate_report(&three).unwrap();
        assert!(
            report.outvoted.is_empty(),
            "{}: {:?}",
            kind.name(),
            report.outvoted
        );
    }
}
