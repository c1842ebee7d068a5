//! Sampled checks of served inference (issue #19, TOPLOC-style): a staked node holding the
//! whole model checks paid generations of other nodes.
//!
//! * **What it learns from.** Every inference payment is a send block whose memo names the
//!   tokens and the request id (`inference tokens=<n> id=<request id>`) and whose recipient
//!   is the serving node. The checker reads the ledger's blocks as they arrive
//!   (`Ledger::messages_since`).
//! * **The draw.** For each payment to another node it draws, with its own randomness and
//!   probability `ledger.verify_probability / V` (V: the nodes holding the whole model that
//!   may check it, this one included, so a payment is checked `verify_probability` times on
//!   average), whether to check it. The server cannot know or choose its verifiers, and it
//!   committed before the draw (the commitment was computed while it generated).
//! * **The check.** Fetch the evidence (`GetInferenceEvidence`: the commitment, the token ids,
//!   the model hash; `evidence.rs`); if this node's weights have the evidence's hash, load
//!   them into a scratch engine (its own engine is not touched) and recompute the request
//!   with one prefill, fed in 32-token pieces (`StageForward` answers the logits of each
//!   piece's last position: exactly the committed rows), and compare every chunk with
//!   `toploc::Tolerance::default()`. Any chunk outside it is guilty, as is evidence that is
//!   malformed or names another request. The minter writes the verdict (`work.rs`,
//!   `Ledger::inference_claim_of`) on the server's reward that claimed the payment.
//! * **Unverifiable, counted, not guilty**: no evidence served (not kept, the server is not
//!   connected), weights of another hash than this node's (it trained since), the scratch
//!   engine failing. A request served through the pipeline has no evidence (its stages
//!   compute it; their work is checked by the stage replays).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use neuroshard_ledger::inference::{paid_tokens, payment_request_id};
use neuroshard_ledger::keys::{Hash32, keccak};
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::{Address, Ledger, Message, Op};
use neuroshard_net::Network;
use neuroshard_net::client::PeerConn;
use neuroshard_shared::shm::{DType, Tensor};
use neuroshard_shared::toploc::{self, ChunkDistance, Tolerance};
use tokio::sync::watch;

use crate::config::LiveConfig;
use crate::diloco::verify::{Finding, Verifier};
use crate::engine::scratch::Scratch;
use crate::engine::{Engine, Slots, TensorIn};
use crate::evidence::Evidence;

/// How often the ledger is read for new payments.
const EVERY: Duration = Duration::from_secs(3);
/// Tries to fetch a sampled request's evidence (the server keeps it just after the payment):
/// this many, [`EVERY`] apart.
const FETCH_TRIES: u32 = 4;
const FETCH_DEADLINE: Duration = Duration::from_secs(10);
/// Blocks read from the ledger per pass.
const PAGE: i64 = 500;
/// Largest server checkpoint fetched for a check.
const MAX_WEIGHTS_BYTES: usize = 4 << 30;
/// Sampled requests waiting to be checked, at most (more draws are dropped, not counted).
const MAX_QUEUED: usize = 64;

/// What the checker uses of the node.
pub struct Checker {
    pub config: LiveConfig,
    pub ledger: Arc<Ledger>,
    pub net: Arc<Network>,
    pub engine: Engine,
    /// Findings and figures shared with the other replays; the minter writes the verdicts.
    pub verifier: Arc<Verifier>,
    pub data_dir: PathBuf,
}

/// A sampled payment.
#[derive(Debug, Clone)]
struct Job {
    server: Address,
    request_id: String,
    epoch: u64,
    tries: u32,
}

/// Runs until `stop` flips.
pub async fn run(c: Checker, mut stop: watch::Receiver<bool>) {
    // Payments made before the node started are not drawn (nobody watched them whole).
    let mut seq = c.ledger.last_seq().await;
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        seq = draw(&c, seq, &mut queue).await;
        if let Some(mut job) = queue.pop_front() {
            match check(&c, &job).await {
                Outcome::Retry if job.tries + 1 < FETCH_TRIES => {
                    job.tries += 1;
                    queue.push_back(job);
                }
                Outcome::Retry => record(&c, &job, Err("no evidence served".into()), 0),
                Outcome::Done(result, ms) => record(&c, &job, result, ms),
            }
        }
    }
}

