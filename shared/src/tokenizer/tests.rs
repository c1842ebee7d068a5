//! Tests for the tokenizer: id layout, exact round trips on random input, HF-style merge order,
//! save/load identity, deterministic training and streaming decode.

use std::sync::LazyLock;

use super::*;

/// A small deterministic generator (splitmix64), so tests need no `rand`.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random text mixing ASCII words and whitespace, accents, CJK, emoji, combining marks,
/// unusual spaces, apostrophes and, sometimes, any code point at all.
pub(crate) fn random_text(rng: &mut Rng, max_chars: u64) -> String {
    const PIECES: &[&str] = &[
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "'s",
        "'ll",
        "'",
        "the",
        " the",
        "and",
        "ing",
        "é",
        "ü",
        "ß",
        "日本語",
        "中",
        "🙂",
        "👩‍👩‍👧",
        "e\u{301}",
        "123",
        "4.5",
        "!?",
        "...",
        "<|",
        "|>",
        "<|eos|>",
        "<|pad",
        "Ω",
        "ﬁ",
        "\u{0}",
        "\u{7f}",
        "\u{feff}",
    ];
    let n = rng.below(max_chars + 1);
    let mut s = String::new();
    for _ in 0..n {
        match rng.below(10) {
            0..=4 => s.push((b'a' + rng.below(26) as u8) as char),
            5 | 6 => s.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]),
            7 => s.push((0x20 + rng.below(0x5f) as u8) as char),
            _ => {
                let c = loop {
                    if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                        break c;
                    }
                };
                s.push(c);
            }
        }
    }
    s
}

pub(crate) fn shakespeare() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/tinyshakespeare.txt"
    );
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("test data {path}: {e}"))
}

/// One tokenizer trained on 200 KB of Shakespeare, shared by the tests.
static TRAINED: LazyLock<Tokenizer> = LazyLock::new(|| {
    let text = shakespeare();
    let cut = text
        .char_indices()
        .nth(200_000)
        .map_or(text.len(), |(i, _)| i);
    Tokenizer::train([&text[..cut]], 1024).unwrap()
});

#[test]
fn id_layout() {
    let tok = Tokenizer::bytes_only();
    assert_eq!(tok.vocab_size(), 266);
    assert_eq!(tok.encode("A"), [10 + 65]);
    assert_eq!(tok.encode_bytes(&[0, 255]), [10, 265]);
    assert_eq!(
        tok.encode("<|pad|><|bos|><|eos|><|unk|><|reserved_9|>"),
        [PAD_ID, BOS_ID, EOS_ID, UNK_ID, 9]
    );
    assert_eq!(tok.id_to_bytes(2), Some(&b"<|eos|>"[..]));
    assert_eq!(tok.id_to_bytes(10 + 97), Some(&b"a"[..]));
    assert_eq!(tok.id_to_bytes(266), None);

    let tok = &*TRAINED;
    assert_eq!(tok.vocab_size(), 1024);
    for id in 0..tok.vocab_size() {
        let bytes = tok.id_to_bytes(id).unwrap();
        match id {
            0..10 => assert_eq!(bytes, SPECIAL_TOKENS[id as usize].as_bytes()),
            10..266 => assert_eq!(bytes, [(id - 10) as u8]),
            _ => assert!(bytes.len() >= 2, "merged id {id} is {bytes:?}"),
        }
    }
    // Common words are single tokens, and the learned ids are used.
    let ids = tok.encode("the king");
    assert!(
        ids.len() <= 3 && ids.iter().all(|&id| id >= FIRST_MERGE_ID),
        "{ids:?}"
    );
    assert!(tok.encode("<|eos|>x").starts_with(&[EOS_ID]));
}

#[test]
fn special_tokens_are_cut_out_leftmost_first() {
    let tok = Tokenizer::bytes_only();
    let a = 10 + b'a' as u32;
    assert_eq!(
        tok.encode("a<|eos|>a<|bos|><|eos|>"),
        [a, EOS_ID, a, BOS_ID, EOS_ID]
    );
    // A partial special is plain text.
    assert_eq!(tok.encode("<|eos"), tok.encode_bytes(b"<|eos"));
    assert_eq!(tok.encode("<|eos").len(), 5);
    // Documents separated by eos, many of them: one id per separator, text round-trips.
    let text = "doc<|eos|>".repeat(20_000);
    let ids = tok.encode(&text);
    assert_eq!(ids.iter().filter(|&&id| id == EOS_ID).count(), 20_000);
    assert_eq!(tok.decode(&ids), text);
}

