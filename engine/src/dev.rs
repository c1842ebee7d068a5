//! `neuroshard-engine grad-dump`: one forward + backward of a full model on a deterministic
//! batch, written out for an independent check (`engine/tests/grad_check.py`):
//!
//! - `DIR/model/`: the Hugging Face Llama export (config.json, model.safetensors,
//!   tokenizer.json)
//! - `DIR/batch.safetensors`: `input_ids` and `labels`, int32 [B, T]
//! - `DIR/grads.safetensors`: the gradient of the mean loss w.r.t. every parameter, same names
//! - `DIR/loss.json`: `{"loss", "batch", "seq", "v_live", "seed", "model"}`

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};

use crate::backend::cpu::CpuBackend;
use crate::checkpoint::write_bytes_atomic;
use crate::data::builtin_tokenizer;
use crate::export::export_hf_llama;
use crate::model::params::{SplitMix64, f32_bytes};
use crate::model::{Model, StageInput, StageSpec};

#[derive(clap::Args, Debug, Clone)]
pub struct GradDumpArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Model (and batch) seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences in the batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 16)]
    pub seq: usize,
}

struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

impl View for Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_st(path: &Path, tensors: Vec<(String, Raw<'_>)>) -> anyhow::Result<()> {
    let bytes = safetensors::serialize(tensors, None)?;
    write_bytes_atomic(path, &bytes)?;
    Ok(())
}

/// Runs the dump; returns the loss.
pub fn grad_dump(args: &GradDumpArgs) -> anyhow::Result<f32> {
    let cfg = neuroshard_shared::model::ModelConfig::preset(&args.model)?;
    anyhow::ensure!(
        args.batch > 0 && args.seq > 0,
        "batch and seq must be positive"
    );
    anyhow::ensure!(
        args.seq <= cfg.max_seq as usize,
        "seq {} exceeds max_seq {}",
        args.seq,
        cfg.max_seq
    );
    let mut model = Model::new(
        CpuBackend::new(),
        cfg.clone(),
        StageSpec::full(&cfg),
        args.seed,
    )?;
    let (b, t) = (args.batch, args.seq);
    // Ids drawn over the whole vocabulary (not only what a tokenizer emits), so every row of
    // the embedding and head can take part.
    let mut rng = SplitMix64(args.seed ^ 0x6261_7463_6800_0000);
    let stream: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let mut ids = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b * t);
    for r in 0..b {
        ids.extend_from_slice(&stream[r * (t + 1)..r * (t + 1) + t]);
        labels.extend_from_slice(&stream[r * (t + 1) + 1..(r + 1) * (t + 1)]);
    }
    let loss = model
        .forward(0, b, t, StageInput::Ids(&ids), Some(&labels))?
        .ok_or_else(|| anyhow::anyhow!("no loss from the head"))?;
    model.backward(0, None)?;

    std::fs::create_dir_all(&args.out)?;
    let tok = builtin_tokenizer(cfg.vocab_size)?;
    export_hf_llama(&model, &args.out.join("model"), Some(&tok))?;
    let as_i32 =
        |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect() };
    write_st(
        &args.out.join("batch.safetensors"),
        vec![
            (
                "input_ids".into(),
                Raw {
                    dtype: Dtype::I32,
                    shape: vec![b, t],
                    bytes: Cow::Owned(as_i32(&ids)),
                },
            ),
            (
                "labels".into(),
                Raw {
                    dtype: Dtype::I32,
                    shape: vec![b, t],
                    bytes: Cow::Owned(as_i32(&labels)),
                },
            ),
        ],
    )?;
    let grads: Vec<Vec<f32>> = (0..model.params.len())
        .map(|i| model.param_grad(i))
        .collect::<Result<_, _>>()?;
    let tensors = model
        .params
        .iter()
        .zip(&grads)
        .map(|(p, g)| {
            (
                p.name.clone(),
                Raw {
                    dtype: Dtype::F32,
                    shape: p.shape.clone(),
                    bytes: Cow::Borrowed(f32_bytes(g)),
                },
            )
        })
        .collect();
    write_st(&args.out.join("grads.safetensors"), tensors)?;
    let info = serde_json::json!({
        "loss": loss,
        "batch": b,
        "seq": t,
        "v_live": model.v_live,
        "seed": args.seed,
        "model": args.model,
    });
    write_bytes_atomic(
        &args.out.join("loss.json"),
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    Ok(loss)
}
