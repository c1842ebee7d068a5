//! The state of DiLoCo rounds shared by the trainer (which runs them) and the peer service
//! (which receives contributions and serves the agreed weights), and the weights files the
//! engine exchanges with control.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use parking_lot::Mutex;

use super::aggregate::Aggregator;
use super::compress::Encoding;
use super::outer::OuterOpt;
use super::streaming::{Partition, StreamingError};
use super::validate::{Inbox, Layout, Reject, WireDelta};

/// Round settings, from `training.*` (`Config::diloco_settings`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Inner steps per round (H).
    pub steps: u32,
    pub aggregator: Aggregator,
    pub encoding: Encoding,
    /// Largest accepted norm of one pseudo-gradient.
    pub max_norm: f32,
    /// How long a replica waits for the others once its own delta is sent.
    pub timeout: Duration,
    pub outer: OuterOpt,
    /// 1 for an honest node; an adversary build's cheat may scale the sent pseudo-gradient.
    pub delta_scale: f32,
    /// Streaming DiLoCo's P: round r syncs fragment r mod P only (`streaming.rs`); 1 syncs
    /// the whole model every round.
    pub fragments: u32,
    /// Streaming DiLoCo's τ: inner steps between sending a round's pseudo-gradient and its
    /// outer step (0: the trainer waits for the round), and α, the local share the merge
    /// keeps then.
    pub overlap: u32,
    pub merge_alpha: f32,
}

/// Largest accepted norm of one pseudo-gradient until the trainer sets the configured one
/// (`training.diloco_max_norm`'s default).
pub const DEFAULT_MAX_NORM: f32 = 1000.0;

/// Where this replica stands: the round it is in and the weights that round started from.
#[derive(Debug, Default, Clone)]
pub struct RoundState {
    /// False until the trainer has read the loaded model's weights.
    pub initialized: bool,
    pub round: u64,
    /// Engine model hash of `theta_start`.
    pub start_hash: String,
    pub layout: Layout,
    /// Weights at the round's start, one vector per layout tensor.
    pub theta_start: Vec<Vec<f32>>,
    /// Outer Nesterov momentum, same shapes.
    pub momentum: Vec<Vec<f32>>,
    /// Inner steps done in this round.
    pub inner_step: u32,
    /// Streaming DiLoCo's P for full replicas (0 and 1: the whole model every round). With
    /// P > 1, `theta_start` is the global weights θ_g (each fragment as of its last outer
    /// step) and `start_hash` their content hash (`stage::content_hash`), not the engine's.
    pub fragments: u32,
    /// Streaming DiLoCo's overlap τ (full replicas; 0: none).
    pub overlap: u32,
}

impl RoundState {
    /// Streaming DiLoCo (fragments or overlap): the engine's weights are not θ_g, so the
    /// agreed hash is θ_g's content hash and rounds are not replayed (`verify.rs`).
    pub fn streaming(&self) -> bool {
        self.fragments > 1 || self.overlap > 0
    }

    /// The layout indices of the tensors round `round` syncs: fragment `round mod P` of
    /// `streaming::Partition`, every tensor with one fragment.
    pub fn fragment(&self, round: u64) -> Result<Vec<usize>, StreamingError> {
        let p = self.fragments.max(1);
        if p == 1 {
            return Ok((0..self.layout.tensors.len()).collect());
        }
        let names: Vec<&str> = self
            .layout
            .tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        let partition = Partition::new(&names, p)?;
        Ok(partition.tensors((round % u64::from(p)) as u32))
    }

    /// The part of the layout round `round` exchanges (`fragment`).
    pub fn fragment_layout(&self, round: u64) -> Result<Layout, StreamingError> {
        Ok(Layout::new(
            self.fragment(round)?
                .into_iter()
                .map(|i| self.layout.tensors[i].clone())
                .collect(),
        ))
    }
}

/// Weight of the latest value in the loss EMAs (the notes' alpha).
pub const LOSS_EMA_ALPHA: f64 = 0.1;

/// What a replica reported with its pseudo-gradients: the mean loss of its inner steps.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PeerLoss {
    /// The latest round it reported, and its loss there.
    pub round: u64,
    pub loss: f32,
    /// EMA (alpha 0.1) over the rounds it reported.
    pub ema: f64,
    pub reports: u64,
}

impl PeerLoss {
    pub fn record(&mut self, round: u64, loss: f32) {
        if self.reports > 0 && round <= self.round {
            return;
        }
        self.ema = if self.reports == 0 {
            f64::from(loss)
        } else {
            LOSS_EMA_ALPHA * f64::from(loss) + (1.0 - LOSS_EMA_ALPHA) * self.ema
        };
        self.round = round;
        self.loss = loss;
        self.reports += 1;
    }
}

