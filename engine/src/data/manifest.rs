//! Genesis-style manifests of token shards:
//! `{"total_shards": N, "shards": [{"shard_id": i, "sha256": "...", "path": "..."}]}`.
//!
//! A shard is a flat little-endian `u32` token array; documents inside it are separated by the
//! eos id (2). `path` is relative to the manifest (default `shard_<id:05>.bin`). Every shard is
//! checked (present, sha256, whole tokens, at least two tokens, ids below the vocabulary) before
//! it is used; a shard that fails is logged, counted and skipped, never read.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DataError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub total_shards: u64,
    pub shards: Vec<ManifestShard>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    pub shard_id: u64,
    /// Hex sha256 of the shard file's bytes.
    pub sha256: String,
    /// Relative to the manifest's folder; `shard_<id:05>.bin` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl ManifestShard {
    pub fn relative_path(&self) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| format!("shard_{:05}.bin", self.shard_id))
    }
}

/// Why a shard was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardProblem {
    #[error("cannot read the shard file: {0}")]
    Unreadable(String),
    #[error("sha256 mismatch: manifest says {expected}, file has {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("file size {bytes} is not a whole number of u32 tokens")]
    PartialToken { bytes: u64 },
    #[error("only {tokens} tokens; a shard needs at least 2")]
    TooShort { tokens: u64 },
    #[error("token id {token} at index {index} is not below the vocabulary size {vocab_size}")]
    TokenOutOfRange {
        token: u32,
        index: u64,
        vocab_size: u32,
    },
    #[error("path {0:?} leaves the manifest's folder")]
    UnsafePath(String),
    #[error("shard id listed more than once")]
    DuplicateId,
}

/// A shard that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedShard {
    pub shard_id: u64,
    pub path: PathBuf,
    pub sha256: String,
    pub tokens: u64,
}

pub fn read_manifest(path: &Path) -> Result<Manifest, DataError> {
    let text = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| DataError::Manifest {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads, hashes and checks one shard file; returns its tokens.
pub(crate) fn load_shard(
    path: &Path,
    expected_sha256: &str,
    vocab_size: u32,
) -> Result<Vec<u32>, ShardProblem> {
    let bytes = std::fs::read(path).map_err(|e| ShardProblem::Unreadable(e.to_string()))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(ShardProblem::HashMismatch {
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    if bytes.len() % 4 != 0 {
        return Err(ShardProblem::PartialToken {
            bytes: bytes.len() as u64,
        });
    }
    let tokens: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect();
    if tokens.len() < 2 {
        return Err(ShardProblem::TooShort {
            tokens: tokens.len() as u64,
        });
    }
    if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &t)| t >= vocab_size) {
        return Err(ShardProblem::TokenOutOfRange {
            token,
            index: index as u64,
            vocab_size,
        });
    }
    Ok(tokens)
}

/// Resolves a manifest path against its folder, refusing absolute paths and `..`.
fn resolve(dir: &Path, relative: &str) -> Result<PathBuf, ShardProblem> {
    let rel = Path::new(relative);
    if relative.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ShardProblem::UnsafePath(relative.to_string()));
    }
    Ok(dir.join(rel))
}

/// Checks every shard of a manifest. Returns the good ones sorted by shard id, and the bad ones
/// with their problem (each also logged at error level).
pub(crate) fn verify_manifest(
    manifest_path: &Path,
    manifest: &Manifest,
    vocab_size: u32,
) -> (Vec<VerifiedShard>, Vec<super::SkippedShard>) {
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    if manifest.total_shards != manifest.shards.len() as u64 {
        tracing::warn!(
            manifest = %manifest_path.display(),
            total_shards = manifest.total_shards,
            listed = manifest.shards.len(),
            "manifest lists a different number of shards than total_shards; using the listed ones"
        );
    }
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in &manifest.shards {
        let relative = entry.relative_path();
        let result = if seen.insert(entry.shard_id) {
            Ok(())
        } else {
            Err(ShardProblem::DuplicateId)
        }
        .and_then(|()| resolve(dir, &relative))
        .and_then(|path| {
            load_shard(&path, &entry.sha256, vocab_size).map(|t| (path, t.len() as u64))
        });
        match result {
            Ok((path, tokens)) => good.push(VerifiedShard {
                shard_id: entry.shard_id,
                path,
                sha256: entry.sha256.clone(),
                tokens,
            }),
            Err(problem) => {
                tracing::error!(
                    manifest = %manifest_path.display(),
                    shard_id = entry.shard_id,
                    path = %relative,
                    %problem,
                    "skipping data shard"
                );
                bad.push(super::SkippedShard {
                    shard_id: entry.shard_id,
                    path: dir.join(&relative),
                    problem,
                });
            }
        }
    }
    good.sort_by_key(|s| s.shard_id);
    (good, bad)
}

