//! Several ledgers (one database each) exchanging blocks as gossip would: they agree on
//! balances and root hash; forged, replayed and double-spending messages change nothing or
//! are frozen everywhere.

mod ledger_support;

use ledger_support::{T0, TestDb, fund, postgres_db, proof, sqlite_db, sync};
use neuroshard_ledger::account::{Effect, VoidReason};
use neuroshard_ledger::{
    Block, BlockStatus, Evidence, Ledger, Message, Op, RejectReason, SignedBlock, UNITS_PER_NEURO,
    Wallet, transfer_fee,
};

const N: u64 = UNITS_PER_NEURO;

macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(vec![
                    super::sqlite_db(),
                    super::sqlite_db(),
                    super::sqlite_db(),
                ])
                .await;
            }
            #[tokio::test]
            async fn postgres() {
                let name = concat!(stringify!($name), "::postgres");
                let mut dbs = Vec::new();
                for _ in 0..3 {
                    match super::postgres_db(name).await {
                        Some(db) => dbs.push(db),
                        None => return,
                    }
                }
                super::$name(dbs).await;
            }
        }
    };
}

async fn open_all(dbs: &[TestDb]) -> Vec<Ledger> {
    let mut out = Vec::new();
    for db in dbs {
        out.push(db.open().await);
    }
    out
}

async fn close_all(nodes: Vec<Ledger>, dbs: Vec<TestDb>) {
    for n in nodes {
        n.close().await;
    }
    for db in dbs {
        db.drop_db().await;
    }
}

/// Full mesh sync until nothing new moves.
async fn settle(nodes: &[Ledger], now: i64) {
    loop {
        let mut moved = 0;
        for i in 0..nodes.len() {
            for j in 0..nodes.len() {
                if i != j {
                    moved += sync(&nodes[i], &nodes[j], now).await;
                }
            }
        }
        if moved == 0 {
            return;
        }
    }
}

on_both_backends!(three_nodes_agree);
async fn three_nodes_agree(dbs: Vec<TestDb>) {
    let nodes = open_all(&dbs).await;
    let w: Vec<Wallet> = (0..3).map(|i| Wallet::from_seed(200 + i)).collect();
    let mut now = T0;
    for i in 0..3 {
        now = now.max(fund(&nodes[i], &w[i], 400, T0).await);
    }
    // Transfers on each node, in a ring, before any gossip.
    for i in 0..3 {
        nodes[i]
            .send(
                &w[i],
                w[(i + 1) % 3].address(),
                (50 + i as u64) * N,
                "ring",
                now,
            )
            .await
            .unwrap();
    }
    settle(&nodes, now).await;
    // Each node claims what was sent to its wallet, then more transfers, then gossip again.
    now += 30;
    for i in 0..3 {
        assert_eq!(nodes[i].claim_incoming(&w[i], now).await.unwrap().len(), 1);
        nodes[i]
            .send(&w[i], w[(i + 2) % 3].address(), 7 * N, "back", now)
            .await
            .unwrap();
    }
    settle(&nodes, now).await;
    for i in 0..3 {
        nodes[i].claim_incoming(&w[i], now + 1).await.unwrap();
    }
    settle(&nodes, now + 1).await;
    let root = nodes[0].root_hash().await;
    for n in &nodes {
        assert_eq!(n.root_hash().await, root);
        n.check_invariant().await.unwrap();
        for wallet in &w {
            assert_eq!(
                n.balance(&wallet.address(), now + 1).await,
                nodes[0].balance(&wallet.address(), now + 1).await
            );
        }
    }
    // Money moved as intended: each wallet got (50 + i - 1) and 7 back, sent its own plus fees.
    let b1 = nodes[2].balance(&w[1].address(), now + 1).await;
    assert_eq!(b1.pending, 0);
    let (minted, burned) = nodes[1].totals().await;
    let expected_burn: u64 = (0..3)
        .map(|i| transfer_fee((50 + i) * N) + transfer_fee(7 * N))
        .sum();
    assert_eq!(burned, u128::from(expected_burn));
    let held: u64 = {
        let mut s = 0;
        for wallet in &w {
            s += nodes[1].balance(&wallet.address(), now + 1).await.total;
        }
        s
    };
    assert_eq!(u128::from(held) + burned, minted);
    close_all(nodes, dbs).await;
}

