//! The deterministic choices of the loader: which shard a node reads when, and where in a shard
//! it starts. Everything derives from sha256 over (node id, seed, epoch[, shard id]), so two runs
//! of one node read the same batches and different nodes read different ones.

use sha2::{Digest, Sha256};

/// A 64-bit seed from sha256 of the node id, the run seed, the epoch and an optional shard id.
pub(crate) fn derive_seed(node_id: &str, seed: u64, epoch: u64, shard_id: Option<u64>) -> u64 {
    let mut h = Sha256::new();
    h.update(b"neuroshard-data-v1\0");
    h.update((node_id.len() as u64).to_le_bytes());
    h.update(node_id.as_bytes());
    h.update(seed.to_le_bytes());
    h.update(epoch.to_le_bytes());
    if let Some(id) = shard_id {
        h.update(id.to_le_bytes());
    }
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// splitmix64: small, fast and fixed forever (a library generator could change its stream
/// between versions and silently change which data a resumed run reads).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// A Fisher-Yates permutation of `0..n`.
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_input() {
        let base = derive_seed("node-a", 1, 0, None);
        assert_eq!(base, derive_seed("node-a", 1, 0, None));
        assert_ne!(base, derive_seed("node-b", 1, 0, None));
        assert_ne!(base, derive_seed("node-a", 2, 0, None));
        assert_ne!(base, derive_seed("node-a", 1, 1, None));
        assert_ne!(base, derive_seed("node-a", 1, 0, Some(0)));
        // Length-prefixed: "ab" + seed differs from "a" + something.
        assert_ne!(derive_seed("ab", 0, 0, None), derive_seed("a", 0, 0, None));
    }

    #[test]
    fn permutations_are_permutations() {
        for n in [0, 1, 2, 7, 100] {
            let mut p = permutation(n, 42);
            assert_eq!(p, permutation(n, 42));
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(permutation(50, 1), permutation(50, 2));
        let mut rng = SplitMix(9);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
