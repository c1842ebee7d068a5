//! Replay windows of DiLoCo rounds (issue #19 item 2): checks that hold across hardware.
//!
//! Training is chaotic: a last-bit difference grows about tenfold every 25 steps, so a whole
//! round (H = 500) replays only on bit-identical nodes (BENCHMARKS.md, "Checked work: replays
//! across hardware"), while a window of 1 to 5 steps after warm-up reproduces within a few
//! thousandths even on other hardware. So:
//!
//! * **Claimant.** Its engine hashes the whole training state (weights, AdamW moments,
//!   optimizer step, data position; `TrainStepReply.state_hash`) after every inner step. At
//!   the round's end it checkpoints the end state, and sends with its pseudo-gradient the
//!   step root: sha256 over the round's H + 1 state hashes (start, then one per step),
//!   committed before anyone draws which steps are checked (`DeltaMessage.step_root`). On
//!   request (round, j, k) it serves the hashes, the states after steps j and j + k
//!   (recomputed from the kept round start in a scratch engine: its own engine keeps
//!   training) and its end state.
//! * **Verifier.** Draws j after the commitment arrived, checks the served hashes against the
//!   root and each served state against its hash (a scratch engine loads it and reports the
//!   hash), replays k steps from state j in the claimant's dtype and compares the replayed
//!   window (state j minus state j + k, weights) with the committed one, relative distance
//!   against `ledger.verify_tolerance`. It also checks the sent pseudo-gradient against the
//!   round's agreed start minus the committed end state: a delta that does not come from the
//!   committed chain (a skipped step scaled up, a made-up delta) is guilty whatever j is.
//!
//! A window starting in the first [`WARM_STEPS`] optimizer steps is not compared across
//! replay classes: a fresh AdamW's first updates amplify last-bit differences (0.056 after one
//! bf16 step from step 0, above the tolerance); the end check still applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use neuroshard_net::client::PeerConn;
use sha2::{Digest, Sha256};

use super::round::{self, Diloco};
use super::validate::Layout;
use super::verify::{Job, KEEP_ROUNDS, ReplaySpec, Verifier, distance};
use crate::engine::scratch::Scratch;
use crate::engine::{EngineHandle, LoadSpec};

/// Longest replay window a claimant serves.
pub const MAX_WINDOW: u32 = 16;
/// Window requests that may wait while one is recomputed; more are refused as busy.
pub const MAX_QUEUED: usize = 4;
/// Optimizer steps before which a window is not compared across replay classes.
pub const WARM_STEPS: u64 = 30;
/// Largest window bundle a verifier fetches (three checkpoints and the hashes).
const MAX_BUNDLE_BYTES: usize = 12 << 30;

/// Why a claimant cannot serve a window.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("no step hashes kept for round {0}")]
    NotKept(u64),
    #[error("bad window: {0}")]
    Invalid(String),
    #[error("too many replay windows waiting; retry later")]
    Busy,
    #[error("recomputing the window failed: {0}")]
    Failed(String),
}

/// This replica's own per-step state hashes.
#[derive(Debug, Default)]
pub struct StepLog {
    /// The round in progress: (round, state hashes so far: its start, then one per step).
    current: Option<(u64, Vec<String>)>,
    /// Finished rounds: round -> (state hashes, end checkpoint).
    ended: BTreeMap<u64, (Vec<String>, PathBuf)>,
}

/// sha256 (hex) over the state hashes (each 32 bytes) in order: the step root.
pub fn step_root<S: AsRef<[u8]>>(leaves: &[S]) -> String {
    let mut h = Sha256::new();
    for leaf in leaves {
        h.update(leaf.as_ref());
    }
    hex::encode(h.finalize())
}

fn leaf_bytes(hex_hash: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(b) = hex::decode(hex_hash)
        && b.len() == 32
    {
        out.copy_from_slice(&b);
    }
    out
}

/// What a claimant serves for a window: the state hashes, states j, j + k and the end.
#[derive(Debug, PartialEq)]
pub struct Bundle {
    pub leaves: Vec<[u8; 32]>,
    pub states: [Vec<u8>; 3],
}

/// Lays a bundle out as `GetRoundCheckpointRequest` says.
pub fn encode_bundle(leaves: &[[u8; 32]], states: [&[u8]; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + leaves.len() * 32 + states.iter().map(|s| 8 + s.len()).sum::<usize>(),
    );
    out.extend_from_slice(&(leaves.len() as u32).to_le_bytes());
    for l in leaves {
        out.extend_from_slice(l);
    }
    for s in states {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }
    out
}

