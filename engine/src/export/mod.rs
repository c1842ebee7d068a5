//! Export in the Hugging Face Llama layout: `config.json` (`LlamaForCausalLM`),
//! `model.safetensors` with the Llama tensor names and `tokenizer.json`, so that
//! `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads a NeuroShard model unchanged.
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
use neuroshard_shared::tokenizer::{BOS_ID, EOS_ID, PAD_ID, Tokenizer};

use crate::backend::Backend;
use crate::checkpoint::{self, CheckpointError};
use crate::model::Model;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("hf-llama export needs the full model on this node (this node holds a stage)")]
    NotFull,
    #[error("cannot write {path:?}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
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

/// Writes `dir/config.json`, `dir/model.safetensors` and (when given) `dir/tokenizer.json`;
/// returns the bytes of the weights file.
pub fn export_hf_llama<B: Backend>(
    model: &Model<B>,
    dir: &Path,
    tokenizer: Option<&Tokenizer>,
) -> Result<u64, ExportError> {
    if !model.spec.is_full(&model.cfg) {
        return Err(ExportError::NotFull);
    }
    let write_err = |path: &Path, message: String| ExportError::Write {
        path: path.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e.to_string()))?;
    let config = serde_json::to_vec_pretty(&hf_config(&model.cfg)).expect("json value serializes");
    checkpoint::write_bytes_atomic(&dir.join("config.json"), &config)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = checkpoint::save_weights(&dir.join("model.safetensors"), model, meta)?;
    if let Some(tok) = tokenizer {
        let path = dir.join("tokenizer.json");
        checkpoint::write_bytes_atomic(&path, tok.to_json().as_bytes())?;
        let specials = tok.special_tokens();
        let cfgjson = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": specials.get(BOS_ID as usize),
            "eos_token": specials.get(EOS_ID as usize),
            "pad_token": specials.get(PAD_ID as usize),
            "unk_token": specials.get(3),
            "model_max_length": model.cfg.max_seq,
        });
        let bytes = serde_json::to_vec_pretty(&cfgjson).expect("json value serializes");
        checkpoint::write_bytes_atomic(&dir.join("tokenizer_config.json"), &bytes)?;
    }
    Ok(bytes)
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
            Err(ExportError::NotFull)
        ));
    }
}
