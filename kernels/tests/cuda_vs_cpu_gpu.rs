//! Every CUDA op against the CPU reference (`neuroshard_kernels::cpu`), on fresh random
//! inputs over several shapes (including sizes that are not multiples of any tile), for
//! f32 and bf16. Written outputs are poisoned with NaN first; accumulated outputs start from
//! random values, so a missed `+=` shows. Runs only with NEUROSHARD_GPU_TESTS=1 (see
//! scripts/gpu-check.sh); compiled everywhere so it always type-checks.
//!
//! Tolerance: max|gpu - cpu| / max|cpu| per tensor, stated per op below. bf16 runs compare
//! with the CPU reference fed the same bf16-rounded inputs.

mod cuda_common;

use cuda_common::*;
use neuroshard_kernels::cpu;
use neuroshard_kernels::cuda::ops::attention::{AttnShape, CachedAttnShape};
use neuroshard_kernels::cuda::ops::optim::{AdamWParams, NORM_PARTIALS_PER_TENSOR};
use neuroshard_kernels::cuda::{Bf16, CudaKernels, GpuDtype};
use rand::rngs::StdRng;

const TEST: &str = "gpu_ops_match_cpu_reference";

fn gpu_ops_match_cpu_reference() {
    let Some(k) = gpu_or_skip(TEST) else { return };
    let mut r = rng(TEST);
    let mut rep = Report::default();
    check_dtype::<f32>(&k, &mut r, &mut rep);
    check_dtype::<Bf16>(&k, &mut r, &mut rep);
    check_optimizer(&k, &mut r, &mut rep);
    rep.finish(TEST);
}

fn check_dtype<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report) {
    elementwise::<T>(k, r, rep);
    for &(bt, c, v) in &[
        (1usize, 1usize, 1usize),
        (7, 33, 11),
        (256, 512, 1000),
        (1000, 768, 50),
    ] {
        embedding::<T>(k, r, rep, bt, c, v);
    }
    for &(rows, c) in &[(1usize, 1usize), (5, 33), (300, 512), (64, 4099)] {
        rmsnorm::<T>(k, r, rep, rows, c);
    }
    for &(b, t, h, d, off) in &[
        (1usize, 1usize, 1usize, 2usize, 0usize),
        (2, 7, 3, 10, 5),
        (2, 64, 8, 64, 1000),
    ] {
        rope::<T>(k, r, rep, b, t, h, d, off);
    }
    for &n in &[1usize, 1001, 262_147] {
        swiglu::<T>(k, r, rep, n);
    }
    for &(m, kk, n) in &[
        (1usize, 1usize, 1usize),
        (37, 53, 29),
        (128, 128, 128),
        (130, 257, 200),
        (512, 768, 2304),
    ] {
        matmul::<T>(k, r, rep, m, kk, n);
    }
    for &s in &[
        AttnShape {
            b: 1,
            t: 1,
            h: 1,
            kvh: 1,
            d: 8,
        },
        AttnShape {
            b: 2,
            t: 37,
            h: 4,
            kvh: 2,
            d: 32,
        },
        AttnShape {
            b: 1,
            t: 129,
            h: 6,
            kvh: 2,
            d: 64,
        },
        AttnShape {
            b: 2,
            t: 70,
            h: 4,
            kvh: 4,
            d: 128,
        },
        AttnShape {
            b: 1,
            t: 300,
            h: 8,
            kvh: 1,
            d: 48,
        },
    ] {
        attention::<T>(k, r, rep, s);
    }
    for &(b, tq, past, tmax, h, kvh, d) in &[
        (1usize, 1usize, 0usize, 1usize, 2usize, 1usize, 16usize),
        (2, 1, 40, 64, 4, 2, 32),
        (2, 5, 100, 129, 6, 3, 64),
        (1, 33, 7, 40, 4, 4, 128),
    ] {
        attention_cached::<T>(
            k,
            r,
            rep,
            AttnCase {
                b,
                tq,
                past,
                tmax,
                h,
                kvh,
                d,
            },
        );
    }
    for &(rows, vp, v_live) in &[
        (1usize, 1usize, 1usize),
        (9, 40, 33),
        (300, 8192, 8000),
        (64, 50304, 50257),
    ] {
        cross_entropy::<T>(k, r, rep, rows, vp, v_live);
    }
}