/// Reads the blocks after `seq`, draws among the inference payments to other nodes; the new
/// position.
async fn draw(c: &Checker, mut seq: i64, queue: &mut VecDeque<Job>) -> i64 {
    let cfg = c.config.get();
    let me = c.net.id();
    // Only a node holding the whole model checks (it recomputes the whole request).
    let holds_all = c.net.local_role().role == "full";
    let p = cfg.ledger.verify_probability;
    loop {
        let Ok(page) = c.ledger.messages_since(seq, PAGE).await else {
            return seq;
        };
        let n = page.len();
        for (s, msg) in page {
            seq = seq.max(s);
            let Message::Block(b) = msg else { continue };
            let Op::Send {
                to, amount, memo, ..
            } = &b.block.op
            else {
                continue;
            };
            let (Some(id), Some(tokens)) = (payment_request_id(memo), paid_tokens(memo, *amount))
            else {
                continue;
            };
            if !holds_all || p <= 0.0 || *to == me || tokens == 0 {
                continue;
            }
            // V: this node and the connected peers holding the whole model, the server aside.
            let others = c
                .net
                .peers
                .node_infos()
                .iter()
                .filter(|i| i.role == "full" && i.node_id != to.to_string())
                .count();
            let share = p / (others + 1) as f64;
            if rand::random::<f64>() >= share || queue.len() >= MAX_QUEUED {
                continue;
            }
            c.verifier.figures.lock().sampled += 1;
            queue.push_back(Job {
                server: *to,
                request_id: id.to_string(),
                epoch: Proof::epoch_of(b.block.timestamp),
                tries: 0,
            });
        }
        if (n as i64) < PAGE {
            return seq;
        }
    }
}

enum Outcome {
    /// The evidence is not served yet: try again later.
    Retry,
    /// Checked (the distances, or the reason it is guilty) or unverifiable (`Err`), and the
    /// time it took in ms.
    Done(Result<Checked, String>, u64),
}

#[derive(Debug)]
struct Checked {
    guilty: bool,
    reason: String,
    worst: ChunkDistance,
    evidence: Hash32,
}

async fn check(c: &Checker, job: &Job) -> Outcome {
    let started = std::time::Instant::now();
    let Some(conn) = c
        .net
        .peers
        .conns()
        .into_iter()
        .find(|conn| conn.id == job.server)
    else {
        return Outcome::Retry;
    };
    let served = match conn
        .get_inference_evidence(&job.request_id, FETCH_DEADLINE)
        .await
    {
        Ok(ev) => ev,
        Err(e) => {
            tracing::debug!(server = %job.server, request = %job.request_id, error = %e, "no inference evidence yet");
            return Outcome::Retry;
        }
    };
    let digest = keccak(
        b"neuroshard-inference-evidence-v1",
        &neuroshard_proto::Message::encode_to_vec(&served),
    );
    let result = match Evidence::try_from(served) {
        Err(reason) => Ok(guilty(format!("malformed evidence: {reason}"), digest)),
        Ok(ev) if ev.request_id != job.request_id => Ok(guilty(
            format!(
                "evidence of request {} served for {}",
                ev.request_id, job.request_id
            ),
            digest,
        )),
        Ok(ev) => recompute(c, &conn, &ev, digest).await,
    };
    Outcome::Done(result, started.elapsed().as_millis() as u64)
}

fn guilty(reason: String, evidence: Hash32) -> Checked {
    Checked {
        guilty: true,
        reason,
        worst: ChunkDistance {
            overlap: 0.0,
            exponent_mismatches: u32::MAX,
            mantissa_mean: f64::INFINITY,
            mantissa_median: f64::INFINITY,
        },
        evidence,
    }
}

/// Recomputes `ev` in a scratch engine with the weights it names: this node's own when they
/// have its hash, else the server's current ones (`GetStageWeights`) when those still have it
/// (a server that trains moves on; its request is then unverifiable).
async fn recompute(
    c: &Checker,
    conn: &PeerConn,
    ev: &Evidence,
    evidence: Hash32,
) -> Result<Checked, String> {
    let engine = c
        .engine
        .handle()
        .ok_or("this node's engine is not running")?;
    let cfg = c.config.get();
    let model = cfg.training.model.config();
    let seq_len = ev.prompt_ids.len() + ev.generated.len() - 1;
    if ev.prompt_ids.is_empty() || seq_len >= model.max_seq as usize {
        return Ok(guilty(
            format!(
                "{} prompt and {} generated tokens do not fit the model's context",
                ev.prompt_ids.len(),
                ev.generated.len()
            ),
            evidence,
        ));
    }
    if let Some(bad) = ev
        .prompt_ids
        .iter()
        .chain(&ev.generated)
        .find(|t| **t >= model.vocab_size)
    {
        return Ok(guilty(
            format!("token {bad} is not in the vocabulary"),
            evidence,
        ));
    }
    let dir = c.data_dir.join("inference").join("verify");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ckpt = dir.join(format!("weights-{}.ckpt", rand::random::<u32>()));
    let own_hash = engine.model_hash().await.map_err(|e| e.to_string())?;
    if own_hash == ev.model_hash {
        engine
            .checkpoint(&ckpt)
            .await
            .map_err(|e| format!("checkpointing this node's weights: {e}"))?;
    } else {
        let (_, bytes) = conn
            .get_stage_weights((0..model.layers).collect(), MAX_WEIGHTS_BYTES)
            .await
            .map_err(|e| format!("fetching the server's weights: {e}"))?;
        crate::diloco::round::write_file(&ckpt, &bytes).map_err(|e| e.to_string())?;
    }
    let r = prefill(c, &ckpt, ev, &dir).await;
    let _ = std::fs::remove_file(&ckpt);
    let distances = r?;
    let tol = Tolerance::default();
    let worst = worst(&distances);
    let outside = distances.iter().filter(|d| !d.within(&tol)).count();
    Ok(Checked {
        guilty: outside > 0,
        reason: if outside > 0 {
            format!(
                "{outside} of {} chunks outside the tolerance",
                distances.len()
            )
        } else {
            format!("{} chunks reproduced", distances.len())
        },
        worst,
        evidence,
    })
}

