//! Coordination of training, as plain functions and state machines: what a node decides, not
//! how it carries it out. Nothing here does I/O, spawns a task or reads a clock: time comes in
//! as an argument (milliseconds on the caller's monotonic clock), so every decision is a unit
//! test away. The daemon's trainer is the executor: it feeds events in and carries the actions
//! out.
//!
//! * [`pool`]: the dynamic layer pool: a node's capacity, the layers it takes, its role, and
//!   the takeover rule for layers nobody holds.
//! * [`balance`]: where a joining node adds the most training throughput, and when a node
//!   moves to even the stages out (with its threshold).
//! * [`route`]: the chain of stages a pipeline step or a generation goes through.
//! * [`catch_up`]: which DiLoCo state a replica adopts from the replicas it sees.
//! * [`upkeep`]: when a pipeline stage checks the layer coverage, takes a gap over and
//!   resyncs from a holder ahead (with its backoff).
//! * [`schedule`]: the GPipe schedule of a pipeline step driven from this node (micro-batch
//!   split, forwards, backwards, the global norm, the optimizer step) and what becomes of the
//!   batch of a failed step (requeued or given up, the backoff before the next).
//! * [`round`]: the DiLoCo round boundary of a replica: read the round state in, catch up
//!   between boundaries, finish the round after H inner steps.
//!
//! Each state machine has its own `Event` and `Action` enums, every variant documented with
//! when it comes: each has exactly one executor (the trainer's run loop for [`upkeep`] and
//! [`round`], the pipeline driver for [`schedule`]), which matches every action of its machine
//! exhaustively and none of another's. One enum over all of them would give each executor arms
//! for actions it can never be asked for. The actions, by machine:
//!
//! | machine | actions |
//! |---|---|
//! | [`upkeep::Upkeep`] | `PublishStep`, `CheckCoverage`, `TakeOver(range)`, `Resync` |
//! | [`schedule::Schedule`] | `Forward{mb, rows}`, `Backward{mb}`, `GatherNorm`, `Apply{global_norm}`, `Done(summary)`; a failed step: `Retry{requeue, after}` |
//! | [`round::Boundary`] | `CountInnerSteps(n)`, `InitRound`, `CatchUp`, `FinishRound{loss, batches}` |
//!
//! **Invariant:** no tokio, no tonic, no clock, no randomness (checked by the architecture
//! test over `cargo metadata`).

pub mod balance;
pub mod catch_up;
pub mod pool;
pub mod round;
pub mod route;
pub mod schedule;
pub mod upkeep;

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;
