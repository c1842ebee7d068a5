//! Proof of Neural Work, the producing side: once per 60 s epoch the node signs a proof of what
//! it did since its last one (uptime, training batches with the model hash before and after,
//! inference tokens) and submits it to the ledger, which verifies it and mints the reward on
//! the node wallet's chain. Uptime is what peers' heartbeat receipts attest (cited in the
//! proof), training what the stages' and replicas' receipts attest, inference the tokens
//! that payers' signed payments to the node paid for. Refused proofs are recorded by the ledger with their reason.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use neuroshard_ledger::keys::keccak;
use neuroshard_ledger::proof::{EPOCH_SECONDS, MAX_TOKENS_PER_SECOND, MAX_UPTIME_SECONDS};
use neuroshard_ledger::receipt::ReceiptKind;
use neuroshard_ledger::{Proof, ProofType, SignedProof};
use parking_lot::Mutex;
use std::sync::Arc;

use crate::config::LiveConfig;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::stats::TrainingStats;
use neuroshard_ledger::{Ledger, Wallet};

/// What the proof minter reads and writes: the node's figures, its engine (for the model
/// hash), its wallet and the ledger. Nothing else of the node.
#[derive(Clone)]
pub struct Minter {
    pub config: LiveConfig,
    pub training: Arc<Mutex<TrainingStats>>,
    pub metrics: Arc<Metrics>,
    pub engine: Engine,
    pub wallet: Arc<Wallet>,
    pub ledger: Arc<Ledger>,
    /// The receipts peers signed for this node's work.
    pub attest: Arc<crate::attest::Attestations>,
    /// Replays of other replicas' work waiting for their verdicts.
    pub verifier: Arc<crate::diloco::verify::Verifier>,
}

impl Minter {
    fn training(&self) -> TrainingStats {
        self.training.lock().clone()
    }
}

/// What the node had done at the last proof.
#[derive(Debug, Clone, Default)]
struct Mark {
    at: i64,
    steps: u64,
    tokens: u64,
    model_hash: String,
    /// Steps trained but not yet claimed for want of receipts: a DiLoCo replica's steps are
    /// attested a round later, when the others aggregated them.
    unclaimed: u64,
}

/// Most unclaimed steps carried from one proof to the next (ten epochs' worth).
const MAX_UNCLAIMED: u64 = 6_000;

/// Runs until `stop` flips: one proof per epoch, submitted a second after the epoch turns.
pub async fn run(state: Minter, mut stop: watch::Receiver<bool>) {
    let mut mark = Mark {
        at: chrono::Utc::now().timestamp(),
        steps: state.training().steps_this_run,
        tokens: state.metrics.tokens_generated.load(Ordering::Relaxed),
        model_hash: String::new(),
        unclaimed: 0,
    };
    let next_proof = |now: i64| (now / EPOCH_SECONDS + 1) * EPOCH_SECONDS + 1;
    let mut next = next_proof(chrono::Utc::now().timestamp());
    loop {
        // Verdicts are written within seconds of the claim they judge appearing (they count
        // only inside its challenge window); proofs once an epoch.
        let now = chrono::Utc::now().timestamp();
        let wait = (next - now).clamp(1, JUDGE_EVERY_SECONDS);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait as u64)) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        if now >= next {
            mark = prove(&state, mark).await;
            next = next_proof(now);
        }
        judge(&state).await;
    }
}

/// How often finished replays are turned into verdicts.
const JUDGE_EVERY_SECONDS: i64 = 5;

