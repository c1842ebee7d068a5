//! The operation log of a pipeline stage (issue #19, item 2: "a stage forward from its attested
//! input"): what a verifier needs to recompute this stage's training work.
//!
//! A stage's weights change every step, so a verifier cannot recompute one forward on its own
//! copy of the layers. Instead the stage logs its engine work in **segments**: a segment starts
//! with a checkpoint of the engine (weights, AdamW moments, step; its sha256 names it) taken
//! under the stage lock between two steps, and goes on with every engine command in order:
//! each step's gradient reset, each forward with the input bytes it received (and the labels
//! on the last stage), each backward with the output gradient it received, each optimizer step
//! with its global norm, and what each command's result was sent as (activations downstream,
//! the loss back, input gradients upstream), in the bytes the receiver checked and hashed, and
//! who received it ([`Op::Route`]). A verifier that holds the same layers loads the checkpoint
//! into a scratch engine, runs the same commands and compares every recomputed output with the
//! logged one (`recheck.rs`); the logged outputs cannot be rewritten after the fact because the
//! receivers' receipts chain over the same bytes ([`sent_chain`]).
//!
//! A new segment starts at the first step after the engine's state was touched from outside
//! a step (a DiLoCo outer step, a reload: [`OpLog::touched`]), after the stage round changed,
//! or when the current one passed [`MAX_SEGMENT_BYTES`]. Until then the old segment goes on
//! (a touch is logged as [`Op::Touched`]: a replay stops there, the sent tensors after it
//! still count for the receipts' chains), so the segments cover every tensor sent without a
//! gap. The last [`KEEP_SEGMENTS`] are kept on disk under `<data-dir>/pipeline/oplog/`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use neuroshard_ledger::Address;
use neuroshard_ledger::keys::Hash32;
use neuroshard_ledger::receipt::Receipt;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

pub use super::oplog_codec::{decode, encode, pack, unpack};
use super::wire::Wire;

/// Segments kept on disk for verifiers (a segment ends at every stage round and every outer
/// step, so an epoch may span several; a verifier needs all of them for the receipts' chains).
pub const KEEP_SEGMENTS: usize = 16;
/// A segment's log stops growing past this many bytes; the next step starts a new one.
pub const MAX_SEGMENT_BYTES: u64 = 96 << 20;

/// Why a log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("operation log truncated at byte {0}")]
    Truncated(usize),
    #[error("operation log: {0}")]
    Malformed(String),
    #[error("operation log file {path}: {error}")]
    Io { path: String, error: std::io::Error },
}

/// Which direction a logged output went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    /// Activations to the next stage (or the loss back to the caller, on the last stage).
    Forward,
    /// The gradient w.r.t. this stage's input, back to the previous stage.
    Backward,
}

/// What a forward's result was sent as.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// Activations, in the bytes the next stage checked (bf16 on the wire: widened back).
    Acts(Wire),
    /// The loss (the last stage).
    Loss(f32),
}

/// One engine command of a stage, in the order the engine ran them.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A new step took the stage: its accumulated gradients were reset.
    Reset,
    Forward {
        at_ms: i64,
        driver: String,
        step: u64,
        mb: u32,
        input: Wire,
        labels: Option<Wire>,
        sent: Sent,
    },
    Backward {
        at_ms: i64,
        driver: String,
        step: u64,
        mb: u32,
        /// The gradient received from the next stage (none on the last stage).
        grad: Option<Wire>,
        /// The input gradient sent back (none on the first stage).
        sent: Option<Wire>,
    },
    /// The optimizer stepped, clipped by this global norm.
    Apply { global_norm: f32 },
    /// The engine's state was changed from outside a step here: a replay cannot go past.
    Touched,
    /// The replay class of the engine that did the work (`LoadModelReply.replay_class`:
    /// engine version, device, instruction set, dtype), first in every segment: a verifier
    /// of another class replays only a short window of it, in this class's dtype
    /// (`trainer/stagecheck.rs`).
    Class(String),
    /// Who received the output of the forward or backward of (driver, step, mb): the attester
    /// whose receipt chains over it.
    Route {
        dir: Dir,
        driver: String,
        step: u64,
        mb: u32,
        to: Address,
    },
    /// A tensor received from a peer for the forward (`Dir::Forward`: activations) or the
    /// backward (`Dir::Backward`: a gradient) of (driver, step, mb), logged when this stage
    /// signed its receipt for `from` over the same bytes (`digest`: `Receipt::tensor_digest`);
    /// the peer's rewards cite that receipt, so a verifier checks the logged inputs against it
    /// ([`received_digests`], [`unbound`]).
    Received {
        at_ms: i64,
        dir: Dir,
        driver: String,
        step: u64,
        mb: u32,
        from: Address,
        digest: Hash32,
    },
}