fn elementwise<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report) {
    let d = T::SUFFIX;
    let tl = tol::<T>(1e-6, 8e-3);
    for &n in &[1usize, 257, 100_003] {
        let shape = format!("n={n}");
        let a = quant::<T>(&randv(r, n, 2.0));
        let b = quant::<T>(&randv(r, n, 2.0));
        let mut x = poisoned::<T>(k, n);
        k.fill(&mut x, 0.75).unwrap();
        rep.check("fill", d, &shape, &down(k, &x), &vec![0.75; n], 0.0);
        let mut x = up::<T>(k, &a);
        k.scale(&mut x, -1.5).unwrap();
        rep.check(
            "scale",
            d,
            &shape,
            &down(k, &x),
            &a.iter().map(|v| v * -1.5).collect::<Vec<_>>(),
            tl,
        );
        let (da, db) = (up::<T>(k, &a), up::<T>(k, &b));
        let mut out = poisoned::<T>(k, n);
        k.add(&mut out, &da, &db).unwrap();
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        rep.check("add", d, &shape, &down(k, &out), &sum, tl);
        let mut y = up::<T>(k, &a);
        k.accumulate(&mut y, &db).unwrap();
        rep.check("accumulate", d, &shape, &down(k, &y), &sum, tl);
    }
    let n = 4099;
    let a = randv(r, n, 3.0);
    let mut h = poisoned::<Bf16>(k, n);
    k.cast_f32_to_bf16(&mut h, &up::<f32>(k, &a)).unwrap();
    rep.check(
        "cast_f32_to_bf16",
        d,
        "n=4099",
        &down(k, &h),
        &quant::<Bf16>(&a),
        0.0,
    );
    let mut f = poisoned::<f32>(k, n);
    k.cast_bf16_to_f32(&mut f, &h).unwrap();
    rep.check(
        "cast_bf16_to_f32",
        d,
        "n=4099",
        &down(k, &f),
        &quant::<Bf16>(&a),
        0.0,
    );
    let init = randv(r, n, 1.0);
    let mut acc = up::<f32>(k, &init);
    k.accumulate_bf16_into_f32(&mut acc, &h).unwrap();
    let want: Vec<f32> = init
        .iter()
        .zip(quant::<Bf16>(&a))
        .map(|(x, y)| x + y)
        .collect();
    rep.check(
        "accumulate_bf16_into_f32",
        d,
        "n=4099",
        &down(k, &acc),
        &want,
        1e-6,
    );
}

fn embedding<T: GpuDtype>(
    k: &CudaKernels,
    r: &mut StdRng,
    rep: &mut Report,
    bt: usize,
    c: usize,
    v: usize,
) {
    let shape = format!("bt={bt} c={c} v={v}");
    let table = quant::<T>(&randv(r, v * c, 1.0));
    let ids = rand_ids(r, bt, v);
    let mut want = vec![0.0; bt * c];
    cpu::embedding_forward(&mut want, &ids, &table, c).unwrap();
    let dids = up_u32(k, &ids);
    let mut out = poisoned::<T>(k, bt * c);
    k.embedding_forward(&mut out, &dids, &up::<T>(k, &table), c)
        .unwrap();
    rep.check(
        "embedding_forward",
        T::SUFFIX,
        &shape,
        &down(k, &out),
        &want,
        0.0,
    );

    let dout = quant::<T>(&randv(r, bt * c, 1.0));
    let mut dtable = randv(r, v * c, 1.0);
    let mut ddtable = up::<f32>(k, &dtable);
    cpu::embedding_backward(&mut dtable, &dout, &ids, c).unwrap();
    k.embedding_backward(&mut ddtable, &up::<T>(k, &dout), &dids, c)
        .unwrap();
    rep.check(
        "embedding_backward",
        T::SUFFIX,
        &shape,
        &down(k, &ddtable),
        &dtable,
        1e-5,
    );
}

