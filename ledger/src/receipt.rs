//! Attestations of training work: a receipt is signed by the node that *received* a piece of
//! another node's work, so a training claim rests on what somebody else observed.
//!
//! In pipeline training each hop has two directions, and each is attested by the other end:
//! the stage that receives a node's activations signs a [`ReceiptKind::Forward`] receipt for
//! it (returned in the forward reply), and the node that receives a stage's input gradient
//! signs a [`ReceiptKind::Backward`] receipt for that stage (sent with its next request). A
//! receipt is cumulative over an epoch: it counts the distinct training steps the attester
//! received from the subject in that epoch and chains a hash over every tensor received
//! (`commitment`), so the subject keeps only the newest one per attester, kind and epoch.
//! It also names the layer boundary the attester saw: the subject's layers end where the
//! attester's begin (forward) or begin where the attester asked (backward).
//!
//! Uptime is attested the same way: a peer that exchanged heartbeats (the network's pings)
//! with the subject signs a [`ReceiptKind::Heartbeat`] receipt counting the distinct
//! [`HEARTBEAT_SECONDS`] slots of an epoch in which the subject pinged it or answered its ping.
//! The ledger credits, per epoch, the `k`-th largest count among the attesters a proof cites
//! (`Rules::uptime_attesters`), so one Sybil attester cannot lift a claim alone.
//!
//! A receipt alone does not prove the tensor was computed honestly (a colluding attester can
//! sign anything): that is what sampled recomputation and fraud proofs are for. It bounds a
//! claim by what another, identifiable node signed, and ties that node to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::address::Address;
use super::encode::Encoder;
use super::keys::{Hash32, Sig65, Wallet, keccak, recover_signer};

const DOMAIN: &[u8] = b"neuroshard-receipt-v1";
/// Most receipts one proof may carry.
pub const MAX_RECEIPTS_PER_PROOF: usize = 64;
/// A receipt counts only for a proof at most this many epochs after its own epoch (the
/// proof age window is five epochs).
pub const MAX_RECEIPT_AGE_EPOCHS: u64 = 5;
/// Length of a heartbeat slot: a heartbeat receipt counts the slots of an epoch in which the
/// subject was heard (pings go every 2 s both ways, so an online peer is heard in every one).
pub const HEARTBEAT_SECONDS: i64 = 10;
/// Heartbeat slots in a 60 s epoch (`proof::EPOCH_SECONDS`, checked there): the most a
/// heartbeat receipt may count.
pub const HEARTBEATS_PER_EPOCH: u64 = 6;

/// What the attester received from the subject.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// The subject's output activations (it ran the layers before the attester's).
    Forward,
    /// The gradient with respect to the subject's input (it ran the backward pass of the
    /// layers from `boundary` on).
    Backward,
    /// A DiLoCo pseudo-gradient of the whole model that the attester, a replica, aggregated
    /// (checked and not outvoted); `steps` counts the inner steps behind it. Every replica
    /// receives the same contribution, so per epoch the largest count of any attester counts,
    /// not their sum.
    Contribution,
    /// Heartbeats: `steps` counts the [`HEARTBEAT_SECONDS`] slots of the epoch in which the
    /// subject pinged the attester or answered its ping; `boundary` is 0. Per epoch the
    /// `k`-th largest count among the cited attesters counts (see [`attested`]).
    Heartbeat,
}

impl ReceiptKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Backward => "backward",
            Self::Contribution => "contribution",
            Self::Heartbeat => "heartbeat",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Who received the work and signs.
    pub attester: Address,
    /// Whose work it was.
    pub subject: Address,
    pub kind: ReceiptKind,
    /// The epoch the work was received in.
    pub epoch_id: u64,
    /// Distinct training steps of the subject received in that epoch so far.
    pub steps: u64,
    /// Forward: the subject's layers end here (the attester's first layer). Backward: the
    /// subject's layers start here.
    pub boundary: u32,
    /// keccak chain over (step, micro-batch, digest of the tensor) of everything counted, each
    /// step's micro-batches in micro-batch order (the attester sorts what raced on the wire).
    pub commitment: Hash32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    pub signature: Sig65,
}

