//! The NeuroShard control daemon: REST API, engine supervision, training driver, ledger and
//! peers. The binary (`main.rs`) only parses the command line and calls `cli::run`.

pub mod api;
pub mod attest;
pub mod auth;
mod bits;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod diloco;
pub mod engine;
pub mod evidence;
pub mod gossip;
pub mod infercheck;
pub mod listen;
pub mod logfile;
pub mod metrics;
pub mod model_export;
pub mod nodectl;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod resources;
pub mod runfile;
pub mod samples;
pub mod stats;
pub mod storage;
pub mod tls;
pub mod tracker;
pub mod trainer;
pub mod wallets;
pub mod work;
