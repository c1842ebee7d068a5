//! Byte-level BPE tokenizer with the original NeuroShard id layout, saved and loaded as a standard
//! Hugging Face `tokenizer.json` so that the Python `tokenizers` / `transformers` libraries load
//! it and produce the same ids.
//!
//! Id layout: 0 pad, 1 bos, 2 eos, 3 unk, 4..=9 reserved specials; byte `b` is id `10 + b`
//! (10..=265); learned merges from 266 upward, in the order they were learned (which is also
//! their merge priority). Every byte sequence is encodable, so `unk` is never produced.
//!
//! Encoding mirrors the Hugging Face pipeline exactly: special-token strings are cut out first,
//! the rest is split into words with GPT-2's pattern ([`pretokenize`]), and each word's bytes
//! are merged lowest rank first, leftmost first.

mod byte_level;
mod hf_json;
mod pretokenize;
mod stream;
mod train;

use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;

pub use stream::DecodeStream;

/// Padding id.
pub const PAD_ID: u32 = 0;
/// Beginning-of-sequence id.
pub const BOS_ID: u32 = 1;
/// End-of-sequence id; also separates documents in token streams.
pub const EOS_ID: u32 = 2;
/// Unknown id (never produced: every byte has an id).
pub const UNK_ID: u32 = 3;
/// Ids `0..NUM_SPECIAL` are special tokens (4..=9 reserved).
pub const NUM_SPECIAL: u32 = 10;
/// Byte `b` has id `BYTE_OFFSET + b`.
pub const BYTE_OFFSET: u32 = 10;
/// The first id a learned merge gets.
pub const FIRST_MERGE_ID: u32 = BYTE_OFFSET + 256;

/// The text of the ten special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; NUM_SPECIAL as usize] = [
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|unk|>",
    "<|reserved_4|>",
    "<|reserved_5|>",
    "<|reserved_6|>",
    "<|reserved_7|>",
    "<|reserved_8|>",
    "<|reserved_9|>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("vocab size {requested} is below {FIRST_MERGE_ID} (10 special ids + 256 bytes)")]
    VocabTooSmall { requested: u32 },
    #[error("cannot read or write tokenizer file {path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer file {path:?} is not valid json: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("tokenizer file {path:?} is not a neuroshard byte-level bpe tokenizer: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// One learned merge: `left` and `right` next to each other become `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Merge {
    pub left: u32,
    pub right: u32,
    pub result: u32,
}

/// A trained byte-level BPE tokenizer. Immutable and cheap to share (`Send + Sync`).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// `pieces[id]` is the byte string of `id` (special tokens: their text).
    pieces: Vec<Vec<u8>>,
    /// Merges in rank order.
    merges: Vec<Merge>,
    /// `(left, right)` -> `(rank, result)`.
    merge_of: HashMap<(u32, u32), (u32, u32)>,
    /// Special token texts (ids `0..NUM_SPECIAL`).
    specials: Vec<String>,
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.pieces == other.pieces
            && self.merges == other.merges
            && self.specials == other.specials
    }
}

impl Tokenizer {
    /// A tokenizer with no merges: specials and the 256 bytes (vocab size 266).
    pub fn bytes_only() -> Tokenizer {
        Tokenizer::from_parts(
            SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
            Vec::new(),
        )
    }

    /// Builds the lookup tables. `learned[i]` is the byte string of id `FIRST_MERGE_ID + i`.
    pub(crate) fn from_parts(
        specials: Vec<String>,
        learned: Vec<Vec<u8>>,
        merges: Vec<Merge>,
    ) -> Tokenizer {
        let mut pieces: Vec<Vec<u8>> = specials.iter().map(|s| s.as_bytes().to_vec()).collect();
        pieces.extend((0..=255u8).map(|b| vec![b]));
        pieces.extend(learned);
        let merge_of = merges
            .iter()
            .enumerate()
            .map(|(rank, m)| ((m.left, m.right), (rank as u32, m.result)))
            .collect();
        Tokenizer {
            pieces,
            merges,
            merge_of,
            specials,
        }
    }

