//! `neuroshard-engine bench-generate`: times generation with the continuous-batching path on
//! the CPU backend and prints one JSON line per batch size: time to first token (prefill of
//! one prompt + its first token, median over the batch's admissions), decode tokens/s over
//! all sequences of the batch, and the same figures CPU-normalized (process CPU time divided
//! by the thread count; see `bench.rs`). The weights are the seeded initial ones: speed does
//! not depend on what they say.

use std::time::Instant;

use neuroshard_shared::model::ModelConfig;

use crate::backend::cpu::CpuBackend;
use crate::bench::process_cpu_seconds;
use crate::model::batch::{BatchScratch, Sequence};
use crate::model::generate::Sampling;
use crate::model::params::SplitMix64;
use crate::model::serve::ServeWeights;
use crate::model::{Model, StageSpec};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchGenerateArgs {
    /// Model preset.
    #[arg(long, default_value = "bench")]
    pub model: String,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 32)]
    pub prompt: usize,
    /// Decode steps timed per batch.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Decode weights: f32 or int8 (per-channel copy, VNNI where the CPU has it).
    #[arg(long, value_enum, default_value = "f32")]
    pub weights: ServeWeights,
    /// Greedy decoding (as HF and llama.cpp in `scripts/serve-bench.py`) instead of sampling
    /// at temperature 1.
    #[arg(long)]
    pub greedy: bool,
    /// Instead of timing: write the same seeded model to DIR/hf (Hugging Face Llama) and
    /// DIR/model-f32.gguf, for `scripts/serve-bench.py` to time HF and llama.cpp on it.
    #[arg(long)]
    pub export: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBench {
    pub model: String,
    pub threads: usize,
    pub batch: usize,
    pub prompt: usize,
    pub steps: usize,
    pub weights: ServeWeights,
    pub ttft_ms: f64,
    pub cpu_ttft_ms: f64,
    pub decode_tokens_per_s: f64,
    pub cpu_decode_tokens_per_s: f64,
    pub step_ms: f64,
}

pub fn run(args: &BenchGenerateArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threads.filter(|&t| t > 0) {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    let cfg = ModelConfig::preset(&args.model)?;
    anyhow::ensure!(
        args.prompt > 0 && args.steps > 0 && args.batch.iter().all(|&b| b > 0),
        "prompt, steps and batch sizes must be positive"
    );
    anyhow::ensure!(
        args.prompt + args.steps + 1 < cfg.max_seq as usize,
        "prompt + steps must stay below max_seq {}",
        cfg.max_seq
    );
    let mut model = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 1)?;
    if let Some(dir) = &args.export {
        let w = crate::export::gather(&model, 0, &[])?;
        let tok = crate::data::builtin_tokenizer(cfg.vocab_size)?;
        crate::export::write_hf_llama(&w, &dir.join("hf"), Some(&tok))?;
        crate::export::gguf::write_llama(&w, &dir.join("model-f32.gguf"), &tok)?;
        println!("{}", serde_json::json!({"exported": dir}));
        return Ok(());
    }
    model.set_serve_weights(args.weights)?;
    // Warm-up: one short request (page-in, gemm packing buffers).
    let warm = sampling(0, args.greedy);
    model.start_sequence(&prompt(&cfg, 0, args.prompt), 2, warm)?;
    for &b in &args.batch {
        let r = bench_batch(&model, &cfg, args, b)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn sampling(seed: u64, greedy: bool) -> Sampling {
    Sampling {
        temperature: if greedy { 0.0 } else { 1.0 },
        top_p: 1.0,
        top_k: 0,
        seed,
    }
}

fn prompt(cfg: &ModelConfig, seed: u64, n: usize) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| 10 + (rng.next_u64() % (cfg.vocab_size as u64 - 10)) as u32)
        .collect()
}

fn bench_batch(
    model: &Model<CpuBackend>,
    cfg: &ModelConfig,
    args: &BenchGenerateArgs,
    b: usize,
) -> anyhow::Result<GenerateBench> {
    let threads = rayon::current_num_threads();
    let mut ttft = Vec::new();
    let mut cpu_ttft = Vec::new();
    let mut seqs: Vec<Sequence<CpuBackend>> = Vec::new();
    let max_tokens = (args.steps + 1) as u32;
    for i in 0..b {
        let p = prompt(cfg, 100 + i as u64, args.prompt);
        let (t0, c0) = (Instant::now(), process_cpu_seconds().unwrap_or(0.0));
        let (seq, _) = model.start_sequence(&p, max_tokens, sampling(i as u64, args.greedy))?;
        ttft.push(t0.elapsed().as_secs_f64());
        cpu_ttft.push((process_cpu_seconds().unwrap_or(0.0) - c0) / threads as f64);
        seqs.push(seq);
    }
    let mut scratch: Option<BatchScratch<CpuBackend>> = None;
    let mut produced = 0usize;
    let (t0, c0) = (Instant::now(), process_cpu_seconds().unwrap_or(0.0));
    for _ in 0..args.steps {
        seqs.retain(|s| !s.finished());
        if seqs.is_empty() {
            break;
        }
        let mut refs: Vec<&mut Sequence<CpuBackend>> = seqs.iter_mut().collect();
        produced += model.decode_batch(&mut refs, &mut scratch)?.len();
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (process_cpu_seconds().unwrap_or(0.0) - c0) / threads as f64;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(GenerateBench {
        model: args.model.clone(),
        threads,
        batch: b,
        prompt: args.prompt,
        steps: args.steps,
        weights: args.weights,
        ttft_ms: median(ttft) * 1e3,
        cpu_ttft_ms: median(cpu_ttft) * 1e3,
        decode_tokens_per_s: produced as f64 / wall,
        cpu_decode_tokens_per_s: if cpu > 0.0 {
            produced as f64 / cpu
        } else {
            0.0
        },
        step_ms: wall / args.steps as f64 * 1e3,
    })
}
