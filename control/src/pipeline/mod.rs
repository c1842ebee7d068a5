//! Pipeline training across nodes that each hold some layers (dynamic layer pool).
//!
//! Schedule: GPipe, decided by `neuroshard_coordination::schedule` and carried out by
//! `driver.rs`. The driver splits its batch into `training.micro_batches` equal parts and
//! starts every micro-batch's forward at once; each stage runs one engine command at a time
//! (the stage lock), so while the worker runs micro-batch 0 the driver already runs micro-batch
//! 1: the stages work at the same time. When every loss is back, every backward starts at once
//! the same way. Then the optimizer: phase `norm` sums the stages' squared gradient norms,
//! phase `apply` steps every stage's AdamW clipped by that global norm — the same update as one
//! node holding every layer.
//!
//! Calls are chained: a stage runs its part, then calls the next stage of `route` and answers
//! when the rest of the pipeline has answered (forward → the loss comes back; backward → the
//! gradient w.r.t. the receiver's input comes back). Every hop has a deadline
//! (`training.pipeline_timeout_secs`), so a dead or stalled stage fails the step; the driver
//! counts it, logs it and retries with a fresh route after the schedule's backoff, on the same
//! batch unless a stage may already have stepped on it; every stage drops what a failed step
//! left the next time it sees a new step id. The phases travel as strings and are parsed once
//! at the edge (`phase.rs`).
//!
//! Tensors between stages are checked (dtype, shape against the model, byte length, finite
//! values, label range) before they reach the engine; a malformed one is refused with
//! INVALID_ARGUMENT and counted in `refused`; so is a call from a peer that is not the stage
//! before this one, or with a step id far ahead of this node's clock.

pub mod assign;
mod driver;
mod error;
pub mod export;
pub mod infer;
pub mod oplog;
mod oplog_codec;
mod phase;
pub mod recheck;
mod route;
pub mod senders;
pub mod service;
mod spoof;
mod stage;
mod wire;

pub use assign::Assignment;
pub use driver::{StepFailed, StepReport, new_step_id};
pub(crate) use error::engine_err;
pub use error::{PipeError, peer_err, within};
pub use route::{Hop, plan_route};
pub(crate) use route::{candidate_hops, shortest_route};
pub use stage::{Counters, Out, Stage};
pub(crate) use wire::u32_below_vocab;
pub use wire::{
    Wire, WireDType, check_acts, check_labels, decode_int_rows, encode_int_rows, int_rows_len,
    wire_len,
};
