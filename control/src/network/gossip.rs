//! Ledger gossip. Push: every [`PUSH_INTERVAL`] the blocks stored since the last push (made
//! here or received from a peer) go to every connected peer except the one a block came
//! from. A receiver stores a block once, so it forwards it once: flooding with deduplication,
//! which reaches nodes that are not neighbours of the author. Pull (anti-entropy): every
//! [`SYNC_INTERVAL`](super::SYNC_INTERVAL) and right after connecting, a node asks each peer
//! for the messages it stored after the last one seen, so a node that was offline catches up.
//! Every received message goes through [`Ledger::apply`](crate::ledger::Ledger::apply), which
//! verifies it; a bad one is counted and charged to the peer that sent it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::ledger_server::{Ledger as LedgerRpc, LedgerServer};
use tonic::{Request, Response, Status};

use super::client::PeerConn;
use super::error::NetworkError;
use super::score::{Offence, node_key};
use super::service::PeerEdge;
use super::{
    MAX_GOSSIP_MESSAGES, MAX_LEDGER_MESSAGE_BYTES, Network, PUSH_INTERVAL, SYNC_PAGE, stopped,
};
use crate::ledger::{Address, Hash32, Message};
use crate::network::MAX_MESSAGE_BYTES;

/// Block origins remembered at most (the map is cleared when full: at worst a block is sent
/// back to the peer it came from, which answers "duplicate").
const MAX_ORIGINS: usize = 100_000;

/// Which peer each recently received block came from.
#[derive(Debug, Default)]
pub struct Origins {
    inner: Mutex<HashMap<Hash32, Address>>,
}

impl Origins {
    fn record(&self, hash: Hash32, from: Address) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_ORIGINS {
            g.clear();
        }
        g.insert(hash, from);
    }

    fn take(&self, hash: &Hash32) -> Option<Address> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash)
    }
}

/// What became of a batch of received messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Carried at least one block new to this node.
    pub accepted: u32,
    /// Undecodable or failed verification.
    pub rejected: u32,
    /// Already held.
    pub duplicates: u32,
    /// Index of the first message refused for now (dated ahead of the local clock): it and
    /// what follows should be offered again later.
    pub deferred_from: Option<usize>,
}

/// Applies messages received from `from`, counts them and charges bad ones to the peer.
pub async fn receive(
    net: &Network,
    from: Address,
    messages: &[Vec<u8>],
) -> Result<Tally, NetworkError> {
    let mut tally = Tally::default();
    let now = chrono::Utc::now().timestamp();
    for (i, bytes) in messages.iter().enumerate() {
        let msg = match Message::from_bytes(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(peer = %from, error = %e, "undecodable ledger message");
                tally.rejected += 1;
                continue;
            }
        };
        // On a task of its own: the peer service drops a request's future at its deadline,
        // and a drop between the database commit and the in-memory update would leave a
        // block stored but unknown to the state (the same cut the API's writes avoid).
        let ledger = net.ledger.clone();
        let result = match tokio::spawn(async move { ledger.apply(&msg, now).await }).await {
            Ok(r) => r,
            Err(e) => return Err(NetworkError::Internal(format!("ledger write task: {e}"))),
        };
        match result {
            Ok(applied) => {
                let mut new = false;
                for (hash, fresh, _) in &applied.blocks {
                    if *fresh {
                        new = true;
                        net.origins.record(*hash, from);
                    }
                }
                if new {
                    tally.accepted += 1;
                } else {
                    tally.duplicates += 1;
                }
            }
            Err(e) if e.code() == "FUTURE_TIMESTAMP" => {
                tally.deferred_from = Some(i);
                break;
            }
            Err(e) if e.code() == "INTERNAL" => return Err(e.into()),
            Err(e) => {
                tracing::debug!(peer = %from, error = %e, "ledger message rejected");
                tally.rejected += 1;
            }
        }
    }
    if tally.rejected > 0 {
        net.state
            .rejected_messages
            .fetch_add(u64::from(tally.rejected), Ordering::Relaxed);
        if net.scores.penalize(
            &node_key(&from),
            Offence::BadLedgerMessage,
            tally.rejected,
            Instant::now(),
        ) {
            tracing::warn!(peer = %from, "peer banned after sending bad ledger messages");
        }
    }
    Ok(tally)
}

