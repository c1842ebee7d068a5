use super::*;
use neuroshard_identity::{Hash32, Wallet};
use neuroshard_net::score::MAX_SCORE;
use neuroshard_net::{LocalRole, PeerState};

async fn node(dir: &std::path::Path) -> Arc<Gossip> {
    let (connected, _) = mpsc::unbounded_channel();
    let net = Network::new(
        Arc::new(Wallet::generate()),
        Arc::new(PeerState::default()),
        0,
        1,
        LocalRole {
            role: "full".into(),
            layers: Vec::new(),
            serve_only: false,
        },
        neuroshard_net::no_advert(),
        connected,
    );
    Gossip::new(
        net,
        Arc::new(
            Ledger::open_data_dir(dir, Default::default())
                .await
                .unwrap(),
        ),
    )
}

#[tokio::test]
async fn received_blocks_are_stored_once() {
    let d = tempfile::tempdir().unwrap();
    let relay = node(d.path()).await;
    let (from, other) = (
        Wallet::from_seed(11).address(),
        Wallet::from_seed(12).address(),
    );
    let now = chrono::Utc::now().timestamp();
    let w = Wallet::from_seed(13);
    // A block made elsewhere (an unstake of nothing: valid, without effect).
    let block = neuroshard_ledger::SignedBlock::sign(
        neuroshard_ledger::Block {
            account: w.address(),
            height: 0,
            previous: Hash32::ZERO,
            timestamp: now,
            op: neuroshard_ledger::Op::Unstake { amount: 1 },
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
}

#[tokio::test]
async fn bad_messages_are_counted_and_charged_to_the_sender() {
    let d = tempfile::tempdir().unwrap();
    let gossip = node(d.path()).await;
    let from = Wallet::from_seed(21).address();
    let msgs = vec![b"{}".to_vec(), vec![0xff; 10]];
    let tally = receive(&gossip, from, &msgs).await.unwrap();
    assert_eq!((tally.accepted, tally.rejected), (0, 2));
    assert_eq!(
        gossip.net.state.rejected_messages.load(Ordering::Relaxed),
        2
    );
    let key = node_key(&from);
    assert_eq!(
        gossip.net.scores.score(&key, Instant::now()),
        MAX_SCORE - 2 * Offence::BadLedgerMessage.cost()
    );
}
