//! BPE training with the standard incremental pair-count update: words are counted once, pair
//! counts live in a map with a max-heap over them (stale heap entries are refreshed lazily), and
//! each merge only touches the words that contain the merged pair.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use super::{FIRST_MERGE_ID, Merge, SPECIAL_TOKENS, Tokenizer, TokenizerError, pretokenize};

type Pair = (u32, u32);

pub(super) fn train<I, T>(texts: I, vocab_size: u32) -> Result<Tokenizer, TokenizerError>
where
    I: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    if vocab_size < FIRST_MERGE_ID {
        return Err(TokenizerError::VocabTooSmall {
            requested: vocab_size,
        });
    }
    let base = Tokenizer::bytes_only();

    // Count distinct words. A BTreeMap gives a deterministic word order, hence deterministic
    // tie-breaking everywhere below.
    let mut word_counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for text in texts {
        let mut rest = text.as_ref();
        while !rest.is_empty() {
            let (plain, after) = match base.find_special(rest) {
                Some((at, _, len)) => (&rest[..at], &rest[at + len..]),
                None => (rest, &rest[rest.len()..]),
            };
            pretokenize::split_words(plain, |w| *word_counts.entry(w.to_vec()).or_insert(0) += 1);
            rest = after;
        }
    }
    let counts: Vec<i64> = word_counts.values().map(|&c| c as i64).collect();
    let mut words: Vec<Vec<u32>> = word_counts.keys().map(|w| base.merge_word(w)).collect();
    drop(word_counts);

    let mut pair_counts: HashMap<Pair, i64> = HashMap::new();
    let mut pair_words: HashMap<Pair, HashSet<u32>> = HashMap::new();
    for (w, word) in words.iter().enumerate() {
        for pair in word.windows(2) {
            let pair = (pair[0], pair[1]);
            *pair_counts.entry(pair).or_insert(0) += counts[w];
            pair_words.entry(pair).or_default().insert(w as u32);
        }
    }
    // Max-heap on count, ties to the smaller pair of ids.
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = pair_counts
        .iter()
        .filter(|&(_, &c)| c > 0)
        .map(|(&p, &c)| (c, Reverse(p)))
        .collect();

    let mut pieces: Vec<Vec<u8>> = base.pieces.clone();
    let mut id_of: HashMap<Vec<u8>, u32> = pieces
        .iter()
        .enumerate()
        .skip(super::NUM_SPECIAL as usize)
        .map(|(id, p)| (p.clone(), id as u32))
        .collect();
    let mut merges: Vec<Merge> = Vec::new();

    while (pieces.len() as u32) < vocab_size {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        let mut bytes = pieces[pair.0 as usize].clone();
        bytes.extend_from_slice(&pieces[pair.1 as usize]);
        let result = match id_of.entry(bytes) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let id = pieces.len() as u32;
                pieces.push(e.key().clone());
                e.insert(id);
                id
            }
        };
        merges.push(Merge {
            left: pair.0,
            right: pair.1,
            result,
        });

        let mut touched: Vec<u32> = pair_words
            .remove(&pair)
            .unwrap_or_default()
            .into_iter()
            .collect();
        touched.sort_unstable();
        let mut changed: HashSet<Pair> = HashSet::new();
        for w in touched {
            let count = counts[w as usize];
            for (p, delta) in merge_in_word(&mut words[w as usize], pair, result) {
                *pair_counts.entry(p).or_insert(0) += delta * count;
                if delta > 0 {
                    pair_words.entry(p).or_default().insert(w);
                }
                changed.insert(p);
            }
        }
        pair_counts.remove(&pair);
        let mut changed: Vec<Pair> = changed.into_iter().filter(|p| *p != pair).collect();
        changed.sort_unstable();
        for p in changed {
            match pair_counts.get(&p).copied() {
                Some(c) if c > 0 => heap.push((c, Reverse(p))),
                _ => {
                    pair_counts.remove(&p);
                }
            }
        }
    }

    let learned = pieces.split_off(FIRST_MERGE_ID as usize);
    let specials = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    Ok(Tokenizer::from_parts(specials, learned, merges))
}

/// Replaces every occurrence of `pair` in `word`, left to right, by `result`; returns the pair
/// count changes (the merged pair's own count is dropped by the caller).
fn merge_in_word(word: &mut Vec<u32>, pair: Pair, result: u32) -> Vec<(Pair, i64)> {
    let mut changes = Vec::new();
    let mut out: Vec<u32> = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
            if let Some(&prev) = out.last() {
                changes.push(((prev, pair.0), -1));
                changes.push(((prev, result), 1));
            }
            if let Some(&next) = word.get(i + 2) {
                changes.push(((pair.1, next), -1));
                changes.push(((result, next), 1));
            }
            out.push(result);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    *word = out;
    changes
}
