//! The matmuls of one `bench` training step (11 layers + LM head, forward and backward), each
//! with its own weights and activations as in the model: GFLOP/s over the whole sequence.
use neuroshard_kernels::cpu::fast::{matmul_backward, matmul_forward};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let (m, c, kv, f, v, layers) = (1024usize, 512usize, 128usize, 2048usize, 8192usize, 11);
    let mut shapes = Vec::new();
    for _ in 0..layers {
        for (k, n) in [(c, c), (c, kv), (c, kv), (c, c), (c, f), (c, f), (f, c)] {
            shapes.push((k, n));
        }
    }
    shapes.push((c, v));
    let bufs: Vec<_> = shapes
        .iter()
        .map(|&(k, n)| {
            (
                vec![0.01f32; m * k],
                vec![0.02f32; n * k],
                vec![0f32; m * n],
                vec![0f32; m * k],
                vec![0f32; n * k],
            )
        })
        .collect();
    let mut bufs = bufs;
    let flops: f64 = shapes.iter().map(|&(k, n)| 6.0 * (m * k * n) as f64).sum();
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        for (i, &(k, n)) in shapes.iter().enumerate() {
            let (inp, w, out, _, _) = &mut bufs[i];
            matmul_forward(out, inp, w, m, k, n);
        }
        for (i, &(k, n)) in shapes.iter().enumerate().rev() {
            let (inp, w, out, dinp, dw) = &mut bufs[i];
            matmul_backward(dinp, dw, out, inp, w, m, k, n);
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "step matmuls {:.0} GFLOP: median {:.3} s = {:.1} GFLOP/s (best {:.1})",
        flops / 1e9,
        times[3],
        flops / times[3] / 1e9,
        flops / times[0] / 1e9
    );
}
