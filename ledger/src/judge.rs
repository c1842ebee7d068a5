//! The verifier's side of fraud verdicts (`fraud.rs`): finding the reward a recomputed piece
//! of work was claimed in, and writing this node's verdict on it.

use super::account::{Effect, Outcome};
use super::address::Address;
use super::block::Op;
use super::error::LedgerError;
use super::keys::{Hash32, Wallet};
use super::receipt::ReceiptKind;
use super::service::Ledger;

impl Ledger {
    /// The first rewarded block of `accused` whose proof carries a receipt of `kind` signed by
    /// `attester` for `epoch`: the claim of the work that receipt attested.
    pub async fn claim_of(
        &self,
        accused: &Address,
        attester: &Address,
        kind: ReceiptKind,
        epoch: u64,
    ) -> Option<Hash32> {
        self.cited(accused, attester, kind, epoch)
            .await
            .map(|(h, _)| h)
    }

    /// As [`Ledger::claim_of`], with the receipt that reward cites (a verifier checks its
    /// commitment against what the accused's evidence says was sent).
    pub async fn cited(
        &self,
        accused: &Address,
        attester: &Address,
        kind: ReceiptKind,
        epoch: u64,
    ) -> Option<(Hash32, crate::receipt::Receipt)> {
        let inner = self.inner.lock().await;
        citing(&inner.state, accused, attester, kind, epoch).next()
    }

    /// The reward that claimed an inference payment to `accused` made in `epoch`: its first
    /// rewarded block whose proof claims inference tokens, of that epoch or of one of the
    /// `MAX_RECEIPT_AGE_EPOCHS` after it (a reward claims the oldest unclaimed payments of that
    /// span first, `inference.rs`).
    pub async fn inference_claim_of(&self, accused: &Address, epoch: u64) -> Option<Hash32> {
        let span = epoch..=epoch + crate::receipt::MAX_RECEIPT_AGE_EPOCHS;
        let inner = self.inner.lock().await;
        let st = &inner.state;
        let account = st.chain_account(accused)?;
        account
            .history
            .iter()
            .filter(|e| e.kind == "reward")
            .filter_map(|e| Hash32::from_hex(e.id.strip_prefix("tx_")?).ok())
            .find(|h| {
                let rewarded = matches!(
                    st.outcome(h),
                    Some(Outcome::Applied(Effect::Rewarded { .. }))
                );
                let Some(Op::Reward { proof, .. }) = st.block(h).map(|b| &b.block.op) else {
                    return false;
                };
                rewarded && proof.proof.tokens_processed > 0 && span.contains(&proof.proof.epoch_id)
            })
    }

    /// Every receipt `attester` signed for `subject`'s `kind` work of `epoch` that the
    /// subject's applied rewards cite (a proof of each later epoch may cite a newer one), with
    /// the reward citing it: a verifier checks a stage's logged inputs against the receipts the
    /// stage itself signed for its senders.
    pub async fn cited_all(
        &self,
        subject: &Address,
        attester: &Address,
        kind: ReceiptKind,
        epoch: u64,
    ) -> Vec<(Hash32, crate::receipt::Receipt)> {
        let inner = self.inner.lock().await;
        citing(&inner.state, subject, attester, kind, epoch).collect()
    }

    /// Writes this node's verdict on the reward block `target` of `accused`; `evidence` is the
    /// hash of what was compared. The block is gossiped like any other.
    pub async fn judge(
        &self,
        wallet: &Wallet,
        target: Hash32,
        accused: Address,
        evidence: Hash32,
        guilty: bool,
        now: i64,
    ) -> Result<Hash32, LedgerError> {
        let mut inner = self.inner.lock().await;
        let op = Op::Verdict {
            target,
            accused,
            evidence,
            guilty,
        };
        let hashes = self.commit_local(&mut inner, wallet, vec![op], now).await?;
        hashes
            .into_iter()
            .next()
            .ok_or_else(|| LedgerError::InvalidMessage {
                reason: "verdict not committed".into(),
            })
    }
}

/// `subject`'s applied rewards (oldest first) whose proofs cite a receipt of `attester` of
/// `kind` and `epoch`, each with that receipt.
fn citing<'a>(
    st: &'a crate::state::LedgerState,
    subject: &Address,
    attester: &'a Address,
    kind: ReceiptKind,
    epoch: u64,
) -> impl Iterator<Item = (Hash32, crate::receipt::Receipt)> + 'a {
    st.chain_account(subject)
        .into_iter()
        .flat_map(|account| account.history.iter())
        .filter(|e| e.kind == "reward")
        .filter_map(|e| Hash32::from_hex(e.id.strip_prefix("tx_")?).ok())
        .filter(|h| {
            matches!(
                st.outcome(h),
                Some(Outcome::Applied(Effect::Rewarded { .. }))
            )
        })
        .filter_map(move |h| {
            let Some(Op::Reward { proof, .. }) = st.block(&h).map(|b| &b.block.op) else {
                return None;
            };
            proof
                .proof
                .receipts
                .iter()
                .find(|r| {
                    r.receipt.attester == *attester
                        && r.receipt.kind == kind
                        && r.receipt.epoch_id == epoch
                })
                .map(|r| (h, r.receipt.clone()))
        })
}
