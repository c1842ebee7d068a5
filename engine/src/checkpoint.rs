//! Checkpoints and weight files (safetensors).
//!
//! A checkpoint is one safetensors file: every held parameter under its Llama name, the AdamW
//! moments as `optim.m.<name>` / `optim.v.<name>`, and in the header metadata the format tag,
//! model config, stage, seed, optimizer step and settings, data position and a sha256 over
//! all tensor bytes (so a flipped byte is found, not trained on). It is written to a temporary
//! file in the same folder, fsynced, renamed over the target and the folder fsynced: a crash
//! at any moment leaves either the previous checkpoint or the new one, never a torn file.
//!
//! A weights file (`ExportWeights` format "safetensors") holds only the parameters.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use neuroshard_shared::model::ModelConfig;
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use sha2::{Digest, Sha256};

use crate::backend::Backend;
use crate::model::params::{f32_bytes, f32_from_bytes};
use crate::model::{Model, ModelError, StageSpec};
use crate::optim::{AdamState, TrainSettings};

pub const FORMAT: &str = "neuroshard-checkpoint-v1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path:?} is not a valid safetensors file (truncated or corrupted?): {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path:?} is corrupted: content sha256 {actual} does not match the recorded {expected}"
    )]
    Corrupted {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path:?} does not fit this model: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

type Result<T> = std::result::Result<T, CheckpointError>;

/// What a checkpoint says besides its tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    pub config: ModelConfig,
    pub stage: StageSpec,
    pub seed: u64,
    /// Optimizer steps taken.
    pub step: u64,
    pub train: TrainSettings,
    /// The data loader's position (JSON of `data::DataPosition`), when a loader was running.
    pub data_position: Option<String>,
    /// Live vocabulary of the head.
    pub v_live: u64,
}

/// A host f32 tensor viewed for safetensors.
struct F32View<'a> {
    shape: Vec<usize>,
    data: Cow<'a, [f32]>,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(f32_bytes(&self.data))
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn host<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> Result<Cow<'a, [f32]>> {
    match be.host_view(buf) {
        Some(v) => Ok(Cow::Borrowed(v)),
        None => {
            let mut out = vec![0.0; be.len(buf)];
            be.download(buf, &mut out).map_err(ModelError::from)?;
            Ok(Cow::Owned(out))
        }
    }
}

