//! GPU benchmarks (needs a CUDA device; built everywhere so it type-checks):
//!   1. GEMM throughput: bf16 tensor-core (mma.sync) and f32 SIMT kernels at model shapes.
//!   2. A full bf16 training step of the NeuroLLM transformer made of this crate's kernels:
//!      embedding, per layer (RMSNorm, Q/K/V, RoPE, flash attention, O, residual, RMSNorm,
//!      gate/up, SwiGLU, down, residual) forward and backward, final norm, LM head,
//!      cross-entropy, global-norm clipping and AdamW on f32 master weights.
//!      Prints tokens/s and MFU = model FLOPs / step time / peak bf16 FLOP/s, where model FLOPs
//!      = 6 x matmul params x tokens + 12 x layers x tokens x seq x hidden (as `neuroshard
//!      bench train`).
//!
//!   cargo run --release -p neuroshard-kernels --example cuda_bench -- [--steps N] [--preset NAME]
//!
//! Peak: NEUROSHARD_PEAK_TFLOPS, else from the device name (H100/H200 989, A100 312 dense bf16).

use std::time::Instant;

use neuroshard_kernels::cuda::cudarc::driver::CudaSlice;
use neuroshard_kernels::cuda::ops::attention::AttnShape;
use neuroshard_kernels::cuda::ops::optim::{AdamWParams, NORM_PARTIALS_PER_TENSOR};
use neuroshard_kernels::cuda::{Bf16, CudaError, CudaKernels, ModuleSource};

/// A model shape and a batch (vocab, hidden, layers, heads, kv heads, ffn; batch, seq).
#[derive(Debug, Clone, Copy)]
struct Preset {
    name: &'static str,
    v: usize,
    c: usize,
    layers: usize,
    h: usize,
    kvh: usize,
    f: usize,
    b: usize,
    t: usize,
}

/// `bench` and `gpt2-small` as in shared/src/model.rs (the latter about 124M parameters).
const PRESETS: [Preset; 2] = [
    Preset {
        name: "bench",
        v: 8192,
        c: 512,
        layers: 11,
        h: 16,
        kvh: 4,
        f: 2048,
        b: 4,
        t: 256,
    },
    Preset {
        name: "gpt2-small",
        v: 32768,
        c: 768,
        layers: 12,
        h: 12,
        kvh: 4,
        f: 2048,
        b: 4,
        t: 1024,
    },
];

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), CudaError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(10);
    let only = arg("--preset");
    let k = CudaKernels::new(0, ModuleSource::Auto)?;
    let peak = peak_tflops(k.device_name());
    println!(
        "device: {} ({}), peak bf16 dense: {peak:.0} TFLOP/s",
        k.device_name(),
        k.arch()
    );
    gemm_table(&k)?;
    println!(
        "\n{:<11} {:>7} {:>10} {:>12} {:>9} {:>7}",
        "preset", "params", "step_ms", "tokens/s", "TFLOP/s", "MFU"
    );
    for p in PRESETS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|n| n == p.name))
    {
        let (params, flops) = model_flops(p);
        let ms = train_step_ms(&k, p, steps)?;
        let tokens = (p.b * p.t) as f64;
        let tflops = flops / (ms / 1e3) / 1e12;
        println!(
            "{:<11} {:>6.1}M {:>10.2} {:>12.0} {:>9.1} {:>6.1}%",
            p.name,
            params as f64 / 1e6,
            ms,
            tokens / (ms / 1e3),
            tflops,
            100.0 * tflops / peak
        );
    }
    Ok(())
}

fn peak_tflops(name: &str) -> f64 {
    if let Some(v) = std::env::var("NEUROSHARD_PEAK_TFLOPS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return v;
    }
    match name {
        n if n.contains("H100") || n.contains("H200") || n.contains("H800") => 989.0,
        n if n.contains("A100") || n.contains("A800") => 312.0,
        _ => f64::NAN,
    }
}

/// (parameters, model FLOPs per step).
fn model_flops(p: &Preset) -> (u64, f64) {
    let d = p.c / p.h;
    let kv = p.kvh * d;
    let layer = p.c * p.c * 2 + p.c * kv * 2 + 3 * p.c * p.f;
    let matmul_params = p.layers * layer + p.v * p.c; // LM head; embedding is a lookup
    let params = (matmul_params + p.v * p.c + p.layers * 2 * p.c + p.c) as u64;
    let tokens = (p.b * p.t) as f64;
    let flops = 6.0 * matmul_params as f64 * tokens + 12.0 * (p.layers * p.t * p.c) as f64 * tokens;
    (params, flops)
}

