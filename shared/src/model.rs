//! NeuroLLM shapes: the hyperparameters both processes agree on, and the named presets.

use serde::{Deserialize, Serialize};

/// Hyperparameters of the decoder-only transformer (pre-norm RMSNorm, RoPE, GQA, SwiGLU,
/// no biases, untied embedding and LM head, final RMSNorm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: u32,
    pub hidden: u32,
    pub layers: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub ffn: u32,
    pub max_seq: u32,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    #[error("unknown model preset {0:?} (known: tiny, default, bench, gpt2-small)")]
    UnknownPreset(String),
    #[error("invalid model shape: {0}")]
    Invalid(String),
}

impl ModelConfig {
    /// Looks a preset up by name.
    pub fn preset(name: &str) -> Result<ModelConfig, ModelConfigError> {
        let base = ModelConfig {
            vocab_size: 512,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 176,
            max_seq: 128,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
        };
        let cfg = match name {
            // For tests: fast enough for finite differences.
            "tiny" => base,
            // What `neuroshard start` trains out of the box on two cores.
            "default" => ModelConfig {
                vocab_size: 2048,
                hidden: 192,
                layers: 4,
                heads: 6,
                kv_heads: 2,
                ffn: 512,
                max_seq: 256,
                ..base
            },
            // The original's default shape (at sequence 256 for benchmarks).
            "bench" => ModelConfig {
                vocab_size: 8192,
                hidden: 512,
                layers: 11,
                heads: 16,
                kv_heads: 4,
                ffn: 2048,
                max_seq: 2048,
                ..base
            },
            // GPT-2-small sized (about 124M parameters), for GPU benchmarks.
            "gpt2-small" => ModelConfig {
                vocab_size: 32768,
                hidden: 768,
                layers: 12,
                heads: 12,
                kv_heads: 4,
                ffn: 2048,
                max_seq: 1024,
                ..base
            },
            other => return Err(ModelConfigError::UnknownPreset(other.to_string())),
        };
        Ok(cfg)
    }

    pub fn head_dim(&self) -> u32 {
        self.hidden / self.heads.max(1)
    }

    /// Checks the shape is one the engine can build.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        let bad = |m: String| Err(ModelConfigError::Invalid(m));
        if self.vocab_size < 266 {
            return bad(format!(
                "vocab_size {} < 266 (10 special ids + 256 bytes)",
                self.vocab_size
            ));
        }
        if self.hidden == 0
            || self.layers == 0
            || self.heads == 0
            || self.kv_heads == 0
            || self.ffn == 0
        {
            return bad("hidden, layers, heads, kv_heads and ffn must be positive".into());
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return bad(format!(
                "hidden {} not divisible by heads {}",
                self.hidden, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads {} not divisible by kv_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.max_seq == 0 {
            return bad("max_seq must be positive".into());
        }
        Ok(())
    }

    /// Parameters of one transformer layer: attention (q, k, v, o), SwiGLU (gate, up, down)
    /// and two RMSNorm weights.
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden as u64;
        let kv = (self.kv_heads * self.head_dim()) as u64;
        let ffn = self.ffn as u64;
        h * h * 2 + h * kv * 2 + 3 * h * ffn + 2 * h
    }

    /// Parameters of the embedding table, or of the LM head (untied, same size).
    pub fn embedding_params(&self) -> u64 {
        self.vocab_size as u64 * self.hidden as u64
    }

    /// All parameters: embedding, layers, final norm and LM head.
    pub fn total_params(&self) -> u64 {
        2 * self.embedding_params() + self.layers as u64 * self.layer_params() + self.hidden as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in ["tiny", "default", "bench", "gpt2-small"] {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        assert!(ModelConfig::preset("huge").is_err());
    }

    #[test]
    fn gpt2_small_is_about_124m() {
        let p = ModelConfig::preset("gpt2-small").unwrap().total_params();
        assert!((110_000_000..140_000_000).contains(&p), "{p}");
    }
}