fn take<'a>(rest: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if rest.len() < n {
        return Err(format!("truncated in {what}"));
    }
    let (a, b) = rest.split_at(n);
    *rest = b;
    Ok(a)
}

/// Reads a served bundle; every length is checked against what is left.
pub fn parse_bundle(bytes: &[u8]) -> Result<Bundle, String> {
    let mut rest = bytes;
    let rest = &mut rest;
    let count = u32::from_le_bytes(
        take(rest, 4, "the hash count")?
            .try_into()
            .expect("4 bytes"),
    );
    let leaves = take(rest, count as usize * 32, "the hashes")?
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    let mut states: [Vec<u8>; 3] = Default::default();
    for s in &mut states {
        let len = u64::from_le_bytes(take(rest, 8, "a length")?.try_into().expect("8 bytes"));
        let len = usize::try_from(len).map_err(|_| "a state too large".to_string())?;
        *s = take(rest, len, "a state")?.to_vec();
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last state", rest.len()));
    }
    Ok(Bundle { leaves, states })
}

/// The dtype a replay class names (its last word), for replaying in the claimant's dtype.
pub(crate) fn class_dtype(class: &str) -> Option<&'static str> {
    match class.rsplit(' ').next() {
        Some("f32") => Some("f32"),
        Some("bf16") => Some("bf16"),
        _ => None,
    }
}

impl Verifier {
    /// A round starts from the state hashing to `hash` (empty: none, no window this round).
    pub fn steps_start(&self, round: u64, hash: String) {
        self.steps.lock().current = (!hash.is_empty()).then(|| (round, vec![hash]));
    }

    /// The state after one more inner step (empty: not hashed, no window this round).
    pub fn step_done(&self, hash: &str) {
        let mut log = self.steps.lock();
        match (&mut log.current, hash.is_empty()) {
            (Some((_, leaves)), false) => leaves.push(hash.to_string()),
            (c, _) => *c = None,
        }
    }

    /// The latest state hash of the round in progress.
    pub fn last_step_hash(&self) -> String {
        let log = self.steps.lock();
        log.current
            .as_ref()
            .and_then(|(_, l)| l.last().cloned())
            .unwrap_or_default()
    }

