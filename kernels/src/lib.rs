//! NeuroLLM ops. `cpu` holds, per op, a plain f32 reference (`<op>_forward` /
//! `<op>_backward`, llm.c style) that every fast path and every CUDA kernel is checked
//! against. No async here.

pub mod cpu;
