//! Per-op CPU benchmark: measured FMA peak, then GFLOP/s (matmul, attention) or time per
//! call (the rest) for the fast path and, for comparison, the plain reference, on the
//! `bench` model shapes (B 4, T 256, C 512, H 16, KVH 4, D 32, FFN 2048, V 8192).
//!
//! `cargo run --release -p neuroshard-kernels --example bench_ops [-- --quick] [matmul] [attention] [ops]`
//! Threads: the rayon pool size (`RAYON_NUM_THREADS`, default all cores).

use std::hint::black_box;
use std::time::Instant;

use neuroshard_kernels::cpu::{self, fast};
use rayon::prelude::*;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU seconds used by this process so far (all threads), from CLOCK_PROCESS_CPUTIME_ID.
fn process_cpu() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec; 2 is CLOCK_PROCESS_CPUTIME_ID on Linux.
    let rc = unsafe { clock_gettime(2, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Timing of one call: `wall` is the median wall-clock seconds; `cpu` is the median
/// process CPU seconds divided by the thread count, i.e. the wall time the call would take
/// if its threads were never preempted (the machine is shared; spinning rayon workers
/// count as busy, so this is conservative).
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Times `iters` calls of a parallel op (on the whole rayon pool) after one warm-up call.
fn time<F: FnMut()>(iters: usize, f: F) -> Timing {
    time_on(rayon::current_num_threads(), iters, f)
}

/// Times `iters` calls of a single-threaded op after one warm-up call.
fn time_serial<F: FnMut()>(iters: usize, f: F) -> Timing {
    time_on(1, iters, f)
}

fn time_on<F: FnMut()>(threads: usize, iters: usize, mut f: F) -> Timing {
    f();
    let threads = threads as f64;
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let (t0, c0) = (Instant::now(), process_cpu());
        f();
        walls.push(t0.elapsed().as_secs_f64());
        cpus.push((process_cpu() - c0) / threads);
    }
    Timing {
        wall: median(walls),
        cpu: median(cpus),
    }
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    let mut s = _mm256_setzero_ps();
    for x in acc {
        s = _mm256_add_ps(s, x);
    }
    // SAFETY: out holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 12];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}

/// Measured FMA peak of the whole rayon pool (GFLOP/s, wall and CPU-normalized): 12
/// independent FMA chains per thread, all threads at once, as wide as the CPU has (16
/// lanes with AVX-512F, else 8 with AVX2).
fn fma_peak() -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (of each loop): called only when its features are present (checked here).
        let (lanes, iters, fma): (usize, usize, unsafe fn(usize) -> f32) =
            if std::is_x86_feature_detected!("avx512f") {
                (16, 10_000_000, fma_loop_512)
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                (8, 20_000_000, fma_loop)
            } else {
                return (f64::NAN, f64::NAN);
            };
        let threads = rayon::current_num_threads();
        let tm = time(5, || {
            rayon::broadcast(|_| {
                // SAFETY: the loop's features were checked above.
                black_box(unsafe { fma(black_box(iters)) });
            });
        });
        let fl = threads as f64 * iters as f64 * 12.0 * lanes as f64 * 2.0 / 1e9;
        (fl / tm.wall, fl / tm.cpu)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (f64::NAN, f64::NAN)
}

/// `wall GFLOP/s (cpu-normalized GFLOP/s, % of cpu-normalized peak)`.
fn gf(flops: f64, tm: Timing, peak: f64) -> String {
    let (w, c) = (flops / tm.wall / 1e9, flops / tm.cpu / 1e9);
    format!("{w:6.1} ({c:6.1}, {:3.0}%)", 100.0 * c / peak)
}

/// `wall ms (cpu-normalized ms)`.
fn ms(tm: Timing) -> String {
    format!("{:8.3} ({:8.3})", tm.wall * 1e3, tm.cpu * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sections: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.as_str())
        .collect();
    let want = |name: &str| sections.is_empty() || sections.contains(&name);
    let iters = if quick { 3 } else { 9 };
    let threads = rayon::current_num_threads();
    let (peak_wall, peak) = fma_peak();
    println!(
        "threads {threads}; measured FMA peak {peak_wall:.1} GFLOP/s wall, {peak:.1} GFLOP/s CPU-normalized"
    );
    println!("figures: wall (CPU-normalized = as if never preempted, % of CPU-normalized peak)");

    if want("matmul") {
        println!(
            "\n## matmul out[M,N] = inp[M,K] @ W[N,K]^T, GFLOP/s; bwd = dinp + dweight (4MNK flops)"
        );
        for (m, k, n) in [
            (1024, 512, 2048),
            (1024, 2048, 512),
            (1024, 512, 8192),
            (1024, 512, 512),
            (1024, 512, 128),
        ] {
            let inp = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let dout = rand_vec(m * n, 3);
            let mut out = vec![0.0; m * n];
            let (mut di, mut dw) = (vec![0.0; m * k], vec![0.0; n * k]);
            let fl = 2.0 * (m * n * k) as f64;
            let tf = time(iters, || fast::matmul_forward(&mut out, &inp, &w, m, k, n));
            let tb = time(iters, || {
                fast::matmul_backward(&mut di, &mut dw, &dout, &inp, &w, m, k, n)
            });
            println!(
                "M={m:5} K={k:5} N={n:5}  fwd {}  bwd {}",
                gf(fl, tf, peak),
                gf(2.0 * fl, tb, peak)
            );
        }
        let (m, k, n) = (256, 512, 512);
        let inp = rand_vec(m * k, 1);
        let w = rand_vec(n * k, 2);
        let mut out = vec![0.0; m * n];
        let tr = time_serial(1, || cpu::matmul_forward(&mut out, &inp, &w, m, k, n));
        println!(
            "reference matmul_forward M={m} K={k} N={n} (1 thread): {}",
            gf(2.0 * (m * n * k) as f64, tr, peak)
        );
    }

    let (b, t, h, kvh, d) = (4, 256, 16, 4, 32);
    if want("attention") {
        println!(
            "\n## attention B={b} T={t} H={h} KVH={kvh} D={d}; GFLOP/s count 4*D (fwd), 10*D (bwd) per causal pair"
        );
        let q = rand_vec(b * t * h * d, 4);
        let k = rand_vec(b * t * kvh * d, 5);
        let v = rand_vec(b * t * kvh * d, 6);
        let dout = rand_vec(q.len(), 7);
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let pairs = (b * h * t * (t + 1) / 2) as f64;
        let tf = time(iters, || {
            fast::attention_forward(&mut out, &mut lse, &q, &k, &v, b, t, h, kvh, d)
        });
        let tb = time(iters, || {
            fast::attention_backward(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, b, t, h, kvh, d,
            )
        });
        let trf = time_serial(1, || {
            cpu::attention_forward(&mut out, &mut lse, &q, &k, &v, b, t, h, kvh, d)
        });
        let trb = time_serial(1, || {
            cpu::attention_backward(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, b, t, h, kvh, d,
            )
        });
        println!(
            "fast      fwd ms {}  GFLOP/s {}",
            ms(tf),
            gf(pairs * 4.0 * d as f64, tf, peak)
        );
        println!(
            "fast      bwd ms {}  GFLOP/s {}",
            ms(tb),
            gf(pairs * 10.0 * d as f64, tb, peak)
        );
        println!(
            "reference fwd ms {}  bwd ms {} (1 thread)",
            ms(trf),
            ms(trb)
        );
        // One generation step: a new query per sequence at position T-1 over a KV cache.
        let qn = rand_vec(b * h * d, 8);
        let mut on = vec![0.0; qn.len()];
        let tc = time(iters, || {
            fast::attention_cached_forward(&mut on, &qn, &k, &v, b, 1, t - 1, t, h, kvh, d)
        });
        let trc = time_serial(iters, || {
            cpu::attention_cached_forward(&mut on, &qn, &k, &v, b, 1, t - 1, t, h, kvh, d)
        });
        println!(
            "cached (1 new query, past {}) ms {} | reference {}",
            t - 1,
            ms(tc),
            ms(trc)
        );
    }
    if !want("ops") {
        return;
    }
    println!("\n## row / elementwise ops, ms: fast (all threads) | reference (1 thread)");
    let rows = b * t;
    {
        let c = 512;
        let inp = rand_vec(rows * c, 8);
        let wt = rand_vec(c, 9);
        let dout = rand_vec(rows * c, 10);
        let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        let (mut di, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
        let f = time(iters, || {
            fast::rmsnorm_forward(&mut out, &mut rstd, &inp, &wt, rows, c, 1e-6)
        });
        let fb = time(iters, || {
            fast::rmsnorm_backward(&mut di, &mut dw, &dout, &inp, &wt, &rstd, rows, c)
        });
        let r = time_serial(iters, || {
            cpu::rmsnorm_forward(&mut out, &mut rstd, &inp, &wt, rows, c, 1e-6)
        });
        let rb = time_serial(iters, || {
            cpu::rmsnorm_backward(&mut di, &mut dw, &dout, &inp, &wt, &rstd, rows, c)
        });
        println!(
            "rmsnorm [{rows},{c}]          fwd {} | {}  bwd {} | {}",
            ms(f),
            ms(r),
            ms(fb),
            ms(rb)
        );
    }
    {
        let x = rand_vec(rows * h * d, 11);
        let mut y = vec![0.0; x.len()];
        let f = time(iters, || {
            fast::rope_forward(&mut y, &x, b, t, h, d, 0, 10000.0)
        });
        let fb = time(iters, || {
            fast::rope_backward(&mut y, &x, b, t, h, d, 0, 10000.0)
        });
        let r = time_serial(iters, || {
            cpu::rope_forward(&mut y, &x, b, t, h, d, 0, 10000.0)
        });
        let rb = time_serial(iters, || {
            cpu::rope_backward(&mut y, &x, b, t, h, d, 0, 10000.0)
        });
        println!(
            "rope [{b},{t},{h},{d}]          fwd {} | {}  bwd {} | {}",
            ms(f),
            ms(r),
            ms(fb),
            ms(rb)
        );
    }
    {
        let n = rows * 2048;
        let g = rand_vec(n, 12);
        let u = rand_vec(n, 13);
        let dout = rand_vec(n, 14);
        let mut out = vec![0.0; n];
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        let f = time(iters, || fast::swiglu_forward(&mut out, &g, &u));
        let fb = time(iters, || {
            fast::swiglu_backward(&mut dg, &mut du, &dout, &g, &u)
        });
        let r = time_serial(iters, || cpu::swiglu_forward(&mut out, &g, &u));
        let rb = time_serial(iters, || {
            cpu::swiglu_backward(&mut dg, &mut du, &dout, &g, &u)
        });
        println!(
            "swiglu [{n}]             fwd {} | {}  bwd {} | {}",
            ms(f),
            ms(r),
            ms(fb),
            ms(rb)
        );
    }
    {
        let (vp, vl) = (8192, 8192);
        let logits = rand_vec(rows * vp, 15);
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 31) % vl as u32).collect();
        let mut dl = vec![0.0; rows * vp];
        let f = time(iters, || {
            black_box(fast::cross_entropy_forward(&logits, &targets, rows, vp, vl).unwrap());
        });
        let fb = time(iters, || {
            fast::cross_entropy_backward(&mut dl, &logits, &targets, rows, vp, vl, 1.0).unwrap()
        });
        let r = time_serial(iters, || {
            black_box(cpu::cross_entropy_forward(&logits, &targets, rows, vp, vl).unwrap());
        });
        let rb = time_serial(iters, || {
            cpu::cross_entropy_backward(&mut dl, &logits, &targets, rows, vp, vl, 1.0).unwrap()
        });
        println!(
            "cross_entropy [{rows},{vp}]   fwd {} | {}  bwd {} | {}",
            ms(f),
            ms(r),
            ms(fb),
            ms(rb)
        );
    }
    {
        let n = 10_000_000;
        let grads = rand_vec(n, 16);
        let mut p = rand_vec(n, 17);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut step = 0;
        let f = time(iters, || {
            step += 1;
            fast::adamw_step(
                &mut p, &grads, &mut m, &mut v, step, 1e-3, 0.9, 0.95, 1e-8, 0.1,
            )
        });
        let fnorm = time(iters, || {
            black_box(fast::global_norm(&[&grads]));
        });
        let r = time_serial(iters, || {
            step += 1;
            cpu::adamw_step(
                &mut p, &grads, &mut m, &mut v, step, 1e-3, 0.9, 0.95, 1e-8, 0.1,
            )
        });
        let rnorm = time_serial(iters, || {
            black_box(cpu::global_norm(&[&grads]));
        });
        println!(
            "adamw [{n}]           step {} | {}  global_norm {} | {}",
            ms(f),
            ms(r),
            ms(fnorm),
            ms(rnorm)
        );
        // What a training step does after its backward: the clip scale, the update and the
        // gradient reset, as three passes and as the one fused pass the engine runs.
        let mut g = grads.clone();
        let passes = time(iters, || {
            step += 1;
            fast::scale_in_place(&mut g, 0.5);
            fast::adamw_step(&mut p, &g, &mut m, &mut v, step, 1e-3, 0.9, 0.95, 1e-8, 0.1);
            g.par_chunks_mut(1 << 15).for_each(|c| c.fill(0.0));
        });
        let fused = time(iters, || {
            step += 1;
            fast::adamw_step_zeroing(
                &mut p, &mut g, &mut m, &mut v, step, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.5,
            );
        });
        println!(
            "clip + adamw + zero [{n}]  three passes {} | fused {}",
            ms(passes),
            ms(fused)
        );
    }
}
