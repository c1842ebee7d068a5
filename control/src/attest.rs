//! Receipts of training work (issue #19): this node signs, for every peer whose work it
//! receives, a cumulative receipt per epoch (`neuroshard_ledger::receipt`), and keeps the
//! receipts peers signed for its own work so its next proof of work can cite them. The ledger
//! counts a training claim only up to what such receipts attest.
//!
//! Pipeline training: the stage that receives a node's activations signs a forward receipt
//! and answers it in the forward reply; the node that receives a stage's input gradient signs
//! a backward receipt and sends it with its next optimizer request to that stage.
//!
//! Uptime: every peer this node pings or is pinged by is "heard" in that heartbeat slot
//! (`receipt::HEARTBEAT_SECONDS`); this node signs a heartbeat receipt counting the slots of
//! the epoch it heard the peer in and hands it over on the next ping or pong (the net crate
//! carries it through the [`neuroshard_net::Witness`] this type implements).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use neuroshard_ledger::keys::Hash32;
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::receipt::{
    HEARTBEAT_SECONDS, MAX_RECEIPT_AGE_EPOCHS, MAX_RECEIPTS_PER_PROOF, Receipt, ReceiptKey,
    ReceiptKind, SignedReceipt,
};
use neuroshard_ledger::{Address, Wallet};
use parking_lot::Mutex;

/// Most bytes a receipt may take on the wire (a signed receipt is about 400 bytes of JSON).
pub const MAX_RECEIPT_BYTES: usize = 2048;
/// Seconds after its epoch's end from which a pipeline receipt (forward or backward) of that
/// epoch is settled: no longer kept, so the one held stays what the attester signed while the
/// work arrived (the clocks' skew is absorbed). A verifier checks a stage's logged inputs
/// against these receipts, and starts only after this (`trainer/stagecheck.rs`): a stage that
/// learns it was drawn can no longer replace them.
pub const PIPELINE_RECEIPT_SETTLE_SECS: i64 = 10;

/// What this node has received from one peer in the current epoch.
#[derive(Debug, Clone)]
struct Running {
    epoch: u64,
    steps: u64,
    last_step: Option<u64>,
    /// The chain over the steps before the current one.
    base: Hash32,
    /// The current step and the digests of its micro-batches received so far: chained in
    /// micro-batch order, whatever order they arrived in (concurrent micro-batches race on
    /// the wire; the sender's log has them in its engine's order, and a verifier must rebuild
    /// the chain from it).
    current: Option<(u64, Vec<(u32, Hash32)>)>,
    commitment: Hash32,
    /// The receipt as last signed.
    signed: Option<SignedReceipt>,
}

/// How a record adds to the count.
enum Count {
    /// One training step (its micro-batches count once).
    Step(u64),
    /// Inner steps behind a contribution.
    Steps(u64),
}

/// Why a peer's receipt was not kept.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptRefused {
    #[error("receipt is not JSON of a signed receipt: {0}")]
    Malformed(String),
    #[error("receipt longer than {MAX_RECEIPT_BYTES} bytes")]
    TooLong,
    #[error("receipt {0}")]
    Invalid(&'static str),
}

/// The receipts this node gives and holds.
pub struct Attestations {
    wallet: Arc<Wallet>,
    given: Mutex<BTreeMap<(Address, ReceiptKind), Running>>,
    held: Mutex<BTreeMap<ReceiptKey, SignedReceipt>>,
    /// Heartbeat receipts from peers that were refused (malformed, forged, foreign).
    pub heartbeats_refused: AtomicU64,
}

fn epoch_now() -> u64 {
    Proof::epoch_of(chrono::Utc::now().timestamp())
}

/// The heartbeat slot a timestamp falls in.
fn slot_of(timestamp: i64) -> u64 {
    (timestamp.max(0) / HEARTBEAT_SECONDS) as u64
}

impl Attestations {
    pub fn new(wallet: Arc<Wallet>) -> Attestations {
        Attestations {
            wallet,
            given: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
            heartbeats_refused: AtomicU64::new(0),
        }
    }

    /// Records that `subject` was heard at unix time `now` (it pinged this node or answered
    /// its ping) and returns the heartbeat receipt of the slots it was heard in this epoch. A
    /// slot counts once; the receipt is signed again only when a new slot counts.
    pub fn heard_at(&self, subject: Address, now: i64) -> SignedReceipt {
        let (epoch, slot) = (Proof::epoch_of(now), slot_of(now));
        if let Some(r) = self.given.lock().get(&(subject, ReceiptKind::Heartbeat))
            && r.epoch == epoch
            && r.last_step == Some(slot)
            && let Some(signed) = &r.signed
        {
            return signed.clone();
        }
        self.record_in(
            epoch,
            subject,
            ReceiptKind::Heartbeat,
            0,
            Count::Step(slot),
            (slot, 0, b"heartbeat"),
        )
    }