/// Pulls every message `conn`'s node stored after `*after`, page by page; advances `*after`.
/// Returns how many messages were new here.
pub async fn pull(net: &Network, conn: &PeerConn, after: &mut i64) -> Result<u32, NetworkError> {
    let mut new = 0;
    loop {
        let reply = conn.sync_ledger(*after).await?;
        if reply.messages.len() != reply.seqs.len() {
            return Err(NetworkError::Malformed {
                what: "sync reply",
                reason: format!(
                    "{} messages but {} sequence numbers",
                    reply.messages.len(),
                    reply.seqs.len()
                ),
            });
        }
        if reply.messages.is_empty() {
            return Ok(new);
        }
        let tally = receive(net, conn.id, &reply.messages).await?;
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
            });
        }
        *after = reply.next_seq;
        if reply.messages.len() < SYNC_PAGE as usize {
            return Ok(new);
        }
    }
}

/// Pushes newly stored blocks to every connected peer until `shutdown` turns true.
pub async fn push_loop(net: Arc<Network>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown;
    // Blocks held before start reach peers through their anti-entropy pulls.
    let mut cursor = net.ledger.last_seq().await;
    let mut tick = tokio::time::interval(PUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let page = match net
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
                let origin = m.blocks().first().and_then(|b| net.origins.take(&b.hash()));
                (origin, m.to_bytes())
            })
            .collect();
        push(&net, &batch).await;
    }
}

/// Sends `batch` to every connected peer (except each block's origin), all peers at once.
async fn push(net: &Network, batch: &[(Option<Address>, Vec<u8>)]) {
    let mut sends = JoinSet::new();
    for conn in net.peers.conns() {
        let messages = for_peer(batch, conn.id);
        if messages.is_empty() {
            continue;
        }
        sends.spawn(async move {
            let n = messages.len();
            match conn.gossip_ledger(messages).await {
                Ok(r) => tracing::debug!(peer = %conn.id, sent = n, accepted = r.accepted, duplicates = r.duplicates, rejected = r.rejected, "ledger pushed"),
                // A peer that missed a push catches up by pulling.
                Err(e) => tracing::debug!(peer = %conn.id, error = %e, "ledger push failed"),
            }
        });
    }
    while sends.join_next().await.is_some() {}
}

/// The messages of `batch` to send to `peer`: all but those that came from it.
fn for_peer(batch: &[(Option<Address>, Vec<u8>)], peer: Address) -> Vec<Vec<u8>> {
    batch
        .iter()
        .filter(|(origin, _)| *origin != Some(peer))
        .map(|(_, bytes)| bytes.clone())
        .collect()
}

/// The `Ledger` peer service: blocks pushed by peers (gossip) and pages pulled by them
/// (anti-entropy).
pub struct LedgerService {
    edge: PeerEdge,
}

