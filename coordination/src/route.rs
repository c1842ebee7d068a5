//! Routes through the pipeline: the chain of stages from a layer to the head.

/// The best chain of `stages` (layer ranges, in order of preference) that covers
/// `from..total`, each stage starting where the previous one ends: the fewest stages that
/// cost a peer call (`remote`), then the fewest stages, then the earliest candidates. Indexes
/// into `stages`; None when they do not cover the range.
///
/// A greedy walk (take the first candidate that starts at the next layer) is not enough: when
/// a stage that stalled past the drop time comes back after a neighbour took its layers over,
/// the stale holder of layer `i` alone may be preferred while only the neighbour (`i..j`)
/// reaches the head.
pub fn shortest_route(
    stages: &[std::ops::Range<u32>],
    remote: impl Fn(usize) -> bool,
    from: u32,
    total: u32,
) -> Option<Vec<usize>> {
    if from >= total {
        return Some(Vec::new());
    }
    let span = (total - from) as usize;
    // best[p]: cost (peer stages, stages) of the best chain ending at layer from + p, the stage
    // that ends it and where that stage starts. Every stage goes forward, so positions in
    // increasing order are final when reached.
    type Reached = ((u32, u32), usize, u32);
    let mut best: Vec<Option<Reached>> = vec![None; span + 1];
    best[0] = Some(((0, 0), usize::MAX, from));
    for pos in from..total {
        let Some((cost, _, _)) = best[(pos - from) as usize] else {
            continue;
        };
        for (i, r) in stages.iter().enumerate() {
            if r.start != pos || r.end <= pos || r.end > total {
                continue;
            }
            let c = (cost.0 + u32::from(remote(i)), cost.1 + 1);
            let slot = &mut best[(r.end - from) as usize];
            if slot.is_none_or(|(old, _, _)| c < old) {
                *slot = Some((c, i, pos));
            }
        }
    }
    let mut route = Vec::new();
    let mut at = total;
    while at > from {
        let (_, i, start) = best[(at - from) as usize]?;
        route.push(i);
        at = start;
    }
    route.reverse();
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_the_fewest_stages_that_reach_the_head() {
        let all = |_: usize| true;
        // A stale holder of layer 2 alone, listed first, and a neighbour holding 2..4: only the
        // neighbour reaches the head (a greedy walk took the first and found no stage at 3).
        assert_eq!(shortest_route(&[2..3, 2..4], all, 2, 4), Some(vec![1]));
        // With a holder of layer 3 too, one stage still beats two.
        assert_eq!(
            shortest_route(&[2..3, 3..4, 2..4], all, 2, 4),
            Some(vec![2])
        );
        assert_eq!(shortest_route(&[3..4, 2..3], all, 2, 4), Some(vec![1, 0]));
        // Ties go to the earlier candidate (lower latency).
        assert_eq!(shortest_route(&[2..4, 2..4], all, 2, 4), Some(vec![0]));
        assert_eq!(shortest_route(&[0..2, 2..3], all, 0, 4), None);
        assert_eq!(shortest_route(&[2..3, 4..5], all, 2, 5), None);
        // Empty ranges and ranges past the model never count.
        assert_eq!(
            shortest_route(&[2..2, 2..5, 2..4], all, 2, 4),
            Some(vec![2])
        );
        assert_eq!(shortest_route(&[], all, 4, 4), Some(vec![]));
        // Local stages cost no peer call: the node's own layers plus one peer beat two peers.
        let remote = |i: usize| i != 0;
        assert_eq!(
            shortest_route(&[0..2, 0..1, 1..4, 2..4], remote, 0, 4),
            Some(vec![0, 3])
        );
        // A single peer holding everything still beats own layers plus a peer.
        assert_eq!(
            shortest_route(&[0..2, 2..4, 0..4], remote, 0, 4),
            Some(vec![2])
        );
    }
}
