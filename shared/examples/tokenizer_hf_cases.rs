//! Writes tokenizers and test cases for `shared/tests/hf_tokenizer_check.py`, which checks that
//! the Python `tokenizers` library loads our `tokenizer.json` and produces the same ids.
//!
//! Usage: `tokenizer_hf_cases OUT_DIR [FILE...]`. Each `*.json` FILE is a `tokenizer.json` to
//! check (e.g. the engine's default); every other FILE is text whose paragraphs (and whole text)
//! become extra cases. Writes `OUT_DIR/<name>/tokenizer.json` and `OUT_DIR/<name>/cases.json`
//! (`[{"text": ..., "ids": [...]}]`) for a tokenizer trained here on generated text and for
//! each given tokenizer.

use std::path::{Path, PathBuf};

use neuroshard_shared::tokenizer::Tokenizer;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "river",
    "light",
    "stone",
    "Ünïcödé",
    "naïve",
    "café",
    "日本語",
    "中文",
    "🙂",
    "👩‍👩‍👧",
    "e\u{301}",
    "don't",
    "it's",
    "we'll",
    "I'm",
    "they've",
    "'re",
    "1234",
    "3.14",
    "x²",
    "Ⅻ",
    "½",
    "—",
    "...",
    "!?",
    "<|eos|>",
    "<|bos|>",
    "<|eos",
    "|>",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    "\u{feff}",
    "\u{200b}",
    "\t",
    "\r\n",
    "\n\n",
    "   ",
    " ",
    "\n",
    "$",
    "€",
    "ﬁ",
    "Σίσυφος",
    "привет",
    "مرحبا",
    "עברית",
    "हिन्दी",
    "🏳️‍🌈",
];

fn random_text(rng: &mut Rng, max_words: u64) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(max_words + 1) {
        match rng.below(8) {
            0..=4 => s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]),
            5 => s.push(' '),
            6 => s.push((0x20 + rng.below(0x5f) as u8) as char),
            _ => loop {
                if let Some(c) = char::from_u32(rng.below(0x3_0000) as u32) {
                    s.push(c);
                    break;
                }
            },
        }
    }
    s
}

fn write_cases(
    dir: &Path,
    tok: &Tokenizer,
    texts: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    tok.save(dir.join("tokenizer.json"))?;
    let cases: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| {
            let ids = tok.encode(t);
            assert_eq!(&tok.decode(&ids), t, "round trip");
            serde_json::json!({"text": t, "ids": ids})
        })
        .collect();
    std::fs::write(dir.join("cases.json"), serde_json::to_string(&cases)?)?;
    println!("wrote {} cases to {}", cases.len(), dir.display());
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: tokenizer_hf_cases OUT_DIR [FILE...]")?,
    );
    let (tokenizers, text_files): (Vec<String>, Vec<String>) =
        args.partition(|a| a.ends_with(".json"));
    let mut rng = Rng(2024);
    let training: Vec<String> = (0..3000).map(|_| random_text(&mut rng, 40)).collect();
    let mut texts: Vec<String> = (0..1500).map(|_| random_text(&mut rng, 30)).collect();
    texts.extend(training.iter().take(200).cloned());
    for file in &text_files {
        let text = std::fs::read_to_string(file)?;
        texts.extend(text.split("\n\n").map(str::to_string));
        texts.push(text);
    }

    let trained = Tokenizer::train(&training, 1500)?;
    write_cases(&out.join("trained"), &trained, &texts)?;
    for (i, path) in tokenizers.iter().enumerate() {
        let tok = Tokenizer::load(path)?;
        write_cases(&out.join(format!("given{i}")), &tok, &texts)?;
    }
    Ok(())
}
