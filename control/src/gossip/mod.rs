//! Ledger gossip: the ledger's peer service, plugged into the network by the daemon like the
//! DiLoCo and pipeline services. Push ([`sync::push_loop`]): every [`PUSH_INTERVAL`] the
//! messages stored since the last push (made here or received) are published on the
//! network's gossipsub topics ([`pubsub`]: ledger blocks and proofs apart), which hand each
//! to a bounded mesh of peers; a receiver checks it ([`receive`]) before gossipsub forwards
//! it, so it reaches nodes that are not neighbours of the author without a flood to every
//! peer. A peer may still push blocks with the `Gossip` call (served, not used for push). Pull (anti-entropy, [`sync::pull`]): every [`SYNC_INTERVAL`] and right
//! after connecting (the network's [`PeerUp`] events), a node asks each peer for the messages
//! it stored after the last one seen, so a node that was offline catches up. Every received
//! message goes through [`Ledger::apply`], which verifies it; a bad one is counted and charged
//! to the peer that sent it. [`run`] runs both until shutdown; the daemon starts it.

pub mod pubsub;
pub mod service;
pub mod sync;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use neuroshard_identity::Address;
use neuroshard_ledger::{Ledger, LedgerError, Message, Op};
use neuroshard_net::score::{Offence, node_key};
use neuroshard_net::{Network, NetworkError, PeerUp, stopped};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

pub use service::{LedgerService, gossip_ledger, sync_ledger};

use crate::wallets::Keyring;

/// Anti-entropy: each peer's ledger is pulled this often (and right after connecting).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Newly stored ledger blocks are pushed to peers this often.
pub const PUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Most ledger messages in one gossip request.
pub const MAX_GOSSIP_MESSAGES: usize = 1024;
/// Largest single ledger message accepted.
pub const MAX_LEDGER_MESSAGE_BYTES: usize = 64 * 1024;
/// Most messages in one anti-entropy page (and one push).
pub const SYNC_PAGE: u32 = 512;

/// Every way gossip can fail: the transport's errors, and the local ledger's.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error(transparent)]
    Net(#[from] NetworkError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl GossipError {
    /// The gRPC code a peer receives for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Net(e) => e.code(),
            // The local database failed: not the caller's fault, and worth a retry.
            Self::Ledger(_) => Code::Unavailable,
        }
    }
}

impl From<GossipError> for Status {
    fn from(e: GossipError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// What gossip works with: the transport and the ledger.
pub struct Gossip {
    pub net: Arc<Network>,
    pub ledger: Arc<Ledger>,
    /// Messages accepted from gossipsub (which forwards them): the push skips them.
    gossiped: parking_lot::Mutex<std::collections::HashSet<neuroshard_net::p2p::gossip::MessageId>>,
    /// The keys this node holds: a transfer to one of them is claimed as soon as it arrives.
    /// None: nothing is claimed here (the node's proofs of work still claim).
    keys: Option<Arc<Keyring>>,
}

impl Gossip {
    pub fn new(net: Arc<Network>, ledger: Arc<Ledger>) -> Arc<Gossip> {
        Self::build(net, ledger, None)
    }

    /// Gossip that claims the transfers to the accounts of `keys` as they arrive.
    pub fn claiming(net: Arc<Network>, ledger: Arc<Ledger>, keys: Arc<Keyring>) -> Arc<Gossip> {
        Self::build(net, ledger, Some(keys))
    }

    fn build(net: Arc<Network>, ledger: Arc<Ledger>, keys: Option<Arc<Keyring>>) -> Arc<Gossip> {
        Arc::new(Gossip {
            net,
            ledger,
            gossiped: Default::default(),
            keys,
        })
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
    gossip: &Gossip,
    from: Address,
    messages: &[Vec<u8>],
) -> Result<Tally, GossipError> {
    let mut tally = Tally::default();
    let now = chrono::Utc::now().timestamp();
    // Accounts that new sends pay: claimed below when this node holds their key.
    let mut paid: Vec<Address> = Vec::new();
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
        let ledger = gossip.ledger.clone();
        let sends: Vec<Address> = msg
            .blocks()
            .iter()
            .filter_map(|b| match &b.block.op {
                Op::Send { to, .. } => Some(*to),
                _ => None,
            })
            .collect();
        let result = match tokio::spawn(async move { ledger.apply(&msg, now).await }).await {
            Ok(r) => r,
            Err(e) => {
                return Err(NetworkError::Internal(format!("ledger write task: {e}")).into());
            }
        };
        match result {
            Ok(applied) => {
                let new = applied.blocks.iter().any(|(_, fresh, _)| *fresh);
                if new {
                    paid.extend(sends);
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
    if let Some(keys) = &gossip.keys
        && tally.accepted > 0
    {
        // The node wallet too: a transfer to it may have waited for a block that just came.
        paid.push(keys.node().address());
        paid.sort();
        paid.dedup();
        crate::wallets::claim_now(keys, &gossip.ledger, paid);
    }
    if tally.rejected > 0 {
        let net = &gossip.net;
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

/// Publishes new blocks, checks the ones gossip brings, and pulls each new peer's ledger
/// (announced on `connected`) right away and every [`SYNC_INTERVAL`], until `shutdown`
/// turns true.
pub async fn run(
    gossip: Arc<Gossip>,
    mut connected: mpsc::UnboundedReceiver<PeerUp>,
    shutdown: watch::Receiver<bool>,
) {
    let inbound = tokio::spawn(pubsub::run(gossip.clone(), shutdown.clone()));
    let push = tokio::spawn(sync::push_loop(gossip.clone(), shutdown.clone()));
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            up = connected.recv() => match up {
                Some(up) => {
                    tokio::spawn(sync::anti_entropy(
                        gossip.clone(),
                        up.conn,
                        up.generation,
                        shutdown.clone(),
                    ));
                }
                // The network is gone: nobody connects any more.
                None => {
                    stopped(&mut stop).await;
                    break;
                }
            },
        }
    }
    let _ = push.await;
    let _ = inbound.await;
}

#[cfg(test)]
mod tests;