/// sha256 over (name, bytes) of every tensor in name order.
fn content_hash<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut all: Vec<_> = tensors.collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, bytes) in all {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

/// Writes `tensors` with `meta` to `path` atomically; returns the file size.
fn write_atomic(
    path: &Path,
    tensors: Vec<(String, F32View<'_>)>,
    mut meta: HashMap<String, String>,
) -> Result<u64> {
    let digest = content_hash(
        tensors
            .iter()
            .map(|(n, v)| (n.as_str(), f32_bytes(&v.data))),
    );
    meta.insert("content_sha256".into(), digest);
    let bytes =
        safetensors::serialize(tensors, Some(meta)).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_bytes_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Saves weights, optimizer state and `meta` to `path` atomically; returns the file size.
pub fn save_checkpoint<B: Backend>(
    path: &Path,
    model: &Model<B>,
    adam: &AdamState<B>,
    meta: &CheckpointMeta,
) -> Result<u64> {
    let be = &model.be;
    let mut tensors = Vec::with_capacity(model.params.len() * 3);
    for (i, p) in model.params.iter().enumerate() {
        tensors.push((
            p.name.clone(),
            F32View {
                shape: p.shape.clone(),
                data: host(be, &p.value)?,
            },
        ));
        tensors.push((
            format!("optim.m.{}", p.name),
            F32View {
                shape: p.shape.clone(),
                data: host(be, &adam.m[i])?,
            },
        ));
        tensors.push((
            format!("optim.v.{}", p.name),
            F32View {
                shape: p.shape.clone(),
                data: host(be, &adam.v[i])?,
            },
        ));
    }
    let mut info = HashMap::new();
    info.insert("format".into(), FORMAT.into());
    info.insert(
        "neuroshard".into(),
        serde_json::to_string(meta).expect("checkpoint metadata serializes"),
    );
    write_atomic(path, tensors, info)
}

/// The whole training state's hash: every parameter with its two AdamW moments, the
/// optimizer step and the data position. A DiLoCo claimant commits to it after every inner
/// step (issue #19), so it runs once per step and must cost little against the step: each
/// tensor is hashed on its own with BLAKE3 (SIMD, and its tree mode split across the rayon
/// pool for large tensors), tensors in parallel where the backend lends host views (CPU),
/// one at a time through a download otherwise (GPU: one tensor's copy at a time, never the
/// whole state), and the per-tensor digests are hashed in parameter order.
/// The master weights and moments are f32 on every device and dtype, so a state restored
/// from a checkpoint hashes as it did when saved, wherever it is loaded.
pub fn state_hash<B: Backend>(
    model: &Model<B>,
    adam: &AdamState<B>,
    meta: &CheckpointMeta,
) -> Result<String> {
    use rayon::prelude::*;
    let be = &model.be;
    let tensor = |name: &str, data: &[f32]| -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(data.len() as u64 * 4).to_le_bytes());
        let bytes = f32_bytes(data);
        if bytes.len() >= PARALLEL_HASH_BYTES {
            h.update_rayon(bytes);
        } else {
            h.update(bytes);
        }
        h.finalize()
    };
    let bufs: Vec<(&str, &B::Buf)> = model
        .params
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                (p.name.as_str(), &p.value),
                ("optim.m", &adam.m[i]),
                ("optim.v", &adam.v[i]),
            ]
        })
        .collect();
    let views: Option<Vec<(&str, &[f32])>> = bufs
        .iter()
        .map(|&(name, buf)| be.host_view(buf).map(|v| (name, v)))
        .collect();
    let digests: Vec<blake3::Hash> = match views {
        Some(views) => views.par_iter().map(|&(n, v)| tensor(n, v)).collect(),
        None => bufs
            .iter()
            .map(|&(n, buf)| Ok(tensor(n, &host(be, buf)?)))
            .collect::<Result<_>>()?,
    };
    let mut h = blake3::Hasher::new();
    h.update(b"neuroshard-state-v2");
    for d in &digests {
        h.update(d.as_bytes());
    }
    h.update(&meta.step.to_le_bytes());
    let position = meta.data_position.as_deref().unwrap_or("");
    h.update(&(position.len() as u64).to_le_bytes());
    h.update(position.as_bytes());
    Ok(h.finalize().to_hex().to_string())
}

/// Tensors from this size on are hashed with BLAKE3's multithreaded tree mode.
const PARALLEL_HASH_BYTES: usize = 1 << 20;

/// Saves only the parameters (names as in `Model::params`) to `path` atomically.
pub fn save_weights<B: Backend>(
    path: &Path,
    model: &Model<B>,
    extra: HashMap<String, String>,
) -> Result<u64> {
    let bytes = weights_bytes(model, extra)?;
    write_bytes_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Saves host f32 tensors (name, shape, values) with `extra` metadata and their content
/// sha256 to `path` atomically; returns the file size.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    extra: HashMap<String, String>,
) -> Result<u64> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            (
                name.clone(),
                F32View {
                    shape: shape.clone(),
                    data: Cow::Borrowed(values.as_slice()),
                },
            )
        })
        .collect();
    write_atomic(path, views, extra)
}

