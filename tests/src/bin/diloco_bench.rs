//! `diloco_bench`: DiLoCo against fully synchronous data parallelism on the same token
//! budget, with the engine's real model, AdamW and data loader (CPU backend) and control's
//! real DiLoCo code (compression, robust aggregation, Nesterov outer step).
//!
//! * DiLoCo: `--replicas` models, each with its own AdamW state and data order (its own node
//!   id), take `--h` inner steps; then every replica's pseudo-gradient θ_start − θ_local is
//!   encoded as on the wire (`--encoding`), decoded, aggregated (`--aggregator`) and the outer
//!   step (lr 0.7, Nesterov 0.9; `--outer-lr`, `--outer-momentum`) is applied from θ_start
//!   and written back into every replica.
//! * Synchronous: one model; every step runs forward and backward on one batch of each
//!   replica's data order and takes one AdamW step on the averaged gradient (exactly what a
//!   per-step all-reduce of the replicas' gradients gives).
//!
//! Bytes: both exchange as our peer network does (each replica pushes its encoded tensor to
//! every other replica): per round for DiLoCo, per step for synchronous training. Loss: the
//! mean over `--eval-batches` fixed batches read with another node id, measured on the
//! replicas' agreed weights (DiLoCo) or the model (synchronous) after the whole budget.
//!
//! Prints one JSON line and a readable summary.

use std::time::Instant;

use clap::Parser;
use neuroshard::diloco::aggregate::{Aggregator, AggregatorKind, Input};
use neuroshard::diloco::compress::{self, Encoding};
use neuroshard::diloco::outer::OuterOpt;
use neuroshard::diloco::sparse::TopK;
use neuroshard_engine::backend::Backend;
use neuroshard_engine::backend::cpu::CpuBackend;
use neuroshard_engine::data::{DataLoader, DataSource, LoaderConfig, builtin_tokenizer};
use neuroshard_engine::model::{Model, StageInput, StageSpec};
use neuroshard_engine::optim::{AdamState, OptimConfig};
use neuroshard_shared::model::ModelConfig;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Inner steps per DiLoCo round.
    #[arg(long, default_value_t = 50)]
    h: usize,
    /// DiLoCo rounds; the token budget is rounds x h x replicas x batch x seq.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Inner (DiLoCo) and only (synchronous) AdamW learning rate.
    #[arg(long, default_value_t = 0.003)]
    lr: f32,
    /// f32, bf16, int8 or topk.
    #[arg(long, default_value = "bf16")]
    encoding: String,
    /// topk: share of each chunk's values sent.
    #[arg(long, default_value_t = 0.01)]
    topk_ratio: f64,
    /// topk: bits per sent value.
    #[arg(long, default_value_t = 2)]
    topk_bits: u32,
    #[arg(long, default_value = "trimmed_mean")]
    aggregator: String,
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Outer Nesterov step (DiLoCo's 0.7 and 0.9 by default, as `training.outer_lr`).
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Skip the synchronous run (its loss does not depend on the encoding); its bytes are
    /// still counted.
    #[arg(long)]
    skip_sync: bool,
}

