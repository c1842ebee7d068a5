//! The trained model out, in the formats people run:
//!
//! - the Hugging Face Llama layout: `config.json` (`LlamaForCausalLM`), `model.safetensors`
//!   with the Llama tensor names and `tokenizer.json`, so that
//!   `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads a NeuroShard model unchanged;
//! - a GGUF file for llama.cpp ([`gguf`]).
//!
//! Both are written from [`FullWeights`]: every parameter of the model on the host, gathered
//! from the engine's own stage and, on a node holding only some layers, from checkpoints of the
//! other stages (fetched from their holders by the daemon and hash-checked before use).
//!
//! Layout conventions (why this is a plain copy and no permutation is needed):
//! - Linear weights are [out, in] like `torch.nn.Linear.weight`; our matmul computes
//!   `x @ W^T`, exactly `F.linear(x, W)`.
//! - q = x Wq^T is viewed as [B, T, H, D] (head-major columns), as `LlamaAttention` does with
//!   `view(bsz, q_len, num_heads, head_dim)`; k and v likewise with KVH heads.
//! - RoPE is rotate-half with pairs (i, i + D/2) and inverse frequency theta^(-2i/D), which is
//!   `apply_rotary_pos_emb` / `rotate_half` of transformers. Meta's original checkpoints are
//!   interleaved and get permuted by the HF conversion script; ours are natively rotate-half,
//!   so the export must NOT permute q_proj/k_proj.
//! - GQA: query head h reads kv head h / (H / KVH), as `repeat_kv`.
//! - RMSNorm: x * rsqrt(mean(x^2) + eps) * weight with eps 1e-6, computed in f32.
//! - MLP: down(silu(gate(x)) * up(x)); no biases anywhere; embedding and head untied.
//!
//! One difference: our head masks logits at or above the tokenizer's live vocabulary; the
//! exported `vocab_size` is the full (padded) table size and transformers does not mask, which
//! only matters for ids the tokenizer never produces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::tokenizer::{BOS_ID, EOS_ID, PAD_ID, Tokenizer, UNK_ID};

use crate::backend::Backend;
use crate::checkpoint::{self, CheckpointError, TensorFile};
use crate::model::params::ModelHasher;
use crate::model::{Model, ModelError, StageSpec};

pub mod gguf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "the export needs every layer: no source holds {missing} (this node holds a stage; \
         the other stages' weights must come from their holders)"
    )]
    Missing { missing: String },
    #[error("{path:?} holds tensor {name} with shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("cannot write {path:?}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Every parameter of the full model on the host, in canonical order (that of
/// [`checkpoint::stage_names`] for the full stage, which `Model::hash` walks).
pub struct FullWeights {
    pub cfg: ModelConfig,
    /// (name, shape, values).
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// The optimizer step of the exporting stage.
    pub step: u64,
}

impl FullWeights {
    /// The model hash of the full model (what `ModelHash` answers on a node holding it all).
    pub fn hash(&self) -> String {
        let mut h = ModelHasher::default();
        for (name, shape, values) in &self.tensors {
            h.update(name, shape, values);
        }
        h.hex()
    }

    /// The values and shape of tensor `name` (every name of the full model is present).
    pub fn get(&self, name: &str) -> (&[usize], &[f32]) {
        let (_, shape, values) = self
            .tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .expect("a full model holds every parameter name");
        (shape, values)
    }

    /// Bytes of all the values.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.2.len() as u64 * 4).sum()
    }
}

/// The expected shape of every parameter of the full model, in canonical order.
fn full_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    use crate::model::params::{EMBED, FINAL_NORM, LM_HEAD, layer_specs};
    let (c, v) = (cfg.hidden as usize, cfg.vocab_size as usize);
    let mut out = vec![(EMBED.to_string(), vec![v, c])];
    for l in 0..cfg.layers {
        out.extend(layer_specs(cfg, l).into_iter().map(|(n, s, _)| (n, s)));
    }
    out.push((FINAL_NORM.to_string(), vec![c]));
    out.push((LM_HEAD.to_string(), vec![v, c]));
    out
}

