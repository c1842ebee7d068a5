//! A GGUF file (version 3) of the full model for llama.cpp: architecture `llama`, every tensor
//! in f32 (`general.file_type` 0, "ALL_F32"), the tokenizer in the metadata as llama.cpp's
//! `gpt2` (byte-level BPE) tokenizer model with GPT-2's pre-tokenizer, which is what ours is
//! (`shared/src/tokenizer.rs`).
//!
//! The file: magic `GGUF`, version, tensor count, metadata count (all little-endian), the
//! metadata key/values, one info per tensor (name, dimensions innermost first, type, offset
//! into the data section), padding to `general.alignment` (32), then the tensor data, each
//! tensor starting on a multiple of the alignment.
//!
//! Two conversions, the same as llama.cpp's `convert_hf_to_gguf.py` does for a Hugging Face
//! Llama:
//! - dimensions are listed innermost first: a row-major [out, in] matrix is `[in, out]`;
//! - llama.cpp's llama graph applies RoPE to interleaved pairs (2i, 2i + 1), ours (like
//!   transformers) to the halves (i, i + D/2), so the rows of q_proj and k_proj are permuted
//!   within each head: GGUF row `h*D + 2i + s` is our row `h*D + s*D/2 + i` ([`permute_rope`]).
//!
//! Token ids at or above the tokenizer's vocabulary (padding of the embedding table) are named
//! `[PADn]` with token type UNUSED, as the conversion script names them.

use std::io::{BufWriter, Write};
use std::path::Path;

use neuroshard_shared::tokenizer::{BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, Tokenizer, UNK_ID};

use super::{ExportError, FullWeights};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;
/// `ggml_type` of f32 tensors.
const GGML_TYPE_F32: u32 = 0;
/// `llama_ftype` ALL_F32.
const FILE_TYPE_ALL_F32: u32 = 0;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_UNUSED: i32 = 5;

/// A metadata value (the GGUF value types this writer needs).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::StrArray(_) | Value::I32Array(_) => 9,
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U32(v) => out.write_all(&v.to_le_bytes()),
            Value::I32(v) => out.write_all(&v.to_le_bytes()),
            Value::F32(v) => out.write_all(&v.to_le_bytes()),
            Value::Bool(v) => out.write_all(&[u8::from(*v)]),
            Value::Str(s) => write_str(out, s),
            Value::StrArray(items) => {
                out.write_all(&8u32.to_le_bytes())?;
                out.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|s| write_str(out, s))
            }
            Value::I32Array(items) => {
                out.write_all(&5u32.to_le_bytes())?;
                out.write_all(&(items.len() as u64).to_le_bytes())?;
                items
                    .iter()
                    .try_for_each(|v| out.write_all(&v.to_le_bytes()))
            }
        }
    }
}

fn write_str(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// One f32 tensor: its GGUF name, its row-major shape (outermost first) and values.
pub struct Tensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: std::borrow::Cow<'a, [f32]>,
}

fn padding(len: u64) -> u64 {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// Writes a GGUF v3 file of `metadata` and f32 `tensors` to `out`; returns the bytes written.
pub fn write(
    out: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[Tensor<'_>],
) -> std::io::Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut head, key)?;
        head.extend_from_slice(&value.type_id().to_le_bytes());
        value.write(&mut head)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&GGML_TYPE_F32.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        let len = t.values.len() as u64 * 4;
        offset += len + padding(len);
    }
    let pad = padding(head.len() as u64);
    head.resize(head.len() + pad as usize, 0);
    out.write_all(&head)?;
    let mut written = head.len() as u64;
    let zeros = [0u8; ALIGNMENT as usize];
    for t in tensors {
        let bytes = crate::model::params::f32_bytes(&t.values);
        out.write_all(bytes)?;
        let pad = padding(bytes.len() as u64);
        out.write_all(&zeros[..pad as usize])?;
        written += bytes.len() as u64 + pad;
    }
    Ok(written)
}

