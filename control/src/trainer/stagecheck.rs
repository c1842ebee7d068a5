//! Sampled recomputation of pipeline-stage work (issue #19, item 2): a holder of a stage's
//! layers checks the other holders of the same layers.
//!
//! Once an epoch, for each other holder of this stage's layers, the node draws with
//! probability `ledger.verify_probability / V` (V: the holders that may check that one, all
//! but itself; so each claim is replayed `verify_probability` times on average whatever the
//! number of holders, as DiLoCo replays are: `verify::per_verifier`), with its own randomness
//! (a claimant can neither know nor choose who checks it, and cannot grind its claim to avoid
//! a draw), whether to check that holder's work of the epoch that just ended. Checking: fetch
//! the segments of the holder's operation log that cover the epoch (`GetStageLog`,
//! `pipeline/oplog.rs`), replay one from its checkpoint in a scratch engine up to the epoch's
//! end (`pipeline/recheck.rs`), and file a finding with the largest distance between a
//! recomputed output and the sent one, and the digests of what the log says was sent to whom
//! and received from whom. Before the replay counts, the served log must be the work that was
//! done: its checkpoint's weights keep at least [`MIN_CHECKPOINT_NORM_RATIO`] of the norm of the
//! closest agreed weights of the stage's last rounds (which this node, a holder of the same
//! layers, took part in; a made-up checkpoint such as zero weights keeps none; the distance is
//! reported, not judged, since honest mid-round drift is large), and every input names the peer it
//! came from (the claimant signed a receipt for it). The minter (`work.rs`) waits for the
//! holder's reward that cites a receipt of one of those receivers for that epoch, checks that
//! the receipt chains over exactly the logged outputs, and that the receipts the holder signed
//! for its senders (cited by their rewards) chain over exactly the logged inputs (otherwise
//! the log is not what was sent or received: guilty), and writes the verdict
//! (`Ledger::judge`). One replay runs at a time (the slot is shared with DiLoCo replays).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use neuroshard_ledger::keys::{Hash32, keccak};
use neuroshard_ledger::proof::{EPOCH_SECONDS, Proof};
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_net::client::PeerConn;
use sha2::{Digest, Sha256};

use super::*;
use crate::diloco::verify::{Agreed, Finding, StageEvidence, Verifier, per_verifier};
use crate::engine::scratch::Scratch;
use crate::pipeline::oplog::{self, Dir, Op};
use crate::pipeline::{recheck, senders};

/// Most segments fetched for one epoch (all that are kept).
const MAX_SEGMENTS: usize = oplog::KEEP_SEGMENTS;
/// Largest segment (checkpoint and log) a verifier fetches.
const MAX_SEGMENT_FETCH: usize = 512 << 20;
/// Clock skew allowed between the claimant's log times and the epoch boundaries.
const SKEW_MS: i64 = 5_000;
/// Seconds after an epoch's end before its stage work is checked: past the settling of its
/// pipeline receipts (`attest::PIPELINE_RECEIPT_SETTLE_SECS`) and the proofs minted a second
/// into the next epoch.
const CHECK_AFTER_SECS: i64 = 2 * crate::attest::PIPELINE_RECEIPT_SETTLE_SECS;
/// A segment's checkpoint is compared with the closest agreed weights of the stage's last
/// rounds. Honest checkpoints taken mid-round drift far from any agreed state (measured in
/// BENCHMARKS.md, "A forged stage log": 0.40 and 0.70 relative distance on 20 s rounds; rounds
/// of the default 600 s drift further, and training is chaotic), so the distance is reported,
/// not judged. What is judged is a checkpoint whose weights have lost most of their norm
/// against the agreed ones (at most this ratio): the zero-weight forgery that makes a residual
/// stage pass its input through. Training moves weights, it does not erase them within a
/// round. The inputs bound to the receipts the claimant signed are the binding that holds
/// against a subtler forgery.
pub const MIN_CHECKPOINT_NORM_RATIO: f64 = 0.1;

