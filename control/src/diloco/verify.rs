//! Sampled recomputation of DiLoCo contributions (issue #19): the check behind fraud verdicts.
//!
//! * **Claimant.** At the start of every round a replica checkpoints its engine (weights,
//!   AdamW moments, step, data position) to `diloco/rounds/round-<r>.ckpt`, keeps the last
//!   [`KEEP_ROUNDS`], and sends the file's sha256 and its data-loader id with the round's
//!   pseudo-gradient (`DeltaMessage.start_checkpoint`, `data_id`): a commitment made before
//!   anyone knows whether it will be checked. It serves the file to any peer
//!   (`GetRoundCheckpoint`).
//! * **Verifier.** After aggregating a round, a replica picks each other replica's accepted
//!   contribution with probability `ledger.verify_probability / V`, V being the replicas that
//!   may check it (all but the claimant), so each contribution is replayed
//!   `verify_probability` times on average, whatever the number of replicas (its own
//!   randomness: a claimant cannot know or choose who checks it), fetches the committed checkpoint, checks
//!   its sha256 against the commitment, loads it into a scratch engine (a second engine
//!   process: its own training is not touched) with the claimant's data order, runs the
//!   claimed number of inner steps and compares the pseudo-gradient it gets with the one the
//!   claimant sent: `distance = |replayed - sent| / |replayed|`. Above
//!   `ledger.verify_tolerance` it is guilty (so is a checkpoint that does not match its
//!   commitment or does not start from the round's agreed weights); the finding waits for the
//!   claimant's reward that cites this node's receipt of that round, and the minter writes the
//!   verdict on it (`Ledger::judge`).
//!
//! A contribution that carries a step root (`DeltaMessage.step_root`: its per-step state
//! hashes) is checked by a short replay window instead, in any replay class
//! (`diloco::window`); the whole-round replay above remains for contributions without one,
//! by verifiers of the claimant's class only.
//!
//! What a replay cannot tell apart, the tolerance absorbs: the claimant's pseudo-gradient is
//! compressed on the wire (bf16: ~0.4% per value; int8 with error feedback: the previous
//! round's residual rides along) and other hardware sums in another order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use neuroshard_ledger::Address;
use neuroshard_ledger::keys::{Hash32, keccak};
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_net::client::PeerConn;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::round::{self, Diloco};
use super::validate::Layout;
use crate::engine::scratch::Scratch;
use crate::engine::{EngineHandle, LoadSpec};

/// Round-start checkpoints a replica keeps for verifiers.
pub const KEEP_ROUNDS: usize = 8;
/// Largest round checkpoint a verifier fetches.
const MAX_CHECKPOINT_BYTES: usize = 4 << 30;

/// How this node replays others' rounds (set by the trainer from the config).
#[derive(Debug, Clone)]
pub struct ReplaySpec {
    pub binary: PathBuf,
    pub threads: u32,
    /// The whole model as this node's engine loads it; checkpoint and loader id are the
    /// claimant's.
    pub load: LoadSpec,
    pub probability: f64,
    pub tolerance: f64,
    /// Inner steps a window replay recomputes (`ledger.verify_window_steps`).
    pub window: u32,
    /// This node's own data-loader id, sent with its contributions.
    pub data_id: String,
}

/// What a claimant committed to with its contribution to a round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commitment {
    pub start_checkpoint: String,
    pub data_id: String,
    /// The claimant engine's replay class: a whole-round replay on another class is not
    /// judged.
    pub replay_class: String,
    /// sha256 over the round's per-step state hashes (`diloco::window`); empty: none, only a
    /// whole-round replay of the same class checks it.
    pub step_root: String,
}

/// The result of one replay, waiting for its verdict to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub claimant: Address,
    pub round: u64,
    /// The epoch of this node's receipt for the contribution: the claim that cites it is
    /// the one judged.
    pub epoch: u64,
    pub guilty: bool,
    /// Relative distance of the sent pseudo-gradient from the replayed one (infinite when
    /// the checkpoint did not match its commitment or the round's start).
    pub distance: f64,
    pub reason: String,
    pub evidence: Hash32,
    pub found_at: i64,
    /// A pipeline stage's replay (`trainer/stagecheck.rs`): what its log says it sent to
    /// whom, checked against the receipts the judged claim cites before the verdict.
    pub stage: Option<StageEvidence>,
    /// A check of served inference (`infercheck.rs`): `epoch` is the payment's, and the claim
    /// judged is the serving node's reward that claimed it.
    pub inference: bool,
}