/// Writes the verdicts of finished replays on the claims that cite them: a finding waits
/// until the claimant's reward citing this node's receipt of that round is on the ledger, and
/// is dropped once that reward's challenge window is over (a verdict would no longer count).
async fn judge(state: &Minter) {
    let mut findings: Vec<_> = std::mem::take(&mut *state.verifier.findings.lock());
    if findings.is_empty() {
        return;
    }
    let now = chrono::Utc::now().timestamp();
    let window = state.ledger.rules().await.challenge_window_secs;
    // A finding waits at most until a verdict on its claim could no longer count.
    let live = |f: &crate::diloco::verify::Finding| now - f.found_at <= window + 2 * EPOCH_SECONDS;
    // One verdict per claim: several rounds' replays cite the same reward (a receipt counts
    // an epoch's rounds); guilty if any of them is.
    findings.sort_by_key(|f| (f.claimant, f.epoch, f.inference, !f.guilty));
    findings.dedup_by_key(|f| (f.claimant, f.epoch, f.inference));
    let me = state.wallet.address();
    let mut keep = Vec::new();
    for mut f in findings {
        let target = match &f.stage {
            None if f.inference => state.ledger.inference_claim_of(&f.claimant, f.epoch).await,
            None => {
                state
                    .ledger
                    .claim_of(
                        &f.claimant,
                        &state.wallet.address(),
                        ReceiptKind::Contribution,
                        f.epoch,
                    )
                    .await
            }
            Some(ev) => {
                let found = stage_claim(state, &f, ev).await;
                if let Some((_, false)) = found {
                    f.guilty = true;
                    f.distance = f64::INFINITY;
                    f.reason = "the stage's log is not what its receivers signed for".into();
                }
                if found.is_some() {
                    match stage_inputs(state, &f, ev).await {
                        Inputs::Bound => {}
                        // (A finding kept for a later round already says so.)
                        Inputs::Unbound(reason) if f.reason.contains(&reason) => {}
                        Inputs::Unbound(reason) => {
                            f.reason = if f.guilty {
                                format!("{}; {reason}", f.reason)
                            } else {
                                reason
                            };
                            f.guilty = true;
                            f.distance = f64::INFINITY;
                        }
                        // The senders' rewards of that epoch come with their next proofs.
                        Inputs::Waiting if !f.guilty && now - f.found_at <= INPUTS_WAIT_SECONDS => {
                            keep.push(f);
                            continue;
                        }
                        Inputs::Waiting => {
                            tracing::debug!(claimant = %f.claimant, "no sender's reward cites the receipts the stage signed: its inputs are not checked")
                        }
                    }
                }
                found.map(|(t, _)| t)
            }
        };
        let Some(target) = target else {
            if live(&f) {
                keep.push(f);
            }
            continue;
        };
        // A verdict weighs this node's stake: without any it would be void, so the finding
        // waits (within the window) for the node to stake.
        let (judged, staked) = state
            .ledger
            .with_state(|s| {
                s.chain_account(&me)
                    .map_or((false, 0), |a| (a.judged.contains(&target), a.staked))
            })
            .await;
        if judged {
            continue;
        }
        if staked == 0 {
            if live(&f) {
                keep.push(f);
            }
            continue;
        }
        match state
            .ledger
            .judge(&state.wallet, target, f.claimant, f.evidence, f.guilty, now)
            .await
        {
            Ok(_) => {
                state.verifier.figures.lock().verdicts_written += 1;
                tracing::info!(claimant = %f.claimant, round = f.round, guilty = f.guilty, distance = f.distance, reason = %f.reason, "verdict written");
            }
            Err(e) => tracing::warn!(claimant = %f.claimant, error = %e, "verdict not written"),
        }
    }
    state.verifier.findings.lock().extend(keep);
}

/// The claimant's reward that cites a receipt of one of the receivers a replayed stage log
/// names, for the replay's epoch, and whether that receipt chains over what the log says was
/// sent to its attester.
async fn stage_claim(
    state: &Minter,
    f: &crate::diloco::verify::Finding,
    ev: &crate::diloco::verify::StageEvidence,
) -> Option<(neuroshard_ledger::keys::Hash32, bool)> {
    for (kind, receiver, sent) in &ev.sent {
        if let Some((target, receipt)) = state
            .ledger
            .cited(&f.claimant, receiver, *kind, f.epoch)
            .await
        {
            // The clocks of the stage and its receiver may differ by some seconds.
            let from = ev.from_ms - 5_000;
            let ok = crate::pipeline::oplog::sent_chain(sent, from, &receipt.commitment);
            return Some((target, ok));
        }
    }
    None
}

/// How long a stage finding waits for the rewards of the claimant's senders (which cite the
/// receipts it signed for them) before its verdict is written without them.
const INPUTS_WAIT_SECONDS: i64 = EPOCH_SECONDS;

/// Whether a replayed stage log's inputs are what the claimant received.
enum Inputs {
    /// Every sender's reward found cites receipts that chain over the logged inputs.
    Bound,
    /// A receipt the claimant signed does not chain over what its log says it received.
    Unbound(String),
    /// Some sender's reward citing the claimant's receipt of that epoch is not on the ledger.
    Waiting,
}

