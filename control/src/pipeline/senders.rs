//! Whether the peers a stage's operation log names as the senders of its inputs really sent
//! them (issue #19, stage replays: a log naming a made-up sender).
//!
//! A stage logs every tensor it receives as [`Op::Received`](super::oplog::Op::Received)
//! (sender, step, micro-batch, digest), and a replay feeds the logged inputs to the engine.
//! The receipts the claimant signed for its senders bind those inputs once the senders'
//! rewards cite them (`work.rs`), but a log may name a sender whose reward never will: a
//! made-up address, a node that is not the stage before (or after), a node that never sent
//! that tensor. So the verifier asks the named sender itself: it must be a node of the
//! network that this verifier knows, and its own operation log must say it sent the claimant
//! each of those tensors (the same digest: the sender logs what it sent in the bytes the
//! receiver hashed, `Wire::as_received`). A sender that does not serve its log is judged by
//! the layers it holds (the layer before the claimant's for activations, the one after for
//! gradients); the receipts on the ledger still bind it.

use std::collections::BTreeSet;
use std::ops::Range;

use neuroshard_ledger::Address;
use neuroshard_ledger::keys::Hash32;

use super::oplog::{Dir, SentDigest};

/// What a verifier knows of a peer that a claimant's log names as a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Not a node this verifier knows on the network.
    Unknown,
    /// A known node: whether it holds the layer next to the claimant's stage on the side the
    /// inputs came from, and the digests of the tensors its own log says it sent the
    /// claimant in that direction (None: it did not serve its log).
    Known {
        adjacent: bool,
        sent: Option<BTreeSet<Hash32>>,
    },
}

/// The layer a sender of `dir` inputs to a stage of `layers` holds: the one before for
/// activations, the one after for gradients (None: the first stage receives no activations).
pub fn adjacent_layer(dir: Dir, layers: &Range<u32>) -> Option<u32> {
    match dir {
        Dir::Forward => layers.start.checked_sub(1),
        Dir::Backward => Some(layers.end),
    }
}

fn what(dir: Dir) -> &'static str {
    match dir {
        Dir::Forward => "activations",
        Dir::Backward => "gradients",
    }
}

/// Why the `received` inputs that a claimant's log says came from `from` in direction `dir`
/// are made up, or None when the sender stands by them (or cannot tell).
pub fn made_up(
    dir: Dir,
    from: &Address,
    received: &[SentDigest],
    sender: &Sender,
) -> Option<String> {
    let first = received.first()?;
    match sender {
        Sender::Unknown => Some(format!(
            "its log names {from}, not a node of the network, as the sender of its {}",
            what(dir)
        )),
        Sender::Known {
            sent: Some(sent), ..
        } => received
            .iter()
            .find(|(_, _, _, d)| !sent.contains(d))
            .map(|(_, step, mb, _)| {
                format!(
                    "its log says {from} sent it the {} of step {step} micro-batch {mb}, which \
                     {from}'s own log never sent it",
                    what(dir)
                )
            }),
        Sender::Known {
            adjacent: false,
            sent: None,
        } => Some(format!(
            "its log names {from}, which does not hold the stage next to it, as the sender of \
             its {} (step {} micro-batch {})",
            what(dir),
            first.1,
            first.2
        )),
        Sender::Known {
            adjacent: true,
            sent: None,
        } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: u8) -> Hash32 {
        Hash32([b; 32])
    }

    #[test]
    fn a_made_up_sender_is_named() {
        let from = Address([3; 20]);
        let received = vec![(10, 5, 0, digest(1)), (11, 5, 1, digest(2))];
        let both: BTreeSet<Hash32> = [digest(1), digest(2), digest(9)].into();
        let one: BTreeSet<Hash32> = [digest(1)].into();
        // A node of the network whose log sent both: innocent, wherever it sits now.
        for adjacent in [true, false] {
            let s = Sender::Known {
                adjacent,
                sent: Some(both.clone()),
            };
            assert_eq!(made_up(Dir::Forward, &from, &received, &s), None);
        }
        // An address nobody knows.
        let r = made_up(Dir::Forward, &from, &received, &Sender::Unknown).unwrap();
        assert!(r.contains("not a node of the network"), "{r}");
        // A node whose own log never sent the second tensor.
        let s = Sender::Known {
            adjacent: true,
            sent: Some(one),
        };
        let r = made_up(Dir::Backward, &from, &received, &s).unwrap();
        assert!(r.contains("gradients of step 5 micro-batch 1"), "{r}");
        // A node that serves no log: believed only when it holds the stage next to it.
        let s = |adjacent| Sender::Known {
            adjacent,
            sent: None,
        };
        assert_eq!(made_up(Dir::Forward, &from, &received, &s(true)), None);
        let r = made_up(Dir::Forward, &from, &received, &s(false)).unwrap();
        assert!(r.contains("does not hold the stage next to it"), "{r}");
        // Nothing received from it: nothing to say.
        assert_eq!(made_up(Dir::Forward, &from, &[], &Sender::Unknown), None);
        assert_eq!(adjacent_layer(Dir::Forward, &(2..4)), Some(1));
        assert_eq!(adjacent_layer(Dir::Forward, &(0..2)), None);
        assert_eq!(adjacent_layer(Dir::Backward, &(0..2)), Some(2));
    }
}
