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
use neuroshard::diloco::streaming::{Partition, Schedule, Settings as StreamingSettings, State};
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
    /// Streaming DiLoCo: fragments of the model synced at staggered times (P); with 1 and
    /// `--overlap 0` only plain DiLoCo runs, else both on the same budget.
    #[arg(long, default_value_t = 1)]
    fragments: u32,
    /// Streaming DiLoCo: inner steps a fragment's exchange overlaps (τ) before its aggregate
    /// is merged.
    #[arg(long, default_value_t = 0)]
    overlap: u32,
    /// Streaming DiLoCo: the local share kept by the merge (α; applied when τ > 0).
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
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

/// What a DiLoCo run (plain or streaming) ends with.
struct Run {
    /// Eval loss on the agreed weights after the whole budget.
    loss: f64,
    /// The agreed weights, one vector per parameter (compared by the test below).
    #[cfg_attr(not(test), allow(dead_code))]
    theta: Vec<Vec<f32>>,
    /// Bytes all replicas sent.
    bytes: u64,
    /// Most bytes one replica sent at one sync point (all its fragments due then, to every
    /// other replica).
    peak: u64,
    seconds: f64,
}

/// The shared set-up of both DiLoCo runs.
struct Setup<'a> {
    args: &'a Args,
    cfg: &'a ModelConfig,
    encoding: Encoding,
    aggregator: Aggregator,
    opt: OptimConfig,
    outer: OuterOpt,
    ids: &'a [String],
    eval: &'a [neuroshard_engine::data::Batch],
}