    pub fn address(&self) -> Address {
        self.wallet.address()
    }

    /// Records `tensor`, micro-batch `mb` of training step `step`, received from `subject`,
    /// and signs the receipt of everything received from it this epoch. A step counts once
    /// however many micro-batches it has.
    pub fn receive(
        &self,
        subject: Address,
        kind: ReceiptKind,
        boundary: u32,
        step: u64,
        mb: u32,
        tensor: &[u8],
    ) -> SignedReceipt {
        self.record(
            subject,
            kind,
            boundary,
            Count::Step(step),
            (step, mb, tensor),
        )
    }

    /// Records a contribution of `steps` inner steps from `subject` (DiLoCo round `round`,
    /// identified by `id`) and signs the receipt of this epoch's contributions from it.
    pub fn credit(&self, subject: Address, steps: u64, round: u64, id: &[u8]) -> SignedReceipt {
        self.record(
            subject,
            ReceiptKind::Contribution,
            0,
            Count::Steps(steps),
            (round, 0, id),
        )
    }

    fn record(
        &self,
        subject: Address,
        kind: ReceiptKind,
        boundary: u32,
        count: Count,
        piece: (u64, u32, &[u8]),
    ) -> SignedReceipt {
        self.record_in(epoch_now(), subject, kind, boundary, count, piece)
    }

    fn record_in(
        &self,
        epoch: u64,
        subject: Address,
        kind: ReceiptKind,
        boundary: u32,
        count: Count,
        (step, mb, tensor): (u64, u32, &[u8]),
    ) -> SignedReceipt {
        let mut given = self.given.lock();
        let fresh = Running {
            epoch,
            steps: 0,
            last_step: None,
            base: Hash32::ZERO,
            current: None,
            commitment: Hash32::ZERO,
            signed: None,
        };
        let r = given
            .entry((subject, kind))
            .or_insert_with(|| fresh.clone());
        if r.epoch != epoch {
            *r = fresh;
        }
        match count {
            Count::Step(step) if r.last_step != Some(step) => {
                r.steps += 1;
                r.last_step = Some(step);
            }
            Count::Step(_) => {}
            Count::Steps(n) => r.steps = r.steps.saturating_add(n),
        }
        r.commitment = extend(r, step, mb, Receipt::tensor_digest(tensor));
        let signed = SignedReceipt::sign(
            Receipt {
                attester: self.wallet.address(),
                subject,
                kind,
                epoch_id: epoch,
                steps: r.steps,
                boundary,
                commitment: r.commitment,
            },
            &self.wallet,
        );
        r.signed = Some(signed.clone());
        signed
    }

    /// Keeps a receipt `from` signed for this node's `kind` work, when it is one: signed by
    /// `from`, about this node, of a recent epoch. A peer's receipt is its word about our
    /// work; a bad one is refused (the caller counts it) and changes nothing.
    pub fn keep(
        &self,
        from: &Address,
        kind: ReceiptKind,
        bytes: &[u8],
    ) -> Result<(), ReceiptRefused> {
        if bytes.len() > MAX_RECEIPT_BYTES {
            return Err(ReceiptRefused::TooLong);
        }
        let r: SignedReceipt =
            serde_json::from_slice(bytes).map_err(|e| ReceiptRefused::Malformed(e.to_string()))?;
        let rc = &r.receipt;
        if rc.attester != *from {
            return Err(ReceiptRefused::Invalid(
                "not signed by the peer that sent it",
            ));
        }
        if rc.subject != self.wallet.address() {
            return Err(ReceiptRefused::Invalid("about another node"));
        }
        if rc.kind != kind {
            return Err(ReceiptRefused::Invalid("of the wrong kind"));
        }
        let now = epoch_now();
        if rc.epoch_id > now + 1 || rc.epoch_id + MAX_RECEIPT_AGE_EPOCHS < now {
            return Err(ReceiptRefused::Invalid("of another epoch"));
        }
        let settled =
            Proof::epoch_of(chrono::Utc::now().timestamp() - PIPELINE_RECEIPT_SETTLE_SECS);
        if matches!(kind, ReceiptKind::Forward | ReceiptKind::Backward) && rc.epoch_id < settled {
            return Err(ReceiptRefused::Invalid("of an epoch already settled"));
        }
        r.verify()
            .map_err(|_| ReceiptRefused::Invalid("with a bad signature"))?;
        let mut held = self.held.lock();
        let key = (rc.attester, rc.kind, rc.epoch_id);
        if held
            .get(&key)
            .is_none_or(|old| old.receipt.steps <= rc.steps)
        {
            held.insert(key, r);
        }
        held.retain(|(_, _, e), _| e + MAX_RECEIPT_AGE_EPOCHS >= now);
        Ok(())
    }