impl LedgerService {
    /// The service with the peer port's message limits, for the daemon to plug in.
    pub fn server(edge: PeerEdge) -> LedgerServer<LedgerService> {
        LedgerServer::new(LedgerService { edge })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl LedgerRpc for LedgerService {
    async fn gossip(
        &self,
        req: Request<pb::GossipRequest>,
    ) -> Result<Response<pb::GossipReply>, Status> {
        let (body, v) = self.edge.verify(req)?;
        match body.kind.as_str() {
            "ledger" => {}
            "proof" | "gradient" => {
                return Err(NetworkError::NotServed {
                    what: "proof and gradient gossip",
                }
                .into());
            }
            other => {
                return Err(NetworkError::Malformed {
                    what: "gossip",
                    reason: format!(
                        "unknown kind {:?}",
                        other.chars().take(32).collect::<String>()
                    ),
                }
                .into());
            }
        }
        if body.messages.len() > MAX_GOSSIP_MESSAGES {
            return Err(NetworkError::TooMany {
                what: "gossip messages",
                count: body.messages.len(),
                max: MAX_GOSSIP_MESSAGES,
            }
            .into());
        }
        if let Some(big) = body
            .messages
            .iter()
            .find(|m| m.len() > MAX_LEDGER_MESSAGE_BYTES)
        {
            return Err(NetworkError::TooLarge {
                what: "ledger message",
                size: big.len(),
                max: MAX_LEDGER_MESSAGE_BYTES,
            }
            .into());
        }
        let tally = receive(&self.edge.net, v.peer, &body.messages).await?;
        Ok(self.edge.sent(pb::GossipReply {
            accepted: tally.accepted,
            rejected: tally.rejected,
            duplicates: tally.duplicates,
        }))
    }

    async fn sync_ledger(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncReply>, Status> {
        let (body, _v) = self.edge.verify(req)?;
        if body.after_seq < 0 {
            return Err(NetworkError::Malformed {
                what: "sync request",
                reason: format!("after_seq {} is negative", body.after_seq),
            }
            .into());
        }
        let limit = body.limit.clamp(1, SYNC_PAGE);
        let page = self
            .edge
            .net
            .ledger
            .messages_since(body.after_seq, i64::from(limit))
            .await
            .map_err(NetworkError::from)?;
        let next_seq = page.last().map(|(s, _)| *s).unwrap_or(body.after_seq);
        let (seqs, messages) = page.into_iter().map(|(s, m)| (s, m.to_bytes())).unzip();
        Ok(self.edge.sent(pb::SyncReply {
            messages,
            seqs,
            next_seq,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, Wallet};
    use crate::network::LocalRole;
    use crate::peer::PeerState;

    async fn node(dir: &std::path::Path) -> Arc<Network> {
        Network::new(
            Arc::new(Wallet::generate()),
            Arc::new(Ledger::open_data_dir(dir).await.unwrap()),
            Arc::new(PeerState::default()),
            0,
            1,
            LocalRole {
                role: "full".into(),
                layers: Vec::new(),
            },
            crate::network::no_advert(),
        )
    }

    #[tokio::test]
    async fn received_blocks_are_forwarded_to_everyone_but_their_origin() {
        let d = tempfile::tempdir().unwrap();
        let relay = node(d.path()).await;
        let (from, other) = (
            Wallet::from_seed(11).address(),
            Wallet::from_seed(12).address(),
        );
        let now = chrono::Utc::now().timestamp();
        let w = Wallet::from_seed(13);
        // A block made elsewhere (an unstake of nothing: valid, without effect).
        let block = crate::ledger::SignedBlock::sign(
            crate::ledger::Block {
                account: w.address(),
                height: 0,
                previous: Hash32::ZERO,
                timestamp: now,
                op: crate::ledger::Op::Unstake { amount: 1 },
            },
            &w,
        );
        let bytes = Message::Block(block).to_bytes();
        let tally = receive(&relay, from, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        assert_eq!(
            (tally.accepted, tally.rejected, tally.duplicates),
            (1, 0, 0)
        );
        // Stored once: a second copy is a duplicate, and is not recorded again.
        let again = receive(&relay, other, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 1));
        // The relay's push batch: the block goes to `other`, not back to `from`.
        let page = relay.ledger.messages_since(0, 10).await.unwrap();
        let batch: Vec<(Option<Address>, Vec<u8>)> = page
            .iter()
            .map(|(_, m)| (relay.origins.take(&m.blocks()[0].hash()), m.to_bytes()))
            .collect();
        assert_eq!(batch[0].0, Some(from));
        assert!(for_peer(&batch, from).is_empty());
        assert_eq!(for_peer(&batch, other), vec![bytes]);
    }

    #[tokio::test]
    async fn bad_messages_are_counted_and_charged_to_the_sender() {
        let d = tempfile::tempdir().unwrap();
        let net = node(d.path()).await;
        let from = Wallet::from_seed(21).address();
        let msgs = vec![b"{}".to_vec(), vec![0xff; 10]];
        let tally = receive(&net, from, &msgs).await.unwrap();
        assert_eq!((tally.accepted, tally.rejected), (0, 2));
        assert_eq!(net.state.rejected_messages.load(Ordering::Relaxed), 2);
        let key = node_key(&from);
        assert_eq!(
            net.scores.score(&key, Instant::now()),
            super::super::score::MAX_SCORE - 2 * Offence::BadLedgerMessage.cost()
        );
    }
}