fn rmsnorm<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report, rows: usize, c: usize) {
    let shape = format!("rows={rows} c={c}");
    let eps = 1e-6;
    let inp = quant::<T>(&randv(r, rows * c, 2.0));
    let w = quant::<T>(&randv(r, c, 1.5));
    let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
    cpu::rmsnorm_forward(&mut out, &mut rstd, &inp, &w, rows, c, eps);
    let (dinp_, dw_) = (up::<T>(k, &inp), up::<T>(k, &w));
    let mut gout = poisoned::<T>(k, rows * c);
    let mut grstd = poisoned::<f32>(k, rows);
    k.rmsnorm_forward(&mut gout, &mut grstd, &dinp_, &dw_, rows, c, eps)
        .unwrap();
    rep.check(
        "rmsnorm_forward",
        T::SUFFIX,
        &shape,
        &down(k, &gout),
        &out,
        tol::<T>(1e-5, 8e-3),
    );
    rep.check(
        "rmsnorm_forward.rstd",
        T::SUFFIX,
        &shape,
        &down(k, &grstd),
        &rstd,
        1e-5,
    );

    let dout = quant::<T>(&randv(r, rows * c, 1.0));
    let mut dinp = quant::<T>(&randv(r, rows * c, 1.0));
    let mut dw = randv(r, c, 1.0);
    let (mut gdinp, mut gdw) = (up::<T>(k, &dinp), up::<f32>(k, &dw));
    cpu::rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &w, &rstd, rows, c);
    k.rmsnorm_backward(
        &mut gdinp,
        &mut gdw,
        &up::<T>(k, &dout),
        &dinp_,
        &dw_,
        &up::<f32>(k, &rstd),
        rows,
        c,
    )
    .unwrap();
    rep.check(
        "rmsnorm_backward.dinp",
        T::SUFFIX,
        &shape,
        &down(k, &gdinp),
        &dinp,
        tol::<T>(1e-5, 1e-2),
    );
    rep.check(
        "rmsnorm_backward.dweight",
        T::SUFFIX,
        &shape,
        &down(k, &gdw),
        &dw,
        1e-5,
    );
}

#[allow(clippy::too_many_arguments)]
fn rope<T: GpuDtype>(
    k: &CudaKernels,
    r: &mut StdRng,
    rep: &mut Report,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    off: usize,
) {
    let shape = format!("b={b} t={t} h={h} d={d} pos+{off}");
    let n = b * t * h * d;
    let inp = quant::<T>(&randv(r, n, 1.0));
    let mut want = vec![0.0; n];
    cpu::rope_forward(&mut want, &inp, b, t, h, d, off, 10000.0);
    let mut out = poisoned::<T>(k, n);
    k.rope_forward(&mut out, &up::<T>(k, &inp), b, t, h, d, off, 10000.0)
        .unwrap();
    rep.check(
        "rope_forward",
        T::SUFFIX,
        &shape,
        &down(k, &out),
        &want,
        tol::<T>(1e-5, 8e-3),
    );
    let dout = quant::<T>(&randv(r, n, 1.0));
    let mut dinp = quant::<T>(&randv(r, n, 1.0));
    let mut g = up::<T>(k, &dinp);
    cpu::rope_backward(&mut dinp, &dout, b, t, h, d, off, 10000.0);
    k.rope_backward(&mut g, &up::<T>(k, &dout), b, t, h, d, off, 10000.0)
        .unwrap();
    rep.check(
        "rope_backward",
        T::SUFFIX,
        &shape,
        &down(k, &g),
        &dinp,
        tol::<T>(1e-5, 8e-3),
    );
}

