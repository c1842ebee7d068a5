//! Training data: batches of `input_ids` [B, T] with `labels` = the same stream shifted by one.
//!
//! Sources: local text (a file, or a folder of text files read recursively), a Genesis-style
//! manifest of sha256-checked token shards, or the built-in corpus when no path is given.
//!
//! Reading order: the valid shards are visited in a permutation drawn from
//! sha256(node id, seed, epoch); inside a shard of `L` tokens the loader reads
//! `max(1, (L - 1) / T)` windows of `T + 1` tokens, `T` apart, starting at a phase drawn from
//! sha256(node id, seed, epoch, shard id), wrapping around the shard's end (so a shard shorter
//! than a window is repeated, and nothing is ever read out of range). After the last shard the
//! epoch advances and the order is drawn again. [`DataPosition`] records where the next window
//! starts, so a checkpoint restores the exact next batch.

mod corpus;
pub mod manifest;
mod order;
mod text;

use std::path::{Path, PathBuf};

use neuroshard_shared::tokenizer::{Tokenizer, TokenizerError};
use serde::{Deserialize, Serialize};

pub use corpus::{BUILTIN_TOKENIZER_VOCAB, builtin_corpus, builtin_tokenizer};
pub use manifest::{Manifest, ManifestShard, ShardProblem, read_manifest, write_shards};
pub use text::TEXT_EXTENSIONS;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data at {path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path:?} is not valid json: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no usable data in {what}: {skipped} shards or files skipped (see the error log)")]
    NoData { what: String, skipped: usize },
    #[error("invalid data loader setting: {reason}")]
    Config { reason: String },
    #[error("cannot restore data position {position:?}: {reason}")]
    Position {
        position: DataPosition,
        reason: String,
    },
    #[error("shard {shard_id} ({path:?}) changed after it was checked: {problem}")]
    ShardChanged {
        shard_id: u64,
        path: PathBuf,
        problem: ShardProblem,
    },
    #[error("built-in tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
}

/// Where training text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The corpus compiled into the engine.
    BuiltIn,
    /// A text file, a folder of text files, or a manifest (`*.json`).
    Path(PathBuf),
}

impl DataSource {
    /// `None` means the built-in corpus.
    pub fn from_option(path: Option<PathBuf>) -> DataSource {
        path.map_or(DataSource::BuiltIn, DataSource::Path)
    }
}

/// What the loader is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Sequences per batch (B).
    pub batch: usize,
    /// Tokens per sequence (T).
    pub seq: usize,
    /// The node's id: decides shard order and starting phases.
    pub node_id: String,
    /// The run's data seed.
    pub seed: u64,
}

/// Where the next window starts; store it in a checkpoint and [`DataLoader::seek`] to it to
/// resume with the identical next batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    pub epoch: u64,
    /// Index into this epoch's shard order.
    pub shard: u64,
    /// The id of that shard, checked on restore so changed data is noticed.
    pub shard_id: u64,
    /// Tokens past the shard's starting phase.
    pub offset: u64,
}

/// One training batch, row-major [batch, seq].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    /// `labels[b][t]` is the token after `input_ids[b][t]` in the stream.
    pub labels: Vec<u32>,
}

/// A shard or file that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedShard {
    pub shard_id: u64,
    pub path: PathBuf,
    pub problem: ShardProblem,
}

enum ShardData {
    Memory(Vec<u32>),
    File(manifest::VerifiedShard),
}

struct Shard {
    id: u64,
    len: u64,
    data: ShardData,
}

/// Yields batches deterministically from (node id, seed); see the module docs for the order.
pub struct DataLoader {
    cfg: LoaderConfig,
    shards: Vec<Shard>,
    skipped: Vec<SkippedShard>,
    /// This epoch's visiting order (indices into `shards`).
    order: Vec<usize>,
    pos: DataPosition,
    /// The file shard currently in memory: (index into `shards`, tokens).
    loaded: Option<(usize, Vec<u32>)>,
}