    /// Checkpoints the end of the current round (before its outer step) and files the round's
    /// state hashes for verifiers, when the end state is the last one hashed.
    pub async fn keep_end(
        &self,
        diloco: &Diloco,
        engine: &EngineHandle,
        dir: &Path,
    ) -> Result<(), String> {
        let round = diloco.state.lock().round;
        let Some((r, leaves)) = self.steps.lock().current.take() else {
            return Ok(());
        };
        if r != round {
            return Ok(());
        }
        let path = dir.join("rounds").join(format!("round-{round}-end.ckpt"));
        let (_, hash) = engine
            .checkpoint_state(&path)
            .await
            .map_err(|e| format!("round end checkpoint: {e}"))?;
        if leaves.last() != Some(&hash) {
            let _ = std::fs::remove_file(&path);
            return Err("the round's end state is not its last hashed step".into());
        }
        let mut log = self.steps.lock();
        log.ended.insert(round, (leaves, path));
        while log.ended.len() > KEEP_ROUNDS {
            if let Some((_, (_, old))) = log.ended.pop_first() {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }

    /// The step root this node sends with its `batches` inner steps of `round` (empty when
    /// it has no hash for every step).
    pub fn own_step_root(&self, round: u64, batches: u64) -> String {
        let log = self.steps.lock();
        match log.ended.get(&round) {
            Some((leaves, _)) if leaves.len() as u64 == batches + 1 => {
                step_root(&leaves.iter().map(|l| leaf_bytes(l)).collect::<Vec<_>>())
            }
            _ => String::new(),
        }
    }

    /// Serves window (j, k) of this node's round `round`: (step root, bundle). One at a time
    /// (it recomputes up to the round's inner steps in a scratch engine), a few waiting.
    pub async fn serve_window(
        &self,
        round: u64,
        j: u64,
        k: u32,
    ) -> Result<(String, Vec<u8>), WindowError> {
        if !(1..=MAX_WINDOW).contains(&k) {
            return Err(WindowError::Invalid(format!(
                "window_len {k} is not between 1 and {MAX_WINDOW}"
            )));
        }
        let (leaves, end) = self
            .steps
            .lock()
            .ended
            .get(&round)
            .cloned()
            .ok_or(WindowError::NotKept(round))?;
        let h = leaves.len() as u64 - 1;
        if j.checked_add(u64::from(k)).is_none_or(|e| e > h) {
            return Err(WindowError::Invalid(format!(
                "steps {j}..{j}+{k} are not inside the round's {h}"
            )));
        }
        let start = self
            .starts
            .lock()
            .get(&round)
            .map(|(p, _)| p.clone())
            .ok_or(WindowError::NotKept(round))?;
        let spec = self
            .spec
            .lock()
            .clone()
            .ok_or_else(|| WindowError::Failed("no replay settings yet".into()))?;
        // Verifiers that drew the same contribution ask at once: they wait their turn.
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(WindowError::Busy);
        }
        let out = {
            let _turn = self.serving.lock().await;
            recompute(&spec, &start, &leaves, j, u64::from(k)).await
        };
        self.queued.fetch_sub(1, Ordering::AcqRel);
        let (a, b) = out.map_err(WindowError::Failed)?;
        let end = std::fs::read(&end)
            .map_err(|e| WindowError::Failed(format!("{}: {e}", end.display())))?;
        let leaves: Vec<[u8; 32]> = leaves.iter().map(|l| leaf_bytes(l)).collect();
        Ok((step_root(&leaves), encode_bundle(&leaves, [&a, &b, &end])))
    }
}

/// The claimant's states after steps j and j + k of a round, recomputed from its start.
async fn recompute(
    spec: &ReplaySpec,
    start: &Path,
    leaves: &[String],
    j: u64,
    k: u64,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let work = start.parent().unwrap_or(Path::new(".")).join("serve");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let scratch = Scratch::start(&spec.binary, spec.threads, &work)
        .await
        .map_err(|e| e.to_string())?;
    let engine = &scratch.engine;
    let mut load = spec.load.clone();
    load.checkpoint = Some(start.to_path_buf());
    load.node_id = spec.data_id.clone();
    engine.load_model(&load).await.map_err(|e| e.to_string())?;
    let mut states = Vec::new();
    let mut done = 0;
    for target in [j, j + k] {
        while done < target {
            engine.train_step(false).await.map_err(|e| e.to_string())?;
            done += 1;
        }
        let path = work.join(format!("state-{target}.ckpt"));
        let (_, hash) = engine
            .checkpoint_state(&path)
            .await
            .map_err(|e| e.to_string())?;
        if leaves.get(target as usize) != Some(&hash) {
            tracing::warn!(
                step = target,
                "a recomputed state differs from the one hashed while training"
            );
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()));
        let _ = std::fs::remove_file(&path);
        states.push(bytes?);
    }
    let b = states.pop().expect("two states");
    let a = states.pop().expect("two states");
    Ok((a, b))
}

/// Exports the scratch engine's weights, flattened in layout order (checked against `layout`).
async fn weights(engine: &EngineHandle, work: &Path, layout: &Layout) -> Result<Vec<f32>, String> {
    let out = work.join("window.safetensors");
    engine
        .export_weights(&out)
        .await
        .map_err(|e| format!("exporting weights: {e}"))?;
    let tensors = round::read_weights_file(&out).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&out);
    let tensors = tensors?;
    let got = Layout::new(
        tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect(),
    );
    if &got != layout {
        return Err("the served state has another layout".into());
    }
    Ok(tensors.into_iter().flat_map(|(_, _, w)| w).collect())
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// What a window check found.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub guilty: bool,
    /// The replayed window's distance from the committed one (None: not compared, a
    /// cross-class window in warm-up), or infinite for a broken commitment.
    pub window: Option<f64>,
    /// The sent pseudo-gradient's distance from the agreed start minus the committed end.
    pub end: f64,
    /// Whether the replay ended on the committed state hash bit for bit.
    pub exact: bool,
    pub cross_class: bool,
    pub reason: String,
    /// Bytes fetched from the claimant.
    pub evidence_bytes: u64,
}

fn convicted(reason: String, evidence_bytes: u64) -> Checked {
    Checked {
        guilty: true,
        window: Some(f64::INFINITY),
        end: f64::INFINITY,
        exact: false,
        cross_class: false,
        reason,
        evidence_bytes,
    }
}

