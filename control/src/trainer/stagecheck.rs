//! Sampled recomputation of pipeline-stage work (issue #19, item 2): a holder of a stage's
//! layers checks the other holders of the same layers.
//!
//! Once an epoch, for each other holder of this stage's layers, the node draws with
//! probability `ledger.verify_probability` (its own randomness: a claimant can neither know
//! nor choose who checks it, and cannot grind its claim to avoid a draw) whether to check that
//! holder's work of the epoch that just ended. Checking: fetch the segments of the holder's
//! operation log that cover the epoch (`GetStageLog`, `pipeline/oplog.rs`), replay each from
//! its checkpoint in a scratch engine up to the epoch's end (`pipeline/recheck.rs`), and file
//! a finding with the largest distance between a recomputed output and the sent one, and the
//! digests of what the log says was sent to whom. The minter (`work.rs`) waits for the
//! holder's reward that cites a receipt of one of those receivers for that epoch, checks that
//! the receipt chains over exactly the logged tensors (otherwise the log is not what was sent:
//! guilty), and writes the verdict (`Ledger::judge`). One replay runs at a time (the slot is
//! shared with DiLoCo replays).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use neuroshard_ledger::keys::{Hash32, keccak};
use neuroshard_ledger::proof::{EPOCH_SECONDS, Proof};
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_net::client::PeerConn;
use sha2::{Digest, Sha256};

use super::*;
use crate::diloco::verify::{Finding, StageEvidence, Verifier};
use crate::engine::scratch::Scratch;
use crate::pipeline::oplog::{self, Dir, Op};
use crate::pipeline::recheck;

/// Most segments fetched for one epoch (all that are kept).
const MAX_SEGMENTS: usize = oplog::KEEP_SEGMENTS;
/// Largest segment (checkpoint and log) a verifier fetches.
const MAX_SEGMENT_FETCH: usize = 512 << 20;
/// Clock skew allowed between the claimant's log times and the epoch boundaries.
const SKEW_MS: i64 = 5_000;

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
}

impl Trainer {
    /// Draws, once an epoch, which other holders of this stage's layers to check for the
    /// epoch that just ended, and starts the check in the background.
    pub(super) fn stage_check(
        &self,
        checks: &mut StageChecks,
        assignment: &crate::pipeline::Assignment,
    ) {
        let epoch = Proof::epoch_of(chrono::Utc::now().timestamp());
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
        for (conn, _) in crate::diloco::sync::replicas(&self.net, &self.diloco) {
            if rand::random::<f64>() >= p {
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
            };
            tokio::spawn(run(verifier, job));
        }
    }
}

async fn run(verifier: Arc<Verifier>, job: Job) {
    let started = std::time::Instant::now();
    let claimant = job.conn.id;
    let outcome = check(&job).await;
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

async fn check(job: &Job) -> Result<Option<Finding>, String> {
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
    let worst = replay_segment(job, seg, until(&seg.ops, to_ms)).await?;
    if worst.compared == 0 {
        return Ok(None);
    }
    let guilty = worst.guilty(job.tolerance);
    let reason = if guilty {
        format!(
            "{} is {:.4} (relative) from its recomputation, tolerance {}",
            worst.worst, worst.max_distance, job.tolerance
        )
    } else {
        format!("reproduced {} outputs", worst.compared)
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
        stage: Some(StageEvidence { sent, from_ms }),
    }))
}

/// Replays `ops` of `seg` from its checkpoint in a scratch engine.
async fn replay_segment(job: &Job, seg: &Segment, ops: &[Op]) -> Result<recheck::Replayed, String> {
    let ckpt = job.dir.join(format!("{}-{}.ckpt", job.conn.id, seg.id));
    crate::diloco::round::write_file(&ckpt, &seg.checkpoint).map_err(|e| e.to_string())?;
    let r = replay_from(job, &ckpt, ops).await;
    let _ = std::fs::remove_file(&ckpt);
    r
}

async fn replay_from(job: &Job, ckpt: &Path, ops: &[Op]) -> Result<recheck::Replayed, String> {
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
    scratch
        .engine
        .load_model(&load)
        .await
        .map_err(|e| format!("loading the segment's checkpoint: {e}"))?;
    recheck::replay(&scratch.engine, ops)
        .await
        .map_err(|e| e.to_string())
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
}
