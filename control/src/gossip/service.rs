//! The `Ledger` peer service: blocks pushed by peers (gossip) and pages pulled by them
//! (anti-entropy), and the two client calls that reach it on a peer.

use std::sync::Arc;

use neuroshard_net::client::PeerConn;
use neuroshard_net::service::PeerEdge;
use neuroshard_net::{MAX_MESSAGE_BYTES, NetworkError, RPC_TIMEOUT};
use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::ledger_client::LedgerClient;
use neuroshard_proto::peer::ledger_server::{Ledger as LedgerRpc, LedgerServer};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{
    Gossip, GossipError, MAX_GOSSIP_MESSAGES, MAX_LEDGER_MESSAGE_BYTES, SYNC_PAGE, receive,
};

/// A client of the `Ledger` service over `channel`, with the peer port's limits.
fn client(channel: Channel) -> LedgerClient<Channel> {
    LedgerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Pushes ledger messages (`Message::to_bytes`) to `conn`'s node.
pub async fn gossip_ledger(
    conn: &PeerConn,
    messages: Vec<Vec<u8>>,
) -> Result<pb::GossipReply, NetworkError> {
    let body = pb::GossipRequest {
        auth: None,
        kind: "ledger".into(),
        messages,
    };
    conn.call("Gossip", body, RPC_TIMEOUT, |c, r| async move {
        client(c).gossip(r).await
    })
    .await
}

/// One anti-entropy page: the ledger messages `conn`'s node stored after `after_seq`.
pub async fn sync_ledger(conn: &PeerConn, after_seq: i64) -> Result<pb::SyncReply, NetworkError> {
    let body = pb::SyncRequest {
        auth: None,
        after_seq,
        limit: SYNC_PAGE,
    };
    conn.call("SyncLedger", body, RPC_TIMEOUT, |c, r| async move {
        client(c).sync_ledger(r).await
    })
    .await
}

/// The `Ledger` peer service.
pub struct LedgerService {
    edge: PeerEdge,
    gossip: Arc<Gossip>,
}

impl LedgerService {
    /// The service with the peer port's message limits, for the daemon to plug in.
    pub fn server(edge: PeerEdge, gossip: Arc<Gossip>) -> LedgerServer<LedgerService> {
        LedgerServer::new(LedgerService { edge, gossip })
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
        let tally = receive(&self.gossip, v.peer, &body.messages).await?;
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
            .gossip
            .ledger
            .messages_since(body.after_seq, i64::from(limit))
            .await
            .map_err(GossipError::from)?;
        let next_seq = page.last().map(|(s, _)| *s).unwrap_or(body.after_seq);
        let (seqs, messages) = page.into_iter().map(|(s, m)| (s, m.to_bytes())).unzip();
        Ok(self.edge.sent(pb::SyncReply {
            messages,
            seqs,
            next_seq,
        }))
    }
}