/// Why a receipt cannot back a proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt signature does not match its attester")]
    BadSignature,
    #[error("receipt attests somebody else's work")]
    WrongSubject,
    #[error("a node cannot attest its own work")]
    SelfAttested,
    #[error("receipt from epoch {receipt} does not fit a proof of epoch {proof}")]
    Epoch { receipt: u64, proof: u64 },
    #[error("two receipts for the same attester, kind and epoch")]
    Duplicate,
    #[error("more than {MAX_RECEIPTS_PER_PROOF} receipts")]
    TooMany,
    #[error("{kind} receipt names layer boundary {boundary}, the claim holds {start}..{end}")]
    Boundary {
        kind: &'static str,
        boundary: u32,
        start: u32,
        end: u32,
    },
    #[error("heartbeat receipt counts {0} slots, an epoch has {HEARTBEATS_PER_EPOCH}")]
    Heartbeats(u64),
}

impl Receipt {
    pub fn digest(&self) -> Hash32 {
        let mut e = Encoder::new(DOMAIN);
        e.bytes(&self.attester.0)
            .bytes(&self.subject.0)
            .str(self.kind.as_str())
            .u64(self.epoch_id)
            .u64(self.steps)
            .u32(self.boundary)
            .bytes(&self.commitment.0);
        keccak(b"", e.finish())
    }

    /// The next link of a commitment chain: `previous` extended by one received tensor.
    pub fn chain(previous: &Hash32, step: u64, micro_batch: u32, tensor: &[u8]) -> Hash32 {
        Self::chain_digest(previous, step, micro_batch, &Self::tensor_digest(tensor))
    }

    /// The digest of one received tensor, as the chain takes it.
    pub fn tensor_digest(tensor: &[u8]) -> Hash32 {
        keccak(b"neuroshard-receipt-tensor-v1", tensor)
    }

    /// [`Receipt::chain`] from the tensor's [`Receipt::tensor_digest`] (a verifier that
    /// keeps digests, not tensors).
    pub fn chain_digest(previous: &Hash32, step: u64, micro_batch: u32, digest: &Hash32) -> Hash32 {
        let mut e = Encoder::new(b"neuroshard-receipt-chain-v1");
        e.bytes(&previous.0)
            .u64(step)
            .u32(micro_batch)
            .bytes(&digest.0);
        keccak(b"", e.finish())
    }
}

impl SignedReceipt {
    pub fn sign(receipt: Receipt, wallet: &Wallet) -> Self {
        let signature = wallet.sign_digest(&receipt.digest());
        SignedReceipt { receipt, signature }
    }

    /// The signature is the attester's.
    pub fn verify(&self) -> Result<(), ReceiptError> {
        let signer = recover_signer(&self.receipt.digest(), &self.signature, "receipt")
            .map_err(|_| ReceiptError::BadSignature)?;
        if signer != self.receipt.attester {
            return Err(ReceiptError::BadSignature);
        }
        Ok(())
    }
}

/// The forward receipt a stage whose layers begin at `boundary` signs for `steps` steps of
/// `subject` received in `epoch`, over one placeholder tensor per step: what tests and
/// benchmarks use to stand for an honest next stage.
pub fn attest_forward(
    attester: &Wallet,
    subject: Address,
    epoch: u64,
    steps: u64,
    boundary: u32,
) -> SignedReceipt {
    let commitment = (0..steps).fold(Hash32::ZERO, |h, step| {
        Receipt::chain(&h, step, 0, &step.to_le_bytes())
    });
    SignedReceipt::sign(
        Receipt {
            attester: attester.address(),
            subject,
            kind: ReceiptKind::Forward,
            epoch_id: epoch,
            steps,
            boundary,
            commitment,
        },
        attester,
    )
}