struct Replica {
    model: Model<CpuBackend>,
    adam: AdamState<CpuBackend>,
    data: DataLoader,
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

fn model(args: &Args, cfg: &ModelConfig) -> anyhow::Result<Model<CpuBackend>> {
    let mut m = Model::new(
        CpuBackend::new(),
        cfg.clone(),
        StageSpec::full(cfg),
        args.seed,
    )?;
    let tok = builtin_tokenizer(cfg.vocab_size)?;
    m.v_live = (tok.vocab_size() as usize).clamp(1, cfg.vocab_size as usize);
    Ok(m)
}

/// Forward and backward on the next batch of `data` (gradients accumulate); the loss.
fn accumulate(
    model: &mut Model<CpuBackend>,
    data: &mut DataLoader,
    micro: u64,
) -> anyhow::Result<f32> {
    let b = data.next_batch()?;
    let loss = model
        .forward(
            micro,
            b.batch,
            b.seq,
            StageInput::Ids(&b.input_ids),
            Some(&b.labels),
        )?
        .ok_or_else(|| anyhow::anyhow!("no loss"))?;
    model.backward(micro, None)?;
    Ok(loss)
}

/// Mean loss over the fixed evaluation batches (no update).
fn evaluate(
    model: &mut Model<CpuBackend>,
    eval: &[neuroshard_engine::data::Batch],
) -> anyhow::Result<f64> {
    let mut sum = 0.0f64;
    for (i, b) in eval.iter().enumerate() {
        let loss = model
            .forward(
                1_000_000 + i as u64,
                b.batch,
                b.seq,
                StageInput::Ids(&b.input_ids),
                Some(&b.labels),
            )?
            .ok_or_else(|| anyhow::anyhow!("no loss"))?;
        model.clear_activations();
        sum += f64::from(loss);
    }
    Ok(sum / eval.len().max(1) as f64)
}

fn flat(model: &Model<CpuBackend>) -> anyhow::Result<Vec<Vec<f32>>> {
    (0..model.params.len())
        .map(|i| Ok(model.param_values(i)?))
        .collect()
}

fn write(model: &mut Model<CpuBackend>, theta: &[Vec<f32>]) -> anyhow::Result<()> {
    for (p, t) in model.params.iter_mut().zip(theta) {
        model.be.write(&mut p.value, t)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = ModelConfig::preset(&args.model)?;
    let encoding = Encoding::parse(&args.encoding)
        .ok_or_else(|| {
            anyhow::anyhow!("unknown encoding {:?} ({})", args.encoding, Encoding::NAMES)
        })?
        .with_topk(TopK::new(args.topk_ratio, args.topk_bits)?);
    let kind = AggregatorKind::ALL
        .into_iter()
        .find(|k| k.name() == args.aggregator)
        .ok_or_else(|| anyhow::anyhow!("unknown aggregator {:?}", args.aggregator))?;
    let aggregator = Aggregator::new(kind);
    let opt = OptimConfig {
        lr: args.lr,
        ..OptimConfig::default()
    };
    let n = args.replicas.max(1);
    let steps = args.rounds * args.h;
    let tokens_per_step = (args.batch * args.seq) as u64;
    let mut ev = loader(&args, &cfg, "diloco-bench-eval")?;
    let eval: Vec<_> = (0..args.eval_batches)
        .map(|_| ev.next_batch())
        .collect::<Result<_, _>>()?;
    let ids: Vec<String> = (0..n)
        .map(|i| format!("diloco-bench-replica-{i}"))
        .collect();

    // DiLoCo.
    let t0 = Instant::now();
    let mut reps: Vec<Replica> = Vec::with_capacity(n);
    for id in &ids {
        let model = model(&args, &cfg)?;
        let adam = AdamState::new(&model)?;
        reps.push(Replica {
            model,
            adam,
            data: loader(&args, &cfg, id)?,
        });
    }
    let initial_loss = evaluate(&mut reps[0].model, &eval)?;
    let mut theta = flat(&reps[0].model)?;
    let sizes: Vec<usize> = theta.iter().map(Vec::len).collect();
    let params: usize = sizes.iter().sum();
    let mut momentum: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut residuals: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); sizes.len()]; n];
    let outer = OuterOpt {
        lr: args.outer_lr,
        momentum: args.outer_momentum,
    };
    let mut diloco_bytes = 0u64;
    let mut micro = 0u64;
    for _round in 0..args.rounds {
        let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(n);
        for (r, rep) in reps.iter_mut().enumerate() {
            for _ in 0..args.h {
                micro += 1;
                accumulate(&mut rep.model, &mut rep.data, micro)?;
                rep.adam.step(&mut rep.model, &opt, opt.lr)?;
            }
            let local = flat(&rep.model)?;
            let mut decoded = Vec::with_capacity(params);
            let mut wire = 0u64;
            for (i, (start, now)) in theta.iter().zip(&local).enumerate() {
                let delta: Vec<f32> = start.iter().zip(now).map(|(a, b)| a - b).collect();
                let bytes = compress::encode(encoding, &delta, &mut residuals[r][i]);
                wire += bytes.len() as u64;
                decoded.extend(compress::decode(encoding, &bytes, delta.len())?);
            }
            // Pushed to every other replica.
            diloco_bytes += wire * (n as u64 - 1);
            deltas.push(decoded);
        }
        let inputs: Vec<Input<'_>> = deltas
            .iter()
            .map(|d| Input {
                values: d,
                weight: args.h as f32,
            })
            .collect();
        let agg = aggregator.aggregate(&inputs)?;
        let mut off = 0;
        for (t, m) in theta.iter_mut().zip(momentum.iter_mut()) {
            let d = &agg[off..off + t.len()];
            off += t.len();
            *t = outer.step(t, d, m);
        }
        for rep in &mut reps {
            write(&mut rep.model, &theta)?;
        }
    }
    let diloco_loss = evaluate(&mut reps[0].model, &eval)?;
    let diloco_s = t0.elapsed().as_secs_f64();
    drop(reps);

    // Fully synchronous data parallelism on the same budget.
    let t0 = Instant::now();
    let mut model = model(&args, &cfg)?;
    let mut adam = AdamState::new(&model)?;
    let mut data: Vec<DataLoader> = ids
        .iter()
        .map(|id| loader(&args, &cfg, id))
        .collect::<Result<_, _>>()?;
    // Gradients all-reduced in this encoding, bf16 for topk (a per-step all-reduce of
    // top-k gradients is not the baseline).
    let sync_encoding = match encoding {
        Encoding::Topk(_) => Encoding::Bf16,
        e => e,
    };
    let grad_bytes = sizes
        .iter()
        .map(|&s| sync_encoding.encoded_len(s) as u64)
        .sum::<u64>();
    let sync_steps = if args.skip_sync { 0 } else { steps };
    let mut sync_bytes = 0u64;
    for _ in 0..sync_steps {
        for d in &mut data {
            micro += 1;
            accumulate(&mut model, d, micro)?;
        }
        adam.step(&mut model, &opt, opt.lr)?;
    }
    sync_bytes += grad_bytes * n as u64 * (n as u64 - 1) * steps as u64;
    let sync_loss = if args.skip_sync {
        f64::NAN
    } else {
        evaluate(&mut model, &eval)?
    };
    let sync_s = t0.elapsed().as_secs_f64();

    let tokens = steps as u64 * n as u64 * tokens_per_step;
    let out = serde_json::json!({
        "model": args.model,
        "params": params,
        "replicas": n,
        "h": args.h,
        "rounds": args.rounds,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "encoding": encoding.name(),
        "topk_ratio": matches!(encoding, Encoding::Topk(_)).then_some(args.topk_ratio),
        "topk_bits": matches!(encoding, Encoding::Topk(_)).then_some(args.topk_bits),
        "aggregator": kind.name(),
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "tokens": tokens,
        "initial_eval_loss": initial_loss,
        "diloco_eval_loss": diloco_loss,
        "sync_eval_loss": sync_loss,
        "diloco_bytes": diloco_bytes,
        "sync_bytes": sync_bytes,
        "diloco_bytes_per_token": diloco_bytes as f64 / tokens as f64,
        "sync_bytes_per_token": sync_bytes as f64 / tokens as f64,
        "diloco_s": diloco_s,
        "sync_s": sync_s,
    });
    println!("{out}");
    println!(
        "{} ({params} params), {n} replicas, {tokens} tokens: DiLoCo (H = {}, {}) loss {initial_loss:.3} -> {diloco_loss:.3}, \
         {:.1} bytes/token; synchronous loss {sync_loss:.3}, {:.1} bytes/token ({:.0}x more)",
        args.model,
        args.h,
        kind.name(),
        diloco_bytes as f64 / tokens as f64,
        sync_bytes as f64 / tokens as f64,
        sync_bytes as f64 / diloco_bytes.max(1) as f64
    );
    Ok(())
}