/// A kept segment as served: its info, checkpoint bytes and log bytes.
pub type Served = (SegmentInfo, Vec<u8>, Vec<u8>);

/// What a verifier is told about a kept segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    /// sha256 (hex) of the checkpoint the segment starts from.
    pub checkpoint_sha256: String,
    pub started_ms: i64,
    pub log_bytes: u64,
}

#[derive(Debug)]
struct Kept {
    info: SegmentInfo,
    checkpoint: PathBuf,
    log: PathBuf,
}

#[derive(Debug, Default)]
struct Inner {
    segments: BTreeMap<u64, Kept>,
    /// The segment being written: its id and file.
    open: Option<(u64, std::fs::File)>,
    /// The engine's state changed outside a step since the open segment began.
    touched: bool,
    /// The stage round the open segment began in.
    round: u64,
    /// The engine's replay class, logged first in each new segment.
    class: String,
    next_id: u64,
}

/// A stage's operation log.
#[derive(Debug)]
pub struct OpLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn io_err(path: &Path, error: std::io::Error) -> LogError {
    LogError::Io {
        path: path.display().to_string(),
        error,
    }
}

impl OpLog {
    pub fn new(dir: PathBuf) -> OpLog {
        OpLog {
            dir,
            inner: Mutex::new(Inner {
                // Ids follow the clock so that a restart never reuses one.
                next_id: neuroshard_net::now_ms().max(0) as u64,
                ..Inner::default()
            }),
        }
    }

    /// The engine's state was changed outside a pipeline step (weights imported, a reload):
    /// the open segment cannot be replayed past this point, so the next step starts a new one.
    pub fn touched(&self) {
        self.record(&Op::Touched);
        self.inner.lock().touched = true;
    }

    /// Whether the next step must start a new segment (none open, the state touched, another
    /// stage round, or the open one full).
    pub fn needs_segment(&self, round: u64) -> bool {
        let g = self.inner.lock();
        let full = g.open.as_ref().is_none_or(|(id, _)| {
            g.segments
                .get(id)
                .is_none_or(|k| k.info.log_bytes >= MAX_SEGMENT_BYTES)
        });
        full || g.touched || g.round != round
    }

    /// The replay class of the engine the next segments are computed by.
    pub fn set_class(&self, class: &str) {
        class.clone_into(&mut self.inner.lock().class);
    }

    /// Where the next segment's checkpoint goes (the caller writes it, under the stage lock).
    pub fn next_checkpoint_path(&self) -> PathBuf {
        let id = self.inner.lock().next_id;
        self.dir.join(format!("segment-{id}.ckpt"))
    }