/// One tensor a stage sent: at (ms), step, micro-batch, digest of its bytes.
pub type SentDigest = (i64, u64, u32, Hash32);
/// The receipt kind a receiver signs, the receiver, and the tensors sent to it.
pub type SentTo = (ReceiptKind, Address, Vec<SentDigest>);

/// What a replayed stage log says the claimant sent in the judged epoch, per receiver: the
/// receiver's receipt (cited by the claim) must chain over exactly these tensors, or the log
/// is not what was sent and the replay proves nothing (then the claimant is guilty).
#[derive(Debug, Clone, PartialEq)]
pub struct StageEvidence {
    /// (receipt kind the receiver signs, receiver, tensors sent to it: (ms, step, micro-batch,
    /// digest)).
    pub sent: Vec<SentTo>,
    /// The judged epoch's start (ms): the receipt's chain starts at a tensor sent from then
    /// on, give or take the clocks' skew.
    pub from_ms: i64,
    /// What the log says the claimant received in the epoch, per sender: (the kind of the
    /// receipt the claimant signed for that sender, the sender, the tensors received). The
    /// receipts the claimant signed, as the senders' rewards cite them, must chain over
    /// exactly these, or the log's inputs are made up (then the claimant is guilty).
    pub received: Vec<SentTo>,
}

/// Stage rounds whose agreed weights a verifier keeps (`Verifier::agreed`).
pub const KEEP_AGREED: usize = 8;

/// A stage round's agreed weights: the layout and the tensors in layout order.
pub type Agreed = (Layout, Arc<Vec<Vec<f32>>>);

/// Counters for `/api/v1/metrics` and the logs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    pub sampled: u64,
    pub replayed: u64,
    pub guilty: u64,
    pub innocent: u64,
    /// Sampled but not checkable (checkpoint not served, scratch engine failed, another
    /// replay class).
    pub unverifiable: u64,
    /// Of those, claims of another replay class (other hardware or dtype) without per-step
    /// commitments: not replayed.
    pub other_class: u64,
    /// Checks by a replay window (`diloco::window`, and a stage segment of another class
    /// replayed for its first steps: `trainer/stagecheck.rs`), and of those, claims of
    /// another class.
    pub windows: u64,
    pub cross_class: u64,
    /// Bytes the replay windows fetched (hashes and three checkpoints each).
    pub evidence_bytes: u64,
    /// Windows whose replay ended on the committed state hash bit for bit.
    pub exact: u64,
    /// Distances of the innocent windows' replays from the committed states (the window
    /// alone; `distances` holds the larger of it and the end check's), at most 1000.
    pub window_distances: Vec<f64>,
    pub verdicts_written: u64,
    /// Wall time spent replaying (fetch, scratch engine, inner steps, compare), in ms.
    pub replay_ms: u64,
    /// Distances of the innocent replays, most recent last (at most 1000).
    pub distances: Vec<f64>,
    /// Contributions this node attested in rounds of one fragment (Streaming DiLoCo,
    /// `training.diloco_fragments` > 1), none of which is drawn for a replay.
    pub unchecked_fragment_rounds: u64,
}

/// The verifier's state, shared by the DiLoCo round (samples), the peer service (files and
/// commitments) and the minter (writes verdicts).
#[derive(Debug, Default)]
pub struct Verifier {
    pub spec: Mutex<Option<ReplaySpec>>,
    /// This node's round-start checkpoints: round -> (file, sha256 hex).
    pub starts: Mutex<BTreeMap<u64, (PathBuf, String)>>,
    /// Peers' commitments by (sender, round), for the rounds still kept.
    pub commitments: Mutex<BTreeMap<(String, u64), Commitment>>,
    pub findings: Mutex<Vec<Finding>>,
    pub figures: Mutex<Figures>,
    /// The agreed weights of this pipeline stage's last [`KEEP_AGREED`] rounds, by round: a
    /// stage replay checks that the claimant's checkpoint lies near one of them.
    pub agreed: Mutex<BTreeMap<u64, Agreed>>,
    /// This node's engine's replay class (from its last LoadModel).
    pub replay_class: Mutex<String>,
    /// This node's per-step state hashes (`diloco::window`).
    pub steps: Mutex<super::window::StepLog>,
    /// Replay windows are recomputed for verifiers one at a time (`serving`), at most
    /// [`super::window::MAX_QUEUED`] waiting (`queued`).
    pub(super) serving: tokio::sync::Mutex<()>,
    pub(super) queued: std::sync::atomic::AtomicUsize,
    busy: AtomicBool,
}