/// Gathers the full model: each parameter from `model` when it holds it, else from the first
/// of `sources` (verified checkpoint files of other stages) that has it with the right shape.
/// A parameter no one holds is an error naming the first few.
pub fn gather<B: Backend>(
    model: &Model<B>,
    step: u64,
    sources: &[(&TensorFile, &Path)],
) -> Result<FullWeights, ExportError> {
    let cfg = model.cfg.clone();
    debug_assert_eq!(
        checkpoint::stage_names(&cfg, &StageSpec::full(&cfg)),
        full_shapes(&cfg)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    );
    let mut tensors = Vec::new();
    let mut missing = Vec::new();
    for (name, shape) in full_shapes(&cfg) {
        if let Some(p) = model.params.iter().find(|p| p.name == name) {
            let mut values = vec![0.0; p.numel()];
            match model.be.host_view(&p.value) {
                Some(v) => values.copy_from_slice(v),
                None => model
                    .be
                    .download(&p.value, &mut values)
                    .map_err(ModelError::from)?,
            }
            tensors.push((name, shape, values));
            continue;
        }
        let Some((file, path)) = sources.iter().find(|(f, _)| f.tensors.contains_key(&name)) else {
            missing.push(name);
            continue;
        };
        let (got, values) = &file.tensors[&name];
        if got != &shape {
            return Err(ExportError::Shape {
                path: path.to_path_buf(),
                name,
                got: got.clone(),
                expected: shape,
            });
        }
        tensors.push((name, shape, values.clone()));
    }
    if !missing.is_empty() {
        let mut listed = missing
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if missing.len() > 3 {
            listed.push_str(&format!(" and {} more", missing.len() - 3));
        }
        return Err(ExportError::Missing { missing: listed });
    }
    Ok(FullWeights { cfg, tensors, step })
}

/// The `config.json` of the Llama export.
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim(),
        "num_hidden_layers": cfg.layers,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": crate::model::params::INIT_STD,
        "torch_dtype": "float32",
        "use_cache": true,
    })
}

/// Writes `dir/config.json`, `dir/model.safetensors` and (when given) `dir/tokenizer.json` and
/// `dir/tokenizer_config.json` of the full model; returns the bytes of the weights file.
pub fn write_hf_llama(
    w: &FullWeights,
    dir: &Path,
    tokenizer: Option<&Tokenizer>,
) -> Result<u64, ExportError> {
    std::fs::create_dir_all(dir).map_err(|e| ExportError::Write {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let config = serde_json::to_vec_pretty(&hf_config(&w.cfg)).expect("json value serializes");
    checkpoint::write_bytes_atomic(&dir.join("config.json"), &config)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("model_hash".to_string(), w.hash());
    meta.insert("step".to_string(), w.step.to_string());
    let bytes = checkpoint::save_tensors(&dir.join("model.safetensors"), &w.tensors, meta)?;
    if let Some(tok) = tokenizer {
        let path = dir.join("tokenizer.json");
        checkpoint::write_bytes_atomic(&path, tok.to_json().as_bytes())?;
        let specials = tok.special_tokens();
        let cfgjson = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": specials.get(BOS_ID as usize),
            "eos_token": specials.get(EOS_ID as usize),
            "pad_token": specials.get(PAD_ID as usize),
            "unk_token": specials.get(UNK_ID as usize),
            "model_max_length": w.cfg.max_seq,
        });
        let bytes = serde_json::to_vec_pretty(&cfgjson).expect("json value serializes");
        checkpoint::write_bytes_atomic(&dir.join("tokenizer_config.json"), &bytes)?;
    }
    Ok(bytes)
}

/// The Hugging Face export of a model that holds every layer itself (`dev grad-dump`).
pub fn export_hf_llama<B: Backend>(
    model: &Model<B>,
    dir: &Path,
    tokenizer: Option<&Tokenizer>,
) -> Result<u64, ExportError> {
    write_hf_llama(&gather(model, 0, &[])?, dir, tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::StageSpec;

    #[test]
    fn export_writes_llama_names_and_config() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let m = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes_only();
        export_hf_llama(&m, dir.path(), Some(&tok)).unwrap();
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(conf["architectures"][0], "LlamaForCausalLM");
        assert_eq!(conf["num_key_value_heads"], cfg.kv_heads);
        assert_eq!(conf["tie_word_embeddings"], false);
        let file = checkpoint::read_tensor_file(&dir.path().join("model.safetensors")).unwrap();
        assert_eq!(file.tensors.len(), 2 + 9 * cfg.layers as usize + 1);
        for name in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.1.mlp.down_proj.weight",
        ] {
            assert!(file.tensors.contains_key(name), "{name}");
        }
        assert_eq!(
            file.tensors["model.layers.0.self_attn.k_proj.weight"].0,
            vec![32, 64]
        );
        assert!(dir.path().join("tokenizer.json").exists());
        let spec = StageSpec {
            layer_start: 0,
            layer_end: 1,
            has_embedding: true,
            has_head: false,
        };
        let part = Model::new(CpuBackend::new(), cfg, spec, 3).unwrap();
        assert!(matches!(
            export_hf_llama(&part, dir.path(), None),
            Err(ExportError::Missing { .. })
        ));
    }
}
