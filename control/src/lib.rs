//! The NeuroShard control daemon: REST API, engine supervision, training driver, ledger and
//! peers. The binary (`main.rs`) only parses the command line and calls `cli::run`.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod db;
pub mod diloco;
pub mod engine;
pub mod ledger;
pub mod metrics;
pub mod network;
pub mod ops;
pub mod peer;
pub mod pipeline;
pub mod resources;
pub mod state;
pub mod tracker;
pub mod trainer;
pub mod wallets;
pub mod work;
