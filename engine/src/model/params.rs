//! The parameters a node holds: names, shapes, deterministic initialization and the canonical
//! order used by the model hash, checkpoints and exports.
//!
//! Names are the Hugging Face Llama names (`model.embed_tokens.weight`,
//! `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`),
//! with the same [out, in] layout as `torch.nn.Linear`, so an export is a plain copy.
//!
//! Initial values are a function of (model seed, tensor name) only: every tensor has its own
//! generator seeded from sha256(seed, name), so a node holding layers 3..5 builds exactly the
//! weights a node holding everything builds for those layers.

use neuroshard_shared::model::ModelConfig;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, Dtype, Result};

/// Standard deviation of the N(0, std) initialization of matrices and embeddings.
pub const INIT_STD: f32 = 0.02;

/// One parameter tensor with its gradient.
pub struct Param<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: B::Buf,
    pub grad: B::Buf,
    /// The bf16 copy of `value` that the GEMMs read when the backend computes in bf16 (the
    /// matrices a linear layer multiplies by: not the embedding, not the norms); rewritten
    /// from `value` after every change of it ([`crate::model::Model::refresh_half`]).
    pub half: Option<B::Half>,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Normal,
    Ones,
}

/// The name, shape and initialization of every tensor of one transformer layer, in canonical
/// order.
pub fn layer_specs(cfg: &ModelConfig, layer: u32) -> Vec<(String, Vec<usize>, Init)> {
    let c = cfg.hidden as usize;
    let kv = (cfg.kv_heads * cfg.head_dim()) as usize;
    let f = cfg.ffn as usize;
    let p = format!("model.layers.{layer}");
    vec![
        (format!("{p}.input_layernorm.weight"), vec![c], Init::Ones),
        (
            format!("{p}.self_attn.q_proj.weight"),
            vec![c, c],
            Init::Normal,
        ),
        (
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, c],
            Init::Normal,
        ),
        (
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, c],
            Init::Normal,
        ),
        (
            format!("{p}.self_attn.o_proj.weight"),
            vec![c, c],
            Init::Normal,
        ),
        (
            format!("{p}.post_attention_layernorm.weight"),
            vec![c],
            Init::Ones,
        ),
        (
            format!("{p}.mlp.gate_proj.weight"),
            vec![f, c],
            Init::Normal,
        ),
        (format!("{p}.mlp.up_proj.weight"), vec![f, c], Init::Normal),
        (
            format!("{p}.mlp.down_proj.weight"),
            vec![c, f],
            Init::Normal,
        ),
    ]
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The initial values of tensor `name`: N(0, INIT_STD) or ones.
pub fn init_values(seed: u64, name: &str, numel: usize, init: Init) -> Vec<f32> {
    match init {
        Init::Ones => vec![1.0; numel],
        Init::Normal => {
            let mut h = Sha256::new();
            h.update(b"neuroshard-init-v1\0");
            h.update(seed.to_le_bytes());
            h.update(name.as_bytes());
            let d = h.finalize();
            let mut rng = SplitMix64(u64::from_le_bytes(
                d[..8].try_into().expect("32-byte digest"),
            ));
            let mut out = Vec::with_capacity(numel);
            while out.len() < numel {
                let (a, b) = rng.normal_pair();
                out.push(a * INIT_STD);
                if out.len() < numel {
                    out.push(b * INIT_STD);
                }
            }
            out
        }
    }
}

/// Builds a parameter (value and zeroed gradient) on the backend.
pub fn make_param<B: Backend>(
    be: &B,
    seed: u64,
    name: String,
    shape: Vec<usize>,
    init: Init,
) -> Result<Param<B>> {
    let numel: usize = shape.iter().product();
    let values = init_values(seed, &name, numel, init);
    let value = be.upload(&values)?;
    let half = if be.compute_dtype() == Dtype::Bf16 && shape.len() == 2 && name != EMBED {
        let mut h = be.zeros_half(numel)?;
        be.to_half(&mut h, &value)?;
        Some(h)
    } else {
        None
    };
    Ok(Param {
        value,
        grad: be.zeros(numel)?,
        half,
        name,
        shape,
    })
}

/// splitmix64: tiny, fast and fixed forever, so initial weights never change with a library
/// version.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box-Muller, computed in f64).
    pub fn normal_pair(&mut self) -> (f32, f32) {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        ((r * a.cos()) as f32, (r * a.sin()) as f32)
    }
}

/// sha256 over tensors in the given order: for each, the name length (u64 LE), the name, the
/// number of dimensions (u64 LE), each dimension (u64 LE) and the values as f32 LE bytes.
pub struct ModelHasher(Sha256);

impl Default for ModelHasher {
    fn default() -> Self {
        ModelHasher(Sha256::new())
    }
}

impl ModelHasher {
    pub fn update(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            self.0.update((d as u64).to_le_bytes());
        }
        self.0.update(f32_bytes(values));
    }

    pub fn hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The little-endian bytes of an f32 slice (the machine is little-endian: checked at build).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    const _: () = assert!(
        cfg!(target_endian = "little"),
        "neuroshard assumes a little-endian host"
    );
    bytemuck::cast_slice(v)
}

/// f32 values from little-endian bytes (`bytes.len()` a multiple of 4).
pub fn f32_from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_depends_only_on_seed_and_name() {
        let a = init_values(7, "model.layers.3.mlp.up_proj.weight", 1001, Init::Normal);
        let b = init_values(7, "model.layers.3.mlp.up_proj.weight", 1001, Init::Normal);
        let c = init_values(8, "model.layers.3.mlp.up_proj.weight", 1001, Init::Normal);
        let d = init_values(7, "model.layers.4.mlp.up_proj.weight", 1001, Init::Normal);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.len(), 1001);
    }

    #[test]
    fn init_has_the_right_statistics() {
        let v = init_values(1, "x", 200_000, Init::Normal);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 2e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "{}", var.sqrt());
        assert_eq!(init_values(1, "n", 3, Init::Ones), vec![1.0; 3]);
    }

    #[test]
    fn hash_covers_names_shapes_and_values() {
        let h = |name: &str, shape: &[usize], v: &[f32]| {
            let mut m = ModelHasher::default();
            m.update(name, shape, v);
            m.hex()
        };
        let base = h("a", &[2], &[1.0, 2.0]);
        assert_eq!(base, h("a", &[2], &[1.0, 2.0]));
        assert_ne!(base, h("b", &[2], &[1.0, 2.0]));
        assert_ne!(base, h("a", &[1, 2], &[1.0, 2.0]));
        assert_ne!(base, h("a", &[2], &[1.0, 2.5]));
    }
}
