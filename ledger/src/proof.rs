//! Proof of Neural Work: the signed per-epoch proof of the notes, its stateless checks
//! (signature, epoch, plausibility) and the live age window checked against the local clock.

use serde::{Deserialize, Serialize};

use super::address::Address;
use super::encode::Encoder;
use super::keys::{Hash32, Sig65, Wallet, keccak, recover_signer};
use super::receipt::{SignedReceipt, check_receipts};
use super::rewards::Work;
use super::units::format_neuro;

/// Length of an epoch: one proof per node per epoch.
pub const EPOCH_SECONDS: i64 = 60;
// A heartbeat receipt counts the slots of one epoch.
const _: () = assert!(
    EPOCH_SECONDS
        == super::receipt::HEARTBEAT_SECONDS * super::receipt::HEARTBEATS_PER_EPOCH as i64
);
/// A proof older than this (against the block or local clock) is rejected.
pub const MAX_PROOF_AGE_SECONDS: i64 = 300;
/// A proof dated further ahead than this is rejected.
pub const MAX_PROOF_FUTURE_SECONDS: i64 = 60;
/// At most this many proofs per node in any hour.
pub const MAX_PROOFS_PER_HOUR: usize = 120;
/// Plausibility: at most this many tokens per second over an epoch.
pub const MAX_TOKENS_PER_SECOND: u64 = 33_333;
pub const MAX_UPTIME_SECONDS: u64 = 120;
/// Ours: at most 10 training batches per second of an epoch and 1000 data samples per second.
pub const MAX_BATCHES_PER_EPOCH: u64 = 600;
pub const MAX_SAMPLES_PER_EPOCH: u64 = 60_000;
pub const MAX_LAYERS: usize = 1024;
const MAX_TEXT: usize = 128;

const DOMAIN: &[u8] = b"neuroshard-proof-v1";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProofType {
    Uptime,
    Inference,
    Training,
    Data,
}

impl ProofType {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Uptime => "uptime",
            Self::Inference => "inference",
            Self::Training => "training",
            Self::Data => "data",
        }
    }
}

/// The fields of the notes, plus `holds_embedding` / `holds_lm_head` (the role bonus needs
/// them). `current_loss` is 0 for proofs without training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    pub node_id: Address,
    pub proof_type: ProofType,
    /// Unix seconds.
    pub timestamp: i64,
    pub nonce: u64,
    pub uptime_seconds: u64,
    pub tokens_processed: u64,
    pub training_batches: u64,
    pub data_samples: u64,
    pub request_id: String,
    pub model_hash: String,
    pub layers_held: Vec<u32>,
    pub holds_embedding: bool,
    pub holds_lm_head: bool,
    pub epoch_id: u64,
    pub model_hash_start: String,
    pub model_hash_end: String,
    pub gradient_commitment: String,
    pub current_loss: f64,
    /// Attestations of the training work by the nodes that received it (see
    /// [`crate::receipt`]); `training_batches` may not exceed what they attest.
    #[serde(default)]
    pub receipts: Vec<SignedReceipt>,
}

/// A proof with its node's signature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignedProof {
    pub proof: Proof,
    pub signature: Sig65,
}

/// Why a proof earns nothing. Counted per reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    BadSignature,
    SignerMismatch,
    EpochMismatch,
    TooOld,
    InFuture,
    Replay,
    DuplicateEpoch,
    RateLimited,
    Implausible(String),
    /// The claim is not backed by other nodes' receipts (or they are invalid).
    Unattested(String),
    AmountMismatch {
        claimed: u64,
        computed: u64,
    },
}