fn swiglu<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report, n: usize) {
    let shape = format!("n={n}");
    let gate = quant::<T>(&randv(r, n, 4.0));
    let upv = quant::<T>(&randv(r, n, 2.0));
    let mut want = vec![0.0; n];
    cpu::swiglu_forward(&mut want, &gate, &upv);
    let (dg, du) = (up::<T>(k, &gate), up::<T>(k, &upv));
    let mut out = poisoned::<T>(k, n);
    k.swiglu_forward(&mut out, &dg, &du).unwrap();
    rep.check(
        "swiglu_forward",
        T::SUFFIX,
        &shape,
        &down(k, &out),
        &want,
        tol::<T>(1e-5, 8e-3),
    );
    let dout = quant::<T>(&randv(r, n, 1.0));
    let mut dgate = quant::<T>(&randv(r, n, 1.0));
    let mut dup = quant::<T>(&randv(r, n, 1.0));
    let (mut gdg, mut gdu) = (up::<T>(k, &dgate), up::<T>(k, &dup));
    cpu::swiglu_backward(&mut dgate, &mut dup, &dout, &gate, &upv);
    k.swiglu_backward(&mut gdg, &mut gdu, &up::<T>(k, &dout), &dg, &du)
        .unwrap();
    rep.check(
        "swiglu_backward.dgate",
        T::SUFFIX,
        &shape,
        &down(k, &gdg),
        &dgate,
        tol::<T>(1e-5, 8e-3),
    );
    rep.check(
        "swiglu_backward.dup",
        T::SUFFIX,
        &shape,
        &down(k, &gdu),
        &dup,
        tol::<T>(1e-5, 8e-3),
    );
}

fn matmul<T: GpuDtype>(
    k: &CudaKernels,
    r: &mut StdRng,
    rep: &mut Report,
    m: usize,
    kk: usize,
    n: usize,
) {
    let shape = format!("m={m} k={kk} n={n}");
    let inp = quant::<T>(&randv(r, m * kk, 1.0));
    let w = quant::<T>(&randv(r, n * kk, 1.0));
    let mut want = vec![0.0; m * n];
    cpu::matmul_forward(&mut want, &inp, &w, m, kk, n);
    let (gi, gw) = (up::<T>(k, &inp), up::<T>(k, &w));
    let mut out = poisoned::<T>(k, m * n);
    k.matmul_forward(&mut out, &gi, &gw, m, kk, n).unwrap();
    let t = tol::<T>(2e-5, 8e-3);
    rep.check(
        "matmul_forward",
        T::SUFFIX,
        &shape,
        &down(k, &out),
        &want,
        t,
    );
    if T::SUFFIX == "bf16" {
        let (bi, bw) = (up::<Bf16>(k, &inp), up::<Bf16>(k, &w));
        let mut o32 = poisoned::<f32>(k, m * n);
        k.matmul_forward_f32out(&mut o32, &bi, &bw, m, kk, n)
            .unwrap();
        rep.check(
            "matmul_forward_f32out",
            "bf16",
            &shape,
            &down(k, &o32),
            &want,
            2e-5,
        );
    }
    let dout = quant::<T>(&randv(r, m * n, 1.0));
    let mut dinp = quant::<T>(&randv(r, m * kk, 1.0));
    let mut dw = randv(r, n * kk, 1.0);
    let (mut gdi, mut gdw) = (up::<T>(k, &dinp), up::<f32>(k, &dw));
    cpu::matmul_backward(&mut dinp, &mut dw, &dout, &inp, &w, m, kk, n);
    k.matmul_backward(&mut gdi, &mut gdw, &up::<T>(k, &dout), &gi, &gw, m, kk, n)
        .unwrap();
    rep.check(
        "matmul_backward.dinp",
        T::SUFFIX,
        &shape,
        &down(k, &gdi),
        &dinp,
        t,
    );
    rep.check(
        "matmul_backward.dweight",
        T::SUFFIX,
        &shape,
        &down(k, &gdw),
        &dw,
        2e-5,
    );
}

