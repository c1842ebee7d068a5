//! The daemon's configuration: defaults, then `neuroshard.toml`, then environment and flags.
//!
//! One `Config`, validated once at start-up and passed down explicitly. The file is written
//! atomically (temp file + rename) so a crash never leaves half a config behind. The values
//! that are names (host, device, model) are parsed into types as the config is read
//! (`types.rs`); the running node reads the live config through a `watch` (`live.rs`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::engine::EngineMode;

mod adversary;
mod keys;
mod ledger;
mod live;
mod node;
mod peer;
mod tls;
mod tree;
mod types;

pub use adversary::{AdversaryConfig, Cheat};
pub use keys::{needs_restart, redact_url};
pub use ledger::LedgerConfig;
pub use live::{ConfigSender, LiveConfig};
pub use node::NodeConfig;
pub use peer::PeerConfig;
pub use tls::{TlsConfig, parse_fingerprint};
use tree::{lookup_mut, merge, parse_like};
use types::Refusal;
pub use types::{Device, Host, ModelPreset, PipeWire, TrainDtype};

pub const CONFIG_FILE: &str = "neuroshard.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing config {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown configuration key {0:?}")]
    UnknownKey(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// REST API port; the peer gRPC service listens on port + 1000.
    pub port: u16,
    /// Address the REST API binds. The peer service always binds all interfaces.
    #[schema(value_type = String)]
    pub host: Host,
    /// Tracker URL for discovery (http:// or https://); empty means none.
    pub tracker_url: String,
    /// SHA-256 fingerprint of an https tracker's certificate: only it is accepted (empty:
    /// the system's roots verify the tracker).
    pub tracker_fingerprint: String,
    /// `host:port` peer addresses to start from.
    pub seed_peers: Vec<String>,
    /// Ledger database; empty means SQLite in the data directory.
    pub database_url: String,
    pub engine: EngineConfig,
    pub training: TrainingConfig,
    pub resources: ResourcesConfig,
    pub api: ApiConfig,
    pub peer: PeerConfig,
    pub ledger: LedgerConfig,
    pub node: NodeConfig,
    pub tls: TlsConfig,
    pub inference: InferenceConfig,
    /// Tests of checked work only (`adversary` feature).
    pub adversary: AdversaryConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// Decode weights of generation: `f32` as trained, or `int8` (a copy quantized per
    /// output channel, decoded with int8 dot products; CPU only; re-quantized after the
    /// weights change). Training always uses f32.
    pub weights: String,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            weights: "f32".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Requests per minute allowed to one API token (bursts up to this many at once).
    pub rate_limit_per_token: u32,
    /// Requests per minute allowed to one client address without a token.
    pub rate_limit_per_ip: u32,
    /// Largest request body accepted, in KiB.
    pub max_body_kb: u32,
    /// Most connections one client address may hold open at once (more are refused at
    /// accept). Applies to the REST port and the tracker.
    pub max_connections_per_address: u32,
    /// Most connections open at once from other machines (loopback clients are not counted);
    /// lowered at start when the descriptor limit leaves less room.
    pub max_connections: u32,
    /// Seconds a connection may take to send a complete request head; also how long an idle
    /// keep-alive connection stays open.
    pub header_timeout_secs: u32,
    /// Seconds a request body may take to arrive.
    pub body_timeout_secs: u32,
    /// New connections one client address may open per second (bursts of 4 s worth); more
    /// are refused at accept. 127.0.0.1 and ::1 are exempt. Also the tracker's default.
    pub connection_rate_per_address: u32,
}