/// The parameters as an in-memory safetensors file (for a shm slot).
pub fn weights_bytes<B: Backend>(
    model: &Model<B>,
    extra: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let be = &model.be;
    let mut tensors = Vec::with_capacity(model.params.len());
    for p in &model.params {
        tensors.push((
            p.name.clone(),
            F32View {
                shape: p.shape.clone(),
                data: host(be, &p.value)?,
            },
        ));
    }
    let mut meta = extra;
    meta.insert(
        "content_sha256".into(),
        content_hash(
            tensors
                .iter()
                .map(|(n, v)| (n.as_str(), f32_bytes(&v.data))),
        ),
    );
    safetensors::serialize(tensors, Some(meta)).map_err(|e| CheckpointError::Format {
        path: PathBuf::from("<memory>"),
        message: e.to_string(),
    })
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    neuroshard_shared::fsx::write_atomic(path, bytes, None).map_err(|source| CheckpointError::Io {
        op: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// A parsed, verified safetensors file: f32 tensors by name plus the header metadata.
pub struct TensorFile {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

/// Parses safetensors bytes (`origin` names them in errors); checks every tensor is f32 and,
/// when recorded, the content sha256.
pub fn parse_tensors(bytes: &[u8], origin: &Path) -> Result<TensorFile> {
    let format = |message: String| CheckpointError::Format {
        path: origin.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let views: Vec<(String, TensorView<'_>)> = st.tensors();
    for (name, v) in &views {
        if v.dtype() != Dtype::F32 {
            return Err(format(format!(
                "tensor {name} is {:?}, expected F32",
                v.dtype()
            )));
        }
    }
    if let Some(expected) = metadata.get("content_sha256") {
        let actual = content_hash(views.iter().map(|(n, v)| (n.as_str(), v.data())));
        if &actual != expected {
            return Err(CheckpointError::Corrupted {
                path: origin.to_path_buf(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    let tensors = views
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), f32_from_bytes(v.data()))))
        .collect();
    Ok(TensorFile { tensors, metadata })
}

/// Reads and verifies a safetensors file.
pub fn read_tensor_file(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    parse_tensors(&bytes, path)
}

/// The metadata of a checkpoint file (format checked).
pub fn checkpoint_meta(file: &TensorFile, path: &Path) -> Result<CheckpointMeta> {
    let bad = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    match file.metadata.get("format") {
        Some(f) if f == FORMAT => {}
        other => return Err(bad(format!("format {other:?}, expected {FORMAT:?}"))),
    }
    let json = file
        .metadata
        .get("neuroshard")
        .ok_or_else(|| bad("no neuroshard metadata".into()))?;
    serde_json::from_str(json).map_err(|e| bad(format!("bad metadata: {e}")))
}

/// Replaces the model's parameters with the tensors of `file` (every held name must be there
/// with the same shape; extra names are an error unless `allow_extra`, e.g. optimizer moments).
pub fn load_params<B: Backend>(
    model: &mut Model<B>,
    file: &TensorFile,
    path: &Path,
    allow_extra: bool,
) -> Result<()> {
    let mismatch = |message: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        message,
    };
    for p in &model.params {
        match file.tensors.get(&p.name) {
            None => return Err(mismatch(format!("tensor {} is missing", p.name))),
            Some((shape, _)) if shape != &p.shape => {
                return Err(mismatch(format!(
                    "tensor {} has shape {shape:?}, expected {:?}",
                    p.name, p.shape
                )));
            }
            Some(_) => {}
        }
    }
    if !allow_extra {
        let held: std::collections::HashSet<&str> =
            model.params.iter().map(|p| p.name.as_str()).collect();
        if let Some(extra) = file.tensors.keys().find(|n| !held.contains(n.as_str())) {
            return Err(mismatch(format!("tensor {extra} is not held by this node")));
        }
    }
    model.weights_changed();
    let be = &model.be;
    for p in &mut model.params {
        let (_, values) = &file.tensors[&p.name];
        be.write(&mut p.value, values).map_err(ModelError::from)?;
    }
    model.refresh_half()?;
    Ok(())
}

/// The parameter names of `stage` in canonical order (the order `Model::hash` walks).
pub fn stage_names(cfg: &ModelConfig, stage: &StageSpec) -> Vec<String> {
    use crate::model::params::{EMBED, FINAL_NORM, LM_HEAD, layer_specs};
    let mut names = Vec::new();
    if stage.has_embedding {
        names.push(EMBED.to_string());
    }
    for l in stage.layer_start..stage.layer_end {
        names.extend(layer_specs(cfg, l).into_iter().map(|(n, _, _)| n));
    }
    if stage.has_head {
        names.push(FINAL_NORM.to_string());
        names.push(LM_HEAD.to_string());
    }
    names
}

/// The model hash of the stage a checkpoint file holds (what `Model::hash` answered on the
/// node that wrote it), from the file's tensors.
pub fn file_model_hash(file: &TensorFile, path: &Path) -> Result<String> {
    let meta = checkpoint_meta(file, path)?;
    let mut h = crate::model::params::ModelHasher::default();
    for name in stage_names(&meta.config, &meta.stage) {
        let (shape, values) = file
            .tensors
            .get(&name)
            .ok_or_else(|| CheckpointError::Mismatch {
                path: path.to_path_buf(),
                message: format!("tensor {name} of its own stage is missing"),
            })?;
        h.update(&name, shape, values);
    }
    Ok(h.hex())
}

/// Fills the held parameters (and their AdamW moments) of `model` from `sources`, each one
/// from the first source holding a tensor of that name and shape (a shape that differs is an
/// error). Returns the held transformer layers no source covered completely.
pub fn overlay_sources<B: Backend>(
    model: &mut Model<B>,
    adam: &mut AdamState<B>,
    sources: &[(&TensorFile, &Path)],
) -> Result<Vec<u32>> {
    model.weights_changed();
    for (i, p) in model.params.iter_mut().enumerate() {
        let Some((file, path)) = sources
            .iter()
            .find(|(f, _)| f.tensors.contains_key(&p.name))
        else {
            continue;
        };
        let (shape, values) = &file.tensors[&p.name];
        if shape != &p.shape {
            return Err(CheckpointError::Mismatch {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {} has shape {shape:?}, expected {:?}",
                    p.name, p.shape
                ),
            });
        }
        model
            .be
            .write(&mut p.value, values)
            .map_err(ModelError::from)?;
        for (kind, dst) in [("m", &mut adam.m[i]), ("v", &mut adam.v[i])] {
            if let Some((s, v)) = file.tensors.get(&format!("optim.{kind}.{}", p.name))
                && s == &p.shape
            {
                model.be.write(dst, v).map_err(ModelError::from)?;
            }
        }
    }
    model.refresh_half()?;
    let spec = model.spec;
    let seeded = (spec.layer_start..spec.layer_end)
        .filter(|&l| {
            crate::model::params::layer_specs(&model.cfg, l)
                .iter()
                .any(|(n, _, _)| !sources.iter().any(|(f, _)| f.tensors.contains_key(n)))
        })
        .collect();
    Ok(seeded)
}

/// Loads the optimizer moments of a checkpoint into `adam`.
pub fn load_moments<B: Backend>(
    model: &Model<B>,
    adam: &mut AdamState<B>,
    file: &TensorFile,
    path: &Path,
) -> Result<()> {
    let mismatch = |message: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        message,
    };
    for (i, p) in model.params.iter().enumerate() {
        for (kind, dst) in [("m", &mut adam.m[i]), ("v", &mut adam.v[i])] {
            let name = format!("optim.{kind}.{}", p.name);
            let (shape, values) = file
                .tensors
                .get(&name)
                .ok_or_else(|| mismatch(format!("tensor {name} is missing")))?;
            if shape != &p.shape {
                return Err(mismatch(format!(
                    "tensor {name} has shape {shape:?}, expected {:?}",
                    p.shape
                )));
            }
            model.be.write(dst, values).map_err(ModelError::from)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::StageInput;
    use crate::optim::OptimConfig;

    fn tiny_model(seed: u64) -> Model<CpuBackend> {
        let cfg = ModelConfig::preset("tiny").unwrap();
        Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), seed).unwrap()
    }

    fn meta(m: &Model<CpuBackend>, step: u64) -> CheckpointMeta {
        CheckpointMeta {
            config: m.cfg.clone(),
            stage: m.spec,
            seed: m.seed,
            step,
            train: TrainSettings {
                optim: OptimConfig::default(),
                batch_size: 2,
                seq_len: 8,
                data_path: String::new(),
                node_id: "n".into(),
            },
            data_position: Some("{\"epoch\":0}".into()),
            v_live: m.v_live as u64,
        }
    }

    fn train_step(m: &mut Model<CpuBackend>, adam: &mut AdamState<CpuBackend>, micro: u64) -> f32 {
        let ids: Vec<u32> = (0..16).map(|i| (i * 37 % 500) as u32 + 3).collect();
        let labels: Vec<u32> = (0..16).map(|i| (i * 11 % 500) as u32 + 3).collect();
        let loss = m
            .forward(micro, 2, 8, StageInput::Ids(&ids), Some(&labels))
            .unwrap()
            .unwrap();
        m.backward(micro, None).unwrap();
        adam.step(m, &OptimConfig::default(), 1e-3).unwrap();
        loss
    }

    #[test]
    fn restore_gives_identical_hash_and_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let mut a = tiny_model(5);
        let mut adam_a = AdamState::new(&a).unwrap();
        train_step(&mut a, &mut adam_a, 0);
        train_step(&mut a, &mut adam_a, 1);
        let bytes = save_checkpoint(&path, &a, &adam_a, &meta(&a, adam_a.step)).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let file = read_tensor_file(&path).unwrap();
        let m = checkpoint_meta(&file, &path).unwrap();
        assert_eq!(m, meta(&a, 2));
        let mut b = tiny_model(999); // different seed: every value must come from the file
        let mut adam_b = AdamState::new(&b).unwrap();
        load_params(&mut b, &file, &path, true).unwrap();
        load_moments(&b, &mut adam_b, &file, &path).unwrap();
        adam_b.step = m.step;
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        let la = train_step(&mut a, &mut adam_a, 2);
        let lb = train_step(&mut b, &mut adam_b, 2);
        assert_eq!(la.to_bits(), lb.to_bits());
        assert_eq!(
            a.hash().unwrap(),
            b.hash().unwrap(),
            "identical after the next step too"
        );
    }

    #[test]
    fn truncated_or_flipped_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let a = tiny_model(5);
        let adam = AdamState::new(&a).unwrap();
        save_checkpoint(&path, &a, &adam, &meta(&a, 0)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
            let p = dir.path().join(format!("cut{cut}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(
                matches!(read_tensor_file(&p), Err(CheckpointError::Format { .. })),
                "cut at {cut}"
            );
        }
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 5] ^= 0x40;
        let p = dir.path().join("flipped");
        std::fs::write(&p, &flipped).unwrap();
        assert!(matches!(
            read_tensor_file(&p),
            Err(CheckpointError::Corrupted { .. })
        ));
        assert!(matches!(
            read_tensor_file(&dir.path().join("missing")),
            Err(CheckpointError::Io { .. })
        ));
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn weights_of_another_stage_do_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = tiny_model(5);
        save_weights(&path, &a, HashMap::new()).unwrap();
        let cfg = ModelConfig::preset("tiny").unwrap();
        let spec = StageSpec {
            layer_start: 0,
            layer_end: 1,
            has_embedding: true,
            has_head: false,
        };
        let mut part = Model::new(CpuBackend::new(), cfg, spec, 5).unwrap();
        let file = read_tensor_file(&path).unwrap();
        assert!(matches!(
            load_params(&mut part, &file, &path, false),
            Err(CheckpointError::Mismatch { .. })
        ));
        load_params(&mut part, &file, &path, true).unwrap();
    }
}