/// The heartbeat receipt a peer signs when it heard `subject` in `slots` heartbeat slots of
/// `epoch` (the network signs them as pings go): what tests and benchmarks use to stand for an
/// honest peer.
pub fn attest_heartbeats(
    attester: &Wallet,
    subject: Address,
    epoch: u64,
    slots: u64,
) -> SignedReceipt {
    let first = epoch * HEARTBEATS_PER_EPOCH;
    let commitment = (first..first + slots).fold(Hash32::ZERO, |h, slot| {
        Receipt::chain(&h, slot, 0, b"heartbeat")
    });
    SignedReceipt::sign(
        Receipt {
            attester: attester.address(),
            subject,
            kind: ReceiptKind::Heartbeat,
            epoch_id: epoch,
            steps: slots,
            boundary: 0,
            commitment,
        },
        attester,
    )
}

/// (attester, kind, epoch): the key under which a receipt's count is cumulative.
pub type ReceiptKey = (Address, ReceiptKind, u64);

/// The checks a proof's receipts must pass without ledger state: signatures, subject, no
/// self-attestation, epochs within the age window of the proof's epoch, one receipt per key,
/// and layer boundaries on the edges of the claimed range `[start, end)`.
pub fn check_receipts(
    receipts: &[SignedReceipt],
    subject: &Address,
    proof_epoch: u64,
    layers: Option<(u32, u32)>,
) -> Result<(), ReceiptError> {
    if receipts.len() > MAX_RECEIPTS_PER_PROOF {
        return Err(ReceiptError::TooMany);
    }
    let mut keys = std::collections::BTreeSet::new();
    for r in receipts {
        let rc = &r.receipt;
        if rc.subject != *subject {
            return Err(ReceiptError::WrongSubject);
        }
        if rc.attester == *subject {
            return Err(ReceiptError::SelfAttested);
        }
        if rc.epoch_id > proof_epoch || rc.epoch_id + MAX_RECEIPT_AGE_EPOCHS < proof_epoch {
            return Err(ReceiptError::Epoch {
                receipt: rc.epoch_id,
                proof: proof_epoch,
            });
        }
        if !keys.insert((rc.attester, rc.kind, rc.epoch_id)) {
            return Err(ReceiptError::Duplicate);
        }
        let (start, end) = layers.unwrap_or((0, 0));
        let on_edge = match rc.kind {
            ReceiptKind::Forward => layers.is_some() && rc.boundary == end,
            ReceiptKind::Backward => layers.is_some() && rc.boundary == start,
            // The whole model from layer 0; the ledger checks the end against the model.
            ReceiptKind::Contribution => layers.is_some() && rc.boundary == 0 && start == 0,
            // Uptime does not depend on the layers held.
            ReceiptKind::Heartbeat => rc.boundary == 0,
        };
        if !on_edge {
            return Err(ReceiptError::Boundary {
                kind: rc.kind.as_str(),
                boundary: rc.boundary,
                start,
                end,
            });
        }
        if rc.kind == ReceiptKind::Heartbeat && rc.steps > HEARTBEATS_PER_EPOCH {
            return Err(ReceiptError::Heartbeats(rc.steps));
        }
        r.verify()?;
    }
    Ok(())
}

/// What a proof's receipts attest beyond what the previous reward already counted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attested {
    /// Training steps attested: per kind, the new steps summed over epochs (and over
    /// attesters for pipeline receipts, the largest attester's for contributions); the
    /// largest of the kinds. Heartbeat receipts count no steps.
    pub steps: u64,
    /// Uptime attested (seconds): per epoch, the heartbeat slots of the `k`-th largest
    /// attester's count beyond what earlier rewards credited for that epoch, summed.
    pub uptime_seconds: u64,
    /// The counts this proof's receipts reach, to be remembered for the next proof.
    pub counted: BTreeMap<ReceiptKey, u64>,
}