impl ApiConfig {
    /// The connection limits of the REST port; `total_cap` is the remote-connection cap after
    /// the descriptor limit (see [`neuroshard_net::admission::total_cap`]).
    pub fn limits(&self, total_cap: usize) -> crate::listen::Limits {
        crate::listen::Limits {
            per_address: self.max_connections_per_address as usize,
            total: total_cap,
            header_timeout: std::time::Duration::from_secs(u64::from(self.header_timeout_secs)),
            body_timeout: std::time::Duration::from_secs(u64::from(self.body_timeout_secs)),
            new_per_second: self.connection_rate_per_address,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            rate_limit_per_token: 600,
            rate_limit_per_ip: 300,
            max_body_kb: 64,
            max_connections_per_address: 256,
            max_connections: 4096,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            connection_rate_per_address: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `spawn`: the daemon starts and supervises the engine. `external`: a service manager
    /// runs it and the daemon connects to `socket`.
    pub mode: EngineMode,
    /// Engine command socket; empty means `<data_dir>/engine.sock`.
    pub socket: String,
    /// Engine binary; empty means `neuroshard-engine` next to the daemon binary.
    pub binary: String,
    /// Shared-memory slots and bytes per slot.
    pub shm_slots: u32,
    pub shm_slot_mb: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    pub enabled: bool,
    /// Model preset: tiny, default, bench, gpt2-small.
    #[schema(value_type = String)]
    pub model: ModelPreset,
    pub batch_size: u32,
    pub seq_len: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub clip_norm: f64,
    pub diloco_steps: u32,
    /// How the replicas' pseudo-gradients are combined each round (default trimmed mean).
    pub aggregator: crate::diloco::aggregate::AggregatorKind,
    /// Share trimmed on each side by the trimmed mean (at least one value once three remain).
    pub aggregator_trim: f64,
    /// Byzantine replicas Krum and Multi-Krum tolerate.
    pub aggregator_byzantine: u32,
    /// Wire encoding of pseudo-gradients: bf16, int8 or topk (both with error feedback), f32.
    #[schema(value_type = String)]
    pub diloco_encoding: crate::diloco::compress::Encoding,
    /// topk: share of each chunk's values sent (the largest in magnitude), in (0, 1].
    pub diloco_topk_ratio: f64,
    /// topk: bits per sent value (sign and magnitude level), 2 to 8.
    pub diloco_topk_bits: u32,
    /// Pseudo-gradients with a larger total norm are refused.
    pub diloco_max_norm: f64,
    /// Seconds a replica waits for the others' pseudo-gradients once its own is sent.
    pub diloco_round_timeout_secs: u32,
    /// Streaming DiLoCo: fragments of the model synced at staggered times, one per round
    /// (`diloco/streaming.rs`); 1 syncs the whole model every round.
    pub diloco_fragments: u32,
    /// Streaming DiLoCo: inner steps the trainer takes between sending a round's
    /// pseudo-gradient and its outer step (the exchange overlaps them); 0: it waits.
    pub diloco_overlap_steps: u32,
    /// Streaming DiLoCo with overlap: the share of its local weights a synced fragment keeps
    /// (α·local + (1 − α)·global), in [0, 1].
    pub diloco_merge_alpha: f64,
    /// Length of a DiLoCo round among the holders of a pipeline stage, in seconds of the
    /// clock (every stage's rounds start together: `diloco/stage.rs`).
    pub stage_round_secs: u32,
    /// Outer Nesterov step (lr 0.7, momentum 0.8: the winners of the sweep at H = 500,
    /// BENCHMARKS.md "DiLoCo settings from a sweep"; the DiLoCo paper used 0.7 and 0.9).
    pub outer_lr: f64,
    pub outer_momentum: f64,
    /// Text files, a directory or a Genesis manifest; empty means the built-in corpus.
    pub data_path: String,
    /// Model seed: every node with the same seed builds identical initial weights.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u32,
    /// Pipeline training: micro-batches per batch (GPipe); the batch is split into this many
    /// equal parts (the largest divisor of the batch size not above it).
    pub micro_batches: u32,
    /// Stop training after this many optimizer steps (0: never).
    pub max_steps: u64,
    /// Pipeline training: seconds a stage may take to answer before the step fails.
    pub pipeline_timeout_secs: u32,
    /// Pipeline training: activations and gradients between stages in bf16 or f32.
    #[schema(value_type = String)]
    pub pipeline_wire: PipeWire,
    /// Compute dtype: auto (bf16 where the device has native bf16 arithmetic), f32, bf16.
    #[schema(value_type = String)]
    pub dtype: TrainDtype,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ResourcesConfig {
    /// auto, cpu or cuda.
    #[schema(value_type = String)]
    pub device: Device,
    pub max_memory_gb: f64,
    /// Compute threads for the engine; 0 means all cores.
    pub cpu_threads: u32,
    /// Free disk below which the storage check fails.
    pub min_free_disk_mb: u64,
    /// Transformer layers this node may hold (dynamic layer pool); 0: as many as
    /// `max_memory_gb` allows. Covering the whole model makes the node a full replica.
    pub max_layers: u32,
    /// Most MB the checkpoints folder may take: older checkpoints are removed first, never
    /// the latest; 0: no bound.
    pub max_storage_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: 8000,
            host: Host::default(),
            tracker_url: String::new(),
            tracker_fingerprint: String::new(),
            seed_peers: Vec::new(),
            database_url: String::new(),
            engine: EngineConfig::default(),
            training: TrainingConfig::default(),
            resources: ResourcesConfig::default(),
            api: ApiConfig::default(),
            peer: PeerConfig::default(),
            ledger: LedgerConfig::default(),
            node: NodeConfig::default(),
            tls: TlsConfig::default(),
            inference: InferenceConfig::default(),
            adversary: AdversaryConfig::default(),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: EngineMode::Spawn,
            socket: String::new(),
            binary: String::new(),
            shm_slots: 8,
            shm_slot_mb: 16,
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            enabled: true,
            model: ModelPreset::default(),
            batch_size: 8,
            seq_len: 128,
            learning_rate: 1e-3,
            weight_decay: 0.01,
            clip_norm: 1.0,
            diloco_steps: 500,
            aggregator: Default::default(),
            aggregator_trim: 0.1,
            aggregator_byzantine: 1,
            diloco_encoding: Default::default(),
            diloco_topk_ratio: 0.01,
            diloco_topk_bits: 2,
            diloco_max_norm: f64::from(crate::diloco::round::DEFAULT_MAX_NORM),
            diloco_round_timeout_secs: 60,
            diloco_fragments: 1,
            diloco_overlap_steps: 0,
            diloco_merge_alpha: 0.5,
            stage_round_secs: 600,
            outer_lr: 0.7,
            outer_momentum: 0.8,
            data_path: String::new(),
            seed: 42,
            checkpoint_every: 50,
            micro_batches: 4,
            max_steps: 0,
            pipeline_timeout_secs: 30,
            pipeline_wire: PipeWire::default(),
            dtype: TrainDtype::Auto,
        }
    }
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig {
            device: Device::default(),
            max_memory_gb: 8.0,
            cpu_threads: 0,
            min_free_disk_mb: 100,
            max_layers: 0,
            max_storage_mb: 0,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let cfg: Config = match toml::from_str(&text) {
            Ok(cfg) => cfg,
            Err(e) => {
                // A bad host, device or model is refused as validation refuses it, unless
                // the file has some other value of the wrong type as well.
                let tree = toml::from_str::<toml::Table>(&text)
                    .ok()
                    .and_then(|t| serde_json::to_value(t).ok());
                if let Some(Refusal::Typed(bad)) = tree.and_then(types::refusal) {
                    return Err(bad);
                }
                return Err(ConfigError::Parse {
                    path: path.into(),
                    message: e.to_string(),
                });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config atomically: a temp file in the same directory, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            key: "<config>".into(),
            message: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.into(),
            source,
        })
    }

    pub fn grpc_port(&self) -> u16 {
        self.port.saturating_add(1000)
    }

    fn check_port(&self) -> Result<(), ConfigError> {
        if self.port > 64535 {
            return Err(ConfigError::Invalid {
                key: "port".into(),
                message: format!(
                    "{} leaves no room for the peer port (port + 1000)",
                    self.port
                ),
            });
        }
        Ok(())
    }

    /// Parses `text` as the value of a typed key (host, device, model); when it does not
    /// parse, a bad port is reported first, as validation does.
    pub fn parse_value<T: FromStr<Err = ConfigError>>(&self, text: &str) -> Result<T, ConfigError> {
        text.parse().or_else(|e| {
            self.check_port()?;
            Err(e)
        })
    }

    /// Checks the values types do not already guarantee (host, device and model are parsed
    /// into theirs when read), in a fixed order: the first bad one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message,
            })
        };
        self.check_port()?;
        self.adversary.validate()?;
        let t = &self.training;
        if !(1..=1024).contains(&t.batch_size) {
            return bad(
                "training.batch_size",
                format!("{} is not in 1..=1024", t.batch_size),
            );
        }
        if !(2..=8192).contains(&t.seq_len) {
            return bad(
                "training.seq_len",
                format!("{} is not in 2..=8192", t.seq_len),
            );
        }
        if !(t.learning_rate > 0.0 && t.learning_rate <= 1.0) {
            return bad(
                "training.learning_rate",
                format!("{} is not in (0, 1]", t.learning_rate),
            );
        }
        if !(0.0..=1.0).contains(&t.weight_decay) {
            return bad(
                "training.weight_decay",
                format!("{} is not in [0, 1]", t.weight_decay),
            );
        }
        if !(t.clip_norm > 0.0 && t.clip_norm.is_finite()) {
            return bad(
                "training.clip_norm",
                format!("{} must be positive", t.clip_norm),
            );
        }
        if t.diloco_steps == 0 {
            return bad("training.diloco_steps", "must be at least 1".into());
        }
        if let Err((key, message)) = crate::diloco::streaming::check_config(
            t.diloco_steps,
            t.model.config().layers,
            t.diloco_fragments,
            t.diloco_overlap_steps,
            t.diloco_merge_alpha,
        ) {
            return bad(key, message);
        }
        if !(0.0..0.5).contains(&t.aggregator_trim) {
            return bad(
                "training.aggregator_trim",
                format!("{} is not in [0, 0.5)", t.aggregator_trim),
            );
        }
        if let Err(e) = crate::diloco::sparse::TopK::new(t.diloco_topk_ratio, t.diloco_topk_bits) {
            let key = match e {
                crate::diloco::sparse::TopKError::Ratio(_) => "training.diloco_topk_ratio",
                crate::diloco::sparse::TopKError::Bits(_) => "training.diloco_topk_bits",
            };
            return bad(key, e.to_string());
        }
        if !(t.diloco_max_norm > 0.0 && t.diloco_max_norm.is_finite()) {
            return bad("training.diloco_max_norm", "must be positive".into());
        }
        if t.diloco_round_timeout_secs == 0 {
            return bad(
                "training.diloco_round_timeout_secs",
                "must be at least 1".into(),
            );
        }
        if t.stage_round_secs < 2 {
            return bad("training.stage_round_secs", "must be at least 2".into());
        }
        if !(t.outer_lr > 0.0 && t.outer_lr <= 10.0) {
            return bad(
                "training.outer_lr",
                format!("{} is not in (0, 10]", t.outer_lr),
            );
        }
        if !(0.0..1.0).contains(&t.outer_momentum) {
            return bad(
                "training.outer_momentum",
                format!("{} is not in [0, 1)", t.outer_momentum),
            );
        }
        if !(1..=8).contains(&t.micro_batches) {
            return bad("training.micro_batches", "must be 1..=8".into());
        }
        if !(1..=600).contains(&t.pipeline_timeout_secs) {
            return bad("training.pipeline_timeout_secs", "must be 1..=600".into());
        }
        if t.checkpoint_every == 0 {
            return bad("training.checkpoint_every", "must be at least 1".into());
        }
        if !(self.resources.max_memory_gb > 0.0 && self.resources.max_memory_gb.is_finite()) {
            return bad("resources.max_memory_gb", "must be positive".into());
        }
        if !matches!(self.inference.weights.as_str(), "f32" | "int8") {
            return bad(
                "inference.weights",
                format!("{:?} is not f32 or int8", self.inference.weights),
            );
        }
        if self.inference.weights == "int8" && self.resources.device == Device::Cuda {
            return bad(
                "inference.weights",
                "int8 decode has CPU kernels only; use f32 with device cuda".into(),
            );
        }
        if self.resources.cpu_threads > 1024 {
            return bad(
                "resources.cpu_threads",
                format!("{} is too many", self.resources.cpu_threads),
            );
        }
        if !(1..=256).contains(&self.engine.shm_slots)
            || !(1..=4096).contains(&self.engine.shm_slot_mb)
        {
            return bad(
                "engine.shm_slots",
                "slots must be 1..=256 and slot size 1..=4096 MB".into(),
            );
        }
        let a = &self.api;
        for (key, v) in [
            ("api.rate_limit_per_token", a.rate_limit_per_token),
            ("api.rate_limit_per_ip", a.rate_limit_per_ip),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return bad(
                    key,
                    format!("{v} is not in 1..=1000000 requests per minute"),
                );
            }
        }
        if !(1..=65_536).contains(&a.max_body_kb) {
            return bad(
                "api.max_body_kb",
                format!("{} is not in 1..=65536 KiB", a.max_body_kb),
            );
        }
        for (key, v, max) in [
            (
                "api.max_connections_per_address",
                a.max_connections_per_address,
                1_000_000,
            ),
            ("api.max_connections", a.max_connections, 1_000_000),
            ("api.header_timeout_secs", a.header_timeout_secs, 3600),
            ("api.body_timeout_secs", a.body_timeout_secs, 3600),
            (
                "api.connection_rate_per_address",
                a.connection_rate_per_address,
                1_000_000,
            ),
            (
                "peer.max_connections_per_address",
                self.peer.max_connections_per_address,
                1_000_000,
            ),
            ("peer.max_connections", self.peer.max_connections, 1_000_000),
            (
                "peer.connection_rate_per_address",
                self.peer.connection_rate_per_address,
                1_000_000,
            ),
            ("peer.max_peers", self.peer.max_peers, 100_000),
        ] {
            if !(1..=max).contains(&v) {
                return bad(key, format!("{v} is not in 1..={max}"));
            }
        }
        self.ledger.rules(self.training.model.config().layers)?;
        tls::validate(self)?;
        for peer in &self.seed_peers {
            if peer
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad("seed_peers", format!("{peer:?} is not host:port"));
            }
        }
        self.node.validate()
    }

    /// The config as a JSON tree (for `config show` and the REST API).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Sets the dotted `key` (e.g. `training.batch_size`) from a string as typed on a
    /// command line; the result is validated. Returns the updated config.
    pub fn with_key(&self, key: &str, raw: &str) -> Result<Config, ConfigError> {
        let mut tree = self.to_json();
        let slot = lookup_mut(&mut tree, key).ok_or_else(|| ConfigError::UnknownKey(key.into()))?;
        *slot = parse_like(slot, raw).map_err(|message| ConfigError::Invalid {
            key: key.into(),
            message,
        })?;
        self.config_from_tree(tree, key)
    }

    /// Applies a partial JSON object; returns the new config and the dotted keys changed.
    pub fn merged(&self, patch: &serde_json::Value) -> Result<(Config, Vec<String>), ConfigError> {
        let mut tree = self.to_json();
        let mut changed = Vec::new();
        merge(&mut tree, patch, "", &mut changed)?;
        let cfg = self.config_from_tree(
            tree,
            changed.first().map(String::as_str).unwrap_or("<patch>"),
        )?;
        Ok((cfg, changed))
    }

    fn config_from_tree(&self, tree: serde_json::Value, key: &str) -> Result<Config, ConfigError> {
        let cfg: Config = match serde_json::from_value(tree.clone()) {
            Ok(cfg) => cfg,
            Err(e) => {
                let invalid = |e: serde_json::Error| ConfigError::Invalid {
                    key: key.into(),
                    message: e.to_string(),
                };
                return Err(match types::refusal(tree) {
                    Some(Refusal::Typed(bad)) => bad,
                    Some(Refusal::Type(other)) => invalid(other),
                    None => invalid(e),
                });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Writes `bytes` to `path` atomically (same-directory temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// As [`write_atomic`], the file created with `mode` (0o600 for secrets) from the start.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    neuroshard_shared::fsx::write_atomic(path, bytes, Some(mode))
}

impl Config {
    /// The DiLoCo round settings these `training.*` keys make.
    pub fn diloco_settings(&self) -> crate::diloco::round::Settings {
        use crate::diloco::aggregate::Aggregator;
        let t = &self.training;
        let mut aggregator = Aggregator::new(t.aggregator);
        aggregator.trim = t.aggregator_trim as f32;
        aggregator.byzantine = t.aggregator_byzantine as usize;
        crate::diloco::round::Settings {
            steps: t.diloco_steps,
            aggregator,
            encoding: t.diloco_encoding.with_topk(
                crate::diloco::sparse::TopK::new(t.diloco_topk_ratio, t.diloco_topk_bits)
                    .unwrap_or_default(),
            ),
            max_norm: t.diloco_max_norm as f32,
            timeout: std::time::Duration::from_secs(u64::from(t.diloco_round_timeout_secs)),
            fragments: t.diloco_fragments,
            overlap: t.diloco_overlap_steps,
            merge_alpha: t.diloco_merge_alpha as f32,
            outer: crate::diloco::outer::OuterOpt {
                lr: t.outer_lr as f32,
                momentum: t.outer_momentum as f32,
            },
            delta_scale: if cfg!(feature = "adversary") {
                self.adversary.delta_scale()
            } else {
                1.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let mut cfg = Config::default();
        cfg.training.batch_size = 3;
        cfg.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), cfg);
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "port = \"eighty\"").unwrap();
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "nonsense = 1").unwrap();
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::Parse { .. })
        ));
        let cfg = Config::default();
        assert!(matches!(
            cfg.with_key("training.batch_size", "0"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            cfg.with_key("training.batch_size", "x"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            cfg.with_key("nope", "1"),
            Err(ConfigError::UnknownKey(_))
        ));
        assert_eq!(
            cfg.with_key("training.batch_size", "16")
                .unwrap()
                .training
                .batch_size,
            16
        );
        assert_eq!(
            cfg.with_key("host", "0.0.0.0").unwrap().host.as_str(),
            "0.0.0.0"
        );
    }

    #[test]
    fn merge_reports_changed_keys_and_refuses_wrong_types() {
        let cfg = Config::default();
        let (new, changed) = cfg
            .merged(&serde_json::json!({"training": {"batch_size": 16, "enabled": true}}))
            .unwrap();
        assert_eq!(changed, vec!["training.batch_size"]);
        assert_eq!(new.training.batch_size, 16);
        assert!(
            cfg.merged(&serde_json::json!({"training": {"batch_size": "16"}}))
                .is_err()
        );
        assert!(
            cfg.merged(&serde_json::json!({"training": {"bogus": 1}}))
                .is_err()
        );
        assert!(
            cfg.merged(&serde_json::json!({"training": {"batch_size": -1}}))
                .is_err()
        );
        assert!(cfg.merged(&serde_json::json!([1])).is_err());
    }
}