/// Reorders the rows of a q or k projection ([heads * d, in]) from rotate-half RoPE pairs to
/// llama.cpp's interleaved pairs (see the module comment).
pub fn permute_rope(values: &[f32], heads: usize, d: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    let half = d / 2;
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let dst = (h * d + 2 * i + s) * cols;
                let src = (h * d + s * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's name of each of our (Llama) parameter names.
fn gguf_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name
        .strip_prefix("model.layers.")
        .expect("every other parameter is a layer's");
    let (layer, leaf) = rest.split_once('.').expect("model.layers.N.<leaf>");
    let leaf = match leaf {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("parameter {other} has no llama.cpp name"),
    };
    format!("blk.{layer}.{leaf}")
}

/// The metadata of the llama architecture and the tokenizer.
pub fn llama_metadata(w: &FullWeights, tok: &Tokenizer) -> Vec<(String, Value)> {
    let cfg = &w.cfg;
    let vocab = cfg.vocab_size as usize;
    let mut tokens = tok.token_strings();
    tokens.truncate(vocab);
    let live = tokens.len();
    let mut types: Vec<i32> = (0..live)
        .map(|id| {
            if (id as u32) < NUM_SPECIAL {
                TOKEN_CONTROL
            } else {
                TOKEN_NORMAL
            }
        })
        .collect();
    for id in live..vocab {
        tokens.push(format!("[PAD{id}]"));
        types.push(TOKEN_UNUSED);
    }
    let s = |k: &str| k.to_string();
    vec![
        (s("general.architecture"), Value::Str("llama".into())),
        (s("general.name"), Value::Str("NeuroLLM".into())),
        (s("general.file_type"), Value::U32(FILE_TYPE_ALL_F32)),
        (s("general.alignment"), Value::U32(ALIGNMENT as u32)),
        (s("neuroshard.model_hash"), Value::Str(w.hash())),
        (s("neuroshard.step"), Value::Str(w.step.to_string())),
        (s("llama.vocab_size"), Value::U32(cfg.vocab_size)),
        (s("llama.context_length"), Value::U32(cfg.max_seq)),
        (s("llama.embedding_length"), Value::U32(cfg.hidden)),
        (s("llama.block_count"), Value::U32(cfg.layers)),
        (s("llama.feed_forward_length"), Value::U32(cfg.ffn)),
        (s("llama.attention.head_count"), Value::U32(cfg.heads)),
        (s("llama.attention.head_count_kv"), Value::U32(cfg.kv_heads)),
        (s("llama.attention.key_length"), Value::U32(cfg.head_dim())),
        (
            s("llama.attention.value_length"),
            Value::U32(cfg.head_dim()),
        ),
        (
            s("llama.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.norm_eps),
        ),
        (s("llama.rope.freq_base"), Value::F32(cfg.rope_theta)),
        (s("llama.rope.dimension_count"), Value::U32(cfg.head_dim())),
        (s("tokenizer.ggml.model"), Value::Str("gpt2".into())),
        (s("tokenizer.ggml.pre"), Value::Str("gpt-2".into())),
        (s("tokenizer.ggml.tokens"), Value::StrArray(tokens)),
        (s("tokenizer.ggml.token_type"), Value::I32Array(types)),
        (
            s("tokenizer.ggml.merges"),
            Value::StrArray(tok.merge_strings()),
        ),
        (s("tokenizer.ggml.bos_token_id"), Value::U32(BOS_ID)),
        (s("tokenizer.ggml.eos_token_id"), Value::U32(EOS_ID)),
        (s("tokenizer.ggml.unknown_token_id"), Value::U32(UNK_ID)),
        (s("tokenizer.ggml.padding_token_id"), Value::U32(PAD_ID)),
        (s("tokenizer.ggml.add_bos_token"), Value::Bool(false)),
        (s("tokenizer.ggml.add_eos_token"), Value::Bool(false)),
    ]
}

/// The tensors of the full model under llama.cpp's names, q and k rows permuted for its RoPE.
pub fn llama_tensors(w: &FullWeights) -> Vec<Tensor<'_>> {
    let cfg = &w.cfg;
    let d = cfg.head_dim() as usize;
    w.tensors
        .iter()
        .map(|(name, shape, values)| {
            let heads = if name.ends_with("self_attn.q_proj.weight") {
                Some(cfg.heads as usize)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(cfg.kv_heads as usize)
            } else {
                None
            };
            let values = match heads {
                Some(h) => std::borrow::Cow::Owned(permute_rope(values, h, d, shape[1])),
                None => std::borrow::Cow::Borrowed(values.as_slice()),
            };
            Tensor {
                name: gguf_name(name),
                shape: shape.clone(),
                values,
            }
        })
        .collect()
}

/// Writes the GGUF file of the full model to `path` (a temporary file, fsynced, renamed over
/// it); returns its size.
pub fn write_llama(w: &FullWeights, path: &Path, tok: &Tokenizer) -> Result<u64, ExportError> {
    let fail = |e: std::io::Error| ExportError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("gguf.partial");
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let bytes = write(&mut out, &llama_metadata(w, tok), &llama_tensors(w))?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cursor over a GGUF file read back in the tests.
    struct Cursor<'a>(&'a [u8], usize);

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            self.1 += n;
            &self.0[self.1 - n..self.1]
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn string(&mut self) -> String {
            let n = self.u64() as usize;
            String::from_utf8(self.take(n).to_vec()).unwrap()
        }
        fn skip_value(&mut self, ty: u32) {
            match ty {
                4..=6 => drop(self.take(4)),
                7 => drop(self.take(1)),
                8 => drop(self.string()),
                9 => {
                    let et = self.u32();
                    for _ in 0..self.u64() {
                        self.skip_value(et);
                    }
                }
                other => panic!("type {other}"),
            }
        }
    }

    /// Metadata keys and tensor infos (name, dims innermost first, type, offset) of a file.
    type Infos = Vec<(String, Vec<u64>, u32, u64)>;

    fn read_head(b: &[u8]) -> (Vec<String>, Infos) {
        let mut c = Cursor(b, 0);
        assert_eq!(c.take(4), MAGIC);
        assert_eq!(c.u32(), 3);
        let n_tensors = c.u64();
        let n_kv = c.u64();
        let mut keys = Vec::new();
        for _ in 0..n_kv {
            keys.push(c.string());
            let ty = c.u32();
            c.skip_value(ty);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string();
            let nd = c.u32();
            let dims = (0..nd).map(|_| c.u64()).collect();
            infos.push((name, dims, c.u32(), c.u64()));
        }
        (keys, infos)
    }

    #[test]
    fn layout_offsets_and_alignment() {
        let meta = vec![
            ("a.u32".to_string(), Value::U32(7)),
            ("a.str".to_string(), Value::Str("hé".into())),
            (
                "a.strs".to_string(),
                Value::StrArray(vec!["x".into(), "yz".into()]),
            ),
            ("a.i32s".to_string(), Value::I32Array(vec![1, -2, 3])),
            ("a.bool".to_string(), Value::Bool(true)),
            ("a.f32".to_string(), Value::F32(0.5)),
        ];
        let t1: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t2 = vec![9.0f32; 3];
        let tensors = vec![
            Tensor {
                name: "m".into(),
                shape: vec![2, 3],
                values: t1.as_slice().into(),
            },
            Tensor {
                name: "v".into(),
                shape: vec![3],
                values: t2.as_slice().into(),
            },
        ];
        let mut bytes = Vec::new();
        let n = write(&mut bytes, &meta, &tensors).unwrap();
        assert_eq!(n as usize, bytes.len());
        assert_eq!(bytes.len() % ALIGNMENT as usize, 0);
        let (keys, infos) = read_head(&bytes);
        assert_eq!(keys, meta.iter().map(|m| m.0.clone()).collect::<Vec<_>>());
        assert_eq!(infos[0], ("m".to_string(), vec![3, 2], 0, 0));
        // 24 bytes padded to 32.
        assert_eq!(infos[1], ("v".to_string(), vec![3], 0, 32));
        // The data section is the last 64 bytes: m then padding then v then padding.
        let data = &bytes[bytes.len() - 64..];
        assert_eq!(&data[..24], crate::model::params::f32_bytes(&t1));
        assert_eq!(&data[32..44], crate::model::params::f32_bytes(&t2));
    }

    #[test]
    fn rope_permutation_moves_half_pairs_next_to_each_other() {
        // 1 head, d = 4, 1 column: rows [a0 a1 b0 b1] (pairs (a0,b0), (a1,b1)) become
        // [a0 b0 a1 b1].
        let v = [10.0, 11.0, 20.0, 21.0];
        assert_eq!(permute_rope(&v, 1, 4, 1), vec![10.0, 20.0, 11.0, 21.0]);
        // Two heads stay apart; columns move with their row.
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let p = permute_rope(&v, 2, 4, 2);
        assert_eq!(&p[..8], &[0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        assert_eq!(&p[8..], &[8.0, 9.0, 12.0, 13.0, 10.0, 11.0, 14.0, 15.0]);
    }

    #[test]
    fn every_parameter_has_a_llama_cpp_name() {
        let cfg = neuroshard_shared::model::ModelConfig::preset("tiny").unwrap();
        let names = crate::checkpoint::stage_names(&cfg, &crate::model::StageSpec::full(&cfg));
        let mapped: std::collections::HashSet<String> =
            names.iter().map(|n| gguf_name(n)).collect();
        assert_eq!(mapped.len(), names.len());
        assert!(mapped.contains("blk.1.ffn_down.weight"));
        assert!(mapped.contains("token_embd.weight"));
    }
}
