//! The NeuroShard control daemon: REST API, engine supervision, training driver, ledger and
//! peers. The binary (`main.rs`) only parses the command line and calls `cli::run`.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod ledger;
pub mod peer;
pub mod resources;
pub mod state;
pub mod supervisor;
pub mod trainer;
