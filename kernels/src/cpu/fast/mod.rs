//! Fast CPU paths, with the same names and signatures as the references in `cpu::*`. The
//! engine calls these; each is tested against its reference on random inputs.

pub use super::adamw::{adamw_step, clip_scale, global_norm, scale_in_place};
pub use super::attention::{attention_backward, attention_forward};
pub use super::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
pub use super::embedding::{embedding_backward, embedding_forward};
pub use super::matmul::{matmul_backward, matmul_forward};
pub use super::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use super::rope::{rope_backward, rope_forward};
pub use super::swiglu::{swiglu_backward, swiglu_forward};
