//! GEMM throughput of the bench preset's linear layers (M = 4 x 256 rows), f32 (`gemm`)
//! against bf16 (`vdpbf16ps` where the CPU has AVX512-BF16), forward and backward, on two
//! threads: `cargo run --release -p neuroshard-kernels --example bf16_timing` (BENCHMARKS.md).

use half::bf16;
use neuroshard_kernels::cpu::fast as k;
use std::time::Instant;
fn main() {
    let shapes = [
        (1024usize, 512usize, 512usize),
        (1024, 512, 2048),
        (1024, 2048, 512),
        (1024, 512, 8192),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        for &(m, kk, n) in &shapes {
            let x: Vec<f32> = (0..m * kk).map(|i| ((i % 17) as f32) * 0.01).collect();
            let w: Vec<f32> = (0..n * kk).map(|i| ((i % 13) as f32) * 0.01).collect();
            let dy: Vec<f32> = (0..m * n).map(|i| ((i % 7) as f32) * 0.01).collect();
            let mut xh = vec![bf16::ZERO; x.len()];
            let mut wh = vec![bf16::ZERO; w.len()];
            let mut dyh = vec![bf16::ZERO; dy.len()];
            k::to_bf16(&mut xh, &x);
            k::to_bf16(&mut wh, &w);
            k::to_bf16(&mut dyh, &dy);
            let mut out = vec![0.0; m * n];
            let mut di = vec![0.0; m * kk];
            let mut dw = vec![0.0; n * kk];
            let fl = 2.0 * (m * n * kk) as f64;
            let reps = 10;
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = Instant::now();
                for _ in 0..reps { f(); }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let f32f = time(&mut || k::matmul_forward(&mut out, &x, &w, m, kk, n));
            let bff = time(&mut || k::matmul_bf16_forward(&mut out, &xh, &wh, m, kk, n));
            let f32b = time(&mut || k::matmul_backward(&mut di, &mut dw, &dy, &x, &w, m, kk, n));
            let bfb = time(&mut || k::matmul_bf16_backward(&mut di, &mut dw, &dyh, &xh, &wh, m, kk, n));
            let conv = time(&mut || k::to_bf16(&mut dyh, &dy));
            println!("{m}x{kk}x{n}: fwd f32 {:.1} GF/s bf16 {:.1} GF/s | bwd f32 {:.1} bf16 {:.1} | to_bf16 of dout {:.2} ms",
                fl / f32f / 1e9, fl / bff / 1e9, 2.0 * fl / f32b / 1e9, 2.0 * fl / bfb / 1e9, conv * 1e3);
        }
    });
}