/// Writes `tokens` as shards of at most `tokens_per_shard` tokens into `dir`, plus
/// `dir/manifest.json`; returns the manifest. The tool side of the format, for tests and for
/// preparing data sets.
pub fn write_shards(
    dir: &Path,
    tokens: &[u32],
    tokens_per_shard: usize,
) -> Result<Manifest, DataError> {
    if tokens_per_shard < 2 {
        return Err(DataError::Config {
            reason: format!("tokens_per_shard {tokens_per_shard} must be at least 2"),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut shards = Vec::new();
    for (i, chunk) in tokens.chunks(tokens_per_shard).enumerate() {
        let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
        let entry = ManifestShard {
            shard_id: i as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            path: Some(format!("shard_{i:05}.bin")),
        };
        let path = dir.join(entry.relative_path());
        std::fs::write(&path, &bytes).map_err(io(&path))?;
        shards.push(entry);
    }
    let manifest = Manifest {
        total_shards: shards.len() as u64,
        shards,
    };
    let path = dir.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
    std::fs::write(&path, json).map_err(io(&path))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_manifest_folder() {
        let dir = Path::new("/data");
        assert_eq!(resolve(dir, "a/b.bin").unwrap(), Path::new("/data/a/b.bin"));
        assert_eq!(resolve(dir, "./b.bin").unwrap(), Path::new("/data/./b.bin"));
        for bad in ["/etc/passwd", "../x.bin", "a/../../x", ""] {
            assert!(
                matches!(resolve(dir, bad), Err(ShardProblem::UnsafePath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn load_shard_checks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let m = write_shards(dir.path(), &[5, 6, 7, 8, 9], 3).unwrap();
        assert_eq!(m.total_shards, 2);
        let p0 = dir.path().join("shard_00000.bin");
        assert_eq!(load_shard(&p0, &m.shards[0].sha256, 10).unwrap(), [5, 6, 7]);
        assert_eq!(
            load_shard(&p0, &m.shards[0].sha256.to_uppercase(), 10).unwrap(),
            [5, 6, 7]
        );
        assert!(matches!(
            load_shard(&p0, &m.shards[1].sha256, 10),
            Err(ShardProblem::HashMismatch { .. })
        ));
        assert_eq!(
            load_shard(&p0, &m.shards[0].sha256, 7),
            Err(ShardProblem::TokenOutOfRange {
                token: 7,
                index: 2,
                vocab_size: 7
            })
        );
        let p1 = dir.path().join("shard_00001.bin");
        assert_eq!(load_shard(&p1, &m.shards[1].sha256, 10), Ok(vec![8, 9]));
        let odd = dir.path().join("odd.bin");
        std::fs::write(&odd, [1u8, 2, 3, 4, 5]).unwrap();
        let sha = hex::encode(Sha256::digest([1u8, 2, 3, 4, 5]));
        assert_eq!(
            load_shard(&odd, &sha, 10),
            Err(ShardProblem::PartialToken { bytes: 5 })
        );
        std::fs::write(&odd, 3u32.to_le_bytes()).unwrap();
        let sha = hex::encode(Sha256::digest(3u32.to_le_bytes()));
        assert_eq!(
            load_shard(&odd, &sha, 10),
            Err(ShardProblem::TooShort { tokens: 1 })
        );
        assert!(matches!(
            load_shard(&dir.path().join("none.bin"), &sha, 10),
            Err(ShardProblem::Unreadable(_))
        ));
        assert!(write_shards(dir.path(), &[1, 2], 1).is_err());
    }

    #[test]
    fn manifest_json_round_trips_and_path_defaults() {
        let json = r#"{"total_shards": 1, "shards": [{"shard_id": 7, "sha256": "ab"}]}"#;
        let m: Manifest = serde_json::from_str(json).unwrap();
        assert_eq!(m.shards[0].relative_path(), "shard_00007.bin");
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