impl RejectReason {
    /// Short stable code for counting.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::SignerMismatch => "signer_mismatch",
            Self::EpochMismatch => "epoch_mismatch",
            Self::TooOld => "too_old",
            Self::InFuture => "in_future",
            Self::Replay => "replay",
            Self::DuplicateEpoch => "duplicate_epoch",
            Self::RateLimited => "rate_limited",
            Self::Implausible(_) => "implausible",
            Self::Unattested(_) => "unattested",
            Self::AmountMismatch { .. } => "amount_mismatch",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadSignature => f.write_str("bad signature"),
            Self::SignerMismatch => f.write_str("signer is not the proof's node_id"),
            Self::EpochMismatch => f.write_str("epoch_id does not match the timestamp"),
            Self::TooOld => write!(f, "older than {MAX_PROOF_AGE_SECONDS} s"),
            Self::InFuture => write!(f, "more than {MAX_PROOF_FUTURE_SECONDS} s in the future"),
            Self::Replay => f.write_str("replayed proof"),
            Self::DuplicateEpoch => {
                f.write_str("a proof for this or a later epoch was already rewarded")
            }
            Self::RateLimited => write!(f, "more than {MAX_PROOFS_PER_HOUR} proofs in an hour"),
            Self::Implausible(what) => write!(f, "implausible: {what}"),
            Self::Unattested(what) => write!(f, "unattested: {what}"),
            Self::AmountMismatch { claimed, computed } => {
                write!(
                    f,
                    "claimed reward {} NEURO, rules give {} NEURO",
                    format_neuro(*claimed),
                    format_neuro(*computed)
                )
            }
        }
    }
}

impl Proof {
    pub fn digest(&self) -> Hash32 {
        let mut e = Encoder::new(DOMAIN);
        e.bytes(&self.node_id.0)
            .str(self.proof_type.as_str())
            .i64(self.timestamp)
            .u64(self.nonce)
            .u64(self.uptime_seconds)
            .u64(self.tokens_processed)
            .u64(self.training_batches)
            .u64(self.data_samples)
            .str(&self.request_id)
            .str(&self.model_hash)
            .u32(self.layers_held.len() as u32);
        for l in &self.layers_held {
            e.u32(*l);
        }
        e.bool(self.holds_embedding)
            .bool(self.holds_lm_head)
            .u64(self.epoch_id)
            .str(&self.model_hash_start)
            .str(&self.model_hash_end)
            .str(&self.gradient_commitment)
            .f64(self.current_loss)
            .u32(self.receipts.len() as u32);
        for r in &self.receipts {
            e.bytes(&r.receipt.digest().0).bytes(&r.signature.0);
        }
        keccak(b"", e.finish())
    }

    /// The epoch a timestamp falls in.
    pub fn epoch_of(timestamp: i64) -> u64 {
        (timestamp.max(0) / EPOCH_SECONDS) as u64
    }

    /// Plausibility rules of the notes (and our bounds on batches and samples).
    pub fn check_plausible(&self) -> Result<(), RejectReason> {
        let bad = |s: &str| Err(RejectReason::Implausible(s.to_string()));
        if self.timestamp < 0 || self.epoch_id != Proof::epoch_of(self.timestamp) {
            return Err(RejectReason::EpochMismatch);
        }
        if self.uptime_seconds > MAX_UPTIME_SECONDS {
            return bad("uptime_seconds above 120");
        }
        if self.tokens_processed > MAX_TOKENS_PER_SECOND * EPOCH_SECONDS as u64 {
            return bad("more than 33,333 tokens per second");
        }
        if self.training_batches > MAX_BATCHES_PER_EPOCH {
            return bad("more than 600 training batches in an epoch");
        }
        if self.data_samples > MAX_SAMPLES_PER_EPOCH {
            return bad("more than 60,000 data samples in an epoch");
        }
        if self.layers_held.len() > MAX_LAYERS || self.layers_held.windows(2).any(|w| w[0] >= w[1])
        {
            return bad("layers_held must be strictly increasing and at most 1024 entries");
        }
        for s in [
            &self.request_id,
            &self.model_hash,
            &self.model_hash_start,
            &self.model_hash_end,
            &self.gradient_commitment,
        ] {
            if s.len() > MAX_TEXT {
                return bad("text field longer than 128 bytes");
            }
        }
        if !self.current_loss.is_finite() || self.current_loss < 0.0 {
            return bad("current_loss must be finite and not negative");
        }
        if self.training_batches > 0 || self.proof_type == ProofType::Training {
            if self.training_batches == 0 {
                return bad("training proof without batches");
            }
            if self.current_loss <= 0.0 {
                return bad("training needs loss > 0");
            }
            if self.model_hash_start.is_empty() || self.model_hash_start == self.model_hash_end {
                return bad("training needs model_hash_start != model_hash_end");
            }
            if self.gradient_commitment.is_empty() {
                return bad("training needs a gradient commitment");
            }
            if self.layers_held.is_empty() {
                return bad("training needs layers held");
            }
        }
        if self.data_samples > 0 || self.proof_type == ProofType::Data {
            return Err(RejectReason::Unattested(
                "data samples: no node attests data served yet".into(),
            ));
        }
        if !self.receipts.is_empty() {
            check_receipts(
                &self.receipts,
                &self.node_id,
                self.epoch_id,
                self.layer_range(),
            )
            .map_err(|e| RejectReason::Unattested(e.to_string()))?;
        }
        if self.proof_type == ProofType::Inference && self.tokens_processed == 0 {
            return bad("inference proof without tokens");
        }
        if self.proof_type == ProofType::Data && self.data_samples == 0 {
            return bad("data proof without samples");
        }
        Ok(())
    }

