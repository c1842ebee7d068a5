//! What a serving node keeps of each paid generation for the checks of served inference
//! (issue #19): the TOPLOC-style commitment the engine computed while it generated
//! (`neuroshard_shared::toploc`: the top-k logits of every 32nd generated token), the prompt
//! and generated token ids, the sampling settings and the model hash, per request id. A
//! verifier that learns of the payment from the ledger fetches it (`GetInferenceEvidence`,
//! `pipeline/service.rs`) and recomputes the request with one prefill (`infercheck.rs`).
//!
//! One JSON file per request under `<data dir>/inference/evidence/`, so the evidence survives
//! a restart of the daemon; files older than the keep time (the challenge window and two
//! epochs: no verdict on the reward could count later) and beyond [`MAX_KEPT`] (oldest
//! first) are removed by [`Store::prune`].

use std::path::{Path, PathBuf};

use neuroshard_proto::peer as pb;
use neuroshard_shared::toploc::{self, ChunkCommit};
use serde::{Deserialize, Serialize};

/// Most requests kept (about 1.2 MB each at the longest context; 6 KB per 1,000 tokens of
/// commitment plus the ids).
pub const MAX_KEPT: usize = 4096;
/// Longest request id accepted (ids are `inf_` + 16 hex, or an OpenAI-style id).
pub const MAX_ID_LEN: usize = 64;

/// What was served for one paid request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub request_id: String,
    /// Unix seconds the generation finished.
    pub served_at: i64,
    /// Hash of the weights that generated (equal before and after the generation).
    pub model_hash: String,
    /// The prompt as the engine generated from (after its document separator).
    pub prompt_ids: Vec<u32>,
    pub generated: Vec<u32>,
    /// One chunk per `toploc::committed_positions(generated.len())`.
    pub commits: Vec<ChunkCommit>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
}

impl Evidence {
    /// Bytes the commitment and the ids take (what the figures count).
    pub fn bytes(&self) -> usize {
        self.commits
            .iter()
            .map(|c| c.indices.len() * 4 + c.values.len() * 2)
            .sum::<usize>()
            + (self.prompt_ids.len() + self.generated.len()) * 4
    }
}

impl From<Evidence> for pb::InferenceEvidence {
    fn from(e: Evidence) -> Self {
        pb::InferenceEvidence {
            request_id: e.request_id,
            served_at: e.served_at,
            model_hash: e.model_hash,
            prompt_ids: e.prompt_ids,
            generated: e.generated,
            commits: e
                .commits
                .into_iter()
                .map(|c| pb::InferenceChunk {
                    indices: c.indices,
                    values: c.values.into_iter().map(u32::from).collect(),
                })
                .collect(),
            temperature: e.temperature,
            top_p: e.top_p,
            top_k: e.top_k,
            seed: e.seed,
        }
    }
}

impl TryFrom<pb::InferenceEvidence> for Evidence {
    type Error = String;

