//! `neuroshard-engine bench-ppl`: what int8 decode weights cost in quality. Trains a model
//! on the built-in corpus minus one held-out file (seeded, so every run trains the same
//! model), then scores the held-out text through the decode path (one token per step, as
//! generation runs) with the f32 weights and with their int8 copy, and prints one JSON line
//! with both perplexities.

use neuroshard_shared::model::ModelConfig;

use crate::backend::cpu::CpuBackend;
use crate::data::{builtin_corpus, builtin_tokenizer};
use crate::model::params::SplitMix64;
use crate::model::serve::ServeWeights;
use crate::model::{Model, StageInput, StageSpec};
use crate::optim::{AdamState, OptimConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchPplArgs {
    /// Model preset (its vocabulary gets the built-in tokenizer of that size).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Corpus file held out of training and scored.
    #[arg(long, default_value = "workshop.txt")]
    pub held_out: String,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence, in training and per scored window.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub model: String,
    pub held_out: String,
    pub steps: usize,
    pub train_loss_last: f32,
    pub scored_tokens: usize,
    pub ppl_f32: f64,
    pub ppl_int8: f64,
    pub int8_over_f32: f64,
}

pub fn run(args: &BenchPplArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threads.filter(|&t| t > 0) {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    let r = bench_ppl(args)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

pub fn bench_ppl(args: &BenchPplArgs) -> anyhow::Result<PplResult> {
    let cfg = ModelConfig::preset(&args.model)?;
    let (b, seq) = (args.batch, args.seq);
    anyhow::ensure!(
        b > 0 && seq > 1 && seq < cfg.max_seq as usize,
        "batch must be positive and seq in 2..max_seq {}",
        cfg.max_seq
    );
    let tok = builtin_tokenizer(cfg.vocab_size)?;
    let mut train = Vec::new();
    let mut held = None;
    for (name, text) in builtin_corpus() {
        if *name == args.held_out {
            held = Some(tok.encode(text));
        } else {
            train.extend(tok.encode(text));
        }
    }
    let held = held.ok_or_else(|| anyhow::anyhow!("no corpus file {:?}", args.held_out))?;
    anyhow::ensure!(
        train.len() > seq + 1,
        "training text shorter than one sequence"
    );
    let mut model = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 1)?;
    let mut adam = AdamState::new(&model)?;
    let oc = OptimConfig::default();
    let mut rng = SplitMix64(11);
    let mut loss = f32::NAN;
    for step in 0..args.steps {
        let (mut ids, mut labels) = (Vec::with_capacity(b * seq), Vec::with_capacity(b * seq));
        for _ in 0..b {
            let at = (rng.next_u64() % (train.len() - seq - 1) as u64) as usize;
            ids.extend_from_slice(&train[at..at + seq]);
            labels.extend_from_slice(&train[at + 1..at + seq + 1]);
        }
        loss = model
            .forward(step as u64, b, seq, StageInput::Ids(&ids), Some(&labels))?
            .ok_or_else(|| anyhow::anyhow!("no loss"))?;
        model.backward(step as u64, None)?;
        adam.step(&mut model, &oc, oc.lr)?;
    }
    let score = |model: &Model<CpuBackend>| -> anyhow::Result<(f64, usize)> {
        let (mut nll, mut n) = (0.0, 0);
        for w in held.chunks(seq) {
            nll += model.decode_nll(w)?;
            n += w.len().saturating_sub(1);
        }
        Ok(((nll / n as f64).exp(), n))
    };
    let (ppl_f32, n) = score(&model)?;
    model.set_serve_weights(ServeWeights::Int8)?;
    let (ppl_int8, _) = score(&model)?;
    Ok(PplResult {
        model: args.model.clone(),
        held_out: args.held_out.clone(),
        steps: args.steps,
        train_loss_last: loss,
        scored_tokens: n,
        ppl_f32,
        ppl_int8,
        int8_over_f32: ppl_int8 / ppl_f32,
    })
}