#[test]
fn round_trips_random_bytes() {
    let tok = &*TRAINED;
    let mut rng = Rng(1);
    for case in 0..400 {
        let len = rng.below(300) as usize;
        let bytes: Vec<u8> = match case % 3 {
            // Any bytes.
            0 => (0..len).map(|_| rng.next() as u8).collect(),
            // Mostly text with invalid bytes sprinkled in.
            1 => {
                let mut v = random_text(&mut rng, 80).into_bytes();
                for _ in 0..rng.below(5) {
                    let at = rng.below(v.len() as u64 + 1) as usize;
                    v.insert(at, 0x80 + rng.below(0x80) as u8);
                }
                v
            }
            _ => {
                let alphabet = b" \n\t'ae\xc3\xa9\xe2";
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                    .collect()
            }
        };
        let ids = tok.encode_bytes(&bytes);
        assert!(ids.iter().all(|&id| id < tok.vocab_size()));
        assert_eq!(tok.decode_bytes(&ids), bytes, "case {case}");
    }
}

#[test]
fn round_trips_random_unicode() {
    let tok = &*TRAINED;
    let mut rng = Rng(2);
    for case in 0..400 {
        let text = random_text(&mut rng, 120);
        let ids = tok.encode(&text);
        assert_eq!(ids, tok.encode_bytes(text.as_bytes()));
        assert_eq!(tok.decode(&ids), text, "case {case}");
    }
    // A long input takes the cached path.
    let text: String = (0..60).map(|_| random_text(&mut rng, 200)).collect();
    assert!(text.len() > 4096);
    assert_eq!(tok.decode(&tok.encode(&text)), text);
    assert_eq!(tok.encode(&text), tok.encode(&text[..]).to_vec());
}

/// The reference BPE: repeatedly merge the lowest-rank pair, leftmost first, rescanning each time.
fn merge_word_reference(tok: &Tokenizer, word: &[u8]) -> Vec<u32> {
    let mut ids: Vec<u32> = word.iter().map(|&b| BYTE_OFFSET + b as u32).collect();
    loop {
        let best = (0..ids.len().saturating_sub(1))
            .filter_map(|i| {
                tok.merge_of
                    .get(&(ids[i], ids[i + 1]))
                    .map(|&(rank, result)| (rank, i, result))
            })
            .min();
        let Some((_, i, result)) = best else {
            return ids;
        };
        ids[i] = result;
        ids.remove(i + 1);
    }
}

#[test]
fn merge_order_matches_reference() {
    let tok = &*TRAINED;
    let mut rng = Rng(3);
    let alphabet = b"etaoinshrdlu eeee   ";
    for _ in 0..2000 {
        let len = 1 + rng.below(24) as usize;
        let word: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
            .collect();
        assert_eq!(
            tok.merge_word(&word),
            merge_word_reference(tok, &word),
            "{:?}",
            String::from_utf8_lossy(&word)
        );
    }
}

#[test]
fn training_is_deterministic_and_reaches_the_vocab_size() {
    let text = shakespeare();
    let part = &text[..60_000];
    let a = Tokenizer::train(part.lines(), 700).unwrap();
    let b = Tokenizer::train(part.lines(), 700).unwrap();
    assert_eq!(a.vocab_size(), 700);
    assert_eq!(a, b);
    assert_eq!(a.to_json(), b.to_json());
    // A different corpus gives a different tokenizer.
    let c = Tokenizer::train(text[60_000..120_000].lines(), 700).unwrap();
    assert_ne!(a, c);
}

#[test]
fn training_stops_when_nothing_is_left_to_merge() {
    let tok = Tokenizer::train(["ab ab ab"], 5000).unwrap();
    // "ab", " a"... then " ab": every word is a single token.
    assert!(tok.vocab_size() < 5000);
    assert_eq!(tok.encode("ab ab").len(), 2);
    assert!(matches!(
        Tokenizer::train(["x"], 265),
        Err(TokenizerError::VocabTooSmall { requested: 265 })
    ));
    let empty = Tokenizer::train(Vec::<&str>::new(), 300).unwrap();
    assert_eq!(empty, Tokenizer::bytes_only());
}

#[test]
fn save_load_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let tok = &*TRAINED;
    tok.save(&path).unwrap();
    let back = Tokenizer::load(&path).unwrap();
    assert_eq!(&back, tok);
    assert_eq!(back.to_json(), tok.to_json());
    let sample = "Now is the winter of our discontent, 'tis true — ünïcödé 🙂\n\n";
    assert_eq!(back.encode(sample), tok.encode(sample));

    let json: serde_json::Value = serde_json::from_str(&tok.to_json()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["model"]["vocab"]["Ġ"], 10 + 32);
    assert_eq!(json["model"]["vocab"]["<|eos|>"], 2);
    assert_eq!(json["added_tokens"].as_array().unwrap().len(), 10);
    assert_eq!(json["added_tokens"][9]["content"], "<|reserved_9|>");
    assert_eq!(
        json["model"]["merges"].as_array().unwrap().len(),
        tok.num_merges()
    );
}

