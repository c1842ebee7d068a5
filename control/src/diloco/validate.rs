//! Checks on a peer's pseudo-gradient before it may count, and the inbox that keeps the
//! accepted ones per round.
//!
//! A contribution is refused, with a counted reason, when: it does not decode (unknown
//! encoding, wrong byte count), its tensors are not the layers we hold (names or shapes), a
//! value is NaN or infinite, its total norm is above the bound, its round is more than
//! [`ROUND_WINDOW`] behind (stale) or ahead (future) of ours, or its sender already sent one
//! for that round. Nothing here panics on peer input.

use std::collections::BTreeMap;

use super::compress::{self, Encoding};

/// Rounds a contribution may be ahead of or behind the receiver (the original's figure).
pub const ROUND_WINDOW: u64 = 2;

/// Why a contribution was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    Malformed,
    WrongShape,
    NonFinite,
    NormTooLarge,
    StaleRound,
    FutureRound,
    Duplicate,
    /// This node has no round state yet (its model is not loaded).
    NotReady,
}

impl Reject {
    pub const ALL: [Reject; 8] = [
        Reject::Malformed,
        Reject::WrongShape,
        Reject::NonFinite,
        Reject::NormTooLarge,
        Reject::StaleRound,
        Reject::FutureRound,
        Reject::Duplicate,
        Reject::NotReady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::WrongShape => "wrong_shape",
            Reject::NonFinite => "non_finite",
            Reject::NormTooLarge => "norm_too_large",
            Reject::StaleRound => "stale_round",
            Reject::FutureRound => "future_round",
            Reject::Duplicate => "duplicate",
            Reject::NotReady => "not_ready",
        }
    }
}

/// One tensor as it travels: name, shape, encoded bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// A pseudo-gradient message as received (its signature already checked by the RPC layer).
#[derive(Debug, Clone, PartialEq)]
pub struct WireDelta {
    pub sender: String,
    pub round: u64,
    /// Model hash at the start of the round the delta was computed from.
    pub model_hash: String,
    pub loss: f32,
    pub batches: u64,
    /// The wire's encoding name parsed at the RPC edge; `None` for a name this node does not
    /// know, which [`check`] refuses as malformed (after the round checks, as any other
    /// malformed message).
    pub encoding: Option<Encoding>,
    pub tensors: Vec<WireTensor>,
}

/// A checked contribution: one f32 vector per tensor of the [`Layout`], in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub sender: String,
    pub round: u64,
    pub model_hash: String,
    pub loss: f32,
    pub batches: u64,
    pub tensors: Vec<Vec<f32>>,
}

impl Contribution {
    /// All tensors end to end, in layout order.
    pub fn flat(&self) -> Vec<f32> {
        self.tensors.iter().flatten().copied().collect()
    }
}

/// The tensors a replica holds, sorted by name: the canonical order of every exchange.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    pub tensors: Vec<(String, Vec<u64>)>,
}

impl Layout {
    pub fn new(mut tensors: Vec<(String, Vec<u64>)>) -> Layout {
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Layout { tensors }
    }

    pub fn numel(shape: &[u64]) -> Option<usize> {
        shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
    }
}

/// Decodes and checks `msg` against `layout`, the bound on its norm and our round.
pub fn check(
    msg: &WireDelta,
    layout: &Layout,
    current_round: u64,
    max_norm: f32,
) -> Result<Contribution, Reject> {
    if msg.round + ROUND_WINDOW < current_round {
        return Err(Reject::StaleRound);
    }
    if msg.round > current_round + ROUND_WINDOW {
        return Err(Reject::FutureRound);
    }
    let encoding = msg.encoding.ok_or(Reject::Malformed)?;
    if !msg.loss.is_finite() {
        return Err(Reject::NonFinite);
    }
    if msg.tensors.len() != layout.tensors.len() {
        return Err(Reject::WrongShape);
    }
    // Tensors may arrive in any order; match them to the layout by name.
    let mut by_name: BTreeMap<&str, &WireTensor> = BTreeMap::new();
    for t in &msg.tensors {
        if by_name.insert(t.name.as_str(), t).is_some() {
            return Err(Reject::Malformed);
        }
    }
    let mut tensors = Vec::with_capacity(layout.tensors.len());
    let mut sq = 0.0f64;
    for (name, shape) in &layout.tensors {
        let t = by_name.get(name.as_str()).ok_or(Reject::WrongShape)?;
        if &t.shape != shape {
            return Err(Reject::WrongShape);
        }
        let n = Layout::numel(shape).ok_or(Reject::WrongShape)?;
        let values = compress::decode(encoding, &t.data, n).map_err(|_| Reject::Malformed)?;
        for v in &values {
            if !v.is_finite() {
                return Err(Reject::NonFinite);
            }
            sq += f64::from(*v) * f64::from(*v);
        }
        tensors.push(values);
    }
    if sq.sqrt() > f64::from(max_norm) {
        return Err(Reject::NormTooLarge);
    }
    Ok(Contribution {
        sender: msg.sender.clone(),
        round: msg.round,
        model_hash: msg.model_hash.clone(),
        loss: msg.loss,
        batches: msg.batches,
        tensors,
    })
}