/// Optimizer steps of a segment replayed for a claimant of another replay class (other
/// hardware, engine version or dtype), from the segment's checkpoint, in the claimant's
/// dtype. A stage replay takes the logged inputs and received gradients, so only the stage's
/// own weights drift; measured (`engine/src/model/stage_replay/tests.rs`, BENCHMARKS.md
/// "Stage replays across hardware"): an honest segment replayed with last-bit
/// differences or in the other dtype stays within 0.01 of the claim for 100 steps and can
/// leave any tolerance after 200 (3.2 at 200 steps). A segment of the verifier's own class is
/// replayed whole (bit for bit but for the wire's rounding).
pub const CROSS_CLASS_STEPS: u32 = 50;

/// What the trainer remembers between stage checks.
#[derive(Debug, Default)]
pub(super) struct StageChecks {
    last_epoch: u64,
}

/// One sampled check.
struct Job {
    conn: PeerConn,
    epoch: u64,
    load: LoadSpec,
    binary: PathBuf,
    threads: u32,
    tolerance: f64,
    dir: PathBuf,
    /// The agreed weights of the stage's last rounds, as this node knows them.
    agreed: Vec<Agreed>,
    /// The stage holds the embedding: its forwards take token ids from its own loader.
    first_stage: bool,
    /// The stage's layers (this node's, the claimant's too).
    layers: std::ops::Range<u32>,
    /// This node's replay class: a segment of another class is replayed only for its first
    /// [`CROSS_CLASS_STEPS`] optimizer steps, in the claimant's dtype.
    own_class: String,
    /// The peers this node knows and what they announce: a sender the log names must be one.
    peers: Vec<(PeerConn, neuroshard_proto::peer::NodeInfo)>,
}

/// Whether this holder checks one other holder now: `roll` (uniform in [0, 1)) falls within
/// its share of `p` when `verifiers` holders may each check that one.
fn drawn(p: f64, verifiers: usize, roll: f64) -> bool {
    roll < per_verifier(p, verifiers)
}

impl Trainer {
    /// Draws, once an epoch, which other holders of this stage's layers to check for the
    /// epoch that just ended, and starts the check in the background.
    pub(super) fn stage_check(
        &self,
        checks: &mut StageChecks,
        assignment: &crate::pipeline::Assignment,
    ) {
        // An epoch is checked once its pipeline receipts are settled (the claimant can no
        // longer replace what it signed for its senders) and the senders' rewards citing them
        // are on the ledger.
        let epoch = Proof::epoch_of(chrono::Utc::now().timestamp() - CHECK_AFTER_SECS);
        if epoch <= checks.last_epoch {
            return;
        }
        let first = checks.last_epoch == 0;
        checks.last_epoch = epoch;
        // The first epoch seen was not watched whole.
        if first {
            return;
        }
        let cfg = self.config();
        let p = cfg.ledger.verify_probability;
        if p <= 0.0 {
            return;
        }
        let spec = self.replay_spec();
        let others = crate::diloco::sync::replicas(&self.net, &self.diloco);
        // Each other holder may be checked by all holders but itself: this node and the
        // other holders but that one, as many as `others`.
        let verifiers = others.len();
        for (conn, _) in others {
            if !drawn(p, verifiers, rand::random::<f64>()) {
                continue;
            }
            let verifier = self.diloco.verifier.clone();
            if !verifier.take_slot() {
                // A replay runs: this draw is dropped (not counted).
                return;
            }
            verifier.figures.lock().sampled += 1;
            let job = Job {
                conn,
                epoch: epoch - 1,
                load: load_spec(&cfg, "", None, assignment),
                binary: spec.binary.clone(),
                threads: spec.threads,
                tolerance: spec.tolerance,
                dir: self.data_dir.join("pipeline").join("verify"),
                agreed: verifier.agreed.lock().values().cloned().collect(),
                first_stage: assignment.has_embedding(),
                layers: assignment.layers.clone(),
                own_class: verifier.replay_class.lock().clone(),
                peers: self.net.peers.conns_with_info(),
            };
            tokio::spawn(run(verifier, job));
        }
    }
}

