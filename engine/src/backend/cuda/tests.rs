use super::*;

#[test]
fn cuda_request_without_a_device_fails_clearly_and_auto_falls_back() {
    if probe().is_available() {
        return; // exercised by scripts/gpu-check.sh on a CUDA machine
    }
    let e = open_device(DeviceRequest::Cuda).unwrap_err().to_string();
    assert!(e.contains("--device cuda") && e.contains("cuda"), "{e}");
    assert!(open_device(DeviceRequest::Auto).unwrap().is_none());
    assert!(open_device(DeviceRequest::Cpu).unwrap().is_none());
    assert!(!cuda_usable());
}

/// Deterministic values in [-1, 1).
fn vals(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// One small forward/backward/optimizer sequence through the `Backend` trait; returns
/// every result, so two backends can be compared value by value.
fn run_sequence<B: Backend>(b: &B) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let (bs, t, h, kvh, d, v) = (2usize, 5usize, 4usize, 2usize, 8usize, 37usize);
    let (rows, c) = (bs * t, h * d);
    let s = AttnShape {
        b: bs,
        t,
        h,
        kvh,
        d,
    };
    let ids = b.upload_ids(
        &(0..rows as u32)
            .map(|i| (i * 7) % v as u32)
            .collect::<Vec<_>>(),
    )?;
    let table = b.upload(&vals(1, v * c))?;
    let mut x = b.zeros(rows * c)?;
    b.embedding_forward(&mut x, &ids, &table, c)?;
    let (mut xn, mut rstd) = (b.zeros(rows * c)?, b.zeros(rows)?);
    b.rmsnorm_forward(
        &mut xn,
        &mut rstd,
        &x,
        &b.upload(&vals(2, c))?,
        rows,
        c,
        1e-6,
    )?;
    let (wq, wk) = (b.upload(&vals(3, c * c))?, b.upload(&vals(4, kvh * d * c))?);
    let (mut q0, mut k0) = (b.zeros(rows * c)?, b.zeros(rows * kvh * d)?);
    b.matmul_forward(&mut q0, &xn, &wq, rows, c, c)?;
    b.matmul_forward(&mut k0, &xn, &wk, rows, c, kvh * d)?;
    let (mut q, mut k) = (b.zeros(rows * c)?, b.zeros(rows * kvh * d)?);
    b.rope_forward(&mut q, &q0, bs, t, h, d, 3, 10000.0)?;
    b.rope_forward(&mut k, &k0, bs, t, kvh, d, 3, 10000.0)?;
    let (mut att, mut lse) = (b.zeros(rows * c)?, b.zeros(bs * h * t)?);
    b.attention_forward(&mut att, &mut lse, &q, &k, &k0, s)?;
    let mut cached = b.zeros(bs * 2 * c)?;
    let mut q_last = b.zeros(bs * 2 * c)?;
    for bi in 0..bs {
        b.copy_range(&mut q_last, bi * 2 * c, &q, (bi * t + t - 2) * c, 2 * c)?;
    }
    let cs = CachedAttnShape {
        b: bs,
        tq: 2,
        past: t - 2,
        tmax: t,
        h,
        kvh,
        d,
    };
    b.attention_cached(&mut cached, &q_last, &k, &k0, cs)?;
    let (mut sw, mut dg, mut du) = (b.zeros(rows * c)?, b.zeros(rows * c)?, b.zeros(rows * c)?);
    b.swiglu_forward(&mut sw, &att, &q)?;
    b.swiglu_backward(&mut dg, &mut du, &xn, &att, &q)?;
    let (mut dq, mut dk, mut dv) = (
        b.zeros(rows * c)?,
        b.zeros(rows * kvh * d)?,
        b.zeros(rows * kvh * d)?,
    );
    b.attention_backward(&mut dq, &mut dk, &mut dv, &sw, &q, &k, &k0, &att, &lse, s)?;
    let targets = b.upload_ids(&(0..rows as u32).map(|i| (i * 11) % 30).collect::<Vec<_>>())?;
    let loss = b.cross_entropy_forward(&sw, &targets, rows, c, 30)?;
    let mut dlogits = b.zeros(rows * c)?;
    b.cross_entropy_backward(&mut dlogits, &sw, &targets, rows, c, 30, 1.0)?;
    let (mut dx, mut dwq) = (b.zeros(rows * c)?, b.zeros(c * c)?);
    b.matmul_backward(&mut dx, &mut dwq, &dlogits, &xn, &wq, rows, c, c)?;
    let norm = b.global_norm(&[&dwq, &dq])?;
    let mut p = b.upload(&vals(5, c * c))?;
    let (mut m, mut vv) = (b.zeros(c * c)?, b.zeros(c * c)?);
    let hp = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    b.adamw_step(&mut p, &dwq, &mut m, &mut vv, 1, hp)?;
    let mut out = Vec::new();
    for (name, buf) in [
        ("embedding", &x),
        ("rmsnorm", &xn),
        ("rope", &q),
        ("attention", &att),
        ("attention_cached", &cached),
        ("swiglu", &sw),
        ("dgate", &dg),
        ("dq", &dq),
        ("dk", &dk),
        ("dv", &dv),
        ("dlogits", &dlogits),
        ("dweight", &dwq),
        ("adamw", &p),
    ] {
        let mut host = vec![0.0; b.len(buf)];
        b.download(buf, &mut host)?;
        out.push((name, host));
    }
    out.push(("loss", vec![loss]));
    out.push(("global_norm", vec![norm]));
    // Bad ids are an error on every backend, never a kernel fault.
    let bad = b.upload_ids(&[0, v as u32])?;
    let mut o = b.zeros(2 * c)?;
    assert!(matches!(
        b.embedding_forward(&mut o, &bad, &table, c),
        Err(BackendError::Kernel { .. })
    ));
    Ok(out)
}

#[test]
fn cpu_sequence_runs_and_gpu_matches_it_when_enabled() {
    let cpu = run_sequence(&super::super::cpu::CpuBackend::new()).expect("cpu sequence");
    assert!(cpu.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    if std::env::var("NEUROSHARD_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("gpu backend parity: NEUROSHARD_GPU_TESTS is not 1: CUDA side not run here");
        return;
    }
    let gpu = CudaBackend::new(0).expect("NEUROSHARD_GPU_TESTS=1 but no usable CUDA device");
    let got = run_sequence(&gpu).expect("gpu sequence");
    for ((name, want), (_, have)) in cpu.iter().zip(&got) {
        let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let err = want
            .iter()
            .zip(have)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs() / scale));
        eprintln!("gpu backend parity: {name:<17} max err {err:.2e}");
        assert!(
            err <= 1e-4 && have.iter().all(|x| x.is_finite()),
            "{name}: gpu differs from cpu by {err}"
        );
    }
}

#[test]
fn kernel_errors_map_to_backend_errors() {
    let e = dev(CudaError::Shape {
        op: "matmul_forward",
        detail: "x".into(),
    });
    assert!(matches!(
        e,
        BackendError::Shape {
            op: "matmul_forward",
            ..
        }
    ));
    let e = dev(CudaError::NoDevice);
    assert!(matches!(e, BackendError::Device { .. }));
}