    /// Starts a segment from the checkpoint just written to [`OpLog::next_checkpoint_path`].
    pub fn begin(&self, round: u64, checkpoint: &Path) -> Result<SegmentInfo, LogError> {
        let bytes = std::fs::read(checkpoint).map_err(|e| io_err(checkpoint, e))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let mut g = self.inner.lock();
        let id = g.next_id;
        g.next_id += 1;
        let log = self.dir.join(format!("segment-{id}.log"));
        let file = std::fs::File::create(&log).map_err(|e| io_err(&log, e))?;
        let info = SegmentInfo {
            id,
            checkpoint_sha256: sha,
            started_ms: neuroshard_net::now_ms(),
            log_bytes: 0,
        };
        g.segments.insert(
            id,
            Kept {
                info: info.clone(),
                checkpoint: checkpoint.to_path_buf(),
                log,
            },
        );
        while g.segments.len() > KEEP_SEGMENTS {
            if let Some((_, old)) = g.segments.pop_first() {
                let _ = std::fs::remove_file(old.checkpoint);
                let _ = std::fs::remove_file(old.log);
            }
        }
        g.open = Some((id, file));
        g.touched = false;
        g.round = round;
        let class = Op::Class(g.class.clone());
        drop(g);
        self.record(&class);
        Ok(info)
    }

    /// Appends `op` to the open segment (nothing when none is open, or the open one is full).
    /// A failed write closes the segment: what it logged so far stays servable.
    pub fn record(&self, op: &Op) {
        let mut g = self.inner.lock();
        if matches!(op, Op::Touched) && g.touched {
            return;
        }
        let Some((id, file)) = g.open.as_mut() else {
            return;
        };
        let id = *id;
        let mut buf = Vec::new();
        encode(op, &mut buf);
        let written = file.write_all(&buf);
        match (written, g.segments.get_mut(&id)) {
            (Ok(()), Some(k)) => {
                k.info.log_bytes += buf.len() as u64;
                // Past the size a new segment is started at the next step; this one goes on
                // until then, up to twice the size.
                if k.info.log_bytes >= 2 * MAX_SEGMENT_BYTES {
                    g.open = None;
                }
            }
            (Err(e), _) => {
                tracing::warn!(segment = id, error = %e, "operation log write failed");
                g.open = None;
            }
            (Ok(()), None) => g.open = None,
        }
    }

    /// The kept segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let g = self.inner.lock();
        g.segments.values().map(|k| k.info.clone()).collect()
    }

    /// The kept segment that covers unix time `at_ms`: the newest one started at or before it
    /// (the oldest kept when all started later).
    pub fn covering(&self, at_ms: i64) -> Option<u64> {
        let g = self.inner.lock();
        g.segments
            .values()
            .rev()
            .find(|k| k.info.started_ms <= at_ms)
            .or_else(|| g.segments.values().next())
            .map(|k| k.info.id)
    }

    /// The kept segment after segment `id` (ids grow).
    pub fn after(&self, id: u64) -> Option<u64> {
        let g = self.inner.lock();
        g.segments.range(id + 1..).next().map(|(id, _)| *id)
    }

    /// A kept segment's checkpoint and log bytes, for a verifier: (info, checkpoint, log).
    pub fn read(&self, id: u64) -> Result<Option<Served>, LogError> {
        let (info, ckpt, log) = {
            let g = self.inner.lock();
            let Some(k) = g.segments.get(&id) else {
                return Ok(None);
            };
            (k.info.clone(), k.checkpoint.clone(), k.log.clone())
        };
        let c = std::fs::read(&ckpt).map_err(|e| io_err(&ckpt, e))?;
        let mut l = std::fs::read(&log).map_err(|e| io_err(&log, e))?;
        // A record being appended meanwhile is cut at what the info counted.
        l.truncate(usize::try_from(info.log_bytes).unwrap_or(usize::MAX));
        Ok(Some((info, c, l)))
    }
}

/// One tensor sent, as its receiver's receipt chains it: sent at (ms), step, micro-batch and
/// the digest of its bytes.
pub type SentDigest = (i64, u64, u32, Hash32);

/// The receivers of `ops`' outputs, by direction.
pub fn receivers(ops: &[Op]) -> Vec<(Dir, Address)> {
    let set: std::collections::BTreeSet<(Dir, [u8; 20])> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Route { dir, to, .. } => Some((*dir, to.0)),
            _ => None,
        })
        .collect();
    set.into_iter().map(|(d, a)| (d, Address(a))).collect()
}

