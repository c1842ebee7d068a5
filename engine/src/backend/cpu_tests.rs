//! Unit tests of `cpu.rs`: the CPU backend against the kernels' references.

use super::*;

#[test]
fn cached_attention_equals_causal_attention() {
    let be = CpuBackend::new();
    let (b, t, h, kvh, d) = (2, 5, 4, 2, 6);
    let mut seed = 1u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    };
    let q = rnd(b * t * h * d);
    let kk = rnd(b * t * kvh * d);
    let v = rnd(b * t * kvh * d);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; b * h * t];
    let s = AttnShape { b, t, h, kvh, d };
    be.attention_forward(&mut out, &mut lse, &q, &kk, &v, s)
        .unwrap();
    // Cache of capacity 7 filled with the first t positions; query the last 2 positions.
    let tmax = 7;
    let mut kc = vec![0.0; b * tmax * kvh * d];
    let mut vc = vec![0.0; b * tmax * kvh * d];
    for bi in 0..b {
        let n = t * kvh * d;
        be.copy_range(&mut kc, bi * tmax * kvh * d, &kk, bi * n, n)
            .unwrap();
        be.copy_range(&mut vc, bi * tmax * kvh * d, &v, bi * n, n)
            .unwrap();
    }
    let tq = 2;
    let past = t - tq;
    let mut qs = vec![0.0; b * tq * h * d];
    for bi in 0..b {
        let n = tq * h * d;
        be.copy_range(&mut qs, bi * n, &q, (bi * t + past) * h * d, n)
            .unwrap();
    }
    let mut oc = vec![0.0; qs.len()];
    be.attention_cached(
        &mut oc,
        &qs,
        &kc,
        &vc,
        CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            kvh,
            d,
        },
    )
    .unwrap();
    for bi in 0..b {
        let n = tq * h * d;
        let want = &out[(bi * t + past) * h * d..(bi * t + past) * h * d + n];
        for (a, w) in oc[bi * n..(bi + 1) * n].iter().zip(want) {
            assert!((a - w).abs() < 1e-5, "{a} vs {w}");
        }
    }
}

#[test]
fn shape_mistakes_are_errors() {
    let be = CpuBackend::new();
    let mut out = vec![0.0; 3];
    assert!(matches!(
        be.matmul_forward(&mut out, &vec![0.0; 4], &vec![0.0; 4], 2, 2, 2),
        Err(BackendError::Shape { .. })
    ));
    let table = vec![0.0; 8];
    let mut o = vec![0.0; 4];
    assert!(matches!(
        be.embedding_forward(&mut o, &vec![0, 9], &table, 2),
        Err(BackendError::Kernel { .. })
    ));
    assert!(be.copy_range(&mut o, 3, &table, 0, 2).is_err());
}
