//! The two directions of ledger gossip: the push of new blocks to every peer, and the pull
//! (anti-entropy) of what one peer holds.

use std::sync::Arc;

use neuroshard_identity::Address;
use neuroshard_net::client::PeerConn;
use neuroshard_net::{NetworkError, stopped};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Gossip, GossipError, PUSH_INTERVAL, SYNC_INTERVAL, SYNC_PAGE, receive};
use super::{gossip_ledger, sync_ledger};

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

/// Pushes newly stored blocks to every connected peer until `shutdown` turns true.
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
        let batch: Vec<(Option<Address>, Vec<u8>)> = page
            .iter()
            .map(|(_, m)| {
                let origin = m
                    .blocks()
                    .first()
                    .and_then(|b| gossip.origins.take(&b.hash()));
                (origin, m.to_bytes())
            })
            .collect();
        push(&gossip, &batch).await;
    }
}

/// Sends `batch` to every connected peer (except each block's origin), all peers at once.
async fn push(gossip: &Gossip, batch: &[(Option<Address>, Vec<u8>)]) {
    let mut sends = JoinSet::new();
    for conn in gossip.net.peers.conns() {
        let messages = for_peer(batch, conn.id);
        if messages.is_empty() {
            continue;
        }
        sends.spawn(async move {
            let n = messages.len();
            match gossip_ledger(&conn, messages).await {
                Ok(r) => tracing::debug!(peer = %conn.id, sent = n, accepted = r.accepted, duplicates = r.duplicates, rejected = r.rejected, "ledger pushed"),
                // A peer that missed a push catches up by pulling.
                Err(e) => tracing::debug!(peer = %conn.id, error = %e, "ledger push failed"),
            }
        });
    }
    while sends.join_next().await.is_some() {}
}

/// The messages of `batch` to send to `peer`: all but those that came from it.
pub(super) fn for_peer(batch: &[(Option<Address>, Vec<u8>)], peer: Address) -> Vec<Vec<u8>> {
    batch
        .iter()
        .filter(|(origin, _)| *origin != Some(peer))
        .map(|(_, bytes)| bytes.clone())
        .collect()
}