/// [`sent_to`] as digests (what a verifier keeps until the claim it checks is on the ledger).
pub fn sent_digests(ops: &[Op], dir: Dir, to: &Address) -> Vec<SentDigest> {
    sent_to(ops, dir, to)
        .into_iter()
        .map(|(at, step, mb, bytes)| (at, step, mb, Receipt::tensor_digest(bytes)))
        .collect()
}

/// The tensors of `ops` that went to `to` in direction `dir`, in the order sent, as the
/// receiver's receipt chains them: (sent at ms, step, micro-batch, bytes). A forward whose
/// result was a loss sent no tensor.
pub fn sent_to<'a>(ops: &'a [Op], dir: Dir, to: &Address) -> Vec<(i64, u64, u32, &'a [u8])> {
    let routed: std::collections::BTreeSet<(&str, u64, u32)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Route {
                dir: d,
                driver,
                step,
                mb,
                to: t,
            } if *d == dir && t == to => Some((driver.as_str(), *step, *mb)),
            _ => None,
        })
        .collect();
    ops.iter()
        .filter_map(|op| match (op, dir) {
            (
                Op::Forward {
                    at_ms,
                    driver,
                    step,
                    mb,
                    sent: Sent::Acts(a),
                    ..
                },
                Dir::Forward,
            ) => Some((*at_ms, driver, *step, *mb, a.data.as_slice())),
            (
                Op::Backward {
                    at_ms,
                    driver,
                    step,
                    mb,
                    sent: Some(g),
                    ..
                },
                Dir::Backward,
            ) => Some((*at_ms, driver, *step, *mb, g.data.as_slice())),
            _ => None,
        })
        .filter(|(_, d, s, m, _)| routed.contains(&(d.as_str(), *s, *m)))
        .map(|(at, _, s, m, b)| (at, s, m, b))
        .collect()
}

/// The peers `ops` name as senders of their inputs, by direction.
pub fn senders(ops: &[Op]) -> Vec<(Dir, Address)> {
    let set: std::collections::BTreeSet<(Dir, [u8; 20])> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Received { dir, from, .. } => Some((*dir, from.0)),
            _ => None,
        })
        .collect();
    set.into_iter().map(|(d, a)| (d, Address(a))).collect()
}

/// The tensors of `ops` received from `from` in direction `dir` (forward inputs, backward
/// gradients), in the order received, as the receipts this stage signed for `from` chain
/// them.
pub fn received_digests(ops: &[Op], dir: Dir, from: &Address) -> Vec<SentDigest> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Received {
                at_ms,
                dir: d,
                step,
                mb,
                from: f,
                digest,
                ..
            } if *d == dir && f == from => Some((*at_ms, *step, *mb, *digest)),
            _ => None,
        })
        .collect()
}

/// The first input of `ops` that is not what the log says was received (an honest stage logs
/// every tensor it signs a receipt for, and feeds its engine exactly that), as "the forward
/// of step s micro-batch m": a forward's input or a backward's gradient with no
/// [`Op::Received`] of the same bytes for its (driver, step, micro-batch). The first stage's
/// forwards take token ids from its own loader and need none (`first_stage`).
pub fn unbound(ops: &[Op], first_stage: bool) -> Option<String> {
    let named: std::collections::BTreeSet<(Dir, &str, u64, u32, Hash32)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Received {
                dir,
                driver,
                step,
                mb,
                digest,
                ..
            } => Some((*dir, driver.as_str(), *step, *mb, *digest)),
            _ => None,
        })
        .collect();
    let is_named = |dir: Dir, driver: &str, step: u64, mb: u32, w: &Wire| {
        named.contains(&(dir, driver, step, mb, Receipt::tensor_digest(&w.data)))
    };
    ops.iter().find_map(|op| match op {
        Op::Forward {
            driver,
            step,
            mb,
            input,
            ..
        } if !first_stage && !is_named(Dir::Forward, driver, *step, *mb, input) => {
            Some(format!("the forward of step {step} micro-batch {mb}"))
        }
        Op::Backward {
            driver,
            step,
            mb,
            grad: Some(g),
            ..
        } if !is_named(Dir::Backward, driver, *step, *mb, g) => {
            Some(format!("the backward of step {step} micro-batch {mb}"))
        }
        _ => None,
    })
}

