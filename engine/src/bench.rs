//! `neuroshard-engine bench-train`: times full training steps (forward, backward, AdamW) of a
//! preset on the CPU backend and prints one JSON line:
//! `tokens_per_s`, `step_s` (median), `gflops` (model FLOPs over the median step: 6 x matmul
//! params x tokens + 12 x layers x tokens x seq x hidden) and `params`.
//!
//! The batch is a fixed deterministic token batch (the data loader is not what is timed).
//! Besides wall time the line carries `cpu_step_s` / `cpu_gflops`: the median of process CPU
//! time per step divided by the thread count, i.e. what a step takes when its threads are
//! never preempted (the figure that means something on a shared machine; spinning rayon
//! workers count as busy, so it is conservative).

use std::time::Instant;

use neuroshard_shared::model::ModelConfig;

use crate::backend::cpu::CpuBackend;
use crate::model::params::SplitMix64;
use crate::model::{Model, StageInput, StageSpec};
use crate::optim::{AdamState, OptimConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// Model preset.
    #[arg(long, default_value = "bench")]
    pub model: String,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (default min(256, max_seq)).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Training dtype: auto (bf16 where the CPU has AVX512-BF16), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Print one JSON line (otherwise a readable summary).
    #[arg(long)]
    pub json: bool,
}

/// Matrix-multiply parameters: every linear layer plus the LM head (the embedding is a lookup).
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    let norms = 2 * cfg.hidden as u64;
    cfg.layers as u64 * (cfg.layer_params() - norms) + cfg.embedding_params()
}

/// Model FLOPs of one training step over `tokens` tokens of sequence length `seq`.
pub fn step_flops(cfg: &ModelConfig, tokens: u64, seq: u64) -> f64 {
    6.0 * matmul_params(cfg) as f64 * tokens as f64
        + 12.0 * cfg.layers as f64 * tokens as f64 * seq as f64 * cfg.hidden as f64
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub gflops: f64,
    pub params: u64,
    pub cpu_step_s: f64,
    pub cpu_gflops: f64,
    pub loss_first: f32,
    pub loss_last: f32,
}

/// Process CPU time (user + system) in seconds, from `/proc/self/stat` (clock ticks of 1/100
/// s, the Linux USER_HZ); `None` where that file is missing.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn bench_train(args: &BenchTrainArgs) -> anyhow::Result<BenchResult> {
    if let Some(t) = args.threads.filter(|&t| t > 0) {
        // Fails only if the pool was already built; then the existing one is used.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    let cfg = ModelConfig::preset(&args.model)?;
    let seq = args.seq.unwrap_or(256.min(cfg.max_seq as usize));
    anyhow::ensure!(
        args.steps > 0 && args.batch > 0 && seq > 0,
        "steps, batch and seq must be positive"
    );
    let b = args.batch;
    let dtype = crate::backend::resolve_dtype(&args.dtype, CpuBackend::native_bf16(), "cpu")
        .map_err(|e| anyhow::anyhow!(e))?;
    let be = CpuBackend::with_dtype(dtype);
    let mut model = Model::new(be, cfg.clone(), StageSpec::full(&cfg), 1)?;
    let mut adam = AdamState::new(&model)?;
    let oc = OptimConfig::default();
    let mut rng = SplitMix64(7);
    let stream: Vec<u32> = (0..b * (seq + 1))
        .map(|_| 10 + (rng.next_u64() % (cfg.vocab_size as u64 - 10)) as u32)
        .collect();
    let mut ids = Vec::with_capacity(b * seq);
    let mut labels = Vec::with_capacity(b * seq);
    for r in 0..b {
        ids.extend_from_slice(&stream[r * (seq + 1)..r * (seq + 1) + seq]);
        labels.extend_from_slice(&stream[r * (seq + 1) + 1..(r + 1) * (seq + 1)]);
    }
    let mut step = |i: usize| -> anyhow::Result<f32> {
        let loss = model
            .forward(i as u64, b, seq, StageInput::Ids(&ids), Some(&labels))?
            .ok_or_else(|| anyhow::anyhow!("no loss"))?;
        model.backward(i as u64, None)?;
        adam.step(&mut model, &oc, oc.lr)?;
        Ok(loss)
    };
    for i in 0..args.warmup {
        step(i)?;
    }
    let threads = rayon::current_num_threads();
    let mut times = Vec::with_capacity(args.steps);
    let mut cpu = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let c0 = process_cpu_seconds();
        let t0 = Instant::now();
        losses.push(step(args.warmup + i)?);
        times.push(t0.elapsed().as_secs_f64());
        if let (Some(c0), Some(c1)) = (c0, process_cpu_seconds()) {
            cpu.push((c1 - c0) / threads as f64);
        }
    }
    let median_wall = median(times);
    // Ticks are 10 ms: a step too short to register falls back to the wall time.
    let cpu_step = Some(cpu)
        .filter(|c| !c.is_empty())
        .map(median)
        .filter(|&c| c > 0.0)
        .unwrap_or(median_wall);
    let tokens = (b * seq) as u64;
    let flops = step_flops(&cfg, tokens, seq as u64);
    Ok(BenchResult {
        model: args.model.clone(),
        device: "cpu".into(),
        dtype: dtype.as_str().into(),
        threads,
        batch: b,
        seq,
        steps: args.steps,
        tokens_per_s: tokens as f64 / median_wall,
        step_s: median_wall,
        gflops: flops / median_wall / 1e9,
        params: cfg.total_params(),
        cpu_step_s: cpu_step,
        cpu_gflops: flops / cpu_step / 1e9,
        loss_first: losses[0],
        loss_last: *losses.last().expect("steps > 0"),
    })
}

/// Runs the benchmark and prints the result.
pub fn run(args: &BenchTrainArgs) -> anyhow::Result<()> {
    let r = bench_train(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} in {} on {} threads: batch {} x seq {}, {:.1} tokens/s, {:.3} s/step (median of {}), {:.2} GFLOP/s, {} params, loss {:.4} -> {:.4}",
            r.model,
            r.dtype,
            r.threads,
            r.batch,
            r.seq,
            r.tokens_per_s,
            r.step_s,
            r.steps,
            r.gflops,
            r.params,
            r.loss_first,
            r.loss_last
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_formula_for_the_bench_preset() {
        let cfg = ModelConfig::preset("bench").unwrap();
        // 11 layers x (2*512*512 + 2*512*128 + 3*512*2048) + 8192*512 matmul weights.
        let want = 11 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048) + 8192 * 512;
        assert_eq!(matmul_params(&cfg), want);
        let f = step_flops(&cfg, 1024, 256);
        assert_eq!(
            f,
            6.0 * want as f64 * 1024.0 + 12.0 * 11.0 * 1024.0 * 256.0 * 512.0
        );
    }

    #[test]
    fn a_tiny_run_reports_sane_figures() {
        let args = BenchTrainArgs {
            model: "tiny".into(),
            steps: 3,
            threads: None,
            batch: 2,
            seq: Some(16),
            warmup: 1,
            dtype: "auto".into(),
            json: true,
        };
        let r = bench_train(&args).unwrap();
        assert!(r.tokens_per_s > 0.0 && r.step_s > 0.0 && r.gflops > 0.0);
        assert!(r.cpu_step_s > 0.0 && r.cpu_gflops.is_finite());
        assert!(process_cpu_seconds().is_some_and(|c| c > 0.0));
        assert_eq!(
            r.params,
            ModelConfig::preset("tiny").unwrap().total_params()
        );
        assert!(r.loss_last.is_finite());
    }
}