/// A sampled contribution to replay.
#[derive(Debug, Clone)]
pub struct Job {
    pub claimant: Address,
    pub round: u64,
    pub epoch: u64,
    pub start_hash: String,
    pub batches: u64,
    pub commitment: Commitment,
    pub layout: Layout,
    pub theta_start: Vec<Vec<f32>>,
    /// The decoded pseudo-gradient the claimant sent, in layout order.
    pub sent: Vec<f32>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Verifier {
    /// Checkpoints the engine as the start of the current round and keeps it for verifiers.
    pub async fn keep_start(
        &self,
        diloco: &Diloco,
        engine: &EngineHandle,
        dir: &Path,
    ) -> Result<(), String> {
        let round = {
            let s = diloco.state.lock();
            if !s.initialized {
                return Ok(());
            }
            s.round
        };
        let path = dir.join("rounds").join(format!("round-{round}.ckpt"));
        let (_, state_hash) = engine
            .checkpoint_state(&path)
            .await
            .map_err(|e| format!("round checkpoint: {e}"))?;
        self.steps_start(round, state_hash);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let sha = sha256_hex(&bytes);
        let mut starts = self.starts.lock();
        starts.insert(round, (path, sha));
        while starts.len() > KEEP_ROUNDS {
            if let Some((_, (old, _))) = starts.pop_first() {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }

    /// The commitment this node sends with its contribution to `round`.
    pub fn own_commitment(&self, round: u64) -> Commitment {
        let data_id = self
            .spec
            .lock()
            .as_ref()
            .map(|s| s.data_id.clone())
            .unwrap_or_default();
        Commitment {
            start_checkpoint: self
                .starts
                .lock()
                .get(&round)
                .map(|(_, sha)| sha.clone())
                .unwrap_or_default(),
            data_id,
            replay_class: self.replay_class.lock().clone(),
            step_root: String::new(),
        }
    }

    /// The round-start checkpoint served to a verifier: (sha256, bytes).
    pub fn start_file(&self, round: u64) -> Option<(String, Vec<u8>)> {
        let (path, sha) = self.starts.lock().get(&round).cloned()?;
        std::fs::read(path).ok().map(|b| (sha, b))
    }

    /// Files a peer's commitment with its accepted contribution.
    pub fn committed(&self, sender: &str, round: u64, c: Commitment) {
        let mut m = self.commitments.lock();
        m.insert((sender.to_string(), round), c);
        while m.len() > 64 * KEEP_ROUNDS {
            m.pop_first();
        }
    }

    /// Keeps `theta` as the agreed weights of stage round `round` (the last [`KEEP_AGREED`]).
    pub fn keep_agreed(&self, round: u64, layout: Layout, theta: Vec<Vec<f32>>) {
        let mut a = self.agreed.lock();
        a.insert(round, (layout, Arc::new(theta)));
        while a.len() > KEEP_AGREED {
            a.pop_first();
        }
    }

    /// Takes the one replay slot for a replay started elsewhere (a pipeline stage's log,
    /// `trainer/stagecheck.rs`): false while a replay runs.
    pub fn take_slot(&self) -> bool {
        !self.busy.swap(true, Ordering::AcqRel)
    }

    /// Frees the slot [`Verifier::take_slot`] took.
    pub fn free_slot(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Whether to replay a contribution now, when `verifiers` replicas (this one included)
    /// may each replay it: with probability `p / verifiers` each, so a contribution is
    /// replayed `p` times on average however many replicas there are, and `p` is the share of
    /// the network's training compute spent on replays. One replay at a time (a sample drawn
    /// while one runs is dropped and not counted).
    pub fn draw(&self, verifiers: usize) -> bool {
        let p = self.spec.lock().as_ref().map_or(0.0, |s| s.probability);
        p > 0.0
            && rand::random::<f64>() < per_verifier(p, verifiers)
            && !self.busy.load(Ordering::Acquire)
    }

    /// Replays `job` in the background (against `conn`, the claimant) and files the finding.
    pub fn spawn(self: &Arc<Self>, job: Job, conn: PeerConn, dir: PathBuf) {
        let Some(spec) = self.spec.lock().clone() else {
            return;
        };
        // Training is chaotic: a round only replays bit for bit on the claimant's kind of
        // hardware and dtype (BENCHMARKS.md, "Checked work: replays across hardware"), so a
        // claim of another class is judged only by a short window (`diloco::window`).
        let own = self.replay_class.lock().clone();
        let windowed = !job.commitment.step_root.is_empty();
        if own != job.commitment.replay_class && !windowed {
            let mut f = self.figures.lock();
            f.sampled += 1;
            f.unverifiable += 1;
            f.other_class += 1;
            tracing::info!(claimant = %job.claimant, round = job.round, theirs = %job.commitment.replay_class, ours = %own, "not replaying a contribution of another replay class");
            return;
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        self.figures.lock().sampled += 1;
        let me = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let outcome = if windowed {
                super::window::check(&job, &conn, &spec, &own, &dir)
                    .await
                    .map(|c| {
                        tracing::info!(claimant = %job.claimant, round = job.round, window = ?c.window, end = c.end, exact = c.exact, cross_class = c.cross_class, evidence_bytes = c.evidence_bytes, "checked a replay window");
                        let mut f = me.figures.lock();
                        f.windows += 1;
                        f.cross_class += u64::from(c.cross_class);
                        f.evidence_bytes += c.evidence_bytes;
                        f.exact += u64::from(c.exact);
                        if let (false, Some(w)) = (c.guilty, c.window) {
                            f.window_distances.push(w);
                            if f.window_distances.len() > 1000 {
                                f.window_distances.remove(0);
                            }
                        }
                        (c.guilty, c.window.map_or(c.end, |w| w.max(c.end)), c.reason)
                    })
            } else {
                replay(&job, &conn, &spec, &dir).await
            };
            let ms = started.elapsed().as_millis() as u64;
            me.busy.store(false, Ordering::Release);
            let mut f = me.figures.lock();
            match outcome {
                Ok((guilty, distance, reason)) => {
                    f.replayed += 1;
                    if guilty {
                        f.guilty += 1;
                    } else {
                        f.innocent += 1;
                        f.distances.push(distance);
                        if f.distances.len() > 1000 {
                            f.distances.remove(0);
                        }
                    }
                    f.replay_ms += ms;
                    drop(f);
                    tracing::info!(claimant = %job.claimant, round = job.round, batches = job.batches, guilty, distance, ms, %reason, "replayed a contribution");
                    me.findings.lock().push(Finding {
                        inference: false,
                        claimant: job.claimant,
                        round: job.round,
                        epoch: job.epoch,
                        guilty,
                        distance,
                        evidence: evidence(&job, distance),
                        reason,
                        found_at: chrono::Utc::now().timestamp(),
                        stage: None,
                    });
                }
                Err(e) => {
                    f.unverifiable += 1;
                    tracing::warn!(claimant = %job.claimant, round = job.round, error = %e, "could not replay a contribution");
                }
            }
        });
    }
}

/// What a verdict names as its evidence: the commitment, the claim's shape and the distance.
fn evidence(job: &Job, distance: f64) -> Hash32 {
    let mut b = Vec::new();
    b.extend_from_slice(job.commitment.start_checkpoint.as_bytes());
    b.extend_from_slice(job.start_hash.as_bytes());
    b.extend_from_slice(&job.round.to_le_bytes());
    b.extend_from_slice(&job.batches.to_le_bytes());
    b.extend_from_slice(&distance.to_le_bytes());
    keccak(b"neuroshard-replay-evidence-v1", &b)
}

/// |a - b| / |a|, in f64.
pub fn distance(replayed: &[f32], sent: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in replayed.iter().zip(sent) {
        let (a, b) = (f64::from(*a), f64::from(*b));
        diff += (a - b) * (a - b);
        norm += a * a;
    }
    if replayed.len() != sent.len() {
        return f64::INFINITY;
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// Fetches, checks and replays; Ok((guilty, distance, reason)) or why it could not.
async fn replay(
    job: &Job,
    conn: &PeerConn,
    spec: &ReplaySpec,
    dir: &Path,
) -> Result<(bool, f64, String), String> {
    let (_, bytes) = conn
        .get_round_checkpoint(job.round, MAX_CHECKPOINT_BYTES)
        .await
        .map_err(|e| format!("fetching the round checkpoint: {e}"))?;
    if sha256_hex(&bytes) != job.commitment.start_checkpoint {
        return Ok((
            true,
            f64::INFINITY,
            "the served checkpoint is not the committed one".into(),
        ));
    }
    let work = dir.join("verify");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let ckpt = work.join(format!("{}-{}.ckpt", job.claimant, job.round));
    round::write_file(&ckpt, &bytes).map_err(|e| e.to_string())?;
    let result = run_scratch(job, spec, &work, &ckpt).await;
    let _ = std::fs::remove_file(&ckpt);
    result
}

async fn run_scratch(
    job: &Job,
    spec: &ReplaySpec,
    work: &Path,
    ckpt: &Path,
) -> Result<(bool, f64, String), String> {
    let scratch = Scratch::start(&spec.binary, spec.threads, work)
        .await
        .map_err(|e| e.to_string())?;
    let engine = &scratch.engine;
    let mut load = spec.load.clone();
    load.checkpoint = Some(ckpt.to_path_buf());
    load.node_id = job.commitment.data_id.clone();
    let loaded = engine
        .load_model(&load)
        .await
        .map_err(|e| format!("loading the round checkpoint: {e}"))?;
    if loaded.replay_class != job.commitment.replay_class {
        return Err(format!(
            "the replay engine is of class {:?}, the claimant's {:?}",
            loaded.replay_class, job.commitment.replay_class
        ));
    }
    if loaded.model_hash != job.start_hash {
        return Ok((
            true,
            f64::INFINITY,
            "the checkpoint does not start from the round's agreed weights".into(),
        ));
    }
    for _ in 0..job.batches {
        engine
            .train_step(false)
            .await
            .map_err(|e| format!("replaying: {e}"))?;
    }
    let out = work.join(format!("{}-{}.safetensors", job.claimant, job.round));
    engine
        .export_weights(&out)
        .await
        .map_err(|e| format!("exporting the replay: {e}"))?;
    let tensors = round::read_weights_file(&out).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&out);
    let tensors = tensors?;
    let layout = Layout::new(
        tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect(),
    );
    if layout != job.layout {
        return Err("the replayed model has another layout".into());
    }
    let replayed: Vec<f32> = job
        .theta_start
        .iter()
        .zip(&tensors)
        .flat_map(|(start, (_, _, w))| start.iter().zip(w).map(|(a, b)| a - b))
        .collect();
    let d = distance(&replayed, &job.sent);
    // NaN (a non-finite replay) is guilty too.
    let guilty = d.is_nan() || d > spec.tolerance;
    let reason = if guilty {
        format!(
            "the sent pseudo-gradient is {d:.4} (relative) from the replayed one, tolerance {}",
            spec.tolerance
        )
    } else {
        "reproduced".into()
    };
    Ok((guilty, d, reason))
}

/// A verifier's share of the sampling probability `p` when `verifiers` may each draw.
pub fn per_verifier(p: f64, verifiers: usize) -> f64 {
    (p / verifiers.max(1) as f64).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_is_relative_to_the_replay() {
        assert_eq!(distance(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((distance(&[3.0, 4.0], &[0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((distance(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-12);
        assert_eq!(distance(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        // A replay that moved nothing: any sent delta is infinitely far.
        assert!(distance(&[0.0], &[1.0]) > 1e6);
    }

    #[test]
    fn the_sampling_probability_is_shared_among_the_verifiers() {
        assert_eq!(per_verifier(0.025, 1), 0.025);
        assert!((per_verifier(0.1, 4) - 0.025).abs() < 1e-12);
        // No verifier count reads as one; p = 1 with two verifiers: each replays half.
        assert_eq!(per_verifier(0.5, 0), 0.5);
        assert_eq!(per_verifier(1.0, 2), 0.5);
        // Replays per contribution: V verifiers times p / V is p, for any V.
        for v in 1..20 {
            assert!((per_verifier(0.05, v) * v as f64 - 0.05).abs() < 1e-12);
        }
    }
}