    /// The receipts a proof of epoch `proof_epoch` may cite: those of epochs from `since`
    /// (the last rewarded proof's epoch) on, the most steps first, at most what a proof
    /// carries.
    pub fn for_proof(&self, since: Option<u64>, proof_epoch: u64) -> Vec<SignedReceipt> {
        let held = self.held.lock();
        let mut out: Vec<SignedReceipt> = held
            .iter()
            .filter(|((_, _, e), _)| {
                since.is_none_or(|s| *e >= s)
                    && *e <= proof_epoch
                    && e + MAX_RECEIPT_AGE_EPOCHS >= proof_epoch
            })
            .map(|(_, r)| r.clone())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.receipt.steps));
        out.truncate(MAX_RECEIPTS_PER_PROOF);
        out
    }

    /// The receipt for `kind` work of `subject` this node signed last, while its epoch lasts
    /// (to send it with a later request).
    pub fn latest(&self, subject: &Address, kind: ReceiptKind) -> Option<SignedReceipt> {
        let given = self.given.lock();
        let r = given.get(&(*subject, kind))?;
        (r.epoch == epoch_now()).then(|| r.signed.clone()).flatten()
    }
}

/// The network's pings carry heartbeat receipts through this.
impl neuroshard_net::Witness for Attestations {
    fn heard(&self, peer: &Address) -> Option<Vec<u8>> {
        Some(to_bytes(
            &self.heard_at(*peer, chrono::Utc::now().timestamp()),
        ))
    }

    fn latest(&self, peer: &Address) -> Option<Vec<u8>> {
        self.latest(peer, ReceiptKind::Heartbeat)
            .map(|r| to_bytes(&r))
    }

    fn keep(&self, peer: &Address, receipt: &[u8]) {
        if let Err(e) = self.keep(peer, ReceiptKind::Heartbeat, receipt) {
            self.heartbeats_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "heartbeat receipt refused");
        }
    }
}

/// Adds one received tensor to `r`'s chain and returns the commitment: the steps before the
/// current one, then the current step's micro-batches in micro-batch order (`chain_step`).
fn extend(r: &mut Running, step: u64, mb: u32, digest: Hash32) -> Hash32 {
    match &mut r.current {
        Some((s, mbs)) if *s == step => mbs.push((mb, digest)),
        _ => {
            if let Some((s, mbs)) = r.current.take() {
                r.base = chain_step(&r.base, s, mbs);
            }
            r.current = Some((step, vec![(mb, digest)]));
        }
    }
    match &r.current {
        Some((s, mbs)) => chain_step(&r.base, *s, mbs.clone()),
        None => r.base,
    }
}

/// `previous` extended by step `step`'s micro-batches, in micro-batch order.
pub fn chain_step(previous: &Hash32, step: u64, mut mbs: Vec<(u32, Hash32)>) -> Hash32 {
    mbs.sort_by_key(|(mb, _)| *mb);
    mbs.iter().fold(*previous, |h, (mb, d)| {
        Receipt::chain_digest(&h, step, *mb, d)
    })
}