    /// A peer's evidence, checked for shape: one chunk per committed position of the
    /// generated tokens, each with as many values as indices, values that are bf16 bits.
    fn try_from(e: pb::InferenceEvidence) -> Result<Self, String> {
        if e.generated.is_empty() {
            return Err("no generated tokens".into());
        }
        let chunks = toploc::committed_positions(e.generated.len()).count();
        if e.commits.len() != chunks {
            return Err(format!(
                "{} committed chunks for {} generated tokens (expected {chunks})",
                e.commits.len(),
                e.generated.len()
            ));
        }
        let mut commits = Vec::with_capacity(chunks);
        for c in e.commits {
            if c.indices.is_empty() || c.indices.len() != c.values.len() {
                return Err("a chunk's indices and values differ in number".into());
            }
            let values: Result<Vec<u16>, _> = c.values.iter().map(|v| u16::try_from(*v)).collect();
            commits.push(ChunkCommit {
                indices: c.indices,
                values: values.map_err(|_| "a committed value is not bf16 bits".to_string())?,
            });
        }
        Ok(Evidence {
            request_id: e.request_id,
            served_at: e.served_at,
            model_hash: e.model_hash,
            prompt_ids: e.prompt_ids,
            generated: e.generated,
            commits,
            temperature: e.temperature,
            top_p: e.top_p,
            top_k: e.top_k,
            seed: e.seed,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("request id {0:?} is not 1 to 64 letters, digits, '_' or '-'")]
    BadId(String),
    #[error("evidence store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("evidence file {path}: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Whether `id` can name a request (and a file): 1 to [`MAX_ID_LEN`] of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The evidence files of this node.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store under `data_dir` (the folder is made on the first write).
    pub fn new(data_dir: &Path) -> Store {
        Store {
            dir: data_dir.join("inference").join("evidence"),
        }
    }

    fn path(&self, id: &str) -> Result<PathBuf, EvidenceError> {
        if !valid_id(id) {
            return Err(EvidenceError::BadId(id.chars().take(80).collect()));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EvidenceError + '_ {
        move |source| EvidenceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Keeps `ev` (replacing any earlier file of the same id).
    pub fn put(&self, ev: &Evidence) -> Result<(), EvidenceError> {
        let path = self.path(&ev.request_id)?;
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(ev).map_err(|source| EvidenceError::Decode {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, bytes).map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Self::io(&path))
    }

    /// The evidence of request `id`, if kept.
    pub fn get(&self, id: &str) -> Result<Option<Evidence>, EvidenceError> {
        let path = self.path(id)?;
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| EvidenceError::Decode { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Removes the files older than `keep_secs` at `now`, and the oldest beyond
    /// [`MAX_KEPT`]; returns how many it removed.
    pub fn prune(&self, now: i64, keep_secs: i64) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut files: Vec<(i64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let modified = e.metadata().ok()?.modified().ok()?;
                let secs = modified
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs() as i64;
                Some((secs, e.path()))
            })
            .collect();
        files.sort();
        let excess = files.len().saturating_sub(MAX_KEPT);
        let mut removed = 0;
        for (i, (at, path)) in files.iter().enumerate() {
            if (i < excess || now - at > keep_secs) && std::fs::remove_file(path).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(id: &str) -> Evidence {
        Evidence {
            request_id: id.into(),
            served_at: 100,
            model_hash: "ab".into(),
            prompt_ids: vec![0, 5, 6],
            generated: vec![7; 40],
            commits: vec![
                ChunkCommit {
                    indices: vec![1, 2],
                    values: vec![0x3f80, 0x3f00],
                };
                2
            ],
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(3),
        }
    }

    #[test]
    fn kept_evidence_reads_back_and_bad_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let ev = evidence("inf_0123456789abcdef");
        store.put(&ev).unwrap();
        assert_eq!(store.get(&ev.request_id).unwrap(), Some(ev.clone()));
        assert_eq!(store.get("inf_ffff").unwrap(), None);
        assert_eq!(ev.bytes(), 2 * (2 * 4 + 2 * 2) + 43 * 4);
        for bad in ["", "../etc/passwd", "a/b", "x.json", &"a".repeat(65)] {
            assert!(
                matches!(store.get(bad), Err(EvidenceError::BadId(_))),
                "{bad}"
            );
        }
        assert!(store.put(&evidence("no/slash")).is_err());
        // A file that is not evidence is an error, not a panic.
        std::fs::write(dir.path().join("inference/evidence/junk.json"), b"{").unwrap();
        assert!(matches!(
            store.get("junk"),
            Err(EvidenceError::Decode { .. })
        ));
    }

    #[test]
    fn prune_removes_what_is_older_than_the_keep_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.put(&evidence("a")).unwrap();
        let now = chrono::Utc::now().timestamp();
        assert_eq!(store.prune(now, 3600), 0);
        assert!(store.get("a").unwrap().is_some());
        assert_eq!(store.prune(now + 7200, 3600), 1);
        assert!(store.get("a").unwrap().is_none());
    }
}