/// Accepted contributions by round and sender, plus the count of each refusal.
#[derive(Debug, Default)]
pub struct Inbox {
    rounds: BTreeMap<u64, BTreeMap<String, Contribution>>,
    pub rejected: BTreeMap<Reject, u64>,
    pub accepted: u64,
}

impl Inbox {
    /// Checks and stores `msg`; a refusal is counted and returned.
    pub fn offer(
        &mut self,
        msg: &WireDelta,
        layout: &Layout,
        current_round: u64,
        max_norm: f32,
    ) -> Result<(), Reject> {
        // A second message from a sender in a round is refused, unless it starts from
        // another hash: then the sender caught up with the replicas' agreed weights and
        // its new delta replaces the old one (which no longer matches anyone's state).
        let result = if self
            .rounds
            .get(&msg.round)
            .and_then(|r| r.get(&msg.sender))
            .is_some_and(|c| c.model_hash == msg.model_hash)
        {
            Err(Reject::Duplicate)
        } else {
            check(msg, layout, current_round, max_norm)
        };
        match result {
            Ok(c) => {
                self.rounds
                    .entry(c.round)
                    .or_default()
                    .insert(c.sender.clone(), c);
                self.accepted += 1;
                Ok(())
            }
            Err(r) => {
                *self.rejected.entry(r).or_default() += 1;
                Err(r)
            }
        }
    }

    /// Stores our own contribution (already decoded from its wire form).
    pub fn insert_own(&mut self, c: Contribution) {
        self.rounds
            .entry(c.round)
            .or_default()
            .insert(c.sender.clone(), c);
    }

    /// The contributions of `round` computed from `model_hash`, in canonical (sender) order.
    pub fn matching(&self, round: u64, model_hash: &str) -> Vec<&Contribution> {
        self.rounds
            .get(&round)
            .map(|r| r.values().filter(|c| c.model_hash == model_hash).collect())
            .unwrap_or_default()
    }

    /// Every contribution of `round`, whatever its start hash, in sender order.
    pub fn in_round(&self, round: u64) -> Vec<&Contribution> {
        self.rounds
            .get(&round)
            .map(|r| r.values().collect())
            .unwrap_or_default()
    }

