//! Fast CPU paths, with the same names and signatures as the references in `cpu::*`. The
//! engine calls these; each is tested against its reference on random inputs of several
//! shapes. Embedding (a row copy / scatter-add) re-exports the reference.
//!
//! Parallelism is rayon's current pool (the caller sizes it); matmul uses all of its
//! threads inside `gemm`, the other ops split rows or chunks across it.

mod adamw;
mod attention;
mod cross_entropy;
mod matmul;
mod rmsnorm;
mod rope;
pub(crate) mod simd;
mod swiglu;

pub use super::embedding::{embedding_backward, embedding_forward};
pub use adamw::{adamw_step, clip_scale, global_norm, scale_in_place};
pub use attention::{attention_backward, attention_forward};
pub use cross_entropy::{cross_entropy_backward, cross_entropy_forward};
pub use matmul::{matmul_backward, matmul_forward};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};
