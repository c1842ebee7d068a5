//! `pipe_wire_bench`: what sending pipeline activations and their gradients in bf16 or int8
//! rows instead of f32 (`training.pipeline_wire`) does to training, with the engine's real model, AdamW and
//! data loader (CPU backend).
//!
//! The model is cut in two stages as a two-node pipeline holds it (the first with the
//! embedding and the lower half of the layers, the second with the upper half and the head).
//! Every step: the first stage's forward, its output through the wire (kept f32, or rounded to
//! bf16 or int8 rows and widened back, with `pipeline::wire`'s own codec for int8), the second stage's forward, loss and
//! backward, the input gradient back through the wire, the first stage's backward, and one
//! AdamW step per stage clipped by the norm over both stages (the pipeline's global norm).
//! Both wires run from the same seed on the same batches. The evaluation loss goes through
//! the same wire. Bytes: the activations and gradients one step sends (labels not counted).
//!
//! Prints one JSON line per wire and a readable summary.

use std::time::Instant;

use clap::Parser;
use half::bf16;
use neuroshard::pipeline::{decode_int_rows, encode_int_rows};
use neuroshard_engine::backend::cpu::CpuBackend;
use neuroshard_engine::data::{Batch, DataLoader, DataSource, LoaderConfig, builtin_tokenizer};
use neuroshard_engine::model::{Model, StageInput, StageSpec};
use neuroshard_engine::optim::{AdamState, OptimConfig};
use neuroshard_shared::model::ModelConfig;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 0.003)]
    lr: f32,
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Wire {
    F32,
    Bf16,
    Int(u32),
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::F32 => "f32",
            Wire::Bf16 => "bf16",
            Wire::Int(4) => "int4",
            Wire::Int(6) => "int6",
            Wire::Int(_) => "int8",
        }
    }

    /// The values (rows of `row`) as the receiving stage gets them; the bytes they took.
    fn send(self, x: &[f32], row: usize) -> (Vec<f32>, u64) {
        match self {
            Wire::F32 => (x.to_vec(), 4 * x.len() as u64),
            Wire::Bf16 => (
                x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                2 * x.len() as u64,
            ),
            Wire::Int(bits) => {
                let bytes = encode_int_rows(x, row, bits);
                let n = bytes.len() as u64;
                (decode_int_rows(&bytes, row, bits).expect("own encoding"), n)
            }
        }
    }
}

struct Pipe {
    first: Model<CpuBackend>,
    second: Model<CpuBackend>,
}

fn loader(args: &Args, cfg: &ModelConfig, node_id: &str) -> anyhow::Result<DataLoader> {
    let tok = builtin_tokenizer(cfg.vocab_size)?;
    let lc = LoaderConfig {
        batch: args.batch,
        seq: args.seq,
        node_id: node_id.into(),
        seed: args.seed,
    };
    Ok(DataLoader::open(&DataSource::BuiltIn, &tok, lc)?)
}

fn pipe(args: &Args, cfg: &ModelConfig) -> anyhow::Result<Pipe> {
    let cut = cfg.layers / 2;
    let spec = |start, end, emb, head| StageSpec {
        layer_start: start,
        layer_end: end,
        has_embedding: emb,
        has_head: head,
    };
    let first = Model::new(
        CpuBackend::new(),
        cfg.clone(),
        spec(0, cut, true, false),
        args.seed,
    )?;
    let mut second = Model::new(
        CpuBackend::new(),
        cfg.clone(),
        spec(cut, cfg.layers, false, true),
        args.seed,
    )?;
    let tok = builtin_tokenizer(cfg.vocab_size)?;
    second.v_live = (tok.vocab_size() as usize).clamp(1, cfg.vocab_size as usize);
    Ok(Pipe { first, second })
}