async fn run(verifier: Arc<Verifier>, job: Job) {
    let started = std::time::Instant::now();
    let claimant = job.conn.id;
    let outcome = check(&job, &verifier).await;
    let ms = started.elapsed().as_millis() as u64;
    verifier.free_slot();
    let mut f = verifier.figures.lock();
    match outcome {
        Ok(Some(finding)) => {
            f.replayed += 1;
            f.replay_ms += ms;
            if finding.guilty {
                f.guilty += 1;
            } else {
                f.innocent += 1;
                f.distances.push(finding.distance);
                if f.distances.len() > 1000 {
                    f.distances.remove(0);
                }
            }
            drop(f);
            tracing::info!(%claimant, epoch = job.epoch, guilty = finding.guilty, distance = finding.distance, ms, reason = %finding.reason, "replayed a stage's work");
            verifier.findings.lock().push(finding);
        }
        Ok(None) => {
            drop(f);
            tracing::debug!(%claimant, epoch = job.epoch, "no stage work to check in that epoch");
        }
        Err(e) => {
            f.unverifiable += 1;
            drop(f);
            tracing::warn!(%claimant, epoch = job.epoch, error = %e, "could not replay a stage's work");
        }
    }
}

/// A fetched segment: id, start (ms), checkpoint, its sha256, operations.
struct Segment {
    id: u64,
    started_ms: i64,
    checkpoint: Vec<u8>,
    sha: String,
    ops: Vec<Op>,
}

async fn fetch(conn: &PeerConn, at_ms: i64, after: u64) -> Result<Segment, String> {
    let (id, stated, bytes) = conn
        .get_stage_log(at_ms, after, MAX_SEGMENT_FETCH)
        .await
        .map_err(|e| format!("fetching the stage log: {e}"))?;
    let (started_ms, checkpoint, log) = oplog::unpack(&bytes).map_err(|e| e.to_string())?;
    let sha = hex::encode(Sha256::digest(checkpoint));
    if sha != stated {
        return Err("the served checkpoint does not hash to what the peer states".into());
    }
    let ops = oplog::decode(log).map_err(|e| e.to_string())?;
    Ok(Segment {
        id,
        started_ms,
        checkpoint: checkpoint.to_vec(),
        sha,
        ops,
    })
}

/// The operations of `seg` up to the end of the epoch (`to_ms`): whole steps, so a replay
/// never stops between a step's forwards and its apply.
fn until(ops: &[Op], to_ms: i64) -> &[Op] {
    let late = ops.iter().position(|op| match op {
        Op::Forward { at_ms, .. } | Op::Backward { at_ms, .. } => *at_ms > to_ms + SKEW_MS,
        _ => false,
    });
    let Some(late) = late else {
        return ops;
    };
    let step_start = ops[..late]
        .iter()
        .rposition(|op| matches!(op, Op::Reset))
        .unwrap_or(0);
    &ops[..step_start]
}

