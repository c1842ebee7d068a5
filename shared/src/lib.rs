//! Plain types both processes agree on. No tokio, no sqlx, no CUDA here.

pub mod fsx;
pub mod model;
pub mod shm;
pub mod tokenizer;
pub mod toploc;