fn attention<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report, s: AttnShape) {
    let AttnShape { b, t, h, kvh, d } = s;
    let shape = format!("b={b} t={t} h={h}/{kvh} d={d}");
    let (nq, nk, nl) = (b * t * h * d, b * t * kvh * d, b * h * t);
    let q = quant::<T>(&randv(r, nq, 1.5));
    let kx = quant::<T>(&randv(r, nk, 1.5));
    let v = quant::<T>(&randv(r, nk, 1.0));
    let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; nl]);
    cpu::attention_forward(&mut out, &mut lse, &q, &kx, &v, b, t, h, kvh, d);
    let (gq, gk, gv) = (up::<T>(k, &q), up::<T>(k, &kx), up::<T>(k, &v));
    let mut gout = poisoned::<T>(k, nq);
    let mut glse = poisoned::<f32>(k, nl);
    k.attention_forward(&mut gout, &mut glse, &gq, &gk, &gv, s)
        .unwrap();
    rep.check(
        "attention_forward",
        T::SUFFIX,
        &shape,
        &down(k, &gout),
        &out,
        tol::<T>(1e-5, 1e-2),
    );
    rep.check(
        "attention_forward.lse",
        T::SUFFIX,
        &shape,
        &down(k, &glse),
        &lse,
        1e-5,
    );

    // Backward from the CPU's forward results (rounded to T as the GPU stores them).
    let out_t = quant::<T>(&out);
    let dout = quant::<T>(&randv(r, nq, 1.0));
    let mut dq = quant::<T>(&randv(r, nq, 1.0));
    let mut dk = quant::<T>(&randv(r, nk, 1.0));
    let mut dv = quant::<T>(&randv(r, nk, 1.0));
    let (mut gdq, mut gdk, mut gdv) = (up::<T>(k, &dq), up::<T>(k, &dk), up::<T>(k, &dv));
    cpu::attention_backward(
        &mut dq, &mut dk, &mut dv, &dout, &q, &kx, &v, &out_t, &lse, b, t, h, kvh, d,
    );
    let mut delta = poisoned::<f32>(k, nl);
    let (gdout, gout_t, glse_c) = (up::<T>(k, &dout), up::<T>(k, &out_t), up::<f32>(k, &lse));
    k.attention_backward(
        &mut gdq, &mut gdk, &mut gdv, &mut delta, &gdout, &gq, &gk, &gv, &gout_t, &glse_c, s,
    )
    .unwrap();
    let t2 = tol::<T>(2e-5, 1.5e-2);
    rep.check(
        "attention_backward.dq",
        T::SUFFIX,
        &shape,
        &down(k, &gdq),
        &dq,
        t2,
    );
    rep.check(
        "attention_backward.dk",
        T::SUFFIX,
        &shape,
        &down(k, &gdk),
        &dk,
        t2,
    );
    rep.check(
        "attention_backward.dv",
        T::SUFFIX,
        &shape,
        &down(k, &gdv),
        &dv,
        t2,
    );
}

struct AttnCase {
    b: usize,
    tq: usize,
    past: usize,
    tmax: usize,
    h: usize,
    kvh: usize,
    d: usize,
}