    /// `layers_held` as a range `[first, last + 1)` when it is one contiguous run.
    pub fn layer_range(&self) -> Option<(u32, u32)> {
        let (first, last) = (*self.layers_held.first()?, *self.layers_held.last()?);
        (last - first + 1 == self.layers_held.len() as u32).then_some((first, last + 1))
    }

    /// The work this proof claims, with uptime credited up to `max_uptime` seconds and
    /// inference up to `max_tokens` paid tokens.
    pub fn work(&self, max_uptime: u64, max_tokens: u64) -> Work {
        Work {
            uptime_seconds: self.uptime_seconds.min(max_uptime),
            training_batches: self.training_batches,
            layers_held: self.layers_held.len() as u64,
            tokens_processed: self.tokens_processed.min(max_tokens),
            data_samples: self.data_samples,
            holds_embedding: self.holds_embedding,
            holds_lm_head: self.holds_lm_head,
        }
    }
}

/// Age window against a reference time (the local clock, or the timestamp of the block that
/// carries the proof).
pub fn check_age(proof_timestamp: i64, reference: i64) -> Result<(), RejectReason> {
    if proof_timestamp > reference + MAX_PROOF_FUTURE_SECONDS {
        return Err(RejectReason::InFuture);
    }
    if reference - proof_timestamp > MAX_PROOF_AGE_SECONDS {
        return Err(RejectReason::TooOld);
    }
    Ok(())
}

impl SignedProof {
    pub fn sign(proof: Proof, wallet: &Wallet) -> Self {
        let signature = wallet.sign_digest(&proof.digest());
        SignedProof { proof, signature }
    }

    /// The proof's identity (its digest); the replay key.
    pub fn id(&self) -> Hash32 {
        self.proof.digest()
    }

    /// `proof_<hex>` as shown by the API.
    pub fn id_string(&self) -> String {
        format!("proof_{}", self.id().to_hex())
    }

    /// Signature and stateless rules; everything that needs no ledger state and no clock.
    pub fn check_stateless(&self) -> Result<(), RejectReason> {
        let signer = recover_signer(&self.id(), &self.signature, "proof")
            .map_err(|_| RejectReason::BadSignature)?;
        if signer != self.proof.node_id {
            return Err(RejectReason::SignerMismatch);
        }
        self.proof.check_plausible()
    }