/// A receipt as the wire carries it (JSON bytes).
pub fn to_bytes(r: &SignedReceipt) -> Vec<u8> {
    serde_json::to_vec(r).expect("a receipt serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_count_once_and_receipts_round_trip() {
        let (a, b) = (Wallet::from_seed(1), Wallet::from_seed(2));
        let att_a = Attestations::new(Arc::new(a));
        let att_b = Attestations::new(Arc::new(b));
        let (ia, ib) = (att_a.address(), att_b.address());
        // B receives two micro-batches of step 7 and one of step 8 from A.
        let first = att_b.receive(ia, ReceiptKind::Forward, 2, 7, 0, b"x");
        assert_eq!(first.receipt.steps, 1);
        att_b.receive(ia, ReceiptKind::Forward, 2, 7, 1, b"y");
        let r = att_b.receive(ia, ReceiptKind::Forward, 2, 8, 0, b"z");
        assert_eq!(r.receipt.steps, 2);
        att_a
            .keep(&ib, ReceiptKind::Forward, &to_bytes(&r))
            .unwrap();
        let proofs = att_a.for_proof(None, r.receipt.epoch_id);
        assert_eq!(proofs, vec![r.clone()]);
        // Refused: from someone else, the wrong kind, forged, garbage, too long.
        assert!(
            att_a
                .keep(&ia, ReceiptKind::Forward, &to_bytes(&r))
                .is_err()
        );
        assert!(
            att_a
                .keep(&ib, ReceiptKind::Backward, &to_bytes(&r))
                .is_err()
        );
        let mut forged = r.clone();
        forged.receipt.steps = 600;
        assert!(
            att_a
                .keep(&ib, ReceiptKind::Forward, &to_bytes(&forged))
                .is_err()
        );
        assert!(att_a.keep(&ib, ReceiptKind::Forward, b"{not json").is_err());
        assert!(
            att_a
                .keep(&ib, ReceiptKind::Forward, &[b' '; 4096])
                .is_err()
        );
        // A receipt of fewer steps never replaces one of more.
        assert_eq!(att_b.latest(&ia, ReceiptKind::Forward), Some(r.clone()));
        att_a
            .keep(&ib, ReceiptKind::Forward, &to_bytes(&first))
            .unwrap();
        assert_eq!(
            att_a.for_proof(None, r.receipt.epoch_id)[0].receipt.steps,
            2
        );
        // A pipeline receipt of an epoch already settled is not kept (a stage drawn for a
        // check could otherwise replace what it signed); contributions may come later.
        let old = att_b.record_in(
            r.receipt.epoch_id - 2,
            ia,
            ReceiptKind::Forward,
            2,
            Count::Step(9),
            (9, 0, b"made up"),
        );
        assert!(
            att_a
                .keep(&ib, ReceiptKind::Forward, &to_bytes(&old))
                .is_err()
        );
        let late = att_b.record_in(
            r.receipt.epoch_id - 2,
            ia,
            ReceiptKind::Contribution,
            0,
            Count::Steps(4),
            (3, 0, b"round 3"),
        );
        att_a
            .keep(&ib, ReceiptKind::Contribution, &to_bytes(&late))
            .unwrap();
        // Contributions add their steps.
        let c = att_b.credit(ia, 40, 3, b"round 3");
        assert_eq!(
            (c.receipt.steps, c.receipt.kind),
            (40, ReceiptKind::Contribution)
        );
        assert_eq!(att_b.credit(ia, 25, 4, b"round 4").receipt.steps, 65);
        // Not about the proof's period: nothing.
        assert!(
            att_a
                .for_proof(Some(r.receipt.epoch_id + 1), r.receipt.epoch_id + 1)
                .is_empty()
        );
    }

    #[test]
    fn heartbeats_count_distinct_slots_per_epoch() {
        let (a, b) = (Wallet::from_seed(1), Wallet::from_seed(2));
        let att_a = Attestations::new(Arc::new(a));
        let att_b = Attestations::new(Arc::new(b));
        let (ia, ib) = (att_a.address(), att_b.address());
        // An epoch that starts at t0: heard twice in slot 0, once in slots 1 and 5.
        // 1_800_000_000 is a multiple of 60.
        let t0 = 1_800_000_000;
        let first = att_b.heard_at(ia, t0 + 1);
        assert_eq!(
            (first.receipt.steps, first.receipt.kind),
            (1, ReceiptKind::Heartbeat)
        );
        // The same slot: the same receipt, not signed again.
        assert_eq!(att_b.heard_at(ia, t0 + 9), first);
        assert_eq!(att_b.heard_at(ia, t0 + 12).receipt.steps, 2);
        let last = att_b.heard_at(ia, t0 + 59);
        assert_eq!(
            (last.receipt.steps, last.receipt.epoch_id),
            (3, Proof::epoch_of(t0))
        );
        // The next epoch starts over.
        let next = att_b.heard_at(ia, t0 + 60);
        assert_eq!(
            (next.receipt.steps, next.receipt.epoch_id),
            (1, Proof::epoch_of(t0) + 1)
        );
        // The subject keeps a current one; a receipt of the wrong kind is refused.
        let now = att_b.heard_at(ia, chrono::Utc::now().timestamp());
        let w: &dyn neuroshard_net::Witness = &att_a;
        w.keep(&ib, &to_bytes(&now));
        assert_eq!(att_a.heartbeats_refused.load(Ordering::Relaxed), 0);
        assert_eq!(
            att_a.for_proof(None, now.receipt.epoch_id),
            vec![now.clone()]
        );
        w.keep(&ib, b"{not json");
        let forward = att_b.receive(ia, ReceiptKind::Forward, 2, 1, 0, b"x");
        w.keep(&ib, &to_bytes(&forward));
        w.keep(&ia, &to_bytes(&now));
        assert_eq!(att_a.heartbeats_refused.load(Ordering::Relaxed), 3);
    }
}