/// Reference: full causal attention over the first past+tq cache rows; the last tq query
/// rows are the generation outputs.
fn attention_cached<T: GpuDtype>(k: &CudaKernels, r: &mut StdRng, rep: &mut Report, c: AttnCase) {
    let AttnCase {
        b,
        tq,
        past,
        tmax,
        h,
        kvh,
        d,
    } = c;
    let shape = format!("b={b} tq={tq} past={past} tmax={tmax} h={h}/{kvh} d={d}");
    let l = past + tq;
    let kc = quant::<T>(&randv(r, b * tmax * kvh * d, 1.5));
    let vc = quant::<T>(&randv(r, b * tmax * kvh * d, 1.0));
    let qn = quant::<T>(&randv(r, b * tq * h * d, 1.5));
    let (mut qf, mut kf, mut vf) = (
        vec![0.0; b * l * h * d],
        vec![0.0; b * l * kvh * d],
        vec![0.0; b * l * kvh * d],
    );
    for bi in 0..b {
        let (rk, rq) = (kvh * d, h * d);
        kf[bi * l * rk..(bi + 1) * l * rk]
            .copy_from_slice(&kc[bi * tmax * rk..(bi * tmax + l) * rk]);
        vf[bi * l * rk..(bi + 1) * l * rk]
            .copy_from_slice(&vc[bi * tmax * rk..(bi * tmax + l) * rk]);
        qf[(bi * l + past) * rq..(bi + 1) * l * rq]
            .copy_from_slice(&qn[bi * tq * rq..(bi + 1) * tq * rq]);
    }
    let (mut of, mut lse) = (vec![0.0; b * l * h * d], vec![0.0; b * h * l]);
    cpu::attention_forward(&mut of, &mut lse, &qf, &kf, &vf, b, l, h, kvh, d);
    let mut want = Vec::with_capacity(b * tq * h * d);
    for bi in 0..b {
        want.extend_from_slice(&of[(bi * l + past) * h * d..(bi + 1) * l * h * d]);
    }
    let mut out = poisoned::<T>(k, b * tq * h * d);
    let s = CachedAttnShape {
        b,
        tq,
        past,
        tmax,
        h,
        kvh,
        d,
    };
    k.attention_cached(
        &mut out,
        &up::<T>(k, &qn),
        &up::<T>(k, &kc),
        &up::<T>(k, &vc),
        s,
    )
    .unwrap();
    rep.check(
        "attention_cached",
        T::SUFFIX,
        &shape,
        &down(k, &out),
        &want,
        tol::<T>(1e-5, 1e-2),
    );
}

fn cross_entropy<T: GpuDtype>(
    k: &CudaKernels,
    r: &mut StdRng,
    rep: &mut Report,
    rows: usize,
    vp: usize,
    v_live: usize,
) {
    let shape = format!("rows={rows} vp={vp} live={v_live}");
    let logits = quant::<T>(&randv(r, rows * vp, 4.0));
    let targets = rand_ids(r, rows, v_live);
    let want = cpu::cross_entropy_forward(&logits, &targets, rows, vp, v_live).unwrap();
    let (gl, gt) = (up::<T>(k, &logits), up_u32(k, &targets));
    let mut loss = poisoned::<f32>(k, 1);
    let mut losses = poisoned::<f32>(k, rows);
    k.cross_entropy_forward(&mut loss, &mut losses, &gl, &gt, rows, vp, v_live)
        .unwrap();
    rep.check(
        "cross_entropy_forward",
        T::SUFFIX,
        &shape,
        &down(k, &loss),
        &[want],
        1e-5,
    );
    let mut dl = vec![0.0; rows * vp];
    cpu::cross_entropy_backward(&mut dl, &logits, &targets, rows, vp, v_live, 1.3).unwrap();
    let mut gdl = poisoned::<T>(k, rows * vp);
    k.cross_entropy_backward(&mut gdl, &gl, &gt, rows, vp, v_live, 1.3)
        .unwrap();
    rep.check(
        "cross_entropy_backward",
        T::SUFFIX,
        &shape,
        &down(k, &gdl),
        &dl,
        tol::<T>(1e-5, 8e-3),
    );
}