/// Checks the inputs of a replayed stage log against the receipts the claimant itself signed
/// for its senders (the activations from the stage before, the gradients from the stage
/// after), as the senders' rewards cite them: a receipt, signed when the tensor arrived and
/// held by the sender, cannot be rewritten once the claimant is drawn, so a log whose inputs
/// were made up to reproduce its outputs is caught here.
async fn stage_inputs(
    state: &Minter,
    f: &crate::diloco::verify::Finding,
    ev: &crate::diloco::verify::StageEvidence,
) -> Inputs {
    let from = ev.from_ms - 5_000;
    let mut waiting = false;
    for (kind, sender, received) in &ev.received {
        let cited = state
            .ledger
            .cited_all(sender, &f.claimant, *kind, f.epoch)
            .await;
        if cited.is_empty() {
            waiting = true;
        }
        for (_, receipt) in cited {
            if !crate::pipeline::oplog::sent_chain(received, from, &receipt.commitment) {
                return Inputs::Unbound(format!(
                    "the stage's logged {} inputs from {sender} are not what it signed for receiving",
                    kind.as_str()
                ));
            }
        }
    }
    if waiting {
        Inputs::Waiting
    } else {
        Inputs::Bound
    }
}

async fn current_model_hash(state: &Minter) -> Option<String> {
    let engine = state.engine.handle()?;
    tokio::time::timeout(Duration::from_secs(10), engine.model_hash())
        .await
        .ok()?
        .ok()
}