    /// Stateless rules plus the age window against the local clock `now`.
    pub fn check_live(&self, now: i64) -> Result<(), RejectReason> {
        self.check_stateless()?;
        check_age(self.proof.timestamp, now)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A training proof of layers 0..4 with a forward receipt of all its batches from the
    /// stage after it (seed 99).
    pub(crate) fn training_proof(wallet: &Wallet, timestamp: i64) -> Proof {
        let epoch_id = Proof::epoch_of(timestamp);
        let next_stage = Wallet::from_seed(99);
        Proof {
            node_id: wallet.address(),
            proof_type: ProofType::Training,
            timestamp,
            nonce: 1,
            uptime_seconds: 60,
            tokens_processed: 4 * 512 * 10,
            training_batches: 10,
            data_samples: 0,
            request_id: String::new(),
            model_hash: "ab".repeat(32),
            layers_held: vec![0, 1, 2, 3],
            holds_embedding: true,
            holds_lm_head: false,
            epoch_id,
            model_hash_start: "aa".repeat(32),
            model_hash_end: "bb".repeat(32),
            gradient_commitment: "cc".repeat(32),
            current_loss: 2.5,
            receipts: vec![crate::receipt::attest_forward(
                &next_stage,
                wallet.address(),
                epoch_id,
                10,
                4,
            )],
        }
    }

    #[test]
    fn valid_proof_passes() {
        let w = Wallet::from_seed(1);
        let p = SignedProof::sign(training_proof(&w, 1_700_000_000), &w);
        p.check_live(1_700_000_010).unwrap();
    }

    #[test]
    fn forged_and_foreign_signatures_fail() {
        let w = Wallet::from_seed(1);
        let mut p = SignedProof::sign(training_proof(&w, 1_700_000_000), &w);
        p.proof.training_batches += 1;
        assert_eq!(
            p.check_stateless().unwrap_err(),
            RejectReason::SignerMismatch
        );
        let other = Wallet::from_seed(2);
        let p = SignedProof::sign(training_proof(&w, 1_700_000_000), &other);
        assert_eq!(
            p.check_stateless().unwrap_err(),
            RejectReason::SignerMismatch
        );
        let mut p = SignedProof::sign(training_proof(&w, 1_700_000_000), &w);
        p.signature.0[64] = 7;
        assert_eq!(p.check_stateless().unwrap_err(), RejectReason::BadSignature);
    }

    #[test]
    fn age_window() {
        assert_eq!(check_age(1000, 1301), Err(RejectReason::TooOld));
        assert_eq!(check_age(1000, 1300), Ok(()));
        assert_eq!(check_age(1061, 1000), Err(RejectReason::InFuture));
        assert_eq!(check_age(1060, 1000), Ok(()));
    }

    #[test]
    fn plausibility_rules() {
        let w = Wallet::from_seed(1);
        let base = training_proof(&w, 6000);
        type Mutation = Box<dyn Fn(&mut Proof)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|p| p.current_loss = 0.0), "implausible"),
            (Box::new(|p| p.current_loss = f64::NAN), "implausible"),
            (
                Box::new(|p| p.model_hash_end = p.model_hash_start.clone()),
                "implausible",
            ),
            (Box::new(|p| p.gradient_commitment.clear()), "implausible"),
            (
                Box::new(|p| p.tokens_processed = 33_334 * 60),
                "implausible",
            ),
            (Box::new(|p| p.uptime_seconds = 121), "implausible"),
            (Box::new(|p| p.epoch_id += 1), "epoch_mismatch"),
            (Box::new(|p| p.layers_held = vec![3, 1]), "implausible"),
            (Box::new(|p| p.data_samples = 1), "unattested"),
            // The receipt says the layers end at 4.
            (Box::new(|p| p.layers_held = vec![0, 1, 2]), "unattested"),
            (
                Box::new(|p| p.receipts[0].receipt.steps = 600),
                "unattested",
            ),
            (
                Box::new(|p| p.receipts[0].receipt.subject = Wallet::from_seed(5).address()),
                "unattested",
            ),
        ];
        for (mutate, code) in cases {
            let mut p = base.clone();
            mutate(&mut p);
            let signed = SignedProof::sign(p, &w);
            assert_eq!(signed.check_stateless().unwrap_err().code(), code);
        }
    }

    #[test]
    fn amount_mismatch_gives_neuro() {
        let r = RejectReason::AmountMismatch {
            claimed: 20_000,
            computed: 10_000,
        };
        assert_eq!(
            r.to_string(),
            "claimed reward 0.00002 NEURO, rules give 0.00001 NEURO"
        );
    }
}
