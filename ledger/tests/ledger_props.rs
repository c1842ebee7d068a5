//! Property tests on the pure ledger state: the same set of signed blocks, delivered in any
//! order and with duplicates, gives identical balances and root hash; the invariant
//! minted == held + in flight + burned holds after every single delivery; equivocated sends
//! never credit anyone.

use neuroshard_ledger::account::Outcome;
use neuroshard_ledger::amount::transfer_fee;
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::receipt::attest_forward;
use neuroshard_ledger::state::LedgerState;
use neuroshard_ledger::{Block, Hash32, Op, ProofType, SignedBlock, SignedProof, Wallet};
use proptest::prelude::*;

const T0: i64 = 1_733_313_600;

#[derive(Debug, Clone)]
enum Spec {
    Reward {
        who: usize,
        layers: u32,
    },
    Send {
        from: usize,
        to: usize,
        permille: u32,
    },
    Claim {
        who: usize,
    },
    Stake {
        who: usize,
        permille: u32,
        days: u32,
    },
    Unstake {
        who: usize,
        permille: u32,
    },
    Equivocate {
        who: usize,
    },
    ReplayProof {
        who: usize,
    },
    InflateReward {
        who: usize,
    },
    Tick {
        secs: i64,
    },
    /// A verdict by `who` on the latest reward of `on`.
    Verdict {
        who: usize,
        on: usize,
        guilty: bool,
    },
}

/// Default rules with a fraud quorum of one unit, so any staked verdict decides.
fn rules() -> neuroshard_ledger::Rules {
    neuroshard_ledger::Rules::default()
        .with_fraud(1, 5_000, 2_000, 1_000)
        .unwrap()
}

fn spec() -> impl Strategy<Value = Spec> {
    let who = 0usize..4;
    prop_oneof![
        4 => (who.clone(), 1u32..64).prop_map(|(who, layers)| Spec::Reward { who, layers }),
        4 => (who.clone(), 0usize..4, 1u32..1300).prop_map(|(from, to, permille)| Spec::Send { from, to, permille }),
        3 => who.clone().prop_map(|who| Spec::Claim { who }),
        3 => (who.clone(), 1u32..1000, 1u32..3).prop_map(|(who, permille, days)| Spec::Stake { who, permille, days }),
        1 => (who.clone(), 1u32..1200).prop_map(|(who, permille)| Spec::Unstake { who, permille }),
        1 => who.clone().prop_map(|who| Spec::Equivocate { who }),
        1 => who.clone().prop_map(|who| Spec::ReplayProof { who }),
        1 => who.clone().prop_map(|who| Spec::InflateReward { who }),
        2 => (60i64..200_000).prop_map(|secs| Spec::Tick { secs }),
        4 => (who.clone(), 0usize..4, any::<bool>()).prop_map(|(who, on, guilty)| Spec::Verdict { who, on, guilty }),
    ]
}

fn proof(w: &Wallet, ts: i64, layers: u32) -> SignedProof {
    SignedProof::sign(
        Proof {
            node_id: w.address(),
            proof_type: ProofType::Training,
            timestamp: ts,
            nonce: ts as u64,
            uptime_seconds: 60,
            tokens_processed: 1000,
            training_batches: 100,
            data_samples: 0,
            request_id: String::new(),
            model_hash: "ab".repeat(32),
            layers_held: (0..layers).collect(),
            holds_embedding: layers.is_multiple_of(2),
            holds_lm_head: false,
            epoch_id: Proof::epoch_of(ts),
            model_hash_start: "01".repeat(32),
            model_hash_end: "02".repeat(32),
            gradient_commitment: "03".repeat(32),
            current_loss: 1.5,
            // All its batches, attested by the stage after its layers.
            receipts: vec![attest_forward(
                &Wallet::from_seed(9_999),
                w.address(),
                Proof::epoch_of(ts),
                100,
                layers,
            )],
        },
        w,
    )
}

