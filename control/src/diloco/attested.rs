//! What a round does for the contributions it aggregated: the receipts this node signs for
//! their senders, and the draw of which to replay (`verify.rs`).

use super::sync::Round;

impl Round<'_> {
    /// Signs, for each replica whose contribution this round aggregated (checked and not
    /// outvoted), the receipt of its inner steps; it answers that replica's next push.
    pub(super) fn attest_contributions(
        &self,
        round: u64,
        start_hash: &str,
        senders: &[String],
        batches: &[u64],
        outvoted: &[usize],
    ) -> Vec<(String, u64)> {
        let me = self.attest.address().to_string();
        let mut epochs = Vec::new();
        for (i, sender) in senders.iter().enumerate() {
            if *sender == me || outvoted.contains(&i) {
                continue;
            }
            let Ok(subject) = sender.parse::<neuroshard_ledger::Address>() else {
                continue;
            };
            let id = format!("{round}:{start_hash}:{}", batches[i]);
            let r = self
                .attest
                .credit(subject, batches[i], round, id.as_bytes());
            epochs.push((sender.clone(), r.receipt.epoch_id));
            self.diloco
                .receipts
                .lock()
                .insert(sender.clone(), crate::attest::to_bytes(&r));
        }
        epochs
    }

    /// Draws, for each attested contribution, whether to replay it (`verify.rs`).
    pub(super) fn sample(&self, round: u64, start_hash: &str, attested: &[(String, u64)]) {
        let verifier = &self.diloco.verifier;
        // Every replica but the claimant may check a contribution: this one and the other
        // senders it attested.
        let verifiers = attested.len();
        for (sender, epoch) in attested {
            if !verifier.draw(verifiers) {
                continue;
            }
            let Ok(claimant) = sender.parse::<neuroshard_ledger::Address>() else {
                continue;
            };
            let Some(commitment) = verifier
                .commitments
                .lock()
                .get(&(sender.clone(), round))
                .cloned()
            else {
                continue;
            };
            let Some(conn) = self
                .replicas()
                .into_iter()
                .find(|(_, i)| i.node_id == *sender)
                .map(|(c, _)| c)
            else {
                continue;
            };
            let (layout, theta_start) = {
                let s = self.diloco.state.lock();
                (s.layout.clone(), s.theta_start.clone())
            };
            let Some((sent, batches)) = self
                .diloco
                .inbox
                .lock()
                .matching(round, start_hash)
                .into_iter()
                .find(|c| c.sender == *sender)
                .map(|c| (c.flat(), c.batches))
            else {
                continue;
            };
            let job = super::verify::Job {
                claimant,
                round,
                epoch: *epoch,
                start_hash: start_hash.to_string(),
                batches,
                commitment,
                layout,
                theta_start,
                sent,
            };
            verifier.spawn(job, conn, self.dir.clone());
        }
    }
}
