//! What control and the engine exchange, as plain Rust types, and their conversions to and
//! from `engine.proto`. Nothing outside `engine/` sees a prost message of the engine.

use std::ops::Range;
use std::path::PathBuf;

use neuroshard_proto::engine as pb;

/// The engine's health answer (the `gpu` check, status and metrics read it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineHealth {
    pub device: String,
    pub device_name: String,
    pub memory_used: u64,
    pub memory_total: u64,
    pub model_loaded: bool,
    pub attached: bool,
    pub step: u64,
    pub pid: u32,
    pub version: String,
    pub batch_size: u32,
    pub batch_waiting: u32,
    pub kv_bytes_used: u64,
    pub kv_bytes_budget: u64,
    pub max_batch: u32,
    pub stage_sessions: u32,
    pub stage_kv_bytes: u64,
}

impl From<pb::HealthReply> for EngineHealth {
    fn from(r: pb::HealthReply) -> Self {
        EngineHealth {
            device: r.device,
            device_name: r.device_name,
            memory_used: r.memory_used,
            memory_total: r.memory_total,
            model_loaded: r.model_loaded,
            attached: r.attached,
            step: r.step,
            pid: r.pid,
            version: r.version,
            batch_size: r.batch_size,
            batch_waiting: r.batch_waiting,
            kv_bytes_used: r.kv_bytes_used,
            kv_bytes_budget: r.kv_bytes_budget,
            max_batch: r.max_batch,
            stage_sessions: r.stage_sessions,
            stage_kv_bytes: r.stage_kv_bytes,
        }
    }
}

/// The training settings a loaded model trains with (all applied live by a reload).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub clip_norm: f32,
    pub batch_size: u32,
    pub seq_len: u32,
    pub data_path: String,
    /// Compute dtype: "auto", "f32" or "bf16" (`training.dtype`).
    pub dtype: String,
}

/// What LoadModel builds: a preset's layer range, from the seed, a checkpoint or the
/// checkpoints of other stages.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    pub preset: String,
    pub layers: Range<u32>,
    pub has_embedding: bool,
    pub has_head: bool,
    pub seed: u64,
    /// This node's own checkpoint to restore, if any.
    pub checkpoint: Option<PathBuf>,
    pub train: TrainSettings,
    pub node_id: String,
    /// Checkpoints of stages of the same model (path, expected model hash or empty): each held
    /// parameter comes from the first that has it.
    pub sources: Vec<(PathBuf, String)>,
}

impl From<&LoadSpec> for pb::LoadModelRequest {
    fn from(s: &LoadSpec) -> Self {
        pb::LoadModelRequest {
            model: Some(pb::ModelSpec {
                preset: s.preset.clone(),
                ..Default::default()
            }),
            layer_start: s.layers.start,
            layer_end: s.layers.end,
            has_embedding: s.has_embedding,
            has_head: s.has_head,
            seed: s.seed,
            checkpoint_path: s
                .checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            train: Some(pb::TrainSpec {
                learning_rate: s.train.learning_rate,
                weight_decay: s.train.weight_decay,
                clip_norm: s.train.clip_norm,
                batch_size: s.train.batch_size,
                seq_len: s.train.seq_len,
                data_path: s.train.data_path.clone(),
            }),
            node_id: s.node_id.clone(),
            dtype: s.train.dtype.clone(),
            sources: s
                .sources
                .iter()
                .map(|(p, h)| pb::WeightSource {
                    path: p.display().to_string(),
                    model_hash: h.clone(),
                })
                .collect(),
        }
    }
}

/// What a LoadModel produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub parameters: u64,
    pub model_hash: String,
    pub step: u64,
    /// The layers no source held: they start from the seed.
    pub seeded_layers: Vec<u32>,
    /// Engine version, device, instruction set and dtype: nodes of one class replay each
    /// other's training bit for bit.
    pub replay_class: String,
    /// The loaded training state's hash (`TrainStepped::state_hash`).
    pub state_hash: String,
}

impl From<pb::LoadModelReply> for Loaded {
    fn from(r: pb::LoadModelReply) -> Self {
        Loaded {
            parameters: r.parameters,
            model_hash: r.model_hash,
            step: r.step,
            seeded_layers: r.seeded_layers,
            replay_class: r.replay_class,
            state_hash: r.state_hash,
        }
    }
}

/// One local training step (every layer on this node).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStepped {
    pub loss: f32,
    pub step: u64,
    pub tokens: u64,
    pub grad_norm: f32,
    pub shard: u32,
    /// sha256 (hex) of the whole training state after the step, when asked for (a DiLoCo
    /// replica's per-step commitment); empty otherwise.
    pub state_hash: String,
}

/// Sampling of a generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
}

impl From<Sampling> for pb::SamplingParams {
    fn from(s: Sampling) -> Self {
        pb::SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: s.seed,
        }
    }
}

/// One generated token as the engine reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Token {
    pub token_id: u32,
    /// Position of the token in the completion (0 for the first).
    pub index: u32,
    /// Empty until the last token: `stop` or `length`.
    pub finish_reason: String,
    /// The token's text (may be empty inside a multi-byte character).
    pub text: String,
    /// Set on the first token: the prompt's length in tokens.
    pub prompt_tokens: u32,
    /// Microseconds the request waited for a place in the batch (first token only).
    pub queue_us: u64,
    /// A committed generation (`commit_top_k`): the prompt's ids on the first token.
    pub prompt_ids: Vec<u32>,
    /// A committed generation: the chunk's commitment on the last token of each chunk of 32
    /// and on the last token (values that are not bf16 bits make it malformed: `None`).
    pub commit: Option<neuroshard_shared::toploc::ChunkCommit>,
}

impl From<pb::GenerateReply> for Token {
    fn from(r: pb::GenerateReply) -> Self {
        let commit =
            (!r.commit_indices.is_empty()).then(|| neuroshard_shared::toploc::ChunkCommit {
                indices: r.commit_indices,
                values: r
                    .commit_values
                    .iter()
                    .map(|v| u16::try_from(*v).unwrap_or(0))
                    .collect(),
            });
        Token {
            token_id: r.token_id,
            index: r.index,
            finish_reason: r.finish_reason,
            text: r.text,
            prompt_tokens: r.prompt_tokens,
            queue_us: r.queue_us,
            prompt_ids: r.prompt_ids,
            commit,
        }
    }
}

/// A distributed-inference session started on this node's stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageStarted {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
    pub rows: u32,
}

/// A tensor handed to the engine: borrowed bytes, written into a slot by the handle.
#[derive(Debug, Clone, Copy)]
pub struct TensorIn<'a> {
    pub dtype: neuroshard_shared::shm::DType,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}