#[test]
fn load_accepts_pair_merges_and_rejects_bad_files() {
    let tok = &*TRAINED;
    let mut json: serde_json::Value = serde_json::from_str(&tok.to_json()).unwrap();
    // Newer libraries write merges as pairs.
    let pairs: Vec<serde_json::Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let (a, b) = m.as_str().unwrap().split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect();
    json["model"]["merges"] = pairs.into();
    assert_eq!(
        &Tokenizer::from_json(&json.to_string(), "pairs").unwrap(),
        tok
    );

    let broken = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut j: serde_json::Value = serde_json::from_str(&tok.to_json()).unwrap();
        edit(&mut j);
        Tokenizer::from_json(&j.to_string(), "broken").unwrap_err()
    };
    let err = broken(&|j| j["model"]["vocab"]["A"] = 11.into());
    assert!(matches!(err, TokenizerError::Format { .. }), "{err}");
    let err = broken(&|j| j["model"]["merges"][0] = "zzz qqq".into());
    assert!(err.to_string().contains("not in the vocabulary"), "{err}");
    let err = broken(&|j| j["model"]["type"] = "WordPiece".into());
    assert!(err.to_string().contains("not BPE"), "{err}");
    let err = broken(&|j| j["pre_tokenizer"] = serde_json::Value::Null);
    assert!(err.to_string().contains("ByteLevel"), "{err}");
    let err = broken(&|j| {
        j["model"]["vocab"]
            .as_object_mut()
            .unwrap()
            .retain(|_, id| id.as_u64() != Some(500))
    });
    assert!(err.to_string().contains("dense"), "{err}");
    assert!(matches!(
        Tokenizer::from_json("{not json", "x"),
        Err(TokenizerError::Json { .. })
    ));
    assert!(matches!(
        Tokenizer::load("/nonexistent/tokenizer.json"),
        Err(TokenizerError::Io { .. })
    ));
}

#[test]
fn decode_skips_unknown_ids_and_renders_specials() {
    let tok = &*TRAINED;
    assert_eq!(tok.decode(&[10 + 104, 99_999, 10 + 105]), "hi");
    assert_eq!(tok.decode(&[BOS_ID, 10 + 120, EOS_ID]), "<|bos|>x<|eos|>");
    assert_eq!(tok.decode(&[10 + 0xff]), "\u{fffd}");
    assert_eq!(tok.decode_bytes(&[10 + 0xff]), [0xff]);
}

#[test]
fn decode_stream_never_splits_characters() {
    let tok = &*TRAINED;
    let mut rng = Rng(4);
    for case in 0..300 {
        let ids: Vec<u32> = if case % 2 == 0 {
            tok.encode(&random_text(&mut rng, 60))
        } else {
            // Arbitrary ids, invalid UTF-8 and unknown ids included.
            (0..rng.below(40))
                .map(|_| rng.below(tok.vocab_size() as u64 + 20) as u32)
                .collect()
        };
        let mut stream = tok.decode_stream();
        let mut text = String::new();
        for &id in &ids {
            text.push_str(&stream.step(id));
        }
        text.push_str(&stream.finish());
        assert_eq!(text, tok.decode(&ids), "case {case}: {ids:?}");
    }
    // "é" arrives byte by byte: nothing, then the whole character.
    let mut stream = tok.decode_stream();
    assert_eq!(stream.step(10 + 0xc3), "");
    assert_eq!(stream.step(10 + 0xa9), "é");
    assert_eq!(stream.finish(), "");
}

#[test]
fn trains_a_large_vocab_quickly_enough_for_tests() {
    // Whole Shakespeare (1.1 MB) to 2048 ids: the size of the `default` preset. No timing
    // assertion here; the figure is printed for the report.
    let text = shakespeare();
    let start = std::time::Instant::now();
    let tok = Tokenizer::train([&text], 2048).unwrap();
    eprintln!(
        "trained 2048 ids on {} bytes in {:?}",
        text.len(),
        start.elapsed()
    );
    assert_eq!(tok.vocab_size(), 2048);
    let ids = tok.encode(&text);
    eprintln!(
        "{} tokens, {:.2} bytes per token",
        ids.len(),
        text.len() as f64 / ids.len() as f64
    );
    assert!(text.len() as f64 / ids.len() as f64 > 2.5);
    assert_eq!(tok.decode(&ids), text);
}