async fn prove(state: &Minter, mark: Mark) -> Mark {
    let now = chrono::Utc::now().timestamp();
    let training = state.training();
    let tokens = state.metrics.tokens_generated.load(Ordering::Relaxed);
    let model_hash = current_model_hash(state).await.unwrap_or_default();
    let cfg = state.config.get();
    let layers: Vec<u32> = if training.model_loaded {
        crate::stats::live_layers(&cfg, &training).collect()
    } else {
        Vec::new()
    };
    // The first proof compares with the hash the model had when it was loaded.
    let mut mark = mark;
    if mark.model_hash.is_empty() {
        mark.model_hash = training.model_hash.clone();
    }
    // Batches count only when the model demonstrably changed between the two hashes.
    let batches = training.steps_this_run.saturating_sub(mark.steps);
    let trained = batches > 0
        && !mark.model_hash.is_empty()
        && !model_hash.is_empty()
        && mark.model_hash != model_hash
        && training.loss.is_some_and(|l| l > 0.0)
        && !layers.is_empty();
    // Only what other nodes' receipts attest counts (unless the network is a development one
    // that accepts unattested training): claiming more would void the whole proof.
    let epoch_id = Proof::epoch_of(now);
    let rules = state.ledger.rules().await;
    let (_, last_epoch) = state
        .ledger
        .attested_steps(&state.wallet.address(), &[])
        .await;
    // Receipts name the layer boundary their attester saw; after a change of layers the old
    // ones no longer fit the claim (the ledger would void the whole proof).
    let range = (
        layers.first().copied().unwrap_or(0),
        layers.last().map_or(0, |l| l + 1),
    );
    let mut receipts = state.attest.for_proof(last_epoch, epoch_id);
    let model_layers = cfg.training.model.config().layers;
    receipts.retain(|r| match r.receipt.kind {
        ReceiptKind::Forward => r.receipt.boundary == range.1,
        ReceiptKind::Backward => r.receipt.boundary == range.0,
        ReceiptKind::Contribution => range == (0, model_layers),
        // Uptime: the epochs that are over (their receipts are final; the current one's
        // slots are cited by the next proof, which the ledger credits once either way).
        ReceiptKind::Heartbeat => r.receipt.epoch_id < epoch_id,
    });
    let (heartbeats, receipts): (Vec<_>, Vec<_>) = receipts
        .into_iter()
        .partition(|r| r.receipt.kind == ReceiptKind::Heartbeat);
    // The uptime peers attest beyond what earlier rewards credited: an honest node claims
    // exactly that (claiming more would be cut to it anyway).
    let (attested_uptime, _) = state
        .ledger
        .attested(&state.wallet.address(), &heartbeats)
        .await;
    let uptime_seconds = if rules.accept_unattested_training {
        (now - mark.at).clamp(0, MAX_UPTIME_SECONDS as i64) as u64
    } else {
        attested_uptime.uptime_seconds.min(MAX_UPTIME_SECONDS)
    };
    // The adversary build's cheat (tests of checked work): the most a proof may claim.
    let uptime_seconds = if cfg!(feature = "adversary") && cfg.adversary.inflates_uptime() {
        MAX_UPTIME_SECONDS
    } else {
        uptime_seconds
    };
    let (attested, _) = state
        .ledger
        .attested_steps(&state.wallet.address(), &receipts)
        .await;
    let total = if trained {
        mark.unclaimed.saturating_add(batches)
    } else {
        mark.unclaimed
    };
    let batches = match (trained, rules.accept_unattested_training) {
        (false, _) => 0,
        (true, true) => batches.min(600),
        (true, false) => total.min(attested).min(600),
    };
    let unclaimed = if rules.accept_unattested_training {
        0
    } else {
        (total - batches).min(MAX_UNCLAIMED)
    };
    let trained = batches > 0;
    // Transfers to the node wallet are claimed once an epoch (sends claim them too), before
    // the proof: inference is rewarded only up to the tokens that the payments claimed on
    // this chain paid for (the ledger voids an inference proof that claims more).
    if let Err(e) = state.ledger.claim_incoming(&state.wallet, now).await {
        tracing::warn!(error = %e, "claiming incoming transfers failed");
    }
    let served = tokens.saturating_sub(mark.tokens);
    let inference_tokens = state
        .ledger
        .paid_inference_tokens(&state.wallet.address(), epoch_id)
        .await
        .min(MAX_TOKENS_PER_SECOND * EPOCH_SECONDS as u64);
    if served > inference_tokens {
        tracing::debug!(
            served,
            paid = inference_tokens,
            "inference tokens served without a payment (own wallet or unpaid) earn nothing"
        );
    }
    let loss = training.loss.map(f64::from).unwrap_or(0.0);
    let proof_type = if trained {
        ProofType::Training
    } else if inference_tokens > 0 {
        ProofType::Inference
    } else {
        ProofType::Uptime
    };
    let commitment = if trained {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(mark.model_hash.as_bytes());
        bytes.extend_from_slice(model_hash.as_bytes());
        bytes.extend_from_slice(&batches.to_le_bytes());
        bytes.extend_from_slice(&loss.to_le_bytes());
        keccak(b"neuroshard-gradient-commitment-v1", &bytes).to_hex()
    } else {
        String::new()
    };
    let proof = Proof {
        node_id: state.wallet.address(),
        proof_type,
        timestamp: now,
        nonce: rand::random(),
        uptime_seconds,
        tokens_processed: inference_tokens,
        training_batches: batches,
        // Data samples earn only when served to others, and nothing attests that yet.
        data_samples: 0,
        request_id: String::new(),
        model_hash: model_hash.clone(),
        // The embedding comes with layer 0 and the LM head with the last layer: the ledger
        // refuses a proof that claims either bonus without that layer.
        holds_embedding: layers.first() == Some(&0),
        holds_lm_head: layers.last() == Some(&(cfg.training.model.config().layers - 1)),
        layers_held: layers,
        epoch_id,
        model_hash_start: if trained {
            mark.model_hash.clone()
        } else {
            String::new()
        },
        model_hash_end: if trained {
            model_hash.clone()
        } else {
            String::new()
        },
        gradient_commitment: commitment,
        current_loss: if trained { loss } else { 0.0 },
        receipts: if trained {
            heartbeats.into_iter().chain(receipts).collect()
        } else {
            heartbeats
        },
    };
    // Nothing attested to claim (no peer heard this node, it neither trained nor served): a
    // proof would earn nothing and be refused, so none is made.
    let claims_nothing = proof.uptime_seconds == 0 && !trained && inference_tokens == 0;
    if claims_nothing {
        tracing::debug!("no proof of work this epoch: nothing attested to claim");
    } else {
        let signed = SignedProof::sign(proof, &state.wallet);
        match state.ledger.submit_proof(&state.wallet, signed, now).await {
            Ok(accepted) => tracing::info!(
                proof = %accepted.proof_id,
                kind = proof_type.as_str(),
                batches,
                reward = neuroshard_ledger::units_to_neuro(accepted.reward),
                "proof of work rewarded"
            ),
            Err(e) => tracing::warn!(error = %e, "proof of work not rewarded"),
        }
    }
    Mark {
        at: now,
        steps: training.steps_this_run,
        tokens,
        model_hash: if model_hash.is_empty() {
            mark.model_hash
        } else {
            model_hash
        },
        unclaimed,
    }
}
