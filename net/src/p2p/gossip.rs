//! Gossip (docs/p2p.md step 6): gossipsub carries the messages a subsystem spreads to every
//! node (ledger blocks, proofs), one topic per kind of message, each message sent to a
//! bounded mesh of peers (D = [`MESH_N`]) instead of a flood to every peer. The network
//! names no subsystem: the daemon subscribes the topics, publishes on them and reads what
//! arrives ([`Inbound`]); it validates every message itself and reports the verdict
//! ([`Verdict`]): only accepted messages are forwarded, and a rejected one lowers the score
//! of the peer that forwarded it (gossipsub's P4), so a peer that floods bad messages is
//! soon graylisted by gossipsub as well as banned by the network's own scores.
//!
//! A message's id is a hash of its bytes: the same signed message published by two nodes
//! (its author, and one that pulled it by anti-entropy) is one message, delivered once.

use std::time::Duration;

use libp2p::PeerId;
pub use libp2p::gossipsub::MessageId;
use libp2p::gossipsub::{
    self, IdentTopic, MessageAuthenticity, PeerScoreParams, PeerScoreThresholds, TopicScoreParams,
    ValidationMode,
};
use libp2p::identity::Keypair;

/// Mesh degree: each message goes to this many peers of the topic's mesh (gossipsub's
/// default D); the mesh is kept between [`MESH_N_LOW`] and [`MESH_N_HIGH`].
pub const MESH_N: usize = 6;
pub const MESH_N_LOW: usize = 4;
pub const MESH_N_HIGH: usize = 12;

/// Largest gossip message: a ledger message is at most 64 KiB; the rest is room for the
/// gossipsub envelope (signature, topic, sequence number).
pub const MAX_GOSSIP_BYTES: usize = 80 * 1024;

/// Received messages waiting for the daemon at most (more are ignored: not forwarded and
/// not charged to anyone; anti-entropy fetches what a node missed).
pub const INBOUND_QUEUE: usize = 4096;

/// The gossipsub protocol id: ours, so only our nodes join our meshes.
const GOSSIP_PROTOCOL: &str = "/neuroshard/gossip/1.1.0";

/// A message that arrived on a subscribed topic, waiting for its verdict.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The topic it came on.
    pub topic: String,
    /// The peer that forwarded it to this node (charged when it is bad).
    pub from: PeerId,
    /// Its id (a hash of `data`): the verdict names it.
    pub id: MessageId,
    pub data: Vec<u8>,
}

/// What the daemon found of a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and new: forwarded to the mesh.
    Accept,
    /// Failed verification: dropped, and the forwarding peer's gossipsub score drops.
    Reject,
    /// Valid but not worth forwarding (a duplicate, dated ahead): dropped, nobody charged.
    Ignore,
}

impl From<Verdict> for gossipsub::MessageAcceptance {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Accept => gossipsub::MessageAcceptance::Accept,
            Verdict::Reject => gossipsub::MessageAcceptance::Reject,
            Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
        }
    }
}

/// A topic of ours by name.
pub fn topic(name: &str) -> IdentTopic {
    IdentTopic::new(name)
}

/// The id of a message: keccak-256 of its bytes.
pub fn message_id(data: &[u8]) -> MessageId {
    MessageId::new(&neuroshard_identity::keys::keccak(b"neuroshard/gossip", data).0)
}

/// The gossipsub behaviour: signed messages (the author's key, checked by every receiver),
/// ids by content, validation by the daemon before forwarding, peer scoring on.
pub(crate) fn behaviour(key: &Keypair) -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        .protocol_id(GOSSIP_PROTOCOL, gossipsub::Version::V1_1)
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| message_id(&m.data))
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .mesh_n(MESH_N)
        .mesh_n_low(MESH_N_LOW)
        .mesh_n_high(MESH_N_HIGH)
        .heartbeat_interval(Duration::from_secs(1))
        .duplicate_cache_time(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let mut gossip = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?;
    gossip.with_peer_score(score_params(), PeerScoreThresholds::default())?;
    Ok(gossip)
}

/// Scores that punish invalid messages and nothing else: a quiet topic (no ledger traffic
/// for minutes) must not count against honest mesh peers, and many nodes behind one IP
/// (NAT, one machine in tests) are normal here.
fn score_params() -> PeerScoreParams {
    PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..PeerScoreParams::default()
    }
}

/// The scores of a subscribed topic: each invalid message forwarded costs its peer
/// `-10 * n²` (n invalid messages, decaying by a tenth a second), so a handful of them take
/// the peer below the graylist threshold (-80): its messages are then ignored.
pub(crate) fn topic_score_params() -> TopicScoreParams {
    TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        ..TopicScoreParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_content_hashes() {
        assert_eq!(message_id(b"block"), message_id(b"block"));
        assert_ne!(message_id(b"block"), message_id(b"block2"));
        let key = Keypair::generate_secp256k1();
        let mut g = behaviour(&key).unwrap();
        assert!(g.subscribe(&topic("/neuroshard/ledger/1")).unwrap());
        assert!(
            g.set_topic_params(topic("/neuroshard/ledger/1"), topic_score_params())
                .is_ok()
        );
    }
}
