//! NeuroLLM ops. `cpu` holds, per op, a plain f32 reference (`<op>_forward` /
//! `<op>_backward`, llm.c style) that every fast path and every CUDA kernel is checked
//! against; `cpu::fast` holds the functions with the same names and signatures that the
//! engine calls. No async here.

pub mod cpu;
pub mod cuda;
mod error;

pub use error::KernelError;