/// Forward through both stages (the activations through `wire`); the loss and the bytes sent.
fn forward(p: &mut Pipe, wire: Wire, micro: u64, b: &Batch) -> anyhow::Result<(f32, u64)> {
    let hidden = p.first.cfg.hidden as usize;
    p.first
        .forward(micro, b.batch, b.seq, StageInput::Ids(&b.input_ids), None)?;
    let (acts, bytes) = p.first.with_output(micro, |x, _| wire.send(x, hidden))?;
    let loss = p
        .second
        .forward(
            micro,
            b.batch,
            b.seq,
            StageInput::Acts(&acts),
            Some(&b.labels),
        )?
        .ok_or_else(|| anyhow::anyhow!("no loss"))?;
    Ok((loss, bytes))
}

fn evaluate(p: &mut Pipe, wire: Wire, eval: &[Batch]) -> anyhow::Result<f64> {
    let mut sum = 0.0f64;
    for (i, b) in eval.iter().enumerate() {
        let (loss, _) = forward(p, wire, 1_000_000 + i as u64, b)?;
        p.first.clear_activations();
        p.second.clear_activations();
        sum += f64::from(loss);
    }
    Ok(sum / eval.len().max(1) as f64)
}

fn run(args: &Args, cfg: &ModelConfig, wire: Wire, eval: &[Batch]) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut p = pipe(args, cfg)?;
    let mut adam_first = AdamState::new(&p.first)?;
    let mut adam_second = AdamState::new(&p.second)?;
    let opt = OptimConfig {
        lr: args.lr,
        ..OptimConfig::default()
    };
    let mut data = loader(args, cfg, "pipe-wire-bench")?;
    let initial = evaluate(&mut p, wire, eval)?;
    let mut bytes = 0u64;
    let mut last_losses = Vec::new();
    for step in 0..args.steps {
        let micro = step as u64 + 1;
        let b = data.next_batch()?;
        let (loss, sent) = forward(&mut p, wire, micro, &b)?;
        p.second.backward(micro, None)?;
        let hidden = cfg.hidden as usize;
        let (grad, back) = p.second.with_grad_input(|g| wire.send(g, hidden))?;
        p.first.backward(micro, Some(&grad))?;
        bytes += sent + back;
        let norm = (AdamState::sq_grad_norm(&p.first)? + AdamState::sq_grad_norm(&p.second)?).sqrt()
            as f32;
        adam_first.step_clipped_by(&mut p.first, &opt, opt.lr, Some(norm))?;
        adam_second.step_clipped_by(&mut p.second, &opt, opt.lr, Some(norm))?;
        if step + 20 >= args.steps {
            last_losses.push(f64::from(loss));
        }
    }
    let eval_loss = evaluate(&mut p, wire, eval)?;
    let tokens = (args.steps * args.batch * args.seq) as u64;
    let train_tail = last_losses.iter().sum::<f64>() / last_losses.len().max(1) as f64;
    let out = serde_json::json!({
        "model": args.model,
        "wire": wire.name(),
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "tokens": tokens,
        "initial_eval_loss": initial,
        "eval_loss": eval_loss,
        "train_loss_last_20": train_tail,
        "bytes": bytes,
        "bytes_per_token": bytes as f64 / tokens as f64,
        "secs": t0.elapsed().as_secs_f64(),
    });
    println!("{out}");
    println!(
        "{} wire: eval loss {initial:.4} -> {eval_loss:.4} after {} steps, train loss (last 20) {train_tail:.4}, {:.1} bytes/token",
        wire.name(),
        args.steps,
        bytes as f64 / tokens as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = ModelConfig::preset(&args.model)?;
    if cfg.layers < 2 {
        anyhow::bail!(
            "{} has {} layer(s); a pipeline needs two",
            args.model,
            cfg.layers
        );
    }
    let mut ev = loader(&args, &cfg, "pipe-wire-bench-eval")?;
    let eval: Vec<Batch> = (0..args.eval_batches)
        .map(|_| ev.next_batch())
        .collect::<Result<_, _>>()?;
    for wire in [
        Wire::F32,
        Wire::Bf16,
        Wire::Int(8),
        Wire::Int(6),
        Wire::Int(4),
    ] {
        run(&args, &cfg, wire, &eval)?;
    }
    Ok(())
}