/// One prefill of prompt + generated tokens (all but the last) from checkpoint `ckpt`, in
/// pieces that end at the committed positions; the distance of each committed chunk.
async fn prefill(
    c: &Checker,
    ckpt: &std::path::Path,
    ev: &Evidence,
    dir: &std::path::Path,
) -> Result<Vec<ChunkDistance>, String> {
    let cfg = c.config.get();
    let model = cfg.training.model.config();
    let binary = if cfg.engine.binary.is_empty() {
        crate::engine::supervisor::default_engine_binary()
    } else {
        cfg.engine.binary.clone().into()
    };
    let whole = crate::pipeline::Assignment::full(model.layers);
    let mut load = crate::trainer::load_spec(&cfg, "", Some(ckpt), &whole);
    load.node_id.clear();
    let slot_bytes = (u64::from(model.vocab_size) * 4)
        .max(u64::from(model.max_seq) * 4)
        .next_multiple_of(1 << 20);
    let scratch = Scratch::start_with(&binary, cfg.resources.cpu_threads, dir, 2, slot_bytes)
        .await
        .map_err(|e| e.to_string())?;
    let loaded = scratch
        .engine
        .load_model(&load)
        .await
        .map_err(|e| format!("loading the weights: {e}"))?;
    if loaded.model_hash != ev.model_hash {
        return Err(format!(
            "served with weights {}, and the weights at hand are {}",
            short(&ev.model_hash),
            short(&loaded.model_hash)
        ));
    }
    let seq: Vec<u32> = ev
        .prompt_ids
        .iter()
        .chain(&ev.generated[..ev.generated.len() - 1])
        .copied()
        .collect();
    let slots = Slots {
        input: 0,
        output: 1,
    };
    let first = ev.prompt_ids.len() - 1;
    let rows = seq.len() as u32;
    let mut from = 0usize;
    let mut out = Vec::with_capacity(ev.commits.len());
    for (p, commit) in toploc::committed_positions(ev.generated.len()).zip(&ev.commits) {
        let to = first + p + 1;
        let piece = &seq[from..to];
        let input = Tensor::from_u32(&[piece.len() as u64], piece);
        let logits = scratch
            .engine
            .stage_forward(
                1,
                slots,
                TensorIn {
                    dtype: DType::U32,
                    shape: &input.shape,
                    bytes: &input.bytes,
                },
                from as u32,
                rows,
            )
            .await
            .map_err(|e| format!("recomputing: {e}"))?;
        let row = logits
            .to_f32()
            .ok_or("the scratch engine answered no logits")?;
        out.push(toploc::compare_row(commit, &row));
        from = to;
    }
    Ok(out)
}

fn worst(ds: &[ChunkDistance]) -> ChunkDistance {
    ds.iter().fold(
        ChunkDistance {
            overlap: 1.0,
            ..ChunkDistance::default()
        },
        |w, d| ChunkDistance {
            overlap: w.overlap.min(d.overlap),
            exponent_mismatches: w.exponent_mismatches.max(d.exponent_mismatches),
            mantissa_mean: w.mantissa_mean.max(d.mantissa_mean),
            mantissa_median: w.mantissa_median.max(d.mantissa_median),
        },
    )
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Counts a check and files its finding for the minter.
fn record(c: &Checker, job: &Job, result: Result<Checked, String>, ms: u64) {
    let mut f = c.verifier.figures.lock();
    match result {
        Ok(checked) => {
            f.replayed += 1;
            f.replay_ms += ms;
            if checked.guilty {
                f.guilty += 1;
            } else {
                f.innocent += 1;
            }
            drop(f);
            let w = checked.worst;
            tracing::info!(server = %job.server, request = %job.request_id, guilty = checked.guilty,
                overlap = w.overlap, exponent_mismatches = w.exponent_mismatches,
                mantissa_mean = w.mantissa_mean, mantissa_median = w.mantissa_median, ms,
                reason = %checked.reason, "checked served inference");
            c.verifier.findings.lock().push(Finding {
                claimant: job.server,
                round: 0,
                epoch: job.epoch,
                guilty: checked.guilty,
                distance: 1.0 - w.overlap,
                reason: checked.reason,
                evidence: checked.evidence,
                found_at: chrono::Utc::now().timestamp(),
                stage: None,
                inference: true,
            });
        }
        Err(e) => {
            f.unverifiable += 1;
            drop(f);
            tracing::warn!(server = %job.server, request = %job.request_id, error = %e, "could not check served inference");
        }
    }
}
