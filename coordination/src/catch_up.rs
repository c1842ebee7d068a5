//! DiLoCo catch-up: which (round, starting hash) a replica adopts from the states it sees.

use std::collections::BTreeMap;

/// The (round, start hash) this node should adopt, given its own and the replicas'
/// advertised states, or None to keep its own: the most common state (ties to the later
/// round, then the larger hash) when it beats ours. Never a state from an earlier round than
/// ours: a node that finished its outer step first sees the others still in the round it
/// left (their pings lag, their outer steps are still running), and going back there threw
/// its round away and made it do that round again. When its state is the minority one, the
/// others reach its round with theirs and it adopts that.
pub fn state_to_adopt(own: (u64, &str), replicas: &[(u64, &str)]) -> Option<(u64, String)> {
    let mut tally: BTreeMap<(u64, &str), usize> = BTreeMap::new();
    *tally.entry(own).or_default() += 1;
    for &state in replicas {
        *tally.entry(state).or_default() += 1;
    }
    let own_count = tally[&own];
    let (best, count) = tally
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))?;
    if best == own || best.0 < own.0 || (count, best) <= (own_count, own) {
        return None;
    }
    Some((best.0, best.1.to_string()))
}

#[cfg(test)]
mod tests {
    use super::state_to_adopt;

    #[test]
    fn a_node_behind_or_in_the_minority_adopts_the_majority_state() {
        // Behind: the replicas moved on to round 3 together.
        assert_eq!(
            state_to_adopt((2, "a"), &[(3, "b"), (3, "b")]),
            Some((3, "b".into()))
        );
        // Same round, another hash than the majority's.
        assert_eq!(
            state_to_adopt((3, "x"), &[(3, "b"), (3, "b")]),
            Some((3, "b".into()))
        );
        // A fresh node (round 0) adopts the replicas' state.
        assert_eq!(
            state_to_adopt((0, "init"), &[(5, "b")]),
            Some((5, "b".into()))
        );
        // One replica each way: ties go to the later round, then the larger hash.
        assert_eq!(state_to_adopt((3, "a"), &[(4, "b")]), Some((4, "b".into())));
        assert_eq!(state_to_adopt((3, "a"), &[(3, "b")]), Some((3, "b".into())));
    }

    #[test]
    fn a_node_keeps_its_state_when_it_is_the_majority_or_ahead() {
        assert_eq!(state_to_adopt((3, "a"), &[(3, "a"), (3, "b")]), None);
        assert_eq!(state_to_adopt((3, "b"), &[(3, "a")]), None);
        assert_eq!(state_to_adopt((3, "a"), &[]), None);
        // Ahead of every replica: the others are still finishing the round it left.
        assert_eq!(
            state_to_adopt((2, "next"), &[(1, "start"), (1, "start"), (1, "start")]),
            None
        );
    }
}
