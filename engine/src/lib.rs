//! The engine: the data-plane process of a NeuroShard node.
//!
//! `serve` binds the local command socket and answers the commands of `proto/engine.proto`;
//! `runtime` holds the model state those commands act on. The engine opens no network socket
//! besides its local command socket and never decides anything about money or peers.

pub mod backend;
pub mod batcher;
pub mod bench;
pub mod bench_generate;
pub mod bench_ppl;
pub mod checkpoint;
pub mod data;
pub mod dev;
pub mod export;
pub mod model;
pub mod optim;
pub mod runtime;
pub mod server;
pub mod watchdog;
