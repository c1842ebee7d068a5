//! Coordination of training, as plain functions and state machines: what a node decides, not
//! how it carries it out. Nothing here does I/O, spawns a task or reads a clock: time comes in
//! as an argument (milliseconds on the caller's monotonic clock), so every decision is a unit
//! test away. The daemon's trainer is the executor: it feeds events in and carries the actions
//! out.
//!
//! * [`pool`]: the dynamic layer pool: a node's capacity, the layers it takes, its role, and
//!   the takeover rule for layers nobody holds.
//! * [`route`]: the chain of stages a pipeline step or a generation goes through.
//! * [`catch_up`]: which DiLoCo state a replica adopts from the replicas it sees.
//! * [`upkeep`]: when a pipeline stage checks the layer coverage, takes a gap over and
//!   resyncs from a holder ahead (with its backoff).
//!
//! **Invariant:** no tokio, no tonic, no clock, no randomness (checked by the architecture
//! test over `cargo metadata`).

pub mod catch_up;
pub mod pool;
pub mod route;
pub mod upkeep;

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;
