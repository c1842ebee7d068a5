//! The network's current model out of this node (`GET /api/v1/model/export`, `neuroshard model
//! export`): the daemon decides where every layer comes from, the engine writes the file.
//!
//! A node holding every layer exports its own weights. A node holding some layers fetches a
//! checkpoint of each other stage from its holders over the peer service (`GetStageWeights`,
//! the same transfer a node joining with those layers uses, [`fetch_layers`]); the engine
//! checks each one (its content sha256, and that its weights hash to the hash the holder
//! claimed) before writing anything. The data path runs one way: the daemon asks, the engine
//! writes into a working folder of the daemon's, the daemon streams the result and removes it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use neuroshard_shared::model::ModelConfig;

use super::{PipeError, Stage, engine_err};

/// How long one stage's weights may take to arrive.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The formats the model leaves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The Hugging Face Llama layout (a folder: config.json, model.safetensors, tokenizer).
    Hf,
    /// One GGUF file for llama.cpp.
    Gguf,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Option<ExportFormat> {
        match s {
            "hf" => Some(ExportFormat::Hf),
            "gguf" => Some(ExportFormat::Gguf),
            _ => None,
        }
    }

    /// The engine's name of the format (`ExportWeights`).
    fn engine_format(self) -> &'static str {
        match self {
            ExportFormat::Hf => "hf-llama",
            ExportFormat::Gguf => "gguf",
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The folder (hf) or file (gguf) written, inside the working folder.
    pub path: PathBuf,
    /// The hash of the full model (as `ModelHash` answers on a node holding it all).
    pub model_hash: String,
    /// Bytes of the weights file.
    pub bytes: u64,
    /// The layers whose weights came from peers.
    pub from_peers: Vec<u32>,
}

/// Fetches from connected peers whose layers are at step `min_step` or later a checkpoint of
/// each stage that holds some of `needed` (GetStageWeights; the hash each peer claims is
/// checked by the engine when it reads the file). Writes them to `dir/from-<peer>.ckpt`;
/// returns the files written, with the stage hash each peer claimed and the needed layers each
/// covers. `on_fetched(layers done, layers needed)` is called after each transfer.
pub async fn fetch_layers(
    net: &neuroshard_net::Network,
    dir: &Path,
    model: &ModelConfig,
    needed: BTreeSet<u32>,
    min_step: u64,
    mut on_fetched: impl FnMut(usize, usize),
) -> Vec<(PathBuf, String, Vec<u32>)> {
    // Weights and two moments in f32, plus the header.
    let max_bytes = usize::try_from(model.total_params())
        .unwrap_or(usize::MAX / 16)
        .saturating_mul(12)
        .saturating_add(16 << 20);
    let total = needed.len();
    let mut left = needed;
    let mut peers = net.peers.conns_with_info();
    // The holders that trained furthest first (a stale replica is the last resort).
    peers.retain(|p| p.1.train_step >= min_step);
    peers.sort_by_key(|p| (std::cmp::Reverse(p.1.train_step), p.0.id.to_string()));
    let _ = std::fs::create_dir_all(dir);
    let mut out = Vec::new();
    for (conn, info) in peers {
        let mut want: Vec<u32> = info
            .layers
            .iter()
            .copied()
            .filter(|l| left.contains(l))
            .collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            continue;
        }
        let got = tokio::time::timeout(
            FETCH_TIMEOUT,
            conn.get_stage_weights(want.clone(), max_bytes),
        )
        .await;
        let (hash, bytes) = match got {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(peer = %conn.id, error = %e, "could not fetch layer weights");
                continue;
            }
            Err(_) => {
                tracing::warn!(peer = %conn.id, "layer weights transfer timed out");
                continue;
            }
        };
        let path = dir.join(format!("from-{}.ckpt", conn.id));
        if let Err(e) = std::fs::write(&path, &bytes) {
            tracing::warn!(error = %e, path = %path.display(), "could not keep fetched weights");
            continue;
        }
        tracing::info!(peer = %conn.id, layers = ?want, hash = %hash, bytes = bytes.len(), "fetched layer weights");
        for l in &want {
            left.remove(l);
        }
        on_fetched(total - left.len(), total);
        out.push((path, hash, want));
        if left.is_empty() {
            break;
        }
    }
    out
}

/// One export at a time per node: each holds the whole model in the engine's memory once more.
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// Numbers the working folders.
static EXPORTS: AtomicU64 = AtomicU64::new(0);

/// Held while an export runs; frees the slot when dropped.
pub struct ExportSlot(());

impl ExportSlot {
    /// The slot, unless another export is running.
    pub fn take() -> Option<ExportSlot> {
        EXPORTING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ExportSlot(()))
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Release);
    }
}

/// A fresh working folder for one export under `<data-dir>/exports/` (the caller removes it).
pub fn work_dir(data_dir: &Path) -> PathBuf {
    let n = EXPORTS.fetch_add(1, Ordering::Relaxed);
    data_dir
        .join("exports")
        .join(format!("export-{}-{n}", std::process::id()))
}

impl Stage {
    /// Writes the full model in `format` into `work` (a folder of its own), fetching the layers
    /// this node does not hold from their holders first.
    pub async fn export(
        &self,
        net: &neuroshard_net::Network,
        format: ExportFormat,
        work: &Path,
    ) -> Result<Exported, PipeError> {
        let a = self.ready()?;
        let model = self.model()?;
        let needed: BTreeSet<u32> = (0..a.total).filter(|l| !a.layers.contains(l)).collect();
        let io = |e: std::io::Error| PipeError::Engine(format!("{}: {e}", work.display()));
        std::fs::create_dir_all(work).map_err(io)?;
        let mut sources = Vec::new();
        let from_peers: Vec<u32> = needed.iter().copied().collect();
        if !needed.is_empty() {
            tracing::info!(layers = ?from_peers, "export: fetching the layers this node does not hold");
            let fetched = fetch_layers(net, work, &model, needed.clone(), 0, |done, total| {
                tracing::info!(done, total, "export: layers fetched");
            })
            .await;
            let got: BTreeSet<u32> = fetched.iter().flat_map(|f| f.2.iter().copied()).collect();
            let missing: Vec<u32> = needed.difference(&got).copied().collect();
            if !missing.is_empty() {
                return Err(PipeError::NoRoute(format!(
                    "layers {missing:?} are held by no reachable peer; the full model cannot be \
                     exported from this node now"
                )));
            }
            sources = fetched.into_iter().map(|(p, h, _)| (p, h)).collect();
        }
        let engine = self.handle()?;
        let path = work.join(match format {
            ExportFormat::Hf => "hf",
            ExportFormat::Gguf => "model.gguf",
        });
        let (model_hash, bytes) = {
            let _g = self.current.lock().await;
            engine
                .export_model(format.engine_format(), &path, &sources)
                .await
                .map_err(engine_err)?
        };
        for (p, _) in &sources {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!(format = ?format, hash = %model_hash, bytes, from_peers = from_peers.len(), "model exported");
        Ok(Exported {
            path,
            model_hash,
            bytes,
            from_peers,
        })
    }
}
