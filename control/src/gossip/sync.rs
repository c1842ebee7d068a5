//! The two directions of ledger gossip: the push of new blocks (published on gossipsub),
//! and the pull (anti-entropy) of what one peer holds.

use std::sync::Arc;

use neuroshard_net::client::PeerConn;
use neuroshard_net::{NetworkError, stopped};
use tokio::sync::watch;

use super::sync_ledger;
use super::{Gossip, GossipError, PUSH_INTERVAL, SYNC_INTERVAL, SYNC_PAGE, receive};

/// Pulls every message `conn`'s node stored after `*after`, page by page; advances `*after`.
/// Returns how many messages were new here.
pub async fn pull(gossip: &Gossip, conn: &PeerConn, after: &mut i64) -> Result<u32, GossipError> {
    let mut new = 0;
    loop {
        let reply = sync_ledger(conn, *after).await?;
        if reply.messages.len() != reply.seqs.len() {
            return Err(NetworkError::Malformed {
                what: "sync reply",
                reason: format!(
                    "{} messages but {} sequence numbers",
                    reply.messages.len(),
                    reply.seqs.len()
                ),
            }
            .into());
        }
        if reply.messages.is_empty() {
            return Ok(new);
        }
        let tally = receive(gossip, conn.id, &reply.messages).await?;
        new += tally.accepted;
        if let Some(i) = tally.deferred_from {
            // Offer the deferred message again next round.
            if i > 0 {
                *after = reply.seqs[i - 1];
            }
            return Ok(new);
        }
        if reply.next_seq <= *after {
            return Err(NetworkError::Malformed {
                what: "sync reply",
                reason: format!(
                    "next_seq {} does not advance past {}",
                    reply.next_seq, *after
                ),
            }
            .into());
        }
        *after = reply.next_seq;
        if reply.messages.len() < SYNC_PAGE as usize {
            return Ok(new);
        }
    }
}

/// Pulls the peer's ledger right after connecting and every [`SYNC_INTERVAL`], while this
/// connection (`generation`) is the peer's entry in the peer table.
pub async fn anti_entropy(
    gossip: Arc<Gossip>,
    conn: PeerConn,
    generation: u64,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown;
    let mut after = 0i64;
    loop {
        if *stop.borrow() || !gossip.net.peers.is_current(&conn.id, generation) {
            return;
        }
        match pull(&gossip, &conn, &mut after).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(peer = %conn.id, new = n, "ledger pulled"),
            Err(e) => tracing::debug!(peer = %conn.id, error = %e, "ledger pull failed"),
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
}

/// Publishes newly stored messages on their gossip topics until `shutdown` turns true.
pub async fn push_loop(gossip: Arc<Gossip>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown;
    // Blocks held before start reach peers through their anti-entropy pulls.
    let mut cursor = gossip.ledger.last_seq().await;
    let mut tick = tokio::time::interval(PUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let page = match gossip
            .ledger
            .messages_since(cursor, i64::from(SYNC_PAGE))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "reading new ledger blocks for gossip");
                continue;
            }
        };
        let Some((last, _)) = page.last() else {
            continue;
        };
        cursor = *last;
        for (_, m) in &page {
            super::pubsub::publish(&gossip, m);
        }
    }
}