/// Counts a proof's (checked) receipts. `previous` holds the counts of the account's previous
/// reward; `min_epoch` is that reward's epoch: older receipts count nothing (their period was
/// proved already), and a receipt of the same key counts only its steps beyond the previous.
///
/// Heartbeats: per epoch, the `uptime_attesters`-th largest count among the cited attesters
/// (none when fewer attesters are cited). What was credited of an epoch is remembered under
/// the subject's own address as attester (a key no receipt can have: self-attestation is
/// refused), so citing other attesters later adds only the aggregate's growth.
pub fn attested(
    receipts: &[SignedReceipt],
    previous: &BTreeMap<ReceiptKey, u64>,
    min_epoch: Option<u64>,
    uptime_attesters: usize,
) -> Attested {
    let mut per_kind: BTreeMap<ReceiptKind, u64> = BTreeMap::new();
    let mut contribution: BTreeMap<u64, u64> = BTreeMap::new();
    // Heartbeat counts per (subject, epoch), one per attester.
    let mut heartbeats: BTreeMap<(Address, u64), Vec<u64>> = BTreeMap::new();
    // What was counted of epochs a receipt may still name stays counted.
    let mut counted: BTreeMap<ReceiptKey, u64> = previous
        .iter()
        .filter(|((_, _, epoch), _)| min_epoch.is_none_or(|m| *epoch >= m))
        .map(|(k, v)| (*k, *v))
        .collect();
    for r in receipts {
        let rc = &r.receipt;
        if min_epoch.is_some_and(|m| rc.epoch_id < m) {
            continue;
        }
        if rc.kind == ReceiptKind::Heartbeat {
            heartbeats
                .entry((rc.subject, rc.epoch_id))
                .or_default()
                .push(rc.steps.min(HEARTBEATS_PER_EPOCH));
            continue;
        }
        let key = (rc.attester, rc.kind, rc.epoch_id);
        let before = previous.get(&key).copied().unwrap_or(0);
        let new = rc.steps.saturating_sub(before);
        if rc.kind == ReceiptKind::Contribution {
            let e = contribution.entry(rc.epoch_id).or_default();
            *e = (*e).max(new);
        } else {
            *per_kind.entry(rc.kind).or_default() += new;
        }
        counted.insert(key, rc.steps.max(before));
    }
    per_kind.insert(ReceiptKind::Contribution, contribution.values().sum());
    let mut slots = 0u64;
    for ((subject, epoch), mut counts) in heartbeats {
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let reached = match uptime_attesters {
            0 => 0,
            k => counts.get(k - 1).copied().unwrap_or(0),
        };
        let key = (subject, ReceiptKind::Heartbeat, epoch);
        let before = previous.get(&key).copied().unwrap_or(0);
        slots += reached.saturating_sub(before);
        counted.insert(key, reached.max(before));
    }
    Attested {
        steps: per_kind.values().copied().max().unwrap_or(0),
        uptime_seconds: slots * HEARTBEAT_SECONDS as u64,
        counted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(
        by: &Wallet,
        of: &Wallet,
        kind: ReceiptKind,
        epoch: u64,
        steps: u64,
    ) -> SignedReceipt {
        SignedReceipt::sign(
            Receipt {
                attester: by.address(),
                subject: of.address(),
                kind,
                epoch_id: epoch,
                steps,
                boundary: match kind {
                    ReceiptKind::Forward => 2,
                    _ => 0,
                },
                commitment: Receipt::chain(&Hash32::ZERO, 1, 0, b"tensor"),
            },
            by,
        )
    }

    #[test]
    fn checks_refuse_forged_foreign_and_misplaced_receipts() {
        let (me, b, c) = (
            Wallet::from_seed(1),
            Wallet::from_seed(2),
            Wallet::from_seed(3),
        );
        let ok = receipt(&b, &me, ReceiptKind::Forward, 100, 5);
        let layers = Some((0, 2));
        assert_eq!(
            check_receipts(std::slice::from_ref(&ok), &me.address(), 100, layers),
            Ok(())
        );
        let mut forged = ok.clone();
        forged.receipt.steps = 500;
        assert_eq!(
            check_receipts(&[forged], &me.address(), 100, layers),
            Err(ReceiptError::BadSignature)
        );
        let other = receipt(&b, &c, ReceiptKind::Forward, 100, 5);
        assert_eq!(
            check_receipts(&[other], &me.address(), 100, layers),
            Err(ReceiptError::WrongSubject)
        );
        let own = receipt(&me, &me, ReceiptKind::Forward, 100, 5);
        assert_eq!(
            check_receipts(&[own], &me.address(), 100, layers),
            Err(ReceiptError::SelfAttested)
        );
        assert!(matches!(
            check_receipts(std::slice::from_ref(&ok), &me.address(), 106, layers),
            Err(ReceiptError::Epoch { .. })
        ));
        assert!(matches!(
            check_receipts(std::slice::from_ref(&ok), &me.address(), 99, layers),
            Err(ReceiptError::Epoch { .. })
        ));
        assert_eq!(
            check_receipts(&[ok.clone(), ok.clone()], &me.address(), 100, layers),
            Err(ReceiptError::Duplicate)
        );
        // The claim must end where the attester's layers begin.
        assert!(matches!(
            check_receipts(std::slice::from_ref(&ok), &me.address(), 100, Some((0, 4))),
            Err(ReceiptError::Boundary { .. })
        ));
        assert!(matches!(
            check_receipts(&[ok], &me.address(), 100, None),
            Err(ReceiptError::Boundary { .. })
        ));
        let many: Vec<_> = (0..65)
            .map(|e| receipt(&b, &me, ReceiptKind::Forward, e, 1))
            .collect();
        assert_eq!(
            check_receipts(&many, &me.address(), 64, layers),
            Err(ReceiptError::TooMany)
        );
    }

    #[test]
    fn counts_are_cumulative_and_never_counted_twice() {
        let (me, b, c) = (
            Wallet::from_seed(1),
            Wallet::from_seed(2),
            Wallet::from_seed(3),
        );
        let first = [
            receipt(&b, &me, ReceiptKind::Forward, 100, 3),
            receipt(&c, &me, ReceiptKind::Forward, 100, 2),
            receipt(&b, &me, ReceiptKind::Backward, 100, 4),
        ];
        let a = attested(&first, &BTreeMap::new(), None, 2);
        // Forward: 3 + 2 from two attesters; backward 4: the larger kind counts.
        assert_eq!(a.steps, 5);
        // The next proof carries the same epoch's receipts, grown, and a new epoch's.
        let second = [
            receipt(&b, &me, ReceiptKind::Forward, 100, 10),
            receipt(&c, &me, ReceiptKind::Forward, 100, 2),
            receipt(&b, &me, ReceiptKind::Forward, 101, 6),
            // Older than the previous reward's epoch: counts nothing.
            receipt(&c, &me, ReceiptKind::Forward, 99, 50),
        ];
        let a2 = attested(&second, &a.counted, Some(100), 2);
        // b: 7 new steps in epoch 100; c: none new; b: 6 in epoch 101.
        assert_eq!(a2.steps, 13);
        // Replaying the same receipts adds nothing, nor do the first proof's.
        assert_eq!(attested(&second, &a2.counted, Some(100), 2).steps, 0);
        assert_eq!(attested(&first, &a2.counted, Some(100), 2).steps, 0);
        // Contributions: every replica received the same one; the largest count counts.
        let c1 = |by: &Wallet, steps| receipt(by, &me, ReceiptKind::Contribution, 200, steps);
        let both = [c1(&b, 40), c1(&c, 30)];
        assert_eq!(attested(&both, &BTreeMap::new(), None, 2).steps, 40);
        assert_eq!(
            check_receipts(&both, &me.address(), 200, Some((0, 4))),
            Ok(())
        );
        assert!(check_receipts(&both, &me.address(), 200, Some((1, 4))).is_err());
        // Once a later reward moved the window on, the old epoch's counts are forgotten.
        assert!(
            attested(&[], &a2.counted, Some(101), 2)
                .counted
                .keys()
                .all(|(_, _, e)| *e >= 101)
        );
    }

    #[test]
    fn uptime_is_the_second_largest_heartbeat_count_per_epoch() {
        let [me, b, c, d] = [1, 2, 3, 4].map(Wallet::from_seed);
        let hb = |by: &Wallet, epoch, slots| receipt(by, &me, ReceiptKind::Heartbeat, epoch, slots);
        let none = BTreeMap::new();
        // One attester alone (a Sybil, say) lifts nothing with k = 2; with k = 1 it counts.
        let sybil = [hb(&b, 100, 6)];
        assert_eq!(attested(&sybil, &none, None, 2).uptime_seconds, 0);
        assert_eq!(attested(&sybil, &none, None, 1).uptime_seconds, 60);
        // The second largest count: a Sybil's 6 slots beside honest 3 and 2 give 3 slots.
        let three = [hb(&b, 100, 6), hb(&c, 100, 3), hb(&d, 100, 2)];
        let a = attested(&three, &none, None, 2);
        assert_eq!((a.uptime_seconds, a.steps), (30, 0));
        // Epochs add up; heartbeats never count as training steps.
        let two = [
            hb(&b, 100, 6),
            hb(&c, 100, 6),
            hb(&b, 101, 4),
            hb(&c, 101, 5),
        ];
        assert_eq!(attested(&two, &none, None, 2).uptime_seconds, 100);
        // What an epoch was credited stays credited: citing other attesters later (or the
        // same receipts again) adds only the aggregate's growth.
        let a = attested(&[hb(&b, 100, 4), hb(&c, 100, 4)], &none, None, 2);
        assert_eq!(a.uptime_seconds, 40);
        let later = [hb(&d, 100, 6), hb(&b, 100, 6), hb(&c, 100, 5)];
        let a2 = attested(&later, &a.counted, Some(100), 2);
        assert_eq!(a2.uptime_seconds, 20);
        assert_eq!(
            attested(&later, &a2.counted, Some(100), 2).uptime_seconds,
            0
        );
        // An epoch before the previous reward's counts nothing.
        assert_eq!(attested(&two, &none, Some(101), 2).uptime_seconds, 40);
        // Checks: a heartbeat receipt counts at most an epoch's slots, at boundary 0, and is
        // refused like any receipt when forged, self-signed, foreign or duplicated; it needs
        // no layers.
        let ok = hb(&b, 100, 6);
        assert_eq!(
            check_receipts(std::slice::from_ref(&ok), &me.address(), 100, None),
            Ok(())
        );
        assert_eq!(
            check_receipts(&[hb(&b, 100, 7)], &me.address(), 100, None),
            Err(ReceiptError::Heartbeats(7))
        );
        let mut moved = ok.clone();
        moved.receipt.boundary = 3;
        assert!(matches!(
            check_receipts(
                &[SignedReceipt::sign(moved.receipt, &b)],
                &me.address(),
                100,
                None
            ),
            Err(ReceiptError::Boundary { .. })
        ));
        let mut forged = ok.clone();
        forged.receipt.steps = 5;
        assert_eq!(
            check_receipts(&[forged], &me.address(), 100, None),
            Err(ReceiptError::BadSignature)
        );
        let own = receipt(&me, &me, ReceiptKind::Heartbeat, 100, 6);
        assert_eq!(
            check_receipts(&[own], &me.address(), 100, None),
            Err(ReceiptError::SelfAttested)
        );
        let other = receipt(&b, &c, ReceiptKind::Heartbeat, 100, 6);
        assert_eq!(
            check_receipts(&[other], &me.address(), 100, None),
            Err(ReceiptError::WrongSubject)
        );
        assert_eq!(
            check_receipts(&[ok.clone(), ok.clone()], &me.address(), 100, None),
            Err(ReceiptError::Duplicate)
        );
        assert!(matches!(
            check_receipts(&[ok], &me.address(), 106, None),
            Err(ReceiptError::Epoch { .. })
        ));
    }
}
