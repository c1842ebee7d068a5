//! The built-in corpus: original English prose written for this project (stories, letters,
//! essays, field notes, instructions, dialogues), compiled into the engine so that a fresh node
//! trains offline. Also the default tokenizer, trained on it.

use neuroshard_shared::tokenizer::{Tokenizer, TokenizerError};

/// The vocabulary size of the tokenizer shipped as `engine/corpus/tokenizer.json` (the
/// `default` preset's).
pub const BUILTIN_TOKENIZER_VOCAB: u32 = 2048;

/// The shipped tokenizer: [`Tokenizer::train`] on [`builtin_corpus`] (in this order) with
/// [`BUILTIN_TOKENIZER_VOCAB`] ids. A test keeps it equal to a fresh training run.
const BUILTIN_TOKENIZER_JSON: &str = include_str!("../../corpus/tokenizer.json");

macro_rules! corpus_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../corpus/", $name)))),*]
    };
}

static CORPUS: &[(&str, &str)] = corpus_files![
    "almanac.txt",
    "coastline.txt",
    "computing.txt",
    "dialogues.txt",
    "essays.txt",
    "fables.txt",
    "field_guide.txt",
    "kitchen.txt",
    "letters.txt",
    "lighthouse.txt",
    "making_things.txt",
    "mountain_hut.txt",
    "river_town.txt",
    "science.txt",
    "travel_journal.txt",
    "workshop.txt",
];

/// `(file name, text)` of every corpus file, sorted by name.
pub fn builtin_corpus() -> &'static [(&'static str, &'static str)] {
    CORPUS
}

/// The tokenizer for the built-in corpus: the shipped one for [`BUILTIN_TOKENIZER_VOCAB`], one
/// trained on the corpus (deterministically, in well under a second) for any other size.
pub fn builtin_tokenizer(vocab_size: u32) -> Result<Tokenizer, TokenizerError> {
    if vocab_size == BUILTIN_TOKENIZER_VOCAB {
        Tokenizer::from_json(BUILTIN_TOKENIZER_JSON, "engine/corpus/tokenizer.json")
    } else {
        train_on_corpus(vocab_size)
    }
}

fn train_on_corpus(vocab_size: u32) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::train(CORPUS.iter().map(|(_, text)| *text), vocab_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_sorted_plain_english_of_useful_size() {
        let names: Vec<&str> = CORPUS.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        let total: usize = CORPUS.iter().map(|(_, t)| t.len()).sum();
        assert!(
            (100_000..=400_000).contains(&total),
            "corpus is {total} bytes"
        );
        for (name, text) in CORPUS {
            assert!(text.len() > 5_000, "{name} is only {} bytes", text.len());
            let ascii = text.bytes().filter(|b| b.is_ascii()).count();
            assert!(
                ascii * 100 >= text.len() * 98,
                "{name} is not mostly plain text"
            );
        }
    }

    /// The committed tokenizer.json must be what training produces today. To regenerate it
    /// after editing the corpus: `NEUROSHARD_WRITE_CORPUS_TOKENIZER=1 cargo test -p
    /// neuroshard-engine shipped_tokenizer` (then commit the file; the test still compares).
    #[test]
    fn shipped_tokenizer_matches_fresh_training() {
        let fresh = train_on_corpus(BUILTIN_TOKENIZER_VOCAB).unwrap();
        if std::env::var_os("NEUROSHARD_WRITE_CORPUS_TOKENIZER").is_some() {
            fresh
                .save(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/corpus/tokenizer.json"
                ))
                .unwrap();
        }
        let shipped = builtin_tokenizer(BUILTIN_TOKENIZER_VOCAB).unwrap();
        assert_eq!(shipped.vocab_size(), BUILTIN_TOKENIZER_VOCAB);
        assert!(
            shipped == fresh,
            "engine/corpus/tokenizer.json is stale; regenerate it (see this test's doc)"
        );
        assert_eq!(
            shipped.to_json(),
            BUILTIN_TOKENIZER_JSON,
            "the shipped file is not in canonical form"
        );
    }

    #[test]
    fn tokenizers_of_other_sizes_round_trip_the_corpus() {
        let tiny = builtin_tokenizer(512).unwrap();
        assert_eq!(tiny.vocab_size(), 512);
        let shipped = builtin_tokenizer(BUILTIN_TOKENIZER_VOCAB).unwrap();
        for (name, text) in CORPUS {
            for tok in [&tiny, &shipped] {
                assert_eq!(&tok.decode(&tok.encode(text)), text, "{name}");
            }
        }
        let (_, text) = CORPUS[0];
        let ratio = text.len() as f64 / shipped.encode(text).len() as f64;
        assert!(
            ratio > 3.0,
            "the 2048 tokenizer compresses only {ratio:.2} bytes per token"
        );
    }
}
