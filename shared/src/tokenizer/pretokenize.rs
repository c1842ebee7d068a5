//! GPT-2's pre-tokenizer split, byte for byte the one the Hugging Face `ByteLevel` pre-tokenizer
//! applies with `use_regex: true`, so that both sides cut text into the same words before BPE.
//!
//! The original pattern is
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
//! The `regex` crate has no look-ahead, so `\s+(?!\S)` is emulated: a whitespace run matched by
//! the last alternative that is longer than one character and followed by a non-space character
//! gives its last character back, exactly as the backtracking engine would.
//! Bytes that are not valid UTF-8 (only reachable through `encode_bytes`) match no alternative;
//! each becomes a word of its own.

use std::sync::LazyLock;

use regex::bytes::Regex;

static GPT2_SPLIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
        .expect("the GPT-2 split pattern is a valid regex")
});

/// Calls `word` with each pre-token of `text`, in order; the pieces concatenate to `text`.
pub(crate) fn split_words<'a>(text: &'a [u8], mut word: impl FnMut(&'a [u8])) {
    let re = &*GPT2_SPLIT;
    let mut pos = 0;
    while pos < text.len() {
        let Some(m) = re.find_at(text, pos) else {
            // Only invalid UTF-8 remains.
            text[pos..]
                .iter()
                .enumerate()
                .for_each(|(i, _)| word(&text[pos + i..pos + i + 1]));
            return;
        };
        // Invalid bytes the regex skipped over: one word each.
        for i in pos..m.start() {
            word(&text[i..i + 1]);
        }
        let (start, mut end) = (m.start(), m.end());
        let piece = &text[start..end];
        if is_whitespace_run(piece) && end < text.len() && !starts_with_whitespace(&text[end..]) {
            // `\s+(?!\S)`: hand the last whitespace character to the next word.
            let last = last_char_len(piece);
            if piece.len() > last {
                end -= last;
            }
        }
        word(&text[start..end]);
        pos = end;
    }
}

fn is_whitespace_run(piece: &[u8]) -> bool {
    std::str::from_utf8(piece).is_ok_and(|s| s.chars().all(char::is_whitespace))
}

/// True when `rest` begins with a whitespace character (invalid UTF-8 counts as non-space, as
/// `\S` would match it in a byte-oriented engine and the original never sees such bytes).
fn starts_with_whitespace(rest: &[u8]) -> bool {
    let n = rest.len().min(4);
    (1..=n)
        .any(|l| std::str::from_utf8(&rest[..l]).is_ok_and(|s| s.chars().all(char::is_whitespace)))
}

fn last_char_len(piece: &[u8]) -> usize {
    std::str::from_utf8(piece)
        .ok()
        .and_then(|s| s.chars().last())
        .map_or(1, char::len_utf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_words(s.as_bytes(), |w| {
            out.push(String::from_utf8(w.to_vec()).unwrap())
        });
        out
    }

    #[test]
    fn matches_gpt2_examples() {
        assert_eq!(words("Hello world"), ["Hello", " world"]);
        assert_eq!(
            words("I'm here, it's 2024!"),
            ["I", "'m", " here", ",", " it", "'s", " 2024", "!"]
        );
        assert_eq!(words("a  b"), ["a", " ", " b"]);
        assert_eq!(words("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(words("a \n b"), ["a", " \n", " b"]);
        assert_eq!(words("end   "), ["end", "   "]);
        assert_eq!(words("x\t\t."), ["x", "\t", "\t", "."]);
        assert_eq!(words("  "), ["  "]);
        assert_eq!(words("über café"), ["über", " café"]);
        assert_eq!(words(""), Vec::<String>::new());
    }

    #[test]
    fn pieces_cover_any_bytes() {
        let text = b"ok \xff\xfe bad\xc3 \xe2\x82 tail";
        let mut joined = Vec::new();
        split_words(text, |w| {
            assert!(!w.is_empty());
            joined.extend_from_slice(w);
        });
        assert_eq!(joined, text);
    }
}