on_both_backends!(forged_and_replayed_messages_change_nothing);
async fn forged_and_replayed_messages_change_nothing(dbs: Vec<TestDb>) {
    let nodes = open_all(&dbs).await;
    let (a, b) = (Wallet::from_seed(301), Wallet::from_seed(302));
    let now = fund(&nodes[0], &a, 100, T0).await;
    nodes[0]
        .send(&a, b.address(), 10 * N, "", now)
        .await
        .unwrap();
    settle(&nodes, now).await;
    let root = nodes[1].root_hash().await;
    let (_, last) = nodes[0]
        .messages_since(0, 1000)
        .await
        .unwrap()
        .pop()
        .unwrap();
    // Forged: the amount changed after signing.
    let Message::Block(mut forged) = last.clone() else {
        panic!("block expected")
    };
    if let Op::Send { amount, fee, .. } = &mut forged.block.op {
        *amount = 90 * N;
        *fee = transfer_fee(90 * N);
    }
    for n in &nodes {
        let e = n
            .apply(&Message::Block(forged.clone()), now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "BAD_SIGNATURE");
    }
    // Signed by someone else for a's account.
    let mut stolen = forged.clone();
    stolen = SignedBlock::sign(stolen.block, &b);
    assert_eq!(
        nodes[1]
            .apply(&Message::Block(stolen), now)
            .await
            .unwrap_err()
            .code(),
        "BAD_SIGNATURE"
    );
    // Replayed: the same message again is a duplicate.
    let again = nodes[1].apply(&last, now).await.unwrap();
    assert!(!again.blocks[0].1);
    assert_eq!(nodes[1].root_hash().await, root);
    // A replayed proof in a fresh reward block mints nothing, on every node.
    let p = proof(&a, now, 4);
    nodes[0].submit_proof(&a, p.clone(), now).await.unwrap();
    let e = nodes[0]
        .submit_proof(&a, p.clone(), now + 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "PROOF_REJECTED");
    let head = nodes[0]
        .with_state(|s| s.account(&a.address()).map(|x| (x.head, x.next_height)))
        .await
        .unwrap();
    let replay = SignedBlock::sign(
        Block {
            account: a.address(),
            height: head.1,
            previous: head.0,
            timestamp: now + 2,
            op: Op::Reward {
                proof: p,
                amount: 5,
            },
        },
        &a,
    );
    let applied = nodes[0]
        .apply(&Message::Block(replay), now + 2)
        .await
        .unwrap();
    assert_eq!(
        applied.blocks[0].2,
        BlockStatus::Void(VoidReason::Proof(RejectReason::Replay))
    );
    settle(&nodes, now + 2).await;
    let root = nodes[0].root_hash().await;
    for n in &nodes {
        assert_eq!(n.root_hash().await, root);
        n.check_invariant().await.unwrap();
    }
    // Too far in the future: refused now, accepted once its time has come.
    let head = nodes[1]
        .with_state(|s| s.account(&b.address()).map(|x| (x.head, x.next_height)))
        .await;
    let (prev, height) = head.unwrap_or((neuroshard_ledger::Hash32::ZERO, 0));
    let early = SignedBlock::sign(
        Block {
            account: b.address(),
            height,
            previous: prev,
            timestamp: now + 3600,
            op: Op::Unstake { amount: 1 },
        },
        &b,
    );
    let e = nodes[1]
        .apply(&Message::Block(early.clone()), now)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "FUTURE_TIMESTAMP");
    assert!(
        nodes[1]
            .apply(&Message::Block(early), now + 3600)
            .await
            .is_ok()
    );
    close_all(nodes, dbs).await;
}

on_both_backends!(double_spend_is_frozen_everywhere);
async fn double_spend_is_frozen_everywhere(dbs: Vec<TestDb>) {
    let nodes = open_all(&dbs).await;
    let x = Wallet::from_seed(401);
    let (b, c) = (Wallet::from_seed(402), Wallet::from_seed(403));
    let now = fund(&nodes[0], &x, 100, T0).await;
    settle(&nodes, now).await;
    let (head, height, avail) = nodes[0]
        .with_state(|s| {
            s.account(&x.address())
                .map(|a| (a.head, a.next_height, a.available))
        })
        .await
        .unwrap();
    let amount = avail - transfer_fee(avail);
    let spend = |to: &Wallet| {
        SignedBlock::sign(
            Block {
                account: x.address(),
                height,
                previous: head,
                timestamp: now,
                op: Op::Send {
                    to: to.address(),
                    amount,
                    fee: transfer_fee(amount),
                    memo: String::new(),
                },
            },
            &x,
        )
    };
    let (s1, s2) = (spend(&b), spend(&c));
    // Each victim's node sees only the send to it, and claims it.
    let r = nodes[1]
        .apply(&Message::Block(s1.clone()), now)
        .await
        .unwrap();
    assert!(matches!(
        r.blocks[0].2,
        BlockStatus::Applied(Effect::Sent { .. })
    ));
    nodes[2]
        .apply(&Message::Block(s2.clone()), now)
        .await
        .unwrap();
    nodes[1].claim_incoming(&b, now).await.unwrap();
    nodes[2].claim_incoming(&c, now).await.unwrap();
    assert_eq!(nodes[1].balance(&b.address(), now).await.available, amount);
    // Evidence reaches node 0 directly; gossip does the rest.
    let ev = nodes[0]
        .apply(
            &Message::Evidence(Evidence {
                first: s1,
                second: s2,
            }),
            now,
        )
        .await
        .unwrap();
    assert_eq!(ev.equivocation, Some((x.address(), height)));
    settle(&nodes, now).await;
    let root = nodes[0].root_hash().await;
    for n in &nodes {
        assert_eq!(n.root_hash().await, root);
        n.check_invariant().await.unwrap();
        let xb = n.balance(&x.address(), now).await;
        assert_eq!(xb.frozen_at_height, Some(height));
        assert_eq!(xb.total, 0);
        assert_eq!(n.balance(&b.address(), now).await.available, 0);
        assert_eq!(n.balance(&c.address(), now).await.available, 0);
        let (minted, burned) = n.totals().await;
        assert_eq!(minted, burned);
    }
    // The frozen account can do nothing more.
    let e = nodes[0]
        .send(&x, b.address(), 1, "", now + 60)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ACCOUNT_FROZEN");
    close_all(nodes, dbs).await;
}