/// Plays the specs as (mostly honest, partly hostile) authors, returning every signed block.
fn author(specs: &[Spec]) -> Vec<SignedBlock> {
    let wallets: Vec<Wallet> = (0..4).map(|i| Wallet::from_seed(100 + i)).collect();
    let mut st = LedgerState::with_rules(rules());
    let mut out = Vec::new();
    let mut now = T0;
    let mut last_proof: Vec<Option<SignedProof>> = vec![None; 4];
    let push = |st: &mut LedgerState, out: &mut Vec<SignedBlock>, b: SignedBlock| {
        let h = b
            .verify_stateless()
            .expect("authored blocks are well formed");
        st.insert(b.clone(), h);
        out.push(b);
    };
    // Every author first earns and stakes half of it, so verdicts carry weight.
    let mut all: Vec<Spec> = (0..4).map(|who| Spec::Reward { who, layers: 4 }).collect();
    all.push(Spec::Tick { secs: 700 });
    all.extend((0..4).map(|who| Spec::Stake {
        who,
        permille: 500,
        days: 1,
    }));
    all.extend(specs.iter().cloned());
    for s in &all {
        now += 61;
        let who = match s {
            Spec::Reward { who, .. }
            | Spec::Claim { who }
            | Spec::Stake { who, .. }
            | Spec::Unstake { who, .. }
            | Spec::Equivocate { who }
            | Spec::ReplayProof { who }
            | Spec::InflateReward { who }
            | Spec::Verdict { who, .. } => *who,
            Spec::Send { from, .. } => *from,
            Spec::Tick { secs } => {
                now += secs;
                continue;
            }
        };
        let w = &wallets[who];
        let acct = st.chain_account(&w.address()).cloned();
        if acct.as_ref().is_some_and(|a| a.is_frozen()) || st.next_slot_taken(&w.address()) {
            continue;
        }
        let (prev, height, last_ts, avail, staked) =
            acct.as_ref().map_or((Hash32::ZERO, 0, 0, 0, 0), |a| {
                (
                    a.head,
                    a.next_height,
                    a.last_ts,
                    a.settled(now).available,
                    a.staked,
                )
            });
        let ts = now.max(last_ts);
        let mk = |op: Op| {
            SignedBlock::sign(
                Block {
                    account: w.address(),
                    height,
                    previous: prev,
                    timestamp: ts,
                    op,
                },
                w,
            )
        };
        let op = match s {
            Spec::Reward { layers, .. } => {
                let p = proof(w, ts, *layers);
                let a = acct.clone().unwrap_or_else(|| {
                    neuroshard_ledger::account::Account::new(w.address(), None, rules())
                });
                let Ok((amount, _)) = a.expected_reward(&p) else {
                    continue;
                };
                last_proof[who] = Some(p.clone());
                Op::Reward { proof: p, amount }
            }
            Spec::ReplayProof { .. } | Spec::InflateReward { .. } => {
                let Some(p) = last_proof[who].clone() else {
                    continue;
                };
                if matches!(s, Spec::InflateReward { .. }) {
                    let fresh = proof(w, ts, 3);
                    Op::Reward {
                        proof: fresh,
                        amount: 10u64.pow(15),
                    }
                } else {
                    if ts - p.proof.timestamp > 300 {
                        continue;
                    }
                    Op::Reward {
                        proof: p,
                        amount: 1,
                    }
                }
            }
            Spec::Send { to, permille, .. } => {
                let to = if *to == who { (who + 1) % 4 } else { *to };
                let amount = (avail as u128 * u128::from(*permille) / 1000) as u64;
                if amount == 0 {
                    continue;
                }
                Op::Send {
                    to: wallets[to].address(),
                    amount,
                    fee: transfer_fee(amount),
                    memo: String::new(),
                }
            }
            Spec::Claim { .. } => {
                let Some((src, _)) = st.incoming(&w.address()).first().copied() else {
                    continue;
                };
                Op::Receive { source: src }
            }
            Spec::Stake { permille, days, .. } => {
                let amount = (avail as u128 * u128::from(*permille) / 1000) as u64;
                if amount == 0 {
                    continue;
                }
                Op::Stake {
                    amount,
                    duration_days: *days,
                }
            }
            Spec::Unstake { permille, .. } => {
                let amount = (staked as u128 * u128::from(*permille) / 1000).max(1) as u64;
                Op::Unstake { amount }
            }
            Spec::Equivocate { .. } => {
                // A second block on the account's latest previous block: a double spend.
                let Some(a) = &acct else { continue };
                let Some(last) = a.history.last() else {
                    continue;
                };
                let last_hash = Hash32::from_hex(&last.id[3..]).expect("history ids are tx_<hash>");
                let Some(orig) = st.block(&last_hash).cloned() else {
                    continue;
                };
                let to = wallets[(who + 1) % 4].address();
                let amount = a.available.max(1);
                let conflicting = SignedBlock::sign(
                    Block {
                        op: Op::Send {
                            to,
                            amount,
                            fee: transfer_fee(amount),
                            memo: "double".into(),
                        },
                        ..orig.block.clone()
                    },
                    w,
                );
                if conflicting.hash() == orig.hash() {
                    continue;
                }
                push(&mut st, &mut out, conflicting);
                continue;
            }
            Spec::Verdict { on, guilty, .. } => {
                let on = if *on == who { (who + 1) % 4 } else { *on };
                let accused = wallets[on].address();
                let Some(target) = st.chain_account(&accused).and_then(|a| {
                    a.history
                        .iter()
                        .rev()
                        .find(|e| e.kind == "reward")
                        .and_then(|e| Hash32::from_hex(&e.id[3..]).ok())
                }) else {
                    continue;
                };
                Op::Verdict {
                    target,
                    accused,
                    evidence: Hash32([3; 32]),
                    guilty: *guilty,
                }
            }
            Spec::Tick { .. } => unreachable!(),
        };
        push(&mut st, &mut out, mk(op));
    }
    out
}

fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