    /// Senders that sent something for `round`.
    pub fn senders(&self, round: u64) -> Vec<String> {
        self.rounds
            .get(&round)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The latest (round, start hash) `sender` sent a contribution for.
    pub fn latest_of(&self, sender: &str) -> Option<(u64, String)> {
        self.rounds
            .iter()
            .rev()
            .find_map(|(r, by)| by.get(sender).map(|c| (*r, c.model_hash.clone())))
    }

    /// Forgets rounds that can no longer be aggregated.
    pub fn prune(&mut self, current_round: u64) {
        self.rounds
            .retain(|&r, _| r + ROUND_WINDOW >= current_round);
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(vec![("b".into(), vec![2]), ("a".into(), vec![2, 2])])
    }

    fn msg(sender: &str, round: u64, values: [&[f32]; 2]) -> WireDelta {
        let enc = |v: &[f32]| compress::encode(Encoding::Bf16, v, &mut Vec::new());
        WireDelta {
            sender: sender.into(),
            round,
            model_hash: "h".into(),
            loss: 2.0,
            batches: 20,
            encoding: Some(Encoding::Bf16),
            tensors: vec![
                WireTensor {
                    name: "b".into(),
                    shape: vec![2],
                    data: enc(values[1]),
                },
                WireTensor {
                    name: "a".into(),
                    shape: vec![2, 2],
                    data: enc(values[0]),
                },
            ],
        }
    }

    fn good(sender: &str, round: u64) -> WireDelta {
        msg(sender, round, [&[0.5, 0.25, -1.0, 0.0], &[1.0, 2.0]])
    }

    #[test]
    fn a_good_message_is_decoded_in_layout_order() {
        let c = check(&good("x", 5), &layout(), 5, 1000.0).unwrap();
        assert_eq!(c.tensors, vec![vec![0.5, 0.25, -1.0, 0.0], vec![1.0, 2.0]]);
        assert_eq!(c.flat().len(), 6);
    }

    #[test]
    fn every_bad_input_is_refused_with_its_reason() {
        let l = layout();
        let cases: Vec<(WireDelta, Reject)> = vec![
            (
                msg("x", 5, [&[f32::NAN, 0.0, 0.0, 0.0], &[1.0, 2.0]]),
                Reject::NonFinite,
            ),
            (
                msg("x", 5, [&[f32::INFINITY, 0.0, 0.0, 0.0], &[1.0, 2.0]]),
                Reject::NonFinite,
            ),
            (
                msg("x", 5, [&[5000.0, 0.0, 0.0, 0.0], &[1.0, 2.0]]),
                Reject::NormTooLarge,
            ),
            (good("x", 2), Reject::StaleRound),
            (good("x", 8), Reject::FutureRound),
            (
                WireDelta {
                    encoding: Encoding::parse("zip"),
                    ..good("x", 5)
                },
                Reject::Malformed,
            ),
            (
                {
                    let mut m = good("x", 5);
                    m.tensors[0].shape = vec![3];
                    m
                },
                Reject::WrongShape,
            ),
            (
                {
                    let mut m = good("x", 5);
                    m.tensors.pop();
                    m
                },
                Reject::WrongShape,
            ),
            (
                {
                    let mut m = good("x", 5);
                    m.tensors[1].name = "c".into();
                    m
                },
                Reject::WrongShape,
            ),
            (
                {
                    let mut m = good("x", 5);
                    m.tensors[0].data.pop();
                    m
                },
                Reject::Malformed,
            ),
            (
                {
                    let mut m = good("x", 5);
                    m.tensors[0].shape = vec![u64::MAX, u64::MAX];
                    m.tensors[0].name = "a".into();
                    m.tensors[1].name = "b".into();
                    m
                },
                Reject::WrongShape,
            ),
            (
                WireDelta {
                    loss: f32::NAN,
                    ..good("x", 5)
                },
                Reject::NonFinite,
            ),
        ];
        let mut inbox = Inbox::default();
        for (m, want) in &cases {
            assert_eq!(inbox.offer(m, &l, 5, 1000.0), Err(*want), "{m:?}");
        }
        assert_eq!(inbox.rejected_total(), cases.len() as u64);
        assert_eq!(inbox.rejected[&Reject::NonFinite], 3);
        assert_eq!(inbox.accepted, 0);
    }

    #[test]
    fn a_second_message_from_a_sender_in_a_round_is_a_duplicate() {
        let l = layout();
        let mut inbox = Inbox::default();
        assert_eq!(inbox.offer(&good("x", 5), &l, 5, 1000.0), Ok(()));
        let other = msg("x", 5, [&[0.0; 4], &[0.0; 2]]);
        assert_eq!(inbox.offer(&other, &l, 5, 1000.0), Err(Reject::Duplicate));
        // Same sender and round from another start (it caught up): replaces the first.
        let mut moved = good("x", 5);
        moved.model_hash = "h2".into();
        assert_eq!(inbox.offer(&moved, &l, 5, 1000.0), Ok(()));
        assert!(inbox.matching(5, "h").is_empty());
        assert_eq!(inbox.matching(5, "h2").len(), 1);
        assert_eq!(inbox.offer(&moved, &l, 5, 1000.0), Err(Reject::Duplicate));
        // Same sender, next round: fine.
        assert_eq!(inbox.offer(&good("x", 6), &l, 5, 1000.0), Ok(()));
        assert_eq!(inbox.rejected[&Reject::Duplicate], 2);
    }

    #[test]
    fn matching_is_in_sender_order_and_filters_by_hash() {
        let l = layout();
        let mut inbox = Inbox::default();
        for s in ["0xc", "0xa", "0xb"] {
            inbox.offer(&good(s, 3), &l, 3, 1000.0).unwrap();
        }
        let mut other = good("0xd", 3);
        other.model_hash = "other".into();
        inbox.offer(&other, &l, 3, 1000.0).unwrap();
        let senders: Vec<&str> = inbox
            .matching(3, "h")
            .iter()
            .map(|c| c.sender.as_str())
            .collect();
        assert_eq!(senders, ["0xa", "0xb", "0xc"]);
        inbox.prune(6);
        assert!(inbox.matching(3, "h").is_empty());
    }
}
