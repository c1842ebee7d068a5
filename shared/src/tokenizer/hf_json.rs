//! Reading and writing the Hugging Face `tokenizer.json` format (model `BPE`, `ByteLevel`
//! pre-tokenizer and decoder, GPT-2's byte-to-unicode mapping).

use std::collections::HashMap;
use std::path::Path;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

use super::byte_level::{bytes_to_string, string_to_bytes};
use super::{BYTE_OFFSET, FIRST_MERGE_ID, Merge, NUM_SPECIAL, Tokenizer, TokenizerError};

/// The vocabulary as a JSON object written in id order.
struct OrderedVocab<'a>(&'a [String]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

/// The token string of every id as it appears in the file.
pub(super) fn token_strings(tok: &Tokenizer) -> Vec<String> {
    let mut tokens: Vec<String> = tok.specials.clone();
    tokens.extend(
        tok.pieces[NUM_SPECIAL as usize..]
            .iter()
            .map(|p| bytes_to_string(p)),
    );
    tokens
}

pub(super) fn merge_strings(tok: &Tokenizer) -> Vec<String> {
    merges_of(tok, &token_strings(tok))
}

fn merges_of(tok: &Tokenizer, tokens: &[String]) -> Vec<String> {
    // Token strings never contain a space (GPT-2's mapping moves it to 'Ġ'), so the classic
    // "left right" form is unambiguous and read by every version of the library.
    tok.merges
        .iter()
        .map(|m| format!("{} {}", tokens[m.left as usize], tokens[m.right as usize]))
        .collect()
}

pub(super) fn to_json(tok: &Tokenizer) -> String {
    let tokens = token_strings(tok);
    let added: Vec<Value> = tok
        .specials
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges = merges_of(tok, &tokens);
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let vocab = serde_json::to_value(OrderedVocab(&tokens))
        .expect("a map of strings to numbers serializes");
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    });
    let mut text = serde_json::to_string_pretty(&doc).expect("a json value serializes");
    text.push('\n');
    text
}

pub(super) fn save(tok: &Tokenizer, path: &Path) -> Result<(), TokenizerError> {
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    // All or nothing: a crash mid-write never leaves a torn tokenizer.json behind.
    crate::fsx::write_atomic(path, to_json(tok).as_bytes(), None).map_err(io)
}

pub(super) fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    from_json(&text, path)
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    model: Model,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Joined(String),
    Pair(String, String),
}

pub(super) fn from_json(text: &str, path: &Path) -> Result<Tokenizer, TokenizerError> {
    let file: File = serde_json::from_str(text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| TokenizerError::Format {
        path: path.to_path_buf(),
        reason,
    };

    if file.model.kind.as_deref().is_some_and(|k| k != "BPE") {
        return Err(bad(format!(
            "model type {:?} is not BPE",
            file.model.kind.unwrap_or_default()
        )));
    }
    if file.normalizer.as_ref().is_some_and(|n| !n.is_null()) {
        return Err(bad(
            "a normalizer is set; only byte-level files without one are supported".into(),
        ));
    }
    let pre = file.pre_tokenizer.unwrap_or(Value::Null);
    if pre.get("type").and_then(Value::as_str) != Some("ByteLevel")
        || pre
            .get("add_prefix_space")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        || !pre
            .get("use_regex")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    {
        return Err(bad(format!(
            "pre_tokenizer must be ByteLevel with use_regex and no prefix space, found {pre}"
        )));
    }

    // Dense ids 0..n.
    let n = file
        .model
        .vocab
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0);
    if n > 1 << 24 {
        return Err(bad(format!(
            "vocabulary ids reach {n}, more than this tokenizer supports"
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n.max(NUM_SPECIAL as usize)];
    for (token, &id) in &file.model.vocab {
        let slot = &mut tokens[id as usize];
        if let Some(other) = slot.replace(token.clone()) {
            return Err(bad(format!(
                "id {id} is given to both {other:?} and {token:?}"
            )));
        }
    }
    // Specials come from added_tokens; the model vocabulary may list them too.
    for added in &file.added_tokens {
        if added.id >= NUM_SPECIAL {
            return Err(bad(format!(
                "added token {:?} has id {} outside 0..{NUM_SPECIAL}",
                added.content, added.id
            )));
        }
        tokens[added.id as usize] = Some(added.content.clone());
    }
    let mut specials = Vec::with_capacity(NUM_SPECIAL as usize);
    for (id, token) in tokens.iter().take(NUM_SPECIAL as usize).enumerate() {
        match token {
            Some(s) if !s.is_empty() => specials.push(s.clone()),
            _ => return Err(bad(format!("special id {id} has no token"))),
        }
    }
    let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate().skip(NUM_SPECIAL as usize) {
        let token = token
            .as_ref()
            .ok_or_else(|| bad(format!("id {id} is missing (ids must be dense)")))?;
        let bytes = string_to_bytes(token)
            .ok_or_else(|| bad(format!("token {token:?} is not byte-level text")))?;
        if (id as u32) < FIRST_MERGE_ID && bytes != [(id as u32 - BYTE_OFFSET) as u8] {
            return Err(bad(format!(
                "id {id} must be the byte {}, found {token:?}",
                id as u32 - BYTE_OFFSET
            )));
        }
        if (id as u32) >= FIRST_MERGE_ID && bytes.len() < 2 {
            return Err(bad(format!(
                "merged id {id} ({token:?}) is shorter than two bytes"
            )));
        }
        pieces.push(bytes);
    }
    if pieces.len() < 256 {
        return Err(bad(format!(
            "vocabulary has {} ids, fewer than the {FIRST_MERGE_ID} required",
            tokens.len()
        )));
    }

    let id_of = |t: &str| {
        file.model
            .vocab
            .get(t)
            .copied()
            .filter(|&id| id >= BYTE_OFFSET)
    };
    let mut merges = Vec::with_capacity(file.model.merges.len());
    for (rank, entry) in file.model.merges.iter().enumerate() {
        let (left, right) = match entry {
            MergeEntry::Joined(s) => s
                .split_once(' ')
                .ok_or_else(|| bad(format!("merge {rank} {s:?} has no space")))?,
            MergeEntry::Pair(a, b) => (a.as_str(), b.as_str()),
        };
        let missing = |t: &str| {
            bad(format!(
                "merge {rank} uses {t:?}, which is not in the vocabulary"
            ))
        };
        let l = id_of(left).ok_or_else(|| missing(left))?;
        let r = id_of(right).ok_or_else(|| missing(right))?;
        let joined = format!("{left}{right}");
        let result = id_of(&joined).ok_or_else(|| missing(&joined))?;
        merges.push(Merge {
            left: l,
            right: r,
            result,
        });
    }
    let learned = pieces.split_off(256);
    Ok(Tokenizer::from_parts(specials, learned, merges))
}