fn deliver(blocks: &[SignedBlock]) -> LedgerState {
    let mut st = LedgerState::with_rules(rules());
    for b in blocks {
        st.insert(b.clone(), b.hash());
        st.check_invariant()
            .expect("invariant after every delivery");
    }
    st
}

fn balances(st: &LedgerState) -> Vec<(String, u64, u64, u64, Option<u64>)> {
    st.accounts()
        .map(|a| {
            (
                a.address.to_string(),
                a.available,
                a.staked,
                a.unbonding,
                a.fork_height,
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn any_permutation_gives_the_same_ledger(
        specs in prop::collection::vec(spec(), 1..40),
        seed1 in 1u64..u64::MAX,
        seed2 in 1u64..u64::MAX,
        dup in 0usize..8,
    ) {
        let blocks = author(&specs);
        let reference = deliver(&blocks);
        let mut p1 = blocks.clone();
        shuffle(&mut p1, seed1);
        let mut p2 = blocks.clone();
        // Duplicated deliveries must change nothing.
        for i in 0..dup.min(blocks.len()) {
            p2.push(blocks[i * 7 % blocks.len()].clone());
        }
        shuffle(&mut p2, seed2);
        let s1 = deliver(&p1);
        let s2 = deliver(&p2);
        prop_assert_eq!(balances(&reference), balances(&s1));
        prop_assert_eq!(balances(&reference), balances(&s2));
        prop_assert_eq!(reference.root_hash(), s1.root_hash());
        prop_assert_eq!(reference.root_hash(), s2.root_hash());
        prop_assert_eq!(reference.minted(), s2.minted());
        prop_assert_eq!(reference.burned(), s2.burned());
        // A rebuild from scratch agrees with the incremental result.
        let mut rebuilt = s1.clone();
        rebuilt.rebuild();
        prop_assert_eq!(rebuilt.root_hash(), reference.root_hash());
        // No block of an equivocated account at or above its fork takes effect, and no send is
        // credited twice.
        let mut credited = std::collections::HashMap::new();
        for b in &blocks {
            let h = b.hash();
            let acct = s2.account(&b.block.account).expect("author account exists");
            if let Some(f) = acct.fork_height
                && b.block.height >= f {
                    prop_assert!(!matches!(s2.outcome(&h), Some(Outcome::Applied(_))));
            }
            if let (Op::Receive { source }, Some(Outcome::Applied(_))) = (&b.block.op, s2.outcome(&h)) {
                *credited.entry(*source).or_insert(0) += 1;
            }
        }
        prop_assert!(credited.values().all(|n| *n == 1));
    }
}

#[test]
fn equivocation_is_frozen_and_slashed_whatever_the_order() {
    // A funds itself, then signs two sends on the same previous block to two recipients, who
    // both claim. Every delivery order ends with A frozen, nothing credited, A's funds burned.
    let a = Wallet::from_seed(1);
    let (b, c) = (Wallet::from_seed(2), Wallet::from_seed(3));
    let p = proof(&a, T0, 8);
    let mut st = LedgerState::with_rules(rules());
    let reward = SignedBlock::sign(
        Block {
            account: a.address(),
            height: 0,
            previous: Hash32::ZERO,
            timestamp: T0,
            op: Op::Reward {
                amount: neuroshard_ledger::account::Account::new(
                    a.address(),
                    None,
                    Default::default(),
                )
                .expected_reward(&p)
                .unwrap()
                .0,
                proof: p,
            },
        },
        &a,
    );
    st.insert(reward.clone(), reward.hash());
    let minted = st.minted() as u64;
    let send_to = |to: &Wallet| {
        let amount = minted / 2;
        SignedBlock::sign(
            Block {
                account: a.address(),
                height: 1,
                previous: reward.hash(),
                timestamp: T0 + 10,
                op: Op::Send {
                    to: to.address(),
                    amount,
                    fee: transfer_fee(amount),
                    memo: String::new(),
                },
            },
            &a,
        )
    };
    let (s1, s2) = (send_to(&b), send_to(&c));
    let claim = |w: &Wallet, src: &SignedBlock| {
        SignedBlock::sign(
            Block {
                account: w.address(),
                height: 0,
                previous: Hash32::ZERO,
                timestamp: T0 + 20,
                op: Op::Receive { source: src.hash() },
            },
            w,
        )
    };
    let all = vec![
        reward.clone(),
        s1.clone(),
        s2.clone(),
        claim(&b, &s1),
        claim(&c, &s2),
    ];
    let mut roots = std::collections::HashSet::new();
    for seed in 1..40u64 {
        let mut order = all.clone();
        shuffle(&mut order, seed * 7919);
        let st = deliver(&order);
        let acct = st.account(&a.address()).unwrap();
        assert_eq!(acct.fork_height, Some(1));
        assert!(acct.slashed);
        assert_eq!(st.account(&b.address()).unwrap().available, 0);
        assert_eq!(st.account(&c.address()).unwrap().available, 0);
        assert_eq!(st.burned(), st.minted());
        roots.insert(st.root_hash());
    }
    assert_eq!(roots.len(), 1);
}