async fn check(job: &Job, verifier: &Verifier) -> Result<Option<Finding>, String> {
    let from_ms = job.epoch as i64 * EPOCH_SECONDS * 1000;
    let to_ms = from_ms + EPOCH_SECONDS * 1000;
    let mut segments = vec![fetch(&job.conn, from_ms, 0).await?];
    while segments.len() < MAX_SEGMENTS {
        let last = segments.last().map_or(0, |s| s.id);
        match fetch(&job.conn, 0, last).await {
            Ok(s) if s.started_ms <= to_ms + SKEW_MS => segments.push(s),
            // Later than the epoch, or none kept after it.
            _ => break,
        }
    }
    // What the log says was sent in the epoch, per receiver (over every segment: a receipt
    // chains over the whole epoch).
    let all: Vec<Op> = segments
        .iter()
        .flat_map(|s| s.ops.iter().cloned())
        .collect();
    let sent: Vec<_> = oplog::receivers(&all)
        .into_iter()
        .map(|(dir, to)| {
            let kind = match dir {
                Dir::Forward => ReceiptKind::Forward,
                Dir::Backward => ReceiptKind::Backward,
            };
            (kind, to, oplog::sent_digests(&all, dir, &to))
        })
        .filter(|(_, _, s)| s.iter().any(|(at, ..)| *at >= from_ms - SKEW_MS))
        .collect();
    if sent.is_empty() {
        return Ok(None);
    }
    // What the log says the claimant received, per sender: the receipts it signed for them
    // must chain over exactly these (checked by the minter against the senders' rewards).
    let received: Vec<_> = oplog::senders(&all)
        .into_iter()
        .map(|(dir, from)| {
            let kind = match dir {
                Dir::Forward => ReceiptKind::Forward,
                Dir::Backward => ReceiptKind::Backward,
            };
            (kind, from, oplog::received_digests(&all, dir, &from))
        })
        .filter(|(_, _, s)| s.iter().any(|(at, ..)| *at >= from_ms - SKEW_MS))
        .collect();
    // An input that is not what the log says was received (and receipted) could be made up;
    // so could a sender the log names for it.
    let unbound = match segments
        .iter()
        .find_map(|s| oplog::unbound(until(&s.ops, to_ms), job.first_stage))
    {
        Some(what) => Some(format!(
            "the input of {what} is not a tensor the log says it received and receipted"
        )),
        None => made_up_senders(job, &all, from_ms, to_ms).await,
    };
    std::fs::create_dir_all(&job.dir).map_err(|e| format!("{}: {e}", job.dir.display()))?;
    // One segment of the epoch, drawn at random, is replayed (the chains above cover them
    // all): a stage that cheats on a share of its steps is caught in proportion, at the cost
    // of one segment's recomputation.
    let candidates: Vec<&Segment> = segments
        .iter()
        .filter(|s| {
            let last = s.ops.iter().rev().find_map(|op| match op {
                Op::Forward { at_ms, .. } | Op::Backward { at_ms, .. } => Some(*at_ms),
                _ => None,
            });
            last.is_some_and(|t| t >= from_ms - SKEW_MS) && !until(&s.ops, to_ms).is_empty()
        })
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let seg = candidates[rand::random_range(0..candidates.len())];
    // Training is chaotic: a segment replays within the tolerance across hardware only for a
    // few steps (BENCHMARKS.md, "Stage replays across hardware"), so a claimant
    // of another replay class is checked by the segment's first steps, in its dtype.
    let class = seg
        .ops
        .iter()
        .find_map(|op| match op {
            Op::Class(c) => Some(c.as_str()),
            _ => None,
        })
        .unwrap_or_default();
    let Some(dtype) = crate::diloco::window::class_dtype(class) else {
        verifier.figures.lock().other_class += 1;
        return Err(format!(
            "the segment names no known replay class ({class:?})"
        ));
    };
    let cross = class != job.own_class;
    let ops = until(&seg.ops, to_ms);
    let ops = if cross {
        first_steps(ops, CROSS_CLASS_STEPS)
    } else {
        ops
    };
    let (worst, from_agreed) = replay_segment(job, seg, ops, dtype).await?;
    if worst.compared == 0 {
        return Ok(None);
    }
    let off_agreed = from_agreed.is_some_and(|(d, ratio)| {
        d.is_nan() || ratio.is_nan() || ratio < MIN_CHECKPOINT_NORM_RATIO
    });
    let agreed_note = match from_agreed {
        Some((d, ratio)) => {
            format!("checkpoint {d:.4} from the agreed weights, {ratio:.4} of their norm")
        }
        None => "no agreed weights of this stage kept to compare the checkpoint with".into(),
    };
    if cross {
        let mut f = verifier.figures.lock();
        f.windows += 1;
        f.cross_class += 1;
    }
    let guilty = worst.guilty(job.tolerance) || off_agreed || unbound.is_some();
    // Every binding that fails is named.
    let mut why: Vec<String> = unbound.into_iter().collect();
    if off_agreed {
        why.push(format!(
            "the segment's {agreed_note} (at least {MIN_CHECKPOINT_NORM_RATIO}): a made-up checkpoint"
        ));
    }
    if worst.guilty(job.tolerance) {
        why.push(format!(
            "{} is {:.4} (relative) from its recomputation, tolerance {}; {agreed_note}",
            worst.worst, worst.max_distance, job.tolerance
        ));
    }
    let reason = if why.is_empty() {
        format!("reproduced {} outputs; {agreed_note}", worst.compared)
    } else {
        why.join("; ")
    };
    let reason = if cross {
        format!("{reason} (class {class:?}: its first {CROSS_CLASS_STEPS} steps, in {dtype})")
    } else {
        reason
    };
    let mut b = Vec::new();
    for s in &segments {
        b.extend_from_slice(s.sha.as_bytes());
    }
    b.extend_from_slice(&job.epoch.to_le_bytes());
    b.extend_from_slice(&worst.max_distance.to_le_bytes());
    let evidence: Hash32 = keccak(b"neuroshard-stage-replay-evidence-v1", &b);
    Ok(Some(Finding {
        inference: false,
        claimant: job.conn.id,
        round: seg.id,
        epoch: job.epoch,
        guilty,
        distance: worst.max_distance,
        reason,
        evidence,
        found_at: chrono::Utc::now().timestamp(),
        stage: Some(StageEvidence {
            sent,
            from_ms,
            received,
        }),
    }))
}

