//! Recomputation of a pipeline stage's logged work by a verifier (issue #19, item 2): a
//! segment of a claimant's operation log (`oplog.rs`) replayed in a scratch engine that
//! loaded the segment's checkpoint for the claimant's layers.
//!
//! The replay runs the logged engine commands in their order, on the logged inputs (the
//! activations and gradients the claimant received), and compares every result with what the
//! claimant sent: `distance = |replayed - sent| / |replayed|` per tensor (the loss: per value).
//! What an honest replay cannot reproduce bit for bit, the tolerance absorbs: the sent tensors
//! were rounded to bf16 on the wire (`training.pipeline_wire`, relative error about 2^-9 per
//! value), and other hardware sums in another order. A forward answered with a loss where the
//! layers make activations (or the reverse), a tensor of another shape, or a non-finite
//! recomputation is infinitely far.
//!
//! Which tensors the claimant really sent is fixed by its receivers' receipts (their hash
//! chain over the same bytes, `oplog::sent_chain`): the verifier checks those before it
//! believes a log.

use neuroshard_shared::shm::DType;

use super::oplog::{Op, Sent};
use super::stage::engine_mb;
use super::wire::Wire;
use crate::engine::{EngineHandle, Forwarded};

/// Why a replay could not be run (not a verdict: the claimant is neither guilty nor innocent).
#[derive(Debug, thiserror::Error)]
pub enum RecheckError {
    #[error("replaying {what} of step {step} micro-batch {mb}: {error}")]
    Engine {
        what: &'static str,
        step: u64,
        mb: u32,
        error: String,
    },
    #[error("replaying an optimizer step: {0}")]
    Apply(String),
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    /// Outputs compared (activations, losses, input gradients).
    pub compared: u64,
    /// The largest distance of any output (0 when none was compared).
    pub max_distance: f64,
    /// Which output it was, for the finding's reason.
    pub worst: String,
    /// Engine commands run.
    pub commands: u64,
}

impl Replayed {
    fn saw(&mut self, d: f64, what: impl FnOnce() -> String) {
        self.compared += 1;
        // NaN counts as the worst of all.
        if d.is_nan() || d > self.max_distance || self.worst.is_empty() {
            if !self.max_distance.is_nan() {
                self.max_distance = if d.is_nan() { f64::INFINITY } else { d };
            }
            self.worst = what();
        }
    }

    /// Guilty when some output is further than `tolerance` from its recomputation.
    pub fn guilty(&self, tolerance: f64) -> bool {
        self.max_distance.is_nan() || self.max_distance > tolerance
    }
}

