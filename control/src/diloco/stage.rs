//! DiLoCo within a pipeline stage (issue #20): the holders of one layer range train different
//! batches (each serves whichever pipelines reach it) and agree at every round boundary, with
//! the same rules as full replicas (`sync.rs`) and three differences:
//!
//! * **Rounds follow the clock.** Round `r` is the `r`-th period of `training.stage_round_secs`
//!   since the Unix epoch, the same for every stage, so the whole model has one state per round
//!   (a stage's holders apply different numbers of steps; a step count could not align them).
//! * **Steps go on during the exchange.** The stage keeps serving pipeline steps while its
//!   pseudo-gradient travels and the others' arrive. The outer step then replaces the weights
//!   with `θ_agreed + (θ_now − θ_sent)`: the steps applied meanwhile are kept, and count in the
//!   next round's pseudo-gradient (taken against `θ_agreed`), so nothing learned is lost.
//! * **The agreed hash is of the weights, not of the engine.** The engine holds `θ_agreed` plus
//!   its own drift, so the round's hash is SHA-256 over the agreed weights' safetensors bytes
//!   ([`content_hash`]), computed by every holder from the same bits; a peer serving a state
//!   whose bytes do not hash to what it claims is refused.
//!
//! A stage's inner steps cannot be replayed from the round's start alone (their inputs came
//! through the pipeline), so these rounds are not replayed by `verify.rs` (it checks full
//! replicas); a stage's work is checked from its operation log instead
//! (`pipeline/oplog.rs`, `trainer/stagecheck.rs`).

use std::path::Path;

use sha2::{Digest, Sha256};

use super::round::{self, Diloco};
use super::validate::Layout;
use crate::engine::EngineHandle;

/// The pipeline stage's lock, as a round needs it (the trainer hands the stage in; this
/// module names no pipeline type).
pub trait StageLock: Send + Sync {
    /// Holds the stage lock: no pipeline command runs on the engine meanwhile.
    fn exclusive(&self) -> Held<'_>;
    /// Holds the stage lock once no pipeline step is between its forwards and its apply.
    fn quiesced(&self) -> Held<'_>;
}

/// A stage lock being taken; dropping what it yields releases it.
pub type Held<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Box<dyn Send + 'a>> + Send + 'a>>;

/// The stage round a moment `unix_secs` falls in, for rounds of `round_secs`.
pub fn epoch(unix_secs: u64, round_secs: u32) -> u64 {
    unix_secs / u64::from(round_secs.max(1))
}

/// The stage round now.
pub fn current_epoch(round_secs: u32) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    epoch(now, round_secs)
}

/// SHA-256 (hex) of `theta`'s safetensors encoding in `layout`: the same on every holder that
/// holds the same bits.
pub fn content_hash(layout: &Layout, theta: &[Vec<f32>]) -> Result<String, String> {
    let bytes = round::encode_weights(layout, theta, None).map_err(|e| e.to_string())?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `agreed + (now − sent)` per value: the outer step's weights with the steps the stage applied
/// since it exported `sent`.
pub fn with_drift(agreed: &[Vec<f32>], now: &[Vec<f32>], sent: &[Vec<f32>]) -> Vec<Vec<f32>> {
    agreed
        .iter()
        .zip(now)
        .zip(sent)
        .map(|((a, n), s)| {
            a.iter()
                .zip(n)
                .zip(s)
                .map(|((a, n), s)| a + (n - s))
                .collect()
        })
        .collect()
}

/// Reads the stage's loaded weights into the round state as the start of round `epoch`
/// (after a start, a takeover or a move to other layers); the replicas' agreed state is
/// adopted at the next boundary when it differs.
pub async fn init(
    diloco: &Diloco,
    engine: &EngineHandle,
    stage: &dyn StageLock,
    dir: &Path,
    epoch: u64,
) -> Result<(), String> {
    let exported = {
        let _g = stage.exclusive().await;
        super::sync::export(engine, dir).await?
    };
    let (layout, theta, _) = exported;
    let hash = content_hash(&layout, &theta)?;
    let mut s = diloco.state.lock();
    s.momentum = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    s.theta_start = theta;
    s.layout = layout;
    s.start_hash = hash;
    s.round = epoch;
    s.inner_step = 0;
    s.initialized = true;
    drop(s);
    diloco.residuals.lock().clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_counts_the_same_rounds() {
        assert_eq!(epoch(0, 60), 0);
        assert_eq!(epoch(119, 60), 1);
        assert_eq!(epoch(120, 60), 2);
        // A zero period is read as one second, never a division by zero.
        assert_eq!(epoch(7, 0), 7);
    }

    #[test]
    fn drift_is_added_to_the_agreed_weights() {
        let agreed = vec![vec![1.0, 2.0]];
        let sent = vec![vec![0.5, 0.5]];
        let now = vec![vec![0.75, 0.0]];
        assert_eq!(with_drift(&agreed, &now, &sent), vec![vec![1.25, 1.5]]);
    }

    #[test]
    fn the_hash_is_of_the_bits() {
        let layout = Layout::new(vec![("a".into(), vec![2])]);
        let h1 = content_hash(&layout, &[vec![1.0, 2.0]]).unwrap();
        assert_eq!(h1, content_hash(&layout, &[vec![1.0, 2.0]]).unwrap());
        assert_ne!(h1, content_hash(&layout, &[vec![1.0, 2.000_001]]).unwrap());
        assert_eq!(h1.len(), 64);
    }
}