/// The operations of `ops` up to its `steps`-th optimizer step (all when it has fewer).
fn first_steps(ops: &[Op], steps: u32) -> &[Op] {
    let mut n = 0;
    for (i, op) in ops.iter().enumerate() {
        if matches!(op, Op::Apply { .. }) {
            n += 1;
            if n >= steps {
                return &ops[..=i];
            }
        }
    }
    ops
}

/// The first sender `ops` name for the inputs received in `[from_ms, to_ms]` that is made
/// up (`pipeline::senders`): unknown to this node, or whose own log (asked here) never sent
/// the claimant those tensors, or, when it serves no log, that does not hold the stage next
/// to the claimant's.
async fn made_up_senders(job: &Job, ops: &[Op], from_ms: i64, to_ms: i64) -> Option<String> {
    for (dir, from) in oplog::senders(ops) {
        let received: Vec<_> = oplog::received_digests(ops, dir, &from)
            .into_iter()
            .filter(|(at, ..)| (from_ms..=to_ms).contains(at))
            .collect();
        if received.is_empty() {
            continue;
        }
        let sender = match job.peers.iter().find(|(c, _)| c.id == from) {
            None => senders::Sender::Unknown,
            Some((conn, info)) => {
                let adjacent = senders::adjacent_layer(dir, &job.layers)
                    .is_some_and(|l| info.layers.contains(&l));
                let sent = match sent_by(conn, dir, &job.conn.id, from_ms, to_ms).await {
                    Ok(sent) => Some(sent),
                    Err(e) => {
                        tracing::debug!(sender = %from, error = %e, "a named sender's log not served");
                        None
                    }
                };
                senders::Sender::Known { adjacent, sent }
            }
        };
        if let Some(why) = senders::made_up(dir, &from, &received, &sender) {
            return Some(why);
        }
    }
    None
}

/// The digests of what `conn`'s own log says it sent `to` in direction `dir` around
/// `[from_ms, to_ms]` (the segments covering it, clocks' skew included).
async fn sent_by(
    conn: &PeerConn,
    dir: Dir,
    to: &neuroshard_ledger::Address,
    from_ms: i64,
    to_ms: i64,
) -> Result<std::collections::BTreeSet<Hash32>, String> {
    let mut segments = vec![fetch(conn, from_ms - 2 * SKEW_MS, 0).await?];
    while segments.len() < MAX_SEGMENTS {
        let last = segments.last().map_or(0, |s| s.id);
        match fetch(conn, 0, last).await {
            Ok(s) if s.started_ms <= to_ms + 2 * SKEW_MS => segments.push(s),
            _ => break,
        }
    }
    let all: Vec<Op> = segments.into_iter().flat_map(|s| s.ops).collect();
    Ok(oplog::sent_digests(&all, dir, to)
        .into_iter()
        .map(|(.., d)| d)
        .collect())
}

