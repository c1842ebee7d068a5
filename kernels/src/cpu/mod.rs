//! CPU ops: plain f32 references, one file per op family, and `fast` with the same
//! names and signatures.
//!
//! Conventions (llm.c style): tensors are row-major contiguous `f32` slices; shape letters
//! in comments (B batch, T time, C channels, H heads, KVH kv heads, D head dim, V vocab,
//! `Bt = B*T` rows). Backward functions ACCUMULATE (`+=`) into gradient outputs, except
//! `cross_entropy_backward`, which writes. Slice length mismatches are programmer errors
//! and panic via `assert!`; ids/targets coming from data return [`crate::KernelError`].

pub mod adamw;
pub mod attention;
pub mod attention_cached;
pub mod attention_decode;
pub mod cross_entropy;
pub mod embedding;
pub mod fast;
pub mod matmul;
pub mod matmul_bf16;
pub mod matmul_int8;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod testutil;

pub use adamw::{adamw_step, clip_scale, global_norm, scale_in_place};
pub use attention::{attention_backward, attention_forward};
pub use attention_cached::attention_cached_forward;
pub use attention_decode::{DecodeSeq, attention_decode_forward};
pub use cross_entropy::{cross_entropy_backward, cross_entropy_forward};
pub use embedding::{embedding_backward, embedding_forward};
pub use matmul::{matmul_backward, matmul_forward};
pub use matmul_bf16::{matmul_bf16_backward, matmul_bf16_forward, to_bf16};
pub use matmul_int8::{matmul_int8_forward, quantize_rows_int8};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};