/// |replayed - sent| / |replayed| over two f32 tensors; infinite when their shapes differ.
pub fn tensor_distance(replayed: &Wire, sent: &Wire) -> f64 {
    if replayed.shape != sent.shape
        || replayed.dtype != DType::F32
        || sent.dtype != DType::F32
        || replayed.data.len() != sent.data.len()
    {
        return f64::INFINITY;
    }
    let f = |c: &[u8]| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in replayed.data.chunks_exact(4).zip(sent.data.chunks_exact(4)) {
        let (a, b) = (f(a), f(b));
        diff += (a - b) * (a - b);
        norm += a * a;
    }
    if !diff.is_finite() || !norm.is_finite() {
        return f64::INFINITY;
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// |replayed - sent| / |replayed| of two losses.
pub fn loss_distance(replayed: f32, sent: f32) -> f64 {
    let (a, b) = (f64::from(replayed), f64::from(sent));
    if !a.is_finite() || !b.is_finite() {
        return f64::INFINITY;
    }
    (a - b).abs() / a.abs().max(1e-30)
}

/// Runs `ops` on `engine` (the claimant's checkpoint loaded for its layers) and compares.
pub async fn replay(engine: &EngineHandle, ops: &[Op]) -> Result<Replayed, RecheckError> {
    let mut r = Replayed::default();
    for op in ops {
        match op {
            Op::Reset => {
                engine
                    .reset_grads()
                    .await
                    .map_err(|e| RecheckError::Apply(e.to_string()))?;
                r.commands += 1;
            }
            Op::Forward {
                step,
                mb,
                input,
                labels,
                sent,
                ..
            } => {
                let out = engine
                    .forward(
                        input.view(),
                        labels.as_ref().map(Wire::view),
                        engine_mb(*step, *mb),
                    )
                    .await
                    .map_err(|e| RecheckError::Engine {
                        what: "a forward",
                        step: *step,
                        mb: *mb,
                        error: e.to_string(),
                    })?;
                r.commands += 1;
                let d = match (out, sent) {
                    (Forwarded::Output(t), Sent::Acts(a)) => tensor_distance(&t.into(), a),
                    (Forwarded::Loss(l), Sent::Loss(s)) => loss_distance(l, *s),
                    _ => f64::INFINITY,
                };
                r.saw(d, || format!("the forward of step {step} micro-batch {mb}"));
            }
            Op::Backward {
                step,
                mb,
                grad,
                sent,
                ..
            } => {
                let out = engine
                    .backward(grad.as_ref().map(Wire::view), engine_mb(*step, *mb))
                    .await
                    .map_err(|e| RecheckError::Engine {
                        what: "a backward",
                        step: *step,
                        mb: *mb,
                        error: e.to_string(),
                    })?;
                r.commands += 1;
                let d = match (out, sent) {
                    (Some(t), Some(s)) => tensor_distance(&t.into(), s),
                    (None, None) => continue,
                    _ => f64::INFINITY,
                };
                r.saw(d, || {
                    format!("the backward of step {step} micro-batch {mb}")
                });
            }
            Op::Apply { global_norm } => {
                if !global_norm.is_finite() || *global_norm < 0.0 {
                    // The claimant's own log names a norm no stage would take: nothing after
                    // this could have been computed honestly.
                    r.saw(f64::INFINITY, || {
                        format!("an optimizer step at norm {global_norm}")
                    });
                    break;
                }
                engine
                    .optimizer_step(*global_norm)
                    .await
                    .map_err(|e| RecheckError::Apply(e.to_string()))?;
                r.commands += 1;
            }
            Op::Route { .. } | Op::Received { .. } | Op::Class(_) => {}
            // The engine's state changed outside a step here: nothing after it is replayable.
            Op::Touched => break,
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(vals: &[f32]) -> Wire {
        Wire {
            dtype: DType::F32,
            shape: vec![1, 1, vals.len() as u64],
            data: vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn distances_are_relative_to_the_recomputation() {
        assert_eq!(tensor_distance(&w(&[3.0, 4.0]), &w(&[3.0, 4.0])), 0.0);
        assert!((tensor_distance(&w(&[3.0, 4.0]), &w(&[3.0, 4.5])) - 0.1).abs() < 1e-12);
        assert_eq!(tensor_distance(&w(&[1.0]), &w(&[1.0, 2.0])), f64::INFINITY);
        assert_eq!(
            tensor_distance(&w(&[1.0]), &w(&[f32::INFINITY])),
            f64::INFINITY
        );
        assert!((loss_distance(4.0, 5.0) - 0.25).abs() < 1e-12);
        assert_eq!(loss_distance(4.0, f32::NAN), f64::INFINITY);
        // bf16 rounding on the wire stays far below any useful tolerance.
        let honest: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin()).collect();
        let sent = w(&honest).as_received(crate::config::PipeWire::Bf16);
        let d = tensor_distance(&w(&honest), &sent);
        assert!(d > 0.0 && d < 0.004, "{d}");
    }

    #[test]
    fn the_worst_output_decides() {
        let mut r = Replayed::default();
        r.saw(0.001, || "a".into());
        r.saw(0.5, || "b".into());
        r.saw(0.01, || "c".into());
        assert_eq!(
            (r.compared, r.max_distance, r.worst.as_str()),
            (3, 0.5, "b")
        );
        assert!(r.guilty(0.05) && !r.guilty(0.6));
        r.saw(f64::NAN, || "d".into());
        assert!(r.guilty(1e9));
    }
}