/// Replays `ops` of `seg` from its checkpoint in a scratch engine; with the checkpoint's
/// distance from the closest kept agreed weights (none kept: None).
async fn replay_segment(
    job: &Job,
    seg: &Segment,
    ops: &[Op],
    dtype: &str,
) -> Result<(recheck::Replayed, Option<(f64, f64)>), String> {
    let ckpt = job.dir.join(format!("{}-{}.ckpt", job.conn.id, seg.id));
    crate::diloco::round::write_file(&ckpt, &seg.checkpoint).map_err(|e| e.to_string())?;
    let r = replay_from(job, &ckpt, ops, dtype).await;
    let _ = std::fs::remove_file(&ckpt);
    r
}

async fn replay_from(
    job: &Job,
    ckpt: &Path,
    ops: &[Op],
    dtype: &str,
) -> Result<(recheck::Replayed, Option<(f64, f64)>), String> {
    // The training slots must hold the largest tensor of the log.
    let largest = ops
        .iter()
        .flat_map(|op| match op {
            Op::Forward { input, labels, .. } => {
                vec![
                    input.data.len(),
                    labels.as_ref().map_or(0, |l| l.data.len()),
                ]
            }
            Op::Backward { grad, sent, .. } => vec![
                grad.as_ref().map_or(0, |g| g.data.len()),
                sent.as_ref().map_or(0, |g| g.data.len()),
            ],
            _ => Vec::new(),
        })
        .max()
        .unwrap_or(0) as u64;
    // Outputs may be wider than inputs (the first stage: ids in, activations out).
    let slot_bytes = (largest * 8).max(1 << 20).next_multiple_of(1 << 20);
    let scratch = Scratch::start_with(&job.binary, job.threads, &job.dir, 4, slot_bytes)
        .await
        .map_err(|e| e.to_string())?;
    let mut load = job.load.clone();
    load.checkpoint = Some(ckpt.to_path_buf());
    load.train.dtype = dtype.into();
    scratch
        .engine
        .load_model(&load)
        .await
        .map_err(|e| format!("loading the segment's checkpoint: {e}"))?;
    let from_agreed = if job.agreed.is_empty() {
        None
    } else {
        let out = job.dir.join(format!("{}-weights.safetensors", job.conn.id));
        scratch
            .engine
            .export_weights(&out)
            .await
            .map_err(|e| format!("exporting the segment's checkpoint: {e}"))?;
        let tensors = crate::diloco::round::read_weights_file(&out).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&out);
        from_agreed(&tensors?, &job.agreed)
    };
    let replayed = recheck::replay(&scratch.engine, ops)
        .await
        .map_err(|e| e.to_string())?;
    Ok((replayed, from_agreed))
}

