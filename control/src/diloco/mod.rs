//! DiLoCo across replicas of the same layers: H local steps, then an exchange of
//! pseudo-gradients (θ_start − θ_local), a robust aggregate and an outer Nesterov step that
//! every honest replica computes bit for bit the same. ARCHITECTURE.md ("DiLoCo") explains
//! the round protocol.
//!
//! * [`aggregate`]: mean, weighted mean, median, trimmed mean, Krum, Multi-Krum, geometric
//!   median.
//! * [`compress`]: bf16 / int8 / topk (the last two with error feedback) encoding of
//!   pseudo-gradients; [`sparse`]: the chunked top-k, low-bit codec behind `topk`.
//! * [`validate`]: checks on a peer's contribution, counted refusals, the per-round inbox.
//! * [`outer`]: the outer Nesterov step.
//! * [`stage`]: rounds within a pipeline stage (clock-aligned, steps go on meanwhile).
//! * [`streaming`]: Streaming DiLoCo's fragments, their staggered schedule, per-fragment
//!   outer state and the delayed merge of an overlapped exchange.
//! * [`service`]: the `Diloco` peer service (PushDelta, GetWeights).
//! * [`verify`]: sampled recomputation of contributions; [`window`]: per-step state
//!   commitments and short replay windows, judged across hardware.

pub mod aggregate;
mod attested;
pub mod compress;
pub mod outer;
pub mod round;
pub mod service;
pub mod sparse;
pub mod stage;
pub mod streaming;
pub mod sync;
pub mod validate;
pub mod verify;
pub mod window;