/// Figures for the API and the logs.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub outer_steps: u64,
    pub syncs_ok: u64,
    pub syncs_failed: u64,
    pub catch_ups: u64,
    pub bytes_sent_last_round: u64,
    pub bytes_sent_total: u64,
    /// The most bytes one round sent (Streaming DiLoCo's fragments lower it by about P).
    pub bytes_sent_max_round: u64,
    /// Senders averaged in the last round (this node included).
    pub last_contributors: usize,
    /// Contributions the aggregator set aside (see `Aggregated::outvoted`), in all rounds,
    /// and the senders of those set aside in the last round.
    pub outvoted_total: u64,
    pub last_outvoted: Vec<String>,
    /// Contributions set aside, by sender.
    pub outvoted_by: std::collections::BTreeMap<String, u64>,
    /// Rounds with replicas around that had too few contributions to outvote a bad one, so
    /// this node stepped with its own delta only.
    pub rounds_alone: u64,
    /// At the last round boundary: replicas (this node included) in this node's state,
    /// and all replicas with a known state.
    pub agreeing: usize,
    pub replicas: usize,
    /// The connected replicas' (node id, round, start hash) when this node last looked
    /// (every inner step and round boundary).
    pub replica_states: Vec<(String, u64, String)>,
    /// Losses the replicas reported with their contributions, by node id.
    pub peer_losses: std::collections::BTreeMap<String, PeerLoss>,
    /// Mean inner loss of each round this node finished, oldest first (at most 1000).
    pub round_losses: Vec<f32>,
}

/// Shared between the trainer and the peer service.
#[derive(Debug)]
pub struct Diloco {
    pub state: Mutex<RoundState>,
    pub inbox: Mutex<Inbox>,
    pub figures: Mutex<Figures>,
    /// Norm bound applied to received deltas (set by the trainer from the config).
    pub max_norm: Mutex<f32>,
    /// Int8 error feedback: what quantization lost last round, per tensor.
    pub residuals: Mutex<Vec<Vec<f32>>>,
    /// Wakes a trainer waiting for contributions.
    pub arrived: tokio::sync::Notify,
    /// Receipts of aggregated contributions waiting to answer their sender's next push, by
    /// sender id (one per replica: a newer one replaces the older, it counts more steps).
    pub receipts: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Sampled recomputation of the replicas' contributions (issue #19).
    pub verifier: std::sync::Arc<super::verify::Verifier>,
}

impl Default for Diloco {
    fn default() -> Self {
        Diloco {
            state: Mutex::default(),
            inbox: Mutex::default(),
            figures: Mutex::default(),
            max_norm: Mutex::new(DEFAULT_MAX_NORM),
            residuals: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
            receipts: Mutex::default(),
            verifier: std::sync::Arc::default(),
        }
    }
}

impl Diloco {
    /// The round and starting hash peers see in our node info.
    pub fn advertised(&self) -> (u64, String) {
        let s = self.state.lock();
        match s.initialized {
            true => (s.round, s.start_hash.clone()),
            false => (0, String::new()),
        }
    }

    /// Checks a peer's delta and keeps it; refusals are counted in the inbox.
    pub fn receive(&self, msg: &WireDelta) -> Result<(), Reject> {
        let max_norm = *self.max_norm.lock();
        let state = self.state.lock();
        let mut inbox = self.inbox.lock();
        if !state.initialized {
            *inbox.rejected.entry(Reject::NotReady).or_default() += 1;
            return Err(Reject::NotReady);
        }
        // With fragments a contribution holds the tensors of its round's fragment only.
        let fragment;
        let layout = if state.fragments <= 1 {
            &state.layout
        } else {
            match state.fragment_layout(msg.round) {
                Ok(l) => {
                    fragment = l;
                    &fragment
                }
                Err(_) => {
                    *inbox.rejected.entry(Reject::WrongShape).or_default() += 1;
                    return Err(Reject::WrongShape);
                }
            }
        };
        let result = inbox.offer(msg, layout, state.round, max_norm);
        drop(inbox);
        drop(state);
        if result.is_ok() {
            self.arrived.notify_waiters();
        }
        result
    }

