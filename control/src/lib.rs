//! The NeuroShard control daemon: REST API, engine supervision, training driver, ledger and
//! peers. The binary (`main.rs`) only parses the command line and calls `cli::run`.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod diloco;
pub mod engine;
pub mod gossip;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod resources;
pub mod stats;
pub mod tracker;
pub mod trainer;
pub mod wallets;
pub mod work;

/// Transitional path alias: the ledger is the `neuroshard-ledger` crate (keys, addresses and
/// the keystore re-exported from `neuroshard-identity`), still reachable as `crate::ledger::…`
/// so the daemon's modules keep their paths. New code names the crates.
pub use neuroshard_ledger as ledger;