/// Draws a window of `job`'s round, fetches it from the claimant and checks it.
pub async fn check(
    job: &Job,
    conn: &PeerConn,
    spec: &ReplaySpec,
    own_class: &str,
    dir: &Path,
) -> Result<Checked, String> {
    let h = job.batches;
    if h == 0 {
        return Err("a round of no inner steps".into());
    }
    let k = u64::from(spec.window.clamp(1, MAX_WINDOW)).min(h);
    let j = rand::random::<u64>() % (h - k + 1);
    let (_, bytes) = conn
        .get_round_window(job.round, j, k as u32, MAX_BUNDLE_BYTES)
        .await
        .map_err(|e| format!("fetching window {j}+{k}: {e}"))?;
    let n = bytes.len() as u64;
    let bundle = match parse_bundle(&bytes) {
        Ok(b) => b,
        Err(e) => return Ok(convicted(format!("the served window is malformed: {e}"), n)),
    };
    drop(bytes);
    if bundle.leaves.len() as u64 != h + 1 {
        return Ok(convicted(
            format!(
                "{} step hashes served for {h} claimed steps",
                bundle.leaves.len()
            ),
            n,
        ));
    }
    if step_root(&bundle.leaves) != job.commitment.step_root {
        return Ok(convicted(
            "the served step hashes are not the committed ones".into(),
            n,
        ));
    }
    let Some(dtype) = class_dtype(&job.commitment.replay_class) else {
        return Err(format!(
            "unknown dtype in class {:?}",
            job.commitment.replay_class
        ));
    };
    let work = dir
        .join("verify")
        .join(format!("{}-{}", job.claimant, job.round));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let files: Vec<PathBuf> = ["j", "jk", "end"]
        .iter()
        .map(|s| work.join(format!("{s}.ckpt")))
        .collect();
    for (f, b) in files.iter().zip(&bundle.states) {
        round::write_file(f, b).map_err(|e| e.to_string())?;
    }
    let leaves: Vec<String> = bundle.leaves.iter().map(hex::encode).collect();
    let mut load = spec.load.clone();
    load.checkpoint = Some(files[0].clone());
    load.node_id = job.commitment.data_id.clone();
    load.train.dtype = dtype.into();
    let ends = Ends {
        j,
        k,
        h,
        leaves: &leaves,
        files: &files,
        load: &load,
    };
    let result = replay_window(job, spec, &work, &ends).await;
    let _ = std::fs::remove_dir_all(&work);
    let mut c = result?;
    c.evidence_bytes = n;
    c.cross_class = own_class != job.commitment.replay_class;
    if c.cross_class && c.window.is_none() {
        c.reason
            .push_str(" (window in warm-up: not compared across classes)");
    }
    Ok(c)
}

struct Ends<'a> {
    j: u64,
    k: u64,
    h: u64,
    leaves: &'a [String],
    files: &'a [PathBuf],
    load: &'a LoadSpec,
}