impl DataLoader {
    /// Opens a source; text is tokenized with `tokenizer`, manifest shards are checked against
    /// its vocabulary size.
    pub fn open(
        source: &DataSource,
        tokenizer: &Tokenizer,
        cfg: LoaderConfig,
    ) -> Result<DataLoader, DataError> {
        match source {
            DataSource::BuiltIn => {
                let tokens =
                    text::tokenize_texts(builtin_corpus().iter().map(|(_, t)| *t), tokenizer);
                DataLoader::from_tokens(tokens, cfg)
            }
            DataSource::Path(path) => {
                let meta = std::fs::metadata(path).map_err(|source| DataError::Io {
                    path: path.clone(),
                    source,
                })?;
                if meta.is_dir() {
                    let files = text::collect_text_files(path)?;
                    let (tokens, skipped) = text::tokenize_files(&files, tokenizer);
                    if tokens.len() < 2 {
                        let what = format!("text folder {path:?} ({} files)", files.len());
                        return Err(DataError::NoData {
                            what,
                            skipped: skipped.len(),
                        });
                    }
                    let mut loader = DataLoader::from_tokens(tokens, cfg)?;
                    loader.skipped = skipped;
                    Ok(loader)
                } else if path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("json"))
                {
                    DataLoader::open_manifest(path, tokenizer.vocab_size(), cfg)
                } else {
                    let (tokens, skipped) =
                        text::tokenize_files(std::slice::from_ref(path), tokenizer);
                    if tokens.len() < 2 {
                        let what = format!("text file {path:?}");
                        return Err(DataError::NoData {
                            what,
                            skipped: skipped.len(),
                        });
                    }
                    DataLoader::from_tokens(tokens, cfg)
                }
            }
        }
    }

    /// Opens a manifest; shards failing any check are logged, listed in
    /// [`DataLoader::skipped`] and never read.
    pub fn open_manifest(
        path: &Path,
        vocab_size: u32,
        cfg: LoaderConfig,
    ) -> Result<DataLoader, DataError> {
        let manifest = read_manifest(path)?;
        let (good, skipped) = manifest::verify_manifest(path, &manifest, vocab_size);
        if good.is_empty() {
            return Err(DataError::NoData {
                what: format!("manifest {path:?}"),
                skipped: skipped.len(),
            });
        }
        let shards = good
            .into_iter()
            .map(|s| Shard {
                id: s.shard_id,
                len: s.tokens,
                data: ShardData::File(s),
            })
            .collect();
        let mut loader = DataLoader::new(shards, cfg)?;
        loader.skipped = skipped;
        tracing::info!(
            manifest = %path.display(),
            shards = loader.shards.len(),
            skipped = loader.skipped.len(),
            tokens = loader.total_tokens(),
            "opened data manifest"
        );
        Ok(loader)
    }

    /// A loader over one in-memory token stream (at least 2 tokens).
    pub fn from_tokens(tokens: Vec<u32>, cfg: LoaderConfig) -> Result<DataLoader, DataError> {
        if tokens.len() < 2 {
            return Err(DataError::NoData {
                what: format!("a stream of {} tokens", tokens.len()),
                skipped: 0,
            });
        }
        DataLoader::new(
            vec![Shard {
                id: 0,
                len: tokens.len() as u64,
                data: ShardData::Memory(tokens),
            }],
            cfg,
        )
    }

    fn new(shards: Vec<Shard>, cfg: LoaderConfig) -> Result<DataLoader, DataError> {
        if cfg.batch == 0 || cfg.seq == 0 || cfg.batch.saturating_mul(cfg.seq) > 1 << 28 {
            let reason = format!(
                "batch {} x seq {} must be positive and at most 2^28 tokens",
                cfg.batch, cfg.seq
            );
            return Err(DataError::Config { reason });
        }
        let mut loader = DataLoader {
            cfg,
            shards,
            skipped: Vec::new(),
            order: Vec::new(),
            pos: DataPosition::default(),
            loaded: None,
        };
        loader.order = loader.order_for(0);
        loader.pos.shard_id = loader.shards[loader.order[0]].id;
        Ok(loader)
    }

    /// The next batch. Errors only when a file shard fails its check on re-reading.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let (b, t) = (self.cfg.batch, self.cfg.seq);
        let mut input_ids = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b * t);
        for _ in 0..b {
            let index = self.order[self.pos.shard as usize];
            let phase = self.phase(index);
            let offset = self.pos.offset;
            let tokens = self.tokens(index)?;
            let len = tokens.len() as u64;
            let start = (phase + offset % len) % len;
            let mut at = start as usize;
            for _ in 0..t {
                input_ids.push(tokens[at]);
                at = if at + 1 == tokens.len() { 0 } else { at + 1 };
                labels.push(tokens[at]);
            }
            self.advance();
        }
        Ok(Batch {
            batch: b,
            seq: t,
            input_ids,
            labels,
        })
    }

    /// Where the next batch starts.
    pub fn position(&self) -> DataPosition {
        self.pos.clone()
    }

    /// Moves to a position saved by [`DataLoader::position`] over the same data and settings.
    pub fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        let bad = |reason: String| DataError::Position {
            position: position.clone(),
            reason,
        };
        if position.shard >= self.shards.len() as u64 {
            return Err(bad(format!(
                "shard index beyond the {} usable shards",
                self.shards.len()
            )));
        }
        let order = self.order_for(position.epoch);
        let shard = &self.shards[order[position.shard as usize]];
        if shard.id != position.shard_id {
            return Err(bad(format!(
                "shard id {} is at that place now; the data changed",
                shard.id
            )));
        }
        if position.offset / self.cfg.seq as u64 >= self.windows(shard.len) {
            return Err(bad(format!(
                "offset past the end of shard {} ({} tokens)",
                shard.id, shard.len
            )));
        }
        self.order = order;
        self.pos = position.clone();
        Ok(())
    }

    /// Shards and files that failed a check and are not read.
    pub fn skipped(&self) -> &[SkippedShard] {
        &self.skipped
    }

    /// Number of usable shards (1 for text and the built-in corpus).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Tokens over all usable shards.
    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.len).sum()
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    fn order_for(&self, epoch: u64) -> Vec<usize> {
        order::permutation(
            self.shards.len(),
            order::derive_seed(&self.cfg.node_id, self.cfg.seed, epoch, None),
        )
    }

    fn phase(&self, index: usize) -> u64 {
        let shard = &self.shards[index];
        order::derive_seed(
            &self.cfg.node_id,
            self.cfg.seed,
            self.pos.epoch,
            Some(shard.id),
        ) % shard.len
    }

    fn windows(&self, len: u64) -> u64 {
        ((len - 1) / self.cfg.seq as u64).max(1)
    }

    fn tokens(&mut self, index: usize) -> Result<&[u32], DataError> {
        let shard = &self.shards[index];
        match &shard.data {
            ShardData::Memory(tokens) => Ok(tokens),
            ShardData::File(file) => {
                if self.loaded.as_ref().is_none_or(|(i, _)| *i != index) {
                    self.loaded = None;
                    // Checked again: the file could have changed since `open`.
                    // Same sha256 means the same tokens, so the range check need not be repeated.
                    let tokens = manifest::load_shard(&file.path, &file.sha256, u32::MAX).map_err(|problem| {
                            tracing::error!(shard_id = shard.id, path = %file.path.display(), %problem, "data shard changed");
                            DataError::ShardChanged { shard_id: shard.id, path: file.path.clone(), problem }
                        })?;
                    self.loaded = Some((index, tokens));
                }
                Ok(&self.loaded.as_ref().expect("loaded just above").1)
            }
        }
    }

    fn advance(&mut self) {
        let len = self.shards[self.order[self.pos.shard as usize]].len;
        self.pos.offset += self.cfg.seq as u64;
        if self.pos.offset / self.cfg.seq as u64 >= self.windows(len) {
            self.pos.offset = 0;
            self.pos.shard += 1;
            if self.pos.shard == self.shards.len() as u64 {
                self.pos.shard = 0;
                self.pos.epoch += 1;
                self.order = self.order_for(self.pos.epoch);
            }
            self.pos.shard_id = self.shards[self.order[self.pos.shard as usize]].id;
        }
    }
}

#[cfg(test)]
mod tests;
