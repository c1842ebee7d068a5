//! Ledger messages on the network's gossipsub topics: proofs of work (reward blocks and the
//! verdicts on them) on [`PROOF_TOPIC`], every other block on [`LEDGER_TOPIC`]. What
//! arrives goes through [`receive`] exactly as a `Gossip` call's messages do: a message that
//! fails verification is counted and charged to the peer that forwarded it, and gossipsub is
//! told to reject it (only accepted messages are forwarded; the forwarder's gossipsub score
//! drops). A banned peer's messages are rejected unread.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use neuroshard_ledger::{Message, Op};
use neuroshard_net::p2p::gossip::{Inbound, Verdict, message_id};
use neuroshard_net::score::{Offence, node_key};
use neuroshard_net::stopped;
use tokio::sync::watch;

use super::{Gossip, MAX_LEDGER_MESSAGE_BYTES, receive};

/// Ledger blocks other than proofs.
pub const LEDGER_TOPIC: &str = "/neuroshard/ledger/1";
/// Proofs of work: reward blocks and verdicts.
pub const PROOF_TOPIC: &str = "/neuroshard/proof/1";

/// Ids of messages accepted from gossip and not yet seen by the push, at most (cleared when
/// full: at worst a message is published again, which gossipsub drops as a duplicate).
pub const MAX_GOSSIPED: usize = 100_000;

/// The topic a message goes on.
pub fn topic_of(msg: &Message) -> &'static str {
    let proof = msg
        .blocks()
        .iter()
        .any(|b| matches!(b.block.op, Op::Reward { .. } | Op::Verdict { .. }));
    if proof { PROOF_TOPIC } else { LEDGER_TOPIC }
}

/// Publishes a stored message on its topic (no-op before the transport runs), unless it
/// came by gossip: gossipsub forwarded it already.
pub fn publish(gossip: &Gossip, msg: &Message) {
    let bytes = msg.to_bytes();
    if gossip.gossiped.lock().remove(&message_id(&bytes)) {
        return;
    }
    if let Ok(t) = gossip.net.transport()
        && let Err(e) = t.publish(topic_of(msg), bytes)
    {
        tracing::debug!(error = %e, "publishing a ledger message");
    }
}

/// Joins both topics and checks what arrives on them until `shutdown` turns true.
pub async fn run(gossip: Arc<Gossip>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown;
    // The daemon attaches the transport before it starts gossip; a node without one (a
    // test's bare network) gossips by anti-entropy only.
    let Ok(transport) = gossip.net.transport() else {
        return;
    };
    for topic in [LEDGER_TOPIC, PROOF_TOPIC] {
        if let Err(e) = transport.subscribe(topic) {
            tracing::warn!(topic, error = %e, "joining a gossip topic");
        }
    }
    let Some(mut inbound) = transport.take_gossip() else {
        return;
    };
    loop {
        let message = tokio::select! {
            _ = stopped(&mut stop) => return,
            m = inbound.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let verdict = check(&gossip, &message).await;
        transport.report(&message, verdict);
    }
}

/// The verdict on one received message, after applying it when it is good.
async fn check(gossip: &Gossip, m: &Inbound) -> Verdict {
    let Ok(from) = neuroshard_net::p2p::address_of(&m.from) else {
        return Verdict::Reject;
    };
    let net = &gossip.net;
    if net
        .scores
        .banned(&node_key(&from), Instant::now())
        .is_some()
    {
        return Verdict::Reject;
    }
    let misplaced = match Message::from_bytes(&m.data) {
        // Undecodable: `receive` counts and charges it.
        Err(_) => false,
        Ok(msg) => topic_of(&msg) != m.topic,
    };
    if misplaced || m.data.len() > MAX_LEDGER_MESSAGE_BYTES {
        net.state.rejected_messages.fetch_add(1, Ordering::Relaxed);
        net.scores.penalize(
            &node_key(&from),
            Offence::BadLedgerMessage,
            1,
            Instant::now(),
        );
        return Verdict::Reject;
    }
    match receive(gossip, from, std::slice::from_ref(&m.data)).await {
        Ok(t) if t.rejected > 0 => Verdict::Reject,
        Ok(t) if t.accepted > 0 => {
            let mut seen = gossip.gossiped.lock();
            if seen.len() >= MAX_GOSSIPED {
                seen.clear();
            }
            seen.insert(m.id.clone());
            Verdict::Accept
        }
        // Held already, or dated ahead of our clock (anti-entropy brings it later).
        Ok(_) => Verdict::Ignore,
        Err(e) => {
            tracing::debug!(error = %e, "applying a gossiped ledger message");
            Verdict::Ignore
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_identity::{Hash32, Wallet};
    use neuroshard_ledger::{Block, SignedBlock};

    #[test]
    fn proofs_and_blocks_go_on_their_topics() {
        let w = Wallet::from_seed(5);
        let block = SignedBlock::sign(
            Block {
                account: w.address(),
                height: 0,
                previous: Hash32::ZERO,
                timestamp: 0,
                op: Op::Unstake { amount: 1 },
            },
            &w,
        );
        assert_eq!(topic_of(&Message::Block(block)), LEDGER_TOPIC);
    }
}