impl Setup<'_> {
    fn replicas(&self) -> anyhow::Result<Vec<Replica>> {
        self.ids
            .iter()
            .map(|id| {
                let model = model(self.args, self.cfg)?;
                let adam = AdamState::new(&model)?;
                Ok(Replica {
                    model,
                    adam,
                    data: loader(self.args, self.cfg, id)?,
                })
            })
            .collect()
    }

    fn aggregate(&self, deltas: &[Vec<f32>]) -> anyhow::Result<Vec<f32>> {
        let inputs: Vec<Input<'_>> = deltas
            .iter()
            .map(|d| Input {
                values: d,
                weight: self.args.h as f32,
            })
            .collect();
        Ok(self.aggregator.aggregate(&inputs)?)
    }

    /// Plain DiLoCo: every replica takes H inner steps, then the whole model is exchanged.
    fn plain(&self) -> anyhow::Result<Run> {
        let (args, encoding, opt) = (self.args, self.encoding, &self.opt);
        let t0 = Instant::now();
        let mut reps = self.replicas()?;
        let n = reps.len();
        let mut theta = flat(&reps[0].model)?;
        let sizes: Vec<usize> = theta.iter().map(Vec::len).collect();
        let params: usize = sizes.iter().sum();
        let mut momentum: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
        let mut residuals: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); sizes.len()]; n];
        let (mut bytes, mut peak) = (0u64, 0u64);
        let mut micro = 0u64;
        for _round in 0..args.rounds {
            let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(n);
            for (r, rep) in reps.iter_mut().enumerate() {
                for _ in 0..args.h {
                    micro += 1;
                    accumulate(&mut rep.model, &mut rep.data, micro)?;
                    rep.adam.step(&mut rep.model, opt, opt.lr)?;
                }
                let local = flat(&rep.model)?;
                let mut decoded = Vec::with_capacity(params);
                let mut wire = 0u64;
                for (i, (start, now)) in theta.iter().zip(&local).enumerate() {
                    let delta: Vec<f32> = start.iter().zip(now).map(|(a, b)| a - b).collect();
                    let b = compress::encode(encoding, &delta, &mut residuals[r][i]);
                    wire += b.len() as u64;
                    decoded.extend(compress::decode(encoding, &b, delta.len())?);
                }
                // Pushed to every other replica.
                bytes += wire * (n as u64 - 1);
                peak = peak.max(wire * (n as u64 - 1));
                deltas.push(decoded);
            }
            let agg = self.aggregate(&deltas)?;
            let mut off = 0;
            for (t, m) in theta.iter_mut().zip(momentum.iter_mut()) {
                let d = &agg[off..off + t.len()];
                off += t.len();
                *t = self.outer.step(t, d, m);
            }
            for rep in &mut reps {
                write(&mut rep.model, &theta)?;
            }
        }
        let loss = evaluate(&mut reps[0].model, self.eval)?;
        Ok(Run {
            loss,
            theta,
            bytes,
            peak,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Streaming DiLoCo (`neuroshard::diloco::streaming`): every replica steps once per
    /// global step; the fragments due send, and the aggregate of a fragment sent τ steps
    /// earlier is applied (outer step, merge into each replica's local weights).
    fn streaming(&self, settings: StreamingSettings) -> anyhow::Result<Run> {
        let (args, opt) = (self.args, &self.opt);
        let t0 = Instant::now();
        let mut reps = self.replicas()?;
        let n = reps.len();
        let names: Vec<String> = reps[0]
            .model
            .params
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let partition = Partition::new(&names, settings.fragments)?;
        let schedule = Schedule::new(u32::try_from(args.h)?, &settings)?;
        let alpha = schedule.alpha(settings.alpha);
        let theta = flat(&reps[0].model)?;
        let mut states: Vec<State> = (0..n)
            .map(|_| State::new(partition.clone(), theta.clone()))
            .collect::<Result<_, _>>()?;
        // Decoded contributions in flight, by fragment.
        let mut in_flight: Vec<Option<Vec<Vec<f32>>>> = vec![None; settings.fragments as usize];
        let (mut bytes, mut peak) = (0u64, 0u64);
        let mut micro = 0u64;
        let steps = (args.rounds * args.h) as u64;
        for step in 1..=steps {
            for rep in &mut reps {
                micro += 1;
                accumulate(&mut rep.model, &mut rep.data, micro)?;
                rep.adam.step(&mut rep.model, opt, opt.lr)?;
            }
            let sends = schedule.sends_after(step);
            if !sends.is_empty() {
                let mut sent = vec![0u64; n];
                let locals: Vec<Vec<Vec<f32>>> = reps
                    .iter()
                    .map(|r| flat(&r.model))
                    .collect::<Result<_, _>>()?;
                for p in sends {
                    let mut deltas = Vec::with_capacity(n);
                    for (r, (state, local)) in states.iter_mut().zip(&locals).enumerate() {
                        let e = state.encode(p, local, self.encoding, 1.0)?;
                        sent[r] += e.bytes() * (n as u64 - 1);
                        deltas.push(e.decoded);
                    }
                    in_flight[p as usize] = Some(deltas);
                }
                bytes += sent.iter().sum::<u64>();
                peak = peak.max(sent.into_iter().max().unwrap_or(0));
            }
            for p in schedule.merges_after(step) {
                let deltas = in_flight[p as usize]
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("fragment {p} merged but never sent"))?;
                let agg = self.aggregate(&deltas)?;
                for (state, rep) in states.iter_mut().zip(reps.iter_mut()) {
                    state.outer_step(p, &agg, self.outer)?;
                    let mut local = flat(&rep.model)?;
                    state.merge(p, &mut local, alpha)?;
                    for i in partition.tensors(p) {
                        rep.model
                            .be
                            .write(&mut rep.model.params[i].value, &local[i])?;
                    }
                }
            }
        }
        // Exchanges still in flight at the end of the budget complete: their outer steps
        // count (no inner step follows, so there is nothing to merge).
        for (p, deltas) in in_flight.into_iter().enumerate() {
            if let Some(deltas) = deltas {
                let agg = self.aggregate(&deltas)?;
                for state in &mut states {
                    state.outer_step(u32::try_from(p)?, &agg, self.outer)?;
                }
            }
        }
        // The replicas agree on the global weights; the loss is measured there.
        for s in &states[1..] {
            anyhow::ensure!(s.global == states[0].global, "replicas disagree");
        }
        let theta = states.swap_remove(0).global;
        write(&mut reps[0].model, &theta)?;
        let loss = evaluate(&mut reps[0].model, self.eval)?;
        Ok(Run {
            loss,
            theta,
            bytes,
            peak,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
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

    let outer = OuterOpt {
        lr: args.outer_lr,
        momentum: args.outer_momentum,
    };
    let setup = Setup {
        args: &args,
        cfg: &cfg,
        encoding,
        aggregator,
        opt,
        outer,
        ids: &ids,
        eval: &eval,
    };
    let initial_loss = evaluate(&mut model(&args, &cfg)?, &eval)?;
    let sizes: Vec<usize> = flat(&model(&args, &cfg)?)?.iter().map(Vec::len).collect();
    let params: usize = sizes.iter().sum();
    let plain = setup.plain()?;
    let streaming = StreamingSettings {
        fragments: args.fragments,
        overlap: args.overlap,
        alpha: args.alpha,
    };
    let stream = match streaming == StreamingSettings::default() {
        true => None,
        false => Some(setup.streaming(streaming)?),
    };
    let (diloco_loss, diloco_bytes, diloco_s) = (plain.loss, plain.bytes, plain.seconds);
    let mut micro = 0u64;

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
        "diloco_peak_bytes_per_sync": plain.peak,
        "sync_s": sync_s,
        "fragments": args.fragments,
        "overlap": args.overlap,
        "alpha": args.alpha,
        "streaming_eval_loss": stream.as_ref().map(|r| r.loss),
        "streaming_bytes": stream.as_ref().map(|r| r.bytes),
        "streaming_bytes_per_token": stream.as_ref().map(|r| r.bytes as f64 / tokens as f64),
        "streaming_peak_bytes_per_sync": stream.as_ref().map(|r| r.peak),
        "streaming_s": stream.as_ref().map(|r| r.seconds),
    });
    println!("{out}");
    if let Some(r) = &stream {
        println!(
            "streaming DiLoCo (P = {}, overlap {}, alpha {}): loss {:.3} (plain {diloco_loss:.3}), {:.1} bytes/token \
             (plain {:.1}), peak {} bytes per sync (plain {}, {:.2}x lower)",
            args.fragments,
            args.overlap,
            args.alpha,
            r.loss,
            r.bytes as f64 / tokens as f64,
            diloco_bytes as f64 / tokens as f64,
            r.peak,
            plain.peak,
            plain.peak as f64 / r.peak.max(1) as f64
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On the engine's real model, streaming DiLoCo with one fragment and no overlap is the
    /// plain DiLoCo run, bit for bit (weights, loss and bytes).
    #[test]
    fn one_fragment_without_overlap_is_plain_diloco_on_the_real_model() {
        let args = Args::parse_from([
            "diloco_bench",
            "--h",
            "3",
            "--rounds",
            "2",
            "--encoding",
            "int8",
        ]);
        let cfg = ModelConfig::preset(&args.model).unwrap();
        let mut ev = loader(&args, &cfg, "diloco-bench-eval").unwrap();
        let eval = vec![ev.next_batch().unwrap()];
        let ids: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
        let setup = Setup {
            args: &args,
            cfg: &cfg,
            encoding: Encoding::Int8,
            aggregator: Aggregator::new(AggregatorKind::TrimmedMean),
            opt: OptimConfig {
                lr: args.lr,
                ..OptimConfig::default()
            },
            outer: OuterOpt::default(),
            ids: &ids,
            eval: &eval,
        };
        let plain = setup.plain().unwrap();
        let stream = setup.streaming(StreamingSettings::default()).unwrap();
        let bits =
            |t: &[Vec<f32>]| -> Vec<u32> { t.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&stream.theta), bits(&plain.theta));
        assert_eq!(stream.loss.to_bits(), plain.loss.to_bits());
        assert_eq!((stream.bytes, stream.peak), (plain.bytes, plain.peak));
        // Two fragments halve the peak and keep the total (int8: one scale per tensor).
        let two = setup
            .streaming(StreamingSettings {
                fragments: 2,
                overlap: 1,
                alpha: 0.5,
            })
            .unwrap();
        assert_eq!(two.bytes, plain.bytes);
        assert!(
            two.peak < plain.peak * 6 / 10,
            "{} vs {}",
            two.peak,
            plain.peak
        );
        assert!(two.loss < plain.loss + 0.5 && two.loss.is_finite());
    }
}