    /// Learns merges from `texts` until the vocabulary holds `vocab_size` ids (or no pair of
    /// adjacent tokens is left to merge). Deterministic: the same texts give the same tokenizer.
    pub fn train<I, T>(texts: I, vocab_size: u32) -> Result<Tokenizer, TokenizerError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        train::train(texts, vocab_size)
    }

    /// Number of ids, specials included; every id produced is below this.
    pub fn vocab_size(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// Number of learned merges (may exceed `vocab_size - 266` when two merges spell the same
    /// token).
    pub fn num_merges(&self) -> usize {
        self.merges.len()
    }

    /// The bytes id `id` stands for (a special token's text for ids below 10).
    pub fn id_to_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Text of the special tokens, in id order.
    pub fn special_tokens(&self) -> &[String] {
        &self.specials
    }

    /// Encodes text; the same ids Hugging Face `tokenizers` gives for this `tokenizer.json`.
    /// Special-token texts such as `<|eos|>` in the input become their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes())
    }

    /// Encodes arbitrary bytes (not necessarily UTF-8). `encode(s) == encode_bytes(s.as_bytes())`.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
        // Repeated words are merged once per call when the input is large enough to pay off.
        let mut cache: Option<HashMap<&[u8], Vec<u32>>> = (bytes.len() > 4096).then(HashMap::new);
        let mut rest = bytes;
        while !rest.is_empty() {
            let (plain, special) = match self.find_special(rest) {
                Some((at, id, len)) => (&rest[..at], Some((id, at + len))),
                None => (rest, None),
            };
            pretokenize::split_words(plain, |word| match cache.as_mut() {
                Some(cache) => out
                    .extend_from_slice(cache.entry(word).or_insert_with(|| self.merge_word(word))),
                None => out.extend(self.merge_word(word)),
            });
            match special {
                Some((id, end)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    /// Decodes ids to text, replacing invalid UTF-8 with U+FFFD. Ids not in the vocabulary are
    /// skipped (as Hugging Face does); special tokens decode to their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Decodes ids to the exact bytes they stand for. Ids not in the vocabulary are skipped.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(piece) = self.pieces.get(id as usize) {
                out.extend_from_slice(piece);
            }
        }
        out
    }

    /// A streaming decoder for generation: feed ids one at a time, get text that never splits
    /// a UTF-8 character.
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        DecodeStream::new(self)
    }

    /// Writes a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), TokenizerError> {
        hf_json::save(self, path.as_ref())
    }

    /// Reads a `tokenizer.json` written by [`Tokenizer::save`] (or any byte-level BPE file with
    /// this id layout).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Tokenizer, TokenizerError> {
        hf_json::load(path.as_ref())
    }

    /// The `tokenizer.json` text [`Tokenizer::save`] writes.
    pub fn to_json(&self) -> String {
        hf_json::to_json(self)
    }

    /// The string of every id as `tokenizer.json` (and a GGUF file's `tokenizer.ggml.tokens`)
    /// spells it: specials as text, byte sequences through GPT-2's byte-to-unicode mapping.
    pub fn token_strings(&self) -> Vec<String> {
        hf_json::token_strings(self)
    }

    /// The learned merges in priority order, each as `"left right"` token strings (the form of
    /// `tokenizer.json`'s `merges` and of a GGUF file's `tokenizer.ggml.merges`).
    pub fn merge_strings(&self) -> Vec<String> {
        hf_json::merge_strings(self)
    }

    /// Parses `tokenizer.json` text; `origin` names it in errors.
    pub fn from_json(json: &str, origin: &str) -> Result<Tokenizer, TokenizerError> {
        hf_json::from_json(json, std::path::Path::new(origin))
    }

    /// Leftmost occurrence of a special token in `bytes` (longest on ties):
    /// `(offset, id, length)`.
    fn find_special(&self, bytes: &[u8]) -> Option<(usize, u32, usize)> {
        // One pass over the positions (so a text full of specials stays linear): at the first
        // position where any special starts, the longest one there wins.
        let mut first_bytes = [false; 256];
        for special in &self.specials {
            if let Some(&b) = special.as_bytes().first() {
                first_bytes[b as usize] = true;
            }
        }
        for at in 0..bytes.len() {
            if !first_bytes[bytes[at] as usize] {
                continue;
            }
            let rest = &bytes[at..];
            let best = self
                .specials
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty() && rest.starts_with(s.as_bytes()))
                .max_by_key(|(id, s)| (s.len(), std::cmp::Reverse(*id)));
            if let Some((id, s)) = best {
                return Some((at, id as u32, s.len()));
            }
        }
        None
    }

    /// Applies the merges to one word, lowest rank first and leftmost first, exactly as the
    /// Hugging Face BPE model does (a heap of candidate merges over a linked list of symbols).
    fn merge_word(&self, word: &[u8]) -> Vec<u32> {
        let n = word.len();
        let mut ids: Vec<u32> = word.iter().map(|&b| BYTE_OFFSET + b as u32).collect();
        if n < 2 || self.merges.is_empty() {
            return ids;
        }
        // Linked list over positions: a merged-away symbol has `alive[i] == false`.
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>, left: u32, right: u32, pos: usize| {
            if let Some(&(rank, result)) = self.merge_of.get(&(left, right)) {
                heap.push(Candidate { rank, pos, result });
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, ids[i], ids[i + 1], i);
        }
        while let Some(top) = heap.pop() {
            let pos = top.pos;
            if !alive[pos] || next[pos] >= n {
                continue;
            }
            let right = next[pos];
            // Skip stale candidates whose pair has changed since they were pushed.
            if self
                .merge_of
                .get(&(ids[pos], ids[right]))
                .is_none_or(|&(_, result)| result != top.result)
            {
                continue;
            }
            ids[pos] = top.result;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] < n {
                prev[next[pos]] = pos;
            }
            if prev[pos] < n {
                push(&mut heap, ids[prev[pos]], ids[pos], prev[pos]);
            }
            if next[pos] < n {
                push(&mut heap, ids[pos], ids[next[pos]], pos);
            }
        }
        (0..n).filter(|&i| alive[i]).map(|i| ids[i]).collect()
    }
}

/// A possible merge at `pos`; the heap pops the lowest rank, then the leftmost position.
#[derive(PartialEq, Eq)]
struct Candidate {
    rank: u32,
    pos: usize,
    result: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then(other.pos.cmp(&self.pos))
            .then(other.result.cmp(&self.result))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
pub(crate) mod tests;