async fn replay_window(
    job: &Job,
    spec: &ReplaySpec,
    work: &Path,
    e: &Ends<'_>,
) -> Result<Checked, String> {
    let scratch = Scratch::start(&spec.binary, spec.threads, work)
        .await
        .map_err(|e| e.to_string())?;
    let engine = &scratch.engine;
    let loaded = engine
        .load_model(e.load)
        .await
        .map_err(|err| format!("loading state {}: {err}", e.j))?;
    if loaded.state_hash != e.leaves[e.j as usize] {
        return Ok(convicted(
            format!(
                "the served state after step {} is not the committed one",
                e.j
            ),
            0,
        ));
    }
    if e.j == 0 && loaded.model_hash != job.start_hash {
        return Ok(convicted(
            "the round does not start from the agreed weights".into(),
            0,
        ));
    }
    let cross = loaded.replay_class != job.commitment.replay_class;
    let w_j = weights(engine, work, &job.layout).await?;
    let mut last = String::new();
    for _ in 0..e.k {
        last = engine
            .train_step(true)
            .await
            .map_err(|err| format!("replaying: {err}"))?
            .state_hash;
    }
    let exact = last == e.leaves[(e.j + e.k) as usize];
    let w_r = weights(engine, work, &job.layout).await?;
    let (_, _, hash) = engine
        .restore(&e.files[1])
        .await
        .map_err(|err| err.to_string())?;
    if hash != e.leaves[(e.j + e.k) as usize] {
        return Ok(convicted(
            format!(
                "the served state after step {} is not the committed one",
                e.j + e.k
            ),
            0,
        ));
    }
    let w_c = weights(engine, work, &job.layout).await?;
    let (_, _, hash) = engine
        .restore(&e.files[2])
        .await
        .map_err(|err| err.to_string())?;
    if hash != e.leaves[e.h as usize] {
        return Ok(convicted(
            "the served end state is not the committed one".into(),
            0,
        ));
    }
    let w_e = weights(engine, work, &job.layout).await?;
    let theta: Vec<f32> = job.theta_start.iter().flatten().copied().collect();
    let end = distance(&sub(&theta, &w_e), &job.sent);
    let window =
        (!cross || loaded.step >= WARM_STEPS).then(|| distance(&sub(&w_j, &w_r), &sub(&w_j, &w_c)));
    let tol = spec.tolerance;
    let bad = |d: f64| d.is_nan() || d > tol;
    let guilty = bad(end) || window.is_some_and(bad);
    let reason = if bad(end) {
        format!(
            "the sent pseudo-gradient is {end:.4} (relative) from the agreed start minus the committed end state, tolerance {tol}"
        )
    } else if guilty {
        format!(
            "steps {}..{} replayed {:.4} (relative) from the committed ones, tolerance {tol}",
            e.j,
            e.j + e.k,
            window.unwrap_or(f64::NAN)
        )
    } else {
        format!(
            "reproduced steps {}..{} (exact {exact}) and the end",
            e.j,
            e.j + e.k
        )
    };
    Ok(Checked {
        guilty,
        window,
        end,
        exact,
        cross_class: cross,
        reason,
        evidence_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_bad_ones_are_refused() {
        let leaves = [[1u8; 32], [2u8; 32], [3u8; 32]];
        let b = encode_bundle(&leaves, [b"state j", b"", b"end"]);
        let got = parse_bundle(&b).unwrap();
        assert_eq!(got.leaves, leaves.to_vec());
        assert_eq!(
            got.states,
            [b"state j".to_vec(), Vec::new(), b"end".to_vec()]
        );
        for cut in [0, 3, 50, b.len() - 1] {
            assert!(parse_bundle(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(parse_bundle(&long).unwrap_err().contains("after the last"));
        // A count or a length far past the bytes is refused, not allocated.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_bundle(&huge).is_err());
        let mut huge = b;
        huge[4 + 96..4 + 104].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_bundle(&huge).is_err());
    }

    #[test]
    fn the_step_root_binds_every_hash_in_order() {
        let a = [[1u8; 32], [2u8; 32]];
        let b = [[2u8; 32], [1u8; 32]];
        assert_ne!(step_root(&a), step_root(&b));
        assert_ne!(step_root(&a), step_root(&a[..1]));
        let hexed = [hex::encode([1u8; 32]), hex::encode([2u8; 32])];
        let bytes: Vec<[u8; 32]> = hexed.iter().map(|h| leaf_bytes(h)).collect();
        assert_eq!(step_root(&bytes), step_root(&a));
    }

    #[test]
    fn the_step_log_commits_only_whole_rounds() {
        let v = Verifier::default();
        v.steps_start(3, "aa".into());
        v.step_done("bb");
        assert_eq!(v.last_step_hash(), "bb");
        // A step without a hash ends the round's chain: no root for it.
        v.step_done("");
        assert_eq!(v.last_step_hash(), "");
        v.steps
            .lock()
            .ended
            .insert(4, (vec![hex::encode([1u8; 32]); 3], PathBuf::new()));
        assert_eq!(v.own_step_root(4, 2).len(), 64);
        assert_eq!(v.own_step_root(4, 3), "", "one hash per step and the start");
        assert_eq!(v.own_step_root(5, 2), "");
    }

    #[test]
    fn the_replay_dtype_is_the_claimants() {
        assert_eq!(
            class_dtype("neuroshard-engine 0.1.0 cpu x86-avx512-bf16 bf16"),
            Some("bf16")
        );
        assert_eq!(
            class_dtype("neuroshard-engine 0.1.0 H100 cuda f32"),
            Some("f32")
        );
        assert_eq!(class_dtype("made up"), None);
    }
}