fn check_optimizer(k: &CudaKernels, r: &mut StdRng, rep: &mut Report) {
    let hp = AdamWParams {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for &n in &[1usize, 1000, 300_001] {
        let shape = format!("n={n} steps=3");
        let mut p = randv(r, n, 1.0);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let (mut gp, mut gm, mut gv) = (up::<f32>(k, &p), up::<f32>(k, &m), up::<f32>(k, &v));
        let mut master = up::<f32>(k, &p);
        let mut pb = poisoned::<Bf16>(k, n);
        let (mut bm, mut bv) = (up::<f32>(k, &m), up::<f32>(k, &v));
        for t in 1..=3u64 {
            let g = randv(r, n, 1.0);
            let gg = up::<f32>(k, &g);
            cpu::adamw_step(
                &mut p,
                &g,
                &mut m,
                &mut v,
                t,
                hp.lr,
                hp.beta1,
                hp.beta2,
                hp.eps,
                hp.weight_decay,
            );
            k.adamw_step(&mut gp, &gg, &mut gm, &mut gv, t, hp, None)
                .unwrap();
            k.adamw_step_bf16(&mut master, &mut pb, &gg, &mut bm, &mut bv, t, hp, None)
                .unwrap();
        }
        rep.check("adamw_step.params", "f32", &shape, &down(k, &gp), &p, 1e-5);
        rep.check("adamw_step.m", "f32", &shape, &down(k, &gm), &m, 1e-5);
        rep.check("adamw_step.v", "f32", &shape, &down(k, &gv), &v, 1e-5);
        rep.check(
            "adamw_step_bf16.master",
            "bf16",
            &shape,
            &down(k, &master),
            &p,
            1e-5,
        );
        rep.check(
            "adamw_step_bf16.params",
            "bf16",
            &shape,
            &down(k, &pb),
            &quant::<Bf16>(&p),
            8e-3,
        );
    }
    // Global norm over ragged tensors, clip scale, scaling, and AdamW with the fused scale.
    let sizes = [1usize, 7, 1000, 262_147];
    let hosts: Vec<Vec<f32>> = sizes.iter().map(|&n| randv(r, n, 3.0)).collect();
    let devs: Vec<_> = hosts.iter().map(|h| up::<f32>(k, h)).collect();
    let refs: Vec<&[f32]> = hosts.iter().map(|h| h.as_slice()).collect();
    let want = cpu::global_norm(&refs);
    let mut norm = poisoned::<f32>(k, 1);
    let mut partials = poisoned::<f32>(k, NORM_PARTIALS_PER_TENSOR * sizes.len());
    let drefs: Vec<_> = devs.iter().collect();
    k.global_norm(&mut norm, &mut partials, &drefs).unwrap();
    rep.check(
        "global_norm",
        "f32",
        "4 tensors",
        &down(k, &norm),
        &[want],
        1e-5,
    );
    for max_norm in [1.0f32, 1e6] {
        let mut scale = poisoned::<f32>(k, 1);
        k.clip_scale(&mut scale, &norm, max_norm).unwrap();
        let s = cpu::clip_scale(want, max_norm);
        rep.check(
            "clip_scale",
            "f32",
            &format!("max={max_norm}"),
            &down(k, &scale),
            &[s],
            1e-5,
        );
        let mut x = up::<f32>(k, &hosts[2]);
        k.scale_in_place(&mut x, &scale).unwrap();
        let mut hx = hosts[2].clone();
        cpu::scale_in_place(&mut hx, s);
        rep.check(
            "scale_in_place",
            "f32",
            &format!("max={max_norm}"),
            &down(k, &x),
            &hx,
            1e-5,
        );
        let (mut p, g) = (randv(r, 1000, 1.0), hosts[2].clone());
        let (mut m, mut v) = (vec![0.0; 1000], vec![0.0; 1000]);
        let (mut gp, mut gm, mut gv) = (up::<f32>(k, &p), up::<f32>(k, &m), up::<f32>(k, &v));
        let mut hg = g.clone();
        cpu::scale_in_place(&mut hg, s);
        cpu::adamw_step(
            &mut p,
            &hg,
            &mut m,
            &mut v,
            1,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
        );
        k.adamw_step(
            &mut gp,
            &up::<f32>(k, &g),
            &mut gm,
            &mut gv,
            1,
            hp,
            Some(&scale),
        )
        .unwrap();
        rep.check(
            "adamw_step.fused_clip",
            "f32",
            &format!("max={max_norm}"),
            &down(k, &gp),
            &p,
            1e-5,
        );
    }
}

/// A plain binary (`harness = false`): with NEUROSHARD_GPU_TESTS=1 on a CUDA machine
/// (scripts/gpu-check.sh) it runs the check and fails loudly; elsewhere it says that it did not
/// run and reports no test, so a check that never ran is never counted as passed.
fn main() {
    gpu_ops_match_cpu_reference();
}