    /// The round's starting weights and momentum as one safetensors file (for GetWeights).
    pub fn snapshot(&self) -> Option<(u64, String, Vec<u8>)> {
        let s = self.state.lock();
        if !s.initialized {
            return None;
        }
        let bytes = encode_weights(&s.layout, &s.theta_start, Some(&s.momentum)).ok()?;
        Some((s.round, s.start_hash.clone(), bytes))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights file {path}: {message}")]
    File { path: String, message: String },
    #[error("weights: {0}")]
    Format(String),
}

/// Named f32 tensors as read from a safetensors file, sorted by name.
pub type Tensors = Vec<(String, Vec<u64>, Vec<f32>)>;

/// Reads every f32 tensor of a safetensors buffer, sorted by name.
pub fn decode_weights(bytes: &[u8]) -> Result<Tensors, WeightsError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| WeightsError::Format(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(WeightsError::Format(format!(
                "tensor {name} is {:?}, f32 expected",
                view.dtype()
            )));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        out.push((name, shape, values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A safetensors buffer of `tensors` (layout order) and, when given, the momentum under
/// names prefixed `momentum.`.
pub fn encode_weights(
    layout: &Layout,
    tensors: &[Vec<f32>],
    momentum: Option<&[Vec<f32>]>,
) -> Result<Vec<u8>, WeightsError> {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, ((name, shape), t)) in layout.tensors.iter().zip(tensors).enumerate() {
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        named.push((name.clone(), shape.clone(), bytes(t)));
        if let Some(mt) = momentum.and_then(|m| m.get(i)) {
            named.push((format!("momentum.{name}"), shape, bytes(mt)));
        }
    }
    let views = named
        .iter()
        .map(|(n, s, d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WeightsError::Format(e.to_string()))?;
    safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| WeightsError::Format(e.to_string()))
}

pub fn read_weights_file(path: &Path) -> Result<Tensors, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    decode_weights(&bytes)
}

/// Writes atomically so the engine never reads half a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    let err = |e: std::io::Error| WeightsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    neuroshard_shared::fsx::write_atomic(path, bytes, None).map_err(err)
}

/// A round's starting weights and outer momentum, one vector per layout tensor each.
pub type Snapshot = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Splits a snapshot (weights + `momentum.*`) into layout-ordered weights and momentum,
/// checking it against `layout`.
pub fn split_snapshot(layout: &Layout, tensors: Tensors) -> Result<Snapshot, WeightsError> {
    let mut by_name: HashMap<String, (Vec<u64>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, v)| (n, (s, v))).collect();
    let mut theta = Vec::new();
    let mut momentum = Vec::new();
    for (name, shape) in &layout.tensors {
        for (key, out) in [
            (name.clone(), &mut theta),
            (format!("momentum.{name}"), &mut momentum),
        ] {
            let (s, v) = by_name
                .remove(&key)
                .ok_or_else(|| WeightsError::Format(format!("tensor {key} missing")))?;
            if &s != shape || Some(v.len()) != Layout::numel(shape) {
                return Err(WeightsError::Format(format!(
                    "tensor {key} has shape {s:?}"
                )));
            }
            out.push(v);
        }
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(WeightsError::Format(format!("unexpected tensor {extra}")));
    }
    Ok((theta, momentum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_loss_ema_counts_each_round_once() {
        let mut p = PeerLoss::default();
        p.record(3, 5.0);
        assert_eq!(p.ema, 5.0);
        p.record(4, 4.0);
        assert!((p.ema - 4.9).abs() < 1e-9);
        // The same or an older round again changes nothing.
        p.record(4, 1.0);
        p.record(2, 1.0);
        assert!((p.ema - 4.9).abs() < 1e-9);
        assert_eq!((p.round, p.loss, p.reports), (4, 4.0, 2));
    }

    #[test]
    fn snapshot_round_trips_through_safetensors() {
        let layout = Layout::new(vec![("w".into(), vec![2, 2]), ("b".into(), vec![3])]);
        let theta = vec![vec![1.0, 2.0, 3.0], vec![0.5; 4]];
        let mom = vec![vec![-1.0; 3], vec![0.25; 4]];
        let bytes = encode_weights(&layout, &theta, Some(&mom)).unwrap();
        let (t, m) = split_snapshot(&layout, decode_weights(&bytes).unwrap()).unwrap();
        assert_eq!(t, theta);
        assert_eq!(m, mom);
        // Weights only: the momentum is missing, which a snapshot must not be.
        let bytes = encode_weights(&layout, &theta, None).unwrap();
        assert_eq!(decode_weights(&bytes).unwrap().len(), 2);
        assert!(split_snapshot(&layout, decode_weights(&bytes).unwrap()).is_err());
        assert!(decode_weights(b"garbage").is_err());
    }

    #[test]
    fn deltas_are_refused_until_the_state_is_known() {
        let d = Diloco::default();
        let msg = WireDelta {
            sender: "0xa".into(),
            round: 0,
            model_hash: "h".into(),
            loss: 1.0,
            batches: 1,
            encoding: Some(Encoding::Bf16),
            tensors: vec![],
        };
        assert_eq!(d.receive(&msg), Err(Reject::NotReady));
        assert_eq!(d.inbox.lock().rejected[&Reject::NotReady], 1);
    }
}