/// The relative distance (`verify::distance`) of the weights `tensors` (name, shape, values,
/// in name order) from the closest of the `agreed` states of the same layout, and the ratio
/// of their norms (checkpoint / agreed); None when none has it.
fn from_agreed(tensors: &crate::diloco::round::Tensors, agreed: &[Agreed]) -> Option<(f64, f64)> {
    let layout = crate::diloco::validate::Layout::new(
        tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect(),
    );
    let ckpt: Vec<f32> = tensors
        .iter()
        .flat_map(|(_, _, w)| w.iter().copied())
        .collect();
    agreed
        .iter()
        .filter(|(l, _)| *l == layout)
        .map(|(_, theta)| {
            let theta: Vec<f32> = theta.iter().flatten().copied().collect();
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            (
                crate::diloco::verify::distance(&theta, &ckpt),
                norm(&ckpt) / norm(&theta).max(1e-30),
            )
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(at_ms: i64) -> Op {
        Op::Forward {
            at_ms,
            driver: "d".into(),
            step: at_ms as u64,
            mb: 0,
            input: crate::pipeline::Wire {
                dtype: neuroshard_shared::shm::DType::F32,
                shape: vec![1, 1, 1],
                data: vec![0; 4],
            },
            labels: None,
            sent: oplog::Sent::Loss(1.0),
        }
    }

    #[test]
    fn each_claim_is_checked_p_times_whatever_the_number_of_holders() {
        // Rolls spread evenly over [0, 1): the share drawn is each verifier's probability.
        let rolls: Vec<f64> = (0..10_000)
            .map(|i| (f64::from(i) + 0.5) / 10_000.0)
            .collect();
        for p in [0.025, 0.1, 0.5, 1.0] {
            for holders in 2..12usize {
                let verifiers = holders - 1;
                let per = rolls.iter().filter(|r| drawn(p, verifiers, **r)).count();
                // Checks of one claim, summed over its verifiers.
                let checks = verifiers as f64 * per as f64 / rolls.len() as f64;
                assert!(
                    (checks - p).abs() < 1e-3,
                    "p {p}, {holders} holders: {checks}"
                );
            }
        }
        // Alone with one other holder at p = 1: always checked; p = 0: never.
        assert!(rolls.iter().all(|r| drawn(1.0, 1, *r)));
        assert!(!rolls.iter().any(|r| drawn(0.0, 3, *r)));
    }

    #[test]
    fn a_checkpoint_is_measured_against_the_closest_agreed_weights() {
        use crate::diloco::validate::Layout;
        let layout = Layout::new(vec![("a".into(), vec![2]), ("b".into(), vec![1])]);
        let tensors = vec![
            ("a".to_string(), vec![2u64], vec![3.0f32, 0.0]),
            ("b".to_string(), vec![1u64], vec![4.0f32]),
        ];
        let near: Agreed = (layout.clone(), Arc::new(vec![vec![3.0, 0.0], vec![4.5]]));
        let far: Agreed = (layout.clone(), Arc::new(vec![vec![30.0, 0.0], vec![40.0]]));
        let other: Agreed = (
            Layout::new(vec![("c".into(), vec![3])]),
            Arc::new(vec![vec![3.0, 0.0, 4.0]]),
        );
        let (d, ratio) =
            from_agreed(&tensors, &[far.clone(), near.clone(), other.clone()]).unwrap();
        assert!((d - 0.5 / 4.5f64.hypot(3.0)).abs() < 1e-6, "{d}");
        assert!((ratio - 5.0 / 4.5f64.hypot(3.0)).abs() < 1e-6, "{ratio}");
        assert!(from_agreed(&tensors, &[other]).is_none());
        // Zero weights are exactly 1.0 from any agreed state and keep none of its norm.
        let zeros = vec![
            ("a".to_string(), vec![2u64], vec![0.0f32, 0.0]),
            ("b".to_string(), vec![1u64], vec![0.0f32]),
        ];
        let (d, ratio) = from_agreed(&zeros, &[near, far]).unwrap();
        assert_eq!((d, ratio), (1.0, 0.0));
        assert!(ratio < MIN_CHECKPOINT_NORM_RATIO);
    }

    #[test]
    fn a_replay_ends_with_the_last_whole_step_of_the_epoch() {
        let ops = vec![
            Op::Reset,
            fwd(10),
            Op::Apply { global_norm: 1.0 },
            Op::Reset,
            fwd(20),
            Op::Apply { global_norm: 1.0 },
            Op::Reset,
            fwd(20_000),
        ];
        assert_eq!(until(&ops, 100).len(), 6);
        assert_eq!(until(&ops, 20_000).len(), 8);
        // A step that started late is not replayed at all.
        assert!(until(&ops[3..], -10_000).is_empty());
    }

    #[test]
    fn another_class_replays_the_first_steps() {
        let ops = vec![
            Op::Class("neuroshard-engine 0.1.0 cpu x86-avx2-fma bf16".into()),
            Op::Reset,
            fwd(10),
            Op::Apply { global_norm: 1.0 },
            Op::Reset,
            fwd(20),
            Op::Apply { global_norm: 1.0 },
            Op::Reset,
            fwd(30),
        ];
        assert_eq!(first_steps(&ops, 1).len(), 4);
        assert_eq!(first_steps(&ops, 2).len(), 7);
        // Fewer steps than the window: all of them.
        assert_eq!(first_steps(&ops, 3).len(), ops.len());
    }
}