fn time_ms(
    k: &CudaKernels,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f()?;
    k.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        k.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn gemm_table(k: &CudaKernels) -> Result<(), CudaError> {
    println!(
        "\n{:<34} {:>9} {:>9} {:>9}",
        "gemm (m, k, n)", "bf16 fwd", "bf16 bwd", "f32 fwd"
    );
    for &(m, kk, n) in &[
        (1024usize, 512usize, 2048usize),
        (4096, 768, 2048),
        (4096, 2048, 768),
        (4096, 768, 32768),
        (8192, 8192, 8192),
    ] {
        let (a, w) = (k.zeros::<Bf16>(m * kk)?, k.zeros::<Bf16>(n * kk)?);
        let mut o = k.zeros::<Bf16>(m * n)?;
        let (mut da, mut dw) = (k.zeros::<Bf16>(m * kk)?, k.zeros::<f32>(n * kk)?);
        let flops = 2.0 * (m * kk * n) as f64;
        let fwd = time_ms(k, 5, || k.matmul_forward(&mut o, &a, &w, m, kk, n))?;
        let bwd = time_ms(k, 5, || {
            k.matmul_backward(&mut da, &mut dw, &o, &a, &w, m, kk, n)
        })?;
        let f32fwd = if m * kk * n <= 8192 * 8192 * 8192 / 8 {
            let (a32, w32) = (k.zeros::<f32>(m * kk)?, k.zeros::<f32>(n * kk)?);
            let mut o32 = k.zeros::<f32>(m * n)?;
            let ms = time_ms(k, 3, || k.matmul_forward(&mut o32, &a32, &w32, m, kk, n))?;
            format!("{:>9.1}", flops / ms / 1e9)
        } else {
            format!("{:>9}", "-")
        };
        println!(
            "{:<34} {:>9.1} {:>9.1} {}   TFLOP/s",
            format!("({m}, {kk}, {n})"),
            flops / fwd / 1e9,
            2.0 * flops / bwd / 1e9,
            f32fwd
        );
    }
    Ok(())
}

/// One transformer layer's parameters (bf16 copies + f32 master, grads, moments) and the
/// activations kept for backward.
struct Layer {
    params: Vec<Param>,
    ln1: CudaSlice<Bf16>,
    r1: CudaSlice<f32>,
    q: CudaSlice<Bf16>,
    kx: CudaSlice<Bf16>,
    vx: CudaSlice<Bf16>,
    att: CudaSlice<Bf16>,
    lse: CudaSlice<f32>,
    x2: CudaSlice<Bf16>,
    ln2: CudaSlice<Bf16>,
    r2: CudaSlice<f32>,
    gate: CudaSlice<Bf16>,
    up: CudaSlice<Bf16>,
    sw: CudaSlice<Bf16>,
}

struct Param {
    w: CudaSlice<Bf16>,
    master: CudaSlice<f32>,
    g: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

fn param(k: &CudaKernels, n: usize) -> Result<Param, CudaError> {
    let mut master = k.zeros::<f32>(n)?;
    k.fill(&mut master, 0.02)?;
    let mut w = k.zeros::<Bf16>(n)?;
    k.cast_f32_to_bf16(&mut w, &master)?;
    Ok(Param {
        w,
        master,
        g: k.zeros(n)?,
        m: k.zeros(n)?,
        v: k.zeros(n)?,
    })
}

// Parameter order inside a layer.
const LN1: usize = 0;
const WQ: usize = 1;
const WK: usize = 2;
const WV: usize = 3;
const WO: usize = 4;
const LN2: usize = 5;
const WG: usize = 6;
const WU: usize = 7;
const WD: usize = 8;

fn train_step_ms(k: &CudaKernels, p: &Preset, steps: usize) -> Result<f64, CudaError> {
    let (m, c, f, d) = (p.b * p.t, p.c, p.f, p.c / p.h);
    let kv = p.kvh * d;
    let s = AttnShape {
        b: p.b,
        t: p.t,
        h: p.h,
        kvh: p.kvh,
        d,
    };
    let ids: Vec<u32> = (0..m as u32).map(|i| (i * 7919) % p.v as u32).collect();
    let ids = k
        .stream()
        .clone_htod(&ids)
        .map_err(CudaError::driver("upload"))?;
    let mut layers = Vec::new();
    for _ in 0..p.layers {
        let sizes = [c, c * c, kv * c, kv * c, c * c, c, f * c, f * c, c * f];
        layers.push(Layer {
            params: sizes
                .iter()
                .map(|&n| param(k, n))
                .collect::<Result<_, _>>()?,
            ln1: k.zeros(m * c)?,
            r1: k.zeros(m)?,
            q: k.zeros(m * c)?,
            kx: k.zeros(m * kv)?,
            vx: k.zeros(m * kv)?,
            att: k.zeros(m * c)?,
            lse: k.zeros(p.b * p.h * p.t)?,
            x2: k.zeros(m * c)?,
            ln2: k.zeros(m * c)?,
            r2: k.zeros(m)?,
            gate: k.zeros(m * f)?,
            up: k.zeros(m * f)?,
            sw: k.zeros(m * f)?,
        });
    }
    let mut emb = param(k, p.v * c)?;
    let mut lnf = param(k, c)?;
    let mut head = param(k, p.v * c)?;
    // Residual stream per layer boundary, plus scratch.
    let mut xs: Vec<CudaSlice<Bf16>> = (0..=p.layers)
        .map(|_| k.zeros(m * c))
        .collect::<Result<_, _>>()?;
    let (mut lnf_out, mut rf) = (k.zeros::<Bf16>(m * c)?, k.zeros::<f32>(m)?);
    let mut logits = k.zeros::<Bf16>(m * p.v)?;
    let mut dlogits = k.zeros::<Bf16>(m * p.v)?;
    let (mut loss, mut losses) = (k.zeros::<f32>(1)?, k.zeros::<f32>(m)?);
    let (mut tmp_c, mut tmp_c2, mut tmp_q) = (
        k.zeros::<Bf16>(m * c)?,
        k.zeros::<Bf16>(m * c)?,
        k.zeros::<Bf16>(m * c)?,
    );
    let (mut dx, mut dx2) = (k.zeros::<Bf16>(m * c)?, k.zeros::<Bf16>(m * c)?);
    let (mut dq, mut dk, mut dv) = (
        k.zeros::<Bf16>(m * c)?,
        k.zeros::<Bf16>(m * kv)?,
        k.zeros::<Bf16>(m * kv)?,
    );
    let (mut dqr, mut dkr) = (k.zeros::<Bf16>(m * c)?, k.zeros::<Bf16>(m * kv)?);
    let (mut datt, mut dsw, mut dgate, mut dup) = (
        k.zeros::<Bf16>(m * c)?,
        k.zeros::<Bf16>(m * f)?,
        k.zeros::<Bf16>(m * f)?,
        k.zeros::<Bf16>(m * f)?,
    );
    let mut delta = k.zeros::<f32>(p.b * p.h * p.t)?;
    let n_params = p.layers * 9 + 3;
    let mut partials = k.zeros::<f32>(NORM_PARTIALS_PER_TENSOR * n_params)?;
    let (mut norm, mut scale) = (k.zeros::<f32>(1)?, k.zeros::<f32>(1)?);
    let hp = AdamWParams {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut step = 0u64;
    let targets = ids.clone();

    time_ms(k, steps, || {
        step += 1;
        // ---- forward ----
        k.embedding_forward(&mut xs[0], &ids, &emb.w, c)?;
        for (l, ly) in layers.iter_mut().enumerate() {
            let (lo, hi) = xs.split_at_mut(l + 1);
            let (x, xn) = (&lo[l], &mut hi[0]);
            let pw = &ly.params;
            k.rmsnorm_forward(&mut ly.ln1, &mut ly.r1, x, &pw[LN1].w, m, c, 1e-6)?;
            k.matmul_forward(&mut tmp_q, &ly.ln1, &pw[WQ].w, m, c, c)?;
            k.matmul_forward(&mut dkr, &ly.ln1, &pw[WK].w, m, c, kv)?;
            k.matmul_forward(&mut ly.vx, &ly.ln1, &pw[WV].w, m, c, kv)?;
            k.rope_forward(&mut ly.q, &tmp_q, p.b, p.t, p.h, d, 0, 10000.0)?;
            k.rope_forward(&mut ly.kx, &dkr, p.b, p.t, p.kvh, d, 0, 10000.0)?;
            k.attention_forward(&mut ly.att, &mut ly.lse, &ly.q, &ly.kx, &ly.vx, s)?;
            k.matmul_forward(&mut tmp_c, &ly.att, &pw[WO].w, m, c, c)?;
            k.add(&mut ly.x2, x, &tmp_c)?;
            k.rmsnorm_forward(&mut ly.ln2, &mut ly.r2, &ly.x2, &pw[LN2].w, m, c, 1e-6)?;
            k.matmul_forward(&mut ly.gate, &ly.ln2, &pw[WG].w, m, c, f)?;
            k.matmul_forward(&mut ly.up, &ly.ln2, &pw[WU].w, m, c, f)?;
            k.swiglu_forward(&mut ly.sw, &ly.gate, &ly.up)?;
            k.matmul_forward(&mut tmp_c, &ly.sw, &pw[WD].w, m, f, c)?;
            k.add(xn, &ly.x2, &tmp_c)?;
        }
        k.rmsnorm_forward(&mut lnf_out, &mut rf, &xs[p.layers], &lnf.w, m, c, 1e-6)?;
        k.matmul_forward(&mut logits, &lnf_out, &head.w, m, c, p.v)?;
        k.cross_entropy_forward(&mut loss, &mut losses, &logits, &targets, m, p.v, p.v)?;
        // ---- backward ----
        for prm in layers
            .iter_mut()
            .flat_map(|l| l.params.iter_mut())
            .chain([&mut emb, &mut lnf, &mut head])
        {
            k.fill(&mut prm.g, 0.0)?;
        }
        k.cross_entropy_backward(&mut dlogits, &logits, &targets, m, p.v, p.v, 1.0)?;
        k.fill(&mut tmp_c, 0.0)?;
        k.matmul_backward(
            &mut tmp_c,
            &mut head.g,
            &dlogits,
            &lnf_out,
            &head.w,
            m,
            c,
            p.v,
        )?;
        k.fill(&mut dx, 0.0)?;
        k.rmsnorm_backward(
            &mut dx,
            &mut lnf.g,
            &tmp_c,
            &xs[p.layers],
            &lnf.w,
            &rf,
            m,
            c,
        )?;
        for (l, ly) in layers.iter_mut().enumerate().rev() {
            let pw = &mut ly.params;
            // MLP: dx is d(x_{l+1}); it reaches x2 unchanged (residual) plus through the MLP.
            k.fill(&mut dsw, 0.0)?;
            let Param { w, g, .. } = &mut pw[WD];
            k.matmul_backward(&mut dsw, g, &dx, &ly.sw, w, m, f, c)?;
            k.fill(&mut dgate, 0.0)?;
            k.fill(&mut dup, 0.0)?;
            k.swiglu_backward(&mut dgate, &mut dup, &dsw, &ly.gate, &ly.up)?;
            k.fill(&mut tmp_c2, 0.0)?;
            let Param { w, g, .. } = &mut pw[WG];
            k.matmul_backward(&mut tmp_c2, g, &dgate, &ly.ln2, w, m, c, f)?;
            let Param { w, g, .. } = &mut pw[WU];
            k.matmul_backward(&mut tmp_c2, g, &dup, &ly.ln2, w, m, c, f)?;
            let Param { w, g, .. } = &mut pw[LN2];
            k.rmsnorm_backward(&mut dx, g, &tmp_c2, &ly.x2, w, &ly.r2, m, c)?;
            // Attention: dx is now d(x2).
            k.fill(&mut datt, 0.0)?;
            let Param { w, g, .. } = &mut pw[WO];
            k.matmul_backward(&mut datt, g, &dx, &ly.att, w, m, c, c)?;
            for buf in [&mut dq, &mut dqr, &mut dx2] {
                k.fill(buf, 0.0)?;
            }
            for buf in [&mut dk, &mut dv, &mut dkr] {
                k.fill(buf, 0.0)?;
            }
            k.attention_backward(
                &mut dq, &mut dk, &mut dv, &mut delta, &datt, &ly.q, &ly.kx, &ly.vx, &ly.att,
                &ly.lse, s,
            )?;
            k.rope_backward(&mut dqr, &dq, p.b, p.t, p.h, d, 0, 10000.0)?;
            k.rope_backward(&mut dkr, &dk, p.b, p.t, p.kvh, d, 0, 10000.0)?;
            let Param { w, g, .. } = &mut pw[WQ];
            k.matmul_backward(&mut dx2, g, &dqr, &ly.ln1, w, m, c, c)?;
            let Param { w, g, .. } = &mut pw[WK];
            k.matmul_backward(&mut dx2, g, &dkr, &ly.ln1, w, m, c, kv)?;
            let Param { w, g, .. } = &mut pw[WV];
            k.matmul_backward(&mut dx2, g, &dv, &ly.ln1, w, m, c, kv)?;
            let Param { w, g, .. } = &mut pw[LN1];
            k.rmsnorm_backward(&mut dx, g, &dx2, &xs[l], w, &ly.r1, m, c)?;
        }
        k.embedding_backward(&mut emb.g, &dx, &ids, c)?;
        // ---- optimizer: clip to global norm 1.0, AdamW on f32 masters ----
        let all: Vec<&mut Param> = layers
            .iter_mut()
            .flat_map(|l| l.params.iter_mut())
            .chain([&mut emb, &mut lnf, &mut head])
            .collect();
        {
            let grads: Vec<&CudaSlice<f32>> = all.iter().map(|p| &p.g).collect();
            k.global_norm(&mut norm, &mut partials, &grads)?;
        }
        k.clip_scale(&mut scale, &norm, 1.0)?;
        for prm in all {
            k.adamw_step_bf16(
                &mut prm.master,
                &mut prm.w,
                &prm.g,
                &mut prm.m,
                &mut prm.v,
                step,
                hp,
                Some(&scale),
            )?;
        }
        Ok(())
    })
}
