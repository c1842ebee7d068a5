//! A real node refuses what a hostile peer can send over the peer service — undecodable and
//! oversized bodies, unsigned, unknown, forged and replayed requests (a forged DiLoCo
//! pseudo-gradient among them), forged ledger blocks —
//! with clear statuses, bans a connection or node that keeps doing it, and stays healthy.

use crate::network_common;

use std::time::Duration;

use network_common::{Observer, now_s};
use neuroshard::gossip::{MAX_LEDGER_MESSAGE_BYTES, gossip_ledger};
use neuroshard_ledger::{Message, Op};
use neuroshard_net::auth::sign_request;
use neuroshard_proto::peer as pb;
use neuroshard_proto::peer::diloco_client::DilocoClient;
use neuroshard_proto::peer::ledger_client::LedgerClient;
use neuroshard_proto::peer::peer_client::PeerClient;
use neuroshard_tests::{Node, NodeOptions};
use tonic::Code;
use tonic::transport::Channel;

const START: Duration = Duration::from_secs(60);
const GOSSIP: &str = "/neuroshard.peer.v1.Ledger/Gossip";

/// A channel to `node`'s peer service over the observer's libp2p connection to it.
fn channel(obs: &Observer, node: &Node) -> Channel {
    let addr = node.peer_addr();
    obs.rt
        .block_on(neuroshard_net::client::dial(&obs.net, &addr))
        .unwrap()
        .0
}

/// Clients of the node's peer services over one connection.
struct Clients {
    peer: PeerClient<Channel>,
    ledger: LedgerClient<Channel>,
    diloco: DilocoClient<Channel>,
}

fn client(obs: &Observer, node: &Node) -> Clients {
    let ch = channel(obs, node);
    Clients {
        peer: PeerClient::new(ch.clone()).max_encoding_message_size(usize::MAX),
        ledger: LedgerClient::new(ch.clone()).max_encoding_message_size(usize::MAX),
        diloco: DilocoClient::new(ch).max_encoding_message_size(usize::MAX),
    }
}

fn gossip(messages: Vec<Vec<u8>>) -> pb::GossipRequest {
    pb::GossipRequest {
        auth: None,
        kind: "ledger".into(),
        messages,
    }
}

#[test]
fn hostile_requests_are_refused_and_the_node_keeps_working() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let obs = Observer::new().unwrap();

    // Garbage bytes: refused by the decoder; after four on one connection it is banned.
    let ch = channel(&obs, &node);
    for _ in 0..4 {
        let garbage = vec![0xff; 40];
        let e = obs
            .rt
            .block_on(neuroshard_proto::raw::unary(ch.clone(), GOSSIP, garbage))
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
    }
    let e = obs
        .rt
        .block_on(neuroshard_proto::raw::unary(ch, GOSSIP, vec![1, 2, 3]))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("banned"), "{}", e.message());
    // The ban holds for the connection: every stream on it, a new channel's too.
    let e = obs
        .rt
        .block_on(neuroshard_proto::raw::unary(
            channel(&obs, &node),
            GOSSIP,
            vec![1, 2, 3],
        ))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The rest comes from a new peer (a new connection).
    let obs = Observer::new().unwrap();

    // A body above the 64 MiB message limit is refused before it is decoded.
    let e = obs
        .rt
        .block_on(neuroshard_proto::raw::unary(
            channel(&obs, &node),
            GOSSIP,
            vec![0; (64 << 20) + 16],
        ))
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Unsigned, and signed by a node that never completed a handshake.
    let mut c = client(&obs, &node);
    let e = obs
        .rt
        .block_on(c.ledger.gossip(gossip(vec![b"{}".to_vec()])))
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no signed auth"), "{}", e.message());
    let stranger = neuroshard_ledger::Wallet::generate();
    let req = sign_request(&stranger, gossip(vec![]), now_s() * 1000);
    let e = obs.rt.block_on(c.ledger.gossip(req)).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("handshake"), "{}", e.message());

    // After a handshake: a tampered body, a replay, a stale timestamp. From a new peer: the
    // refusals above have spent most of this connection's score.
    let obs = Observer::new().unwrap();
    let _conn = obs.connect(&node).unwrap();
    let mut c = client(&obs, &node);
    let mut forged = sign_request(obs.wallet(), gossip(vec![]), now_s() * 1000);
    forged.messages.push(b"added after signing".to_vec());
    let e = obs.rt.block_on(c.ledger.gossip(forged)).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("bad signature"), "{}", e.message());
    // A forged pseudo-gradient: a signed DiLoCo delta changed after signing.
    let delta = pb::DeltaMessage {
        round: 1,
        model_hash: "00".into(),
        encoding: "bf16".into(),
        ..Default::default()
    };
    let mut forged = sign_request(obs.wallet(), delta, now_s() * 1000);
    forged.round = 2;
    let e = obs.rt.block_on(c.diloco.push_delta(forged)).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("bad signature"), "{}", e.message());
    let ping = sign_request(obs.wallet(), pb::PingRequest::default(), now_s() * 1000);
    obs.rt.block_on(c.peer.ping(ping.clone())).unwrap();
    let e = obs.rt.block_on(c.peer.ping(ping)).unwrap_err();
    assert!(e.message().contains("replayed"), "{}", e.message());
    let old = sign_request(
        obs.wallet(),
        pb::PingRequest::default(),
        (now_s() - 3600) * 1000,
    );
    let e = obs.rt.block_on(c.peer.ping(old)).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("window"), "{}", e.message());

    // An oversized ledger message inside a well-signed request. From a new peer again: four
    // refusals have spent this connection's score.
    let obs = Observer::new().unwrap();
    let conn = obs.connect(&node).unwrap();
    let big = vec![b'x'; MAX_LEDGER_MESSAGE_BYTES + 1];
    let e = obs
        .rt
        .block_on(gossip_ledger(&conn, vec![big]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most"), "{e}");

    // Forged ledger blocks from an authenticated peer: rejected, counted, and enough of them
    // get the peer banned.
    let now = now_s();
    obs.mint(now).unwrap();
    let (_, Message::Block(mut block)) = obs
        .rt
        .block_on(obs.ledger().messages_since(0, 1))
        .unwrap()
        .remove(0)
    else {
        panic!("a block")
    };
    if let Op::Reward { amount, .. } = &mut block.block.op {
        *amount *= 1000;
    }
    let reply = obs
        .rt
        .block_on(gossip_ledger(
            &conn,
            vec![
                Message::Block(block.clone()).to_bytes(),
                b"not a ledger message".to_vec(),
            ],
        ))
        .unwrap();
    assert_eq!((reply.accepted, reply.rejected), (0, 2));
    let reply = obs
        .rt
        .block_on(gossip_ledger(
            &conn,
            vec![Message::Block(block).to_bytes(); 8],
        ))
        .unwrap();
    assert_eq!(reply.rejected, 8);
    let e = obs.rt.block_on(conn.ping()).unwrap_err().to_string();
    assert!(e.contains("banned"), "{e}");

    // The node is still healthy and serves a well-behaved peer.
    node.wait_healthy(Duration::from_secs(10)).unwrap();
    let fresh = Observer::new().unwrap();
    let conn = fresh.connect(&node).unwrap();
    let (rtt_ms, info) = fresh.rt.block_on(conn.ping()).unwrap();
    assert!(rtt_ms >= 0.0);
    assert_eq!(info.unwrap().node_id, conn.id.to_string());
    let reply = fresh.rt.block_on(gossip_ledger(&conn, vec![])).unwrap();
    assert_eq!(reply.rejected, 0);
}