/// Whether the `sent` tensors chain (from zero, as a receipt of one epoch does) to
/// `commitment`, the way the receiver chains them (`attest::chain_step`: step by step, each
/// step's micro-batches in micro-batch order): the receiver signed for exactly these bytes.
/// The epoch (and the receipt, signed at any moment) may cut a step, so the first and last
/// steps of the run may be any part of theirs; the run starts at a step with a tensor sent
/// from `from_ms` on (the epoch's start, give or take the clocks' skew).
pub fn sent_chain(sent: &[SentDigest], from_ms: i64, commitment: &Hash32) -> bool {
    use crate::attest::chain_step;
    // Consecutive tensors of one step, in the order sent.
    // (step, last sent at, its micro-batches).
    type Group = (u64, i64, Vec<(u32, Hash32)>);
    let mut steps: Vec<Group> = Vec::new();
    for (at, step, mb, d) in sent {
        match steps.last_mut() {
            Some((s, last_at, mbs)) if s == step => {
                *last_at = (*last_at).max(*at);
                mbs.push((*mb, *d));
            }
            _ => steps.push((*step, *at, vec![(*mb, *d)])),
        }
    }
    // Parts of a step (at most 2^8 tried per step: micro-batches beyond 8 are taken whole).
    let parts = |mbs: &[(u32, Hash32)]| -> Vec<Vec<(u32, Hash32)>> {
        if mbs.len() > 8 {
            return vec![mbs.to_vec()];
        }
        (1u32..(1 << mbs.len()))
            .map(|bits| {
                mbs.iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, x)| *x)
                    .collect()
            })
            .collect()
    };
    for start in 0..steps.len() {
        if steps[start].1 < from_ms {
            continue;
        }
        for first in parts(&steps[start].2) {
            let mut h = chain_step(&Hash32::ZERO, steps[start].0, first);
            if h == *commitment {
                return true;
            }
            for (step, _, mbs) in &steps[start + 1..] {
                // The receipt may have been signed part-way through this step.
                for part in parts(mbs) {
                    if chain_step(&h, *step, part) == *commitment {
                        return true;
                    }
                }
                h = chain_step(&h, *step, mbs.clone());
            }
        }
    }
    false
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use neuroshard_shared::shm::DType;

    pub(crate) fn w(vals: &[f32]) -> Wire {
        Wire {
            dtype: DType::F32,
            shape: vec![1, 1, vals.len() as u64],
            data: vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub(crate) fn sample(to: Address) -> Vec<Op> {
        vec![
            Op::Reset,
            Op::Forward {
                at_ms: 10,
                driver: "d".into(),
                step: 5,
                mb: 0,
                input: w(&[1.0, 2.0]),
                labels: None,
                sent: Sent::Acts(w(&[3.0, 4.0])),
            },
            Op::Route {
                dir: Dir::Forward,
                driver: "d".into(),
                step: 5,
                mb: 0,
                to,
            },
            Op::Received {
                at_ms: 10,
                dir: Dir::Forward,
                driver: "d".into(),
                step: 5,
                mb: 0,
                from: Address([9; 20]),
                digest: Receipt::tensor_digest(&w(&[1.0, 2.0]).data),
            },
            Op::Forward {
                at_ms: 11,
                driver: "d".into(),
                step: 5,
                mb: 1,
                input: w(&[1.0, 2.0]),
                labels: Some(Wire {
                    dtype: DType::U32,
                    shape: vec![1, 2],
                    data: vec![0; 8],
                }),
                sent: Sent::Loss(2.5),
            },
            Op::Backward {
                at_ms: 12,
                driver: "d".into(),
                step: 5,
                mb: 0,
                grad: Some(w(&[0.5, 0.5])),
                sent: Some(w(&[0.25, 0.0])),
            },
            Op::Received {
                at_ms: 12,
                dir: Dir::Backward,
                driver: "d".into(),
                step: 5,
                mb: 0,
                from: Address([8; 20]),
                digest: Receipt::tensor_digest(&w(&[0.5, 0.5]).data),
            },
            Op::Route {
                dir: Dir::Backward,
                driver: "d".into(),
                step: 5,
                mb: 0,
                to,
            },
            Op::Apply { global_norm: 1.5 },
            Op::Class("neuroshard-engine 0.1.0 cpu x86-avx2-fma bf16".into()),
        ]
    }

    #[test]
    fn the_sent_tensors_chain_to_the_receivers_commitment() {
        let to = Address([7; 20]);
        let ops = sample(to);
        assert_eq!(
            receivers(&ops),
            vec![(Dir::Forward, to), (Dir::Backward, to)]
        );
        let fwd = sent_to(&ops, Dir::Forward, &to);
        assert_eq!(fwd.len(), 1);
        let back = sent_digests(&ops, Dir::Backward, &to);
        assert_eq!(back.len(), 1);
        assert!(sent_to(&ops, Dir::Forward, &Address([8; 20])).is_empty());
        let c = Receipt::chain(&Hash32::ZERO, 5, 0, &w(&[0.25, 0.0]).data);
        assert!(sent_chain(&back, 0, &c));
        // Micro-batches that arrived out of order chain the same; a receipt signed part-way
        // through a step, or an epoch that began inside one, still matches.
        let d = |x: u8| Hash32([x; 32]);
        let sent = vec![
            (0, 1, 1, d(1)),
            (0, 1, 0, d(2)),
            (5, 2, 0, d(3)),
            (5, 2, 1, d(4)),
        ];
        let mut received = crate::attest::chain_step(&Hash32::ZERO, 1, vec![(0, d(2)), (1, d(1))]);
        let partial = crate::attest::chain_step(&received, 2, vec![(1, d(4))]);
        received = crate::attest::chain_step(&received, 2, vec![(1, d(4)), (0, d(3))]);
        assert!(sent_chain(&sent, 0, &received));
        assert!(sent_chain(&sent, 0, &partial));
        let cut = crate::attest::chain_step(&Hash32::ZERO, 1, vec![(0, d(2))]);
        assert!(sent_chain(&sent, 0, &cut));
        assert!(!sent_chain(&sent, 1, &received));
        assert!(!sent_chain(&sent, 0, &d(9)));
        // Not from that epoch on, or other bytes: no match.
        assert!(!sent_chain(&back, 13, &c));
        let other = Receipt::chain(&Hash32::ZERO, 5, 0, &w(&[0.25, 0.5]).data);
        assert!(!sent_chain(&back, 0, &other));
    }

    #[test]
    fn the_received_tensors_chain_to_the_receipts_the_stage_signed() {
        let ops = sample(Address([7; 20]));
        let (up, down) = (Address([9; 20]), Address([8; 20]));
        assert_eq!(
            senders(&ops),
            vec![(Dir::Forward, up), (Dir::Backward, down)]
        );
        // What the stage signed for its upstream: the input of step 5 micro-batch 0.
        let inputs = received_digests(&ops, Dir::Forward, &up);
        assert_eq!(inputs.len(), 1);
        let signed = Receipt::chain(&Hash32::ZERO, 5, 0, &w(&[1.0, 2.0]).data);
        assert!(sent_chain(&inputs, 0, &signed));
        let grads = received_digests(&ops, Dir::Backward, &down);
        let signed_back = Receipt::chain(&Hash32::ZERO, 5, 0, &w(&[0.5, 0.5]).data);
        assert!(sent_chain(&grads, 0, &signed_back));
        assert!(received_digests(&ops, Dir::Forward, &down).is_empty());
        // A log whose inputs were made up after the fact (equal to its outputs, as zero weights
        // would need) is not what the stage signed for when it received them.
        let mut forged = ops.clone();
        if let Op::Forward { input, .. } = &mut forged[1] {
            *input = w(&[3.0, 4.0]);
        }
        assert_eq!(
            unbound(&forged, true),
            None,
            "the first stage's inputs are its own"
        );
        assert_eq!(
            unbound(&forged, false).as_deref(),
            Some("the forward of step 5 micro-batch 0")
        );
        // Nor can the record be forged along: it no longer chains to the signed receipt.
        let mut both = forged.clone();
        if let Op::Received { digest, .. } = &mut both[3] {
            *digest = Receipt::tensor_digest(&w(&[3.0, 4.0]).data);
        }
        assert!(!sent_chain(
            &received_digests(&both, Dir::Forward, &up),
            0,
            &signed
        ));
        // Every input of a stage after the first names its sender (the labelled micro-batch 1
        // here does not).
        let first: Vec<Op> = ops
            .iter()
            .filter(|op| !matches!(op, Op::Forward { mb: 1, .. }))
            .cloned()
            .collect();
        assert_eq!(unbound(&first, false), None);
        assert_eq!(
            unbound(&ops, false).as_deref(),
            Some("the forward of step 5 micro-batch 1")
        );
        assert_eq!(unbound(&ops, true), None);
        let unnamed: Vec<Op> = ops
            .iter()
            .filter(|op| {
                !matches!(
                    op,
                    Op::Received {
                        dir: Dir::Backward,
                        ..
                    }
                )
            })
            .cloned()
            .collect();
        assert_eq!(
            unbound(&unnamed, true).as_deref(),
            Some("the backward of step 5 micro-batch 0")
        );
    }

    #[test]
    fn segments_roll_and_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let log = OpLog::new(dir.path().to_path_buf());
        log.set_class("cpu f32");
        assert!(log.needs_segment(1));
        let mut ids = Vec::new();
        for i in 0..(KEEP_SEGMENTS + 2) {
            let ckpt = log.next_checkpoint_path();
            std::fs::write(&ckpt, format!("checkpoint {i}")).unwrap();
            let info = log.begin(1, &ckpt).unwrap();
            assert!(!log.needs_segment(1));
            assert!(log.needs_segment(2));
            for op in sample(Address([1; 20])) {
                log.record(&op);
            }
            ids.push(info.id);
        }
        let kept = log.segments();
        assert_eq!(kept.len(), KEEP_SEGMENTS);
        assert_eq!(kept[0].id, ids[2]);
        assert!(log.read(ids[0]).unwrap().is_none());
        let (info, ckpt, bytes) = log.read(*ids.last().unwrap()).unwrap().unwrap();
        assert_eq!(info.checkpoint_sha256, hex::encode(Sha256::digest(&ckpt)));
        // Each segment opens with the engine's replay class.
        let mut want = vec![Op::Class("cpu f32".into())];
        want.extend(sample(Address([1; 20])));
        assert_eq!(decode(&bytes).unwrap(), want);
        let packed = pack(9, &ckpt, &bytes);
        assert_eq!(unpack(&packed).unwrap(), (9, &ckpt[..], &bytes[..]));
        assert!(unpack(&packed[..7]).is_err());
        assert!(unpack(&packed[..17]).is_err());
        assert_eq!(log.covering(info.started_ms), Some(info.id));
        assert_eq!(log.covering(kept[0].started_ms - 1), Some(kept[0].id));
        assert_eq!(log.after(kept[0].id), Some(kept[1].id));
        assert_eq!(log.after(info.id), None);
        // A touch is logged once and asks for a new segment; the old one goes on until then.
        log.touched();
        log.touched();
        assert!(log.needs_segment(1));
        log.record(&Op::Reset);
        let ops = decode(&log.read(info.id).unwrap().unwrap().2).unwrap();
        assert_eq!(&ops[ops.len() - 2..], &[Op::Touched, Op::Reset]);
    }
}
