//! Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping
//! communication", arXiv 2501.18512): the model is split into P fragments that are synced at
//! staggered times, and a fragment's exchange overlaps with the next τ inner steps.
//!
//! * **Fragments** ([`Partition`]): layers are interleaved, fragment p = layers {p, p+P, ...}
//!   (a fragment's layers are spread over the depth, as in the paper); the embedding goes
//!   with fragment 0 and the final norm and LM head with fragment P−1, so the two large
//!   tables sit in different fragments once P ≥ 2.
//! * **Schedule** ([`Schedule`]): every fragment syncs every H inner steps; fragment p sends
//!   after the inner steps s ≡ ⌊(p+1)·H/P⌋ (mod H), s ≥ 1, so fragment P−1 syncs at H, 2H, ...
//!   as plain DiLoCo does, and the others one P-th of H apart before it. Over R·H steps each
//!   fragment syncs R times: the total bytes are plain DiLoCo's, the peak per sync 1/P of them.
//! * **Per fragment**: the global weights θ_g (the agreed state, which a fragment's outer step
//!   moves), the outer Nesterov momentum and this replica's error-feedback residual live per
//!   tensor, and only the fragment's own sync touches its tensors. Its pseudo-gradient is
//!   Δ_p = θ_g,p − θ_local,p (θ_g,p from its last sync: the paper's outer gradient).
//! * **Delayed merge**: the aggregate of a fragment sent after step s is applied after step
//!   s + τ: the outer step θ_g,p ← OuterOpt(θ_g,p, Δ̄_p), then the local fragment is merged,
//!   θ_local,p ← α·θ_local,p + (1−α)·θ_g,p (the paper's α = 0.5), keeping part of the τ
//!   steps' progress. With τ = 0 there is no such progress and the fragment takes θ_g,p
//!   (α is not applied), so P = 1, τ = 0 is plain DiLoCo, bit for bit.
//!
//! Every step is element by element in layout order from the same inputs, so replicas that
//! aggregate the same contributions hold the same θ_g and momentum bits.

use super::compress::{self, DecodeError, Encoding};
use super::outer::OuterOpt;

/// The streaming settings (`fragments` 1 and `overlap` 0: plain DiLoCo).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// P: fragments of the model synced at staggered times.
    pub fragments: u32,
    /// τ: inner steps between a fragment's send and the merge of its aggregate.
    pub overlap: u32,
    /// α: the local share kept by the merge (applied when τ > 0).
    pub alpha: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fragments: 1,
            overlap: 0,
            alpha: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StreamingError {
    #[error("fragments must be at least 1 and at most H = {h}, got {fragments}")]
    Fragments { fragments: u32, h: u32 },
    #[error("overlap must be below H = {h} inner steps, got {overlap}")]
    Overlap { overlap: u32, h: u32 },
    #[error("alpha must lie in [0, 1], got {0}")]
    Alpha(f32),
    #[error("tensor {0:?} is neither a layer's, the embedding, the final norm nor the LM head")]
    Tensor(String),
    #[error("fragment {fragment} of {fragments} holds no tensor (more fragments than layers?)")]
    EmptyFragment { fragment: u32, fragments: u32 },
    #[error("fragment {fragment}: {message}")]
    Shape { fragment: u32, message: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Which fragment each tensor belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    fragments: u32,
    of_tensor: Vec<u32>,
}

/// The layer index of a `model.layers.{i}.*` tensor name.
fn layer_of(name: &str) -> Option<u32> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

impl Partition {
    /// Assigns the tensors `names` (in the caller's order) to `fragments` fragments: layer i
    /// to i mod P, the embedding to 0, the final norm and the LM head to P−1. Every fragment
    /// must hold at least one tensor.
    pub fn new<S: AsRef<str>>(names: &[S], fragments: u32) -> Result<Partition, StreamingError> {
        if fragments == 0 {
            return Err(StreamingError::Fragments { fragments, h: 0 });
        }
        let of_tensor = names
            .iter()
            .map(|n| {
                let n = n.as_ref();
                match n {
                    "model.embed_tokens.weight" => Ok(0),
                    "model.norm.weight" | "lm_head.weight" => Ok(fragments - 1),
                    _ => layer_of(n)
                        .map(|l| l % fragments)
                        .ok_or_else(|| StreamingError::Tensor(n.to_string())),
                }
            })
            .collect::<Result<Vec<u32>, _>>()?;
        for fragment in 0..fragments {
            if !of_tensor.contains(&fragment) {
                return Err(StreamingError::EmptyFragment {
                    fragment,
                    fragments,
                });
            }
        }
        Ok(Partition {
            fragments,
            of_tensor,
        })
    }

    pub fn fragments(&self) -> u32 {
        self.fragments
    }

    /// The fragment of tensor `i`.
    pub fn of(&self, i: usize) -> u32 {
        self.of_tensor[i]
    }

    /// How many tensors were partitioned.
    pub fn tensor_count(&self) -> usize {
        self.of_tensor.len()
    }

    /// The tensors of fragment `p`, in the caller's order.
    pub fn tensors(&self, p: u32) -> Vec<usize> {
        (0..self.of_tensor.len())
            .filter(|&i| self.of_tensor[i] == p)
            .collect()
    }
}

/// When each fragment sends and when its aggregate is merged, counted in inner steps since
/// the start of training (the first step is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub h: u32,
    pub fragments: u32,
    pub overlap: u32,
}

impl Schedule {
    pub fn new(h: u32, s: &Settings) -> Result<Schedule, StreamingError> {
        if s.fragments == 0 || s.fragments > h {
            return Err(StreamingError::Fragments {
                fragments: s.fragments,
                h,
            });
        }
        if s.overlap >= h {
            return Err(StreamingError::Overlap {
                overlap: s.overlap,
                h,
            });
        }
        if !(0.0..=1.0).contains(&s.alpha) {
            return Err(StreamingError::Alpha(s.alpha));
        }
        Ok(Schedule {
            h,
            fragments: s.fragments,
            overlap: s.overlap,
        })
    }

    /// Fragment p sends after the steps s ≡ offset(p) (mod H): ⌊(p+1)·H/P⌋ mod H, so
    /// distinct for P ≤ H and 0 for the last fragment.
    pub fn offset(&self, p: u32) -> u64 {
        (u64::from(p + 1) * u64::from(self.h) / u64::from(self.fragments)) % u64::from(self.h)
    }

    /// The fragments whose pseudo-gradient is computed and sent after inner step `step`.
    pub fn sends_after(&self, step: u64) -> Vec<u32> {
        if step == 0 {
            return Vec::new();
        }
        (0..self.fragments)
            .filter(|&p| step % u64::from(self.h) == self.offset(p))
            .collect()
    }

    /// The fragments whose aggregate is merged after inner step `step` (sent τ steps
    /// earlier).
    pub fn merges_after(&self, step: u64) -> Vec<u32> {
        match step.checked_sub(u64::from(self.overlap)) {
            Some(sent) => self.sends_after(sent),
            None => Vec::new(),
        }
    }

    /// The merge's local share: α with overlap, 0 (take the global weights) without.
    pub fn alpha(&self, alpha: f32) -> f32 {
        if self.overlap == 0 { 0.0 } else { alpha }
    }
}

/// Checks the daemon's Streaming DiLoCo settings (`training.diloco_fragments`,
/// `diloco_overlap_steps`, `diloco_merge_alpha`) for H = `h` inner steps and a model of
/// `layers` layers: every fragment needs a tensor (layer i goes to i mod P, the LM head to
/// P − 1) and every round a step, and the overlap ends before the next round's send (the
/// shortest round has ⌊H/P⌋ steps). The error names the key.
pub fn check_config(
    h: u32,
    layers: u32,
    fragments: u32,
    overlap: u32,
    alpha: f64,
) -> Result<(), (&'static str, String)> {
    let max_fragments = h.min(layers + 1);
    if !(1..=max_fragments).contains(&fragments) {
        return Err((
            "training.diloco_fragments",
            format!(
                "{fragments} is not in 1..={max_fragments} (at most the layers + 1 and diloco_steps)"
            ),
        ));
    }
    let shortest = h / fragments;
    if overlap >= shortest {
        return Err((
            "training.diloco_overlap_steps",
            format!("{overlap} must be below diloco_steps / diloco_fragments = {shortest}"),
        ));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err((
            "training.diloco_merge_alpha",
            format!("{alpha} is not in [0, 1]"),
        ));
    }
    Ok(())
}

/// Inner steps of the daemon's round `round` when each round syncs one fragment (round r
/// syncs fragment r mod P): ⌊(q+1)·H/P⌋ − ⌊q·H/P⌋ for q = r mod P, so P rounds make H steps
/// and fragment q is sent after the steps [`Schedule::offset`] names. `fragments` 0 or 1: H.
pub fn round_steps(h: u32, fragments: u32, round: u64) -> u32 {
    let p = u64::from(fragments.max(1));
    let q = round % p;
    let at = |q: u64| q * u64::from(h) / p;
    u32::try_from(at(q + 1) - at(q)).unwrap_or(h)
}

/// One fragment's pseudo-gradient as this replica sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// (tensor index, encoded bytes), in the fragment's tensor order.
    pub wire: Vec<(usize, Vec<u8>)>,
    /// The decoded form, flat over the fragment's tensors: what this replica aggregates as
    /// its own contribution, like every receiver does.
    pub decoded: Vec<f32>,
}

impl Encoded {
    pub fn bytes(&self) -> u64 {
        self.wire.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// A replica's streaming state: the global weights, outer momentum and error-feedback
/// residual per tensor, and the syncs each fragment has done.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub partition: Partition,
    /// θ_g: the agreed weights, each tensor as of its fragment's last outer step.
    pub global: Vec<Vec<f32>>,
    pub momentum: Vec<Vec<f32>>,
    /// What this replica's encoder held back (int8, topk), per tensor.
    pub residuals: Vec<Vec<f32>>,
    /// Outer steps taken per fragment.
    pub syncs: Vec<u64>,
}

impl State {
    /// The start of training from the weights `theta` (one vector per tensor, partition order).
    pub fn new(partition: Partition, theta: Vec<Vec<f32>>) -> Result<State, StreamingError> {
        if partition.tensor_count() != theta.len() {
            return Err(StreamingError::Shape {
                fragment: 0,
                message: format!(
                    "{} tensors, the partition has {}",
                    theta.len(),
                    partition.tensor_count()
                ),
            });
        }
        let fragments = partition.fragments() as usize;
        Ok(State {
            partition,
            momentum: theta.iter().map(|t| vec![0.0; t.len()]).collect(),
            residuals: vec![Vec::new(); theta.len()],
            global: theta,
            syncs: vec![0; fragments],
        })
    }

    /// The tensors of fragment `p`, with `local` (when given) checked against the state.
    fn fragment(&self, p: u32, local: Option<&[Vec<f32>]>) -> Result<Vec<usize>, StreamingError> {
        let shape = |message: String| StreamingError::Shape {
            fragment: p,
            message,
        };
        if p >= self.partition.fragments() {
            return Err(shape(format!(
                "no such fragment (of {})",
                self.partition.fragments()
            )));
        }
        let tensors = self.partition.tensors(p);
        let Some(local) = local else {
            return Ok(tensors);
        };
        if local.len() != self.global.len() {
            return Err(shape(format!(
                "{} tensors, the state has {}",
                local.len(),
                self.global.len()
            )));
        }
        for &i in &tensors {
            if local[i].len() != self.global[i].len() {
                return Err(shape(format!(
                    "tensor {i} has {} values, the state {}",
                    local[i].len(),
                    self.global[i].len()
                )));
            }
        }
        Ok(tensors)
    }

    /// This replica's pseudo-gradient of fragment `p`, Δ = (θ_g − θ_local)·scale per tensor,
    /// encoded with error feedback (the residual of each tensor is updated).
    pub fn encode(
        &mut self,
        p: u32,
        local: &[Vec<f32>],
        encoding: Encoding,
        scale: f32,
    ) -> Result<Encoded, StreamingError> {
        let tensors = self.fragment(p, Some(local))?;
        let mut wire = Vec::with_capacity(tensors.len());
        let mut decoded = Vec::new();
        for i in tensors {
            let delta: Vec<f32> = self.global[i]
                .iter()
                .zip(&local[i])
                .map(|(a, b)| (a - b) * scale)
                .collect();
            let bytes = compress::encode(encoding, &delta, &mut self.residuals[i]);
            decoded.extend(compress::decode(encoding, &bytes, delta.len())?);
            wire.push((i, bytes));
        }
        Ok(Encoded { wire, decoded })
    }

    /// The outer step of fragment `p` with the aggregate `agg` (flat over its tensors):
    /// θ_g and the momentum of its tensors move; nothing else does.
    pub fn outer_step(&mut self, p: u32, agg: &[f32], opt: OuterOpt) -> Result<(), StreamingError> {
        let tensors = self.fragment(p, None)?;
        let numel: usize = tensors.iter().map(|&i| self.global[i].len()).sum();
        if agg.len() != numel {
            return Err(StreamingError::Shape {
                fragment: p,
                message: format!(
                    "aggregate of {} values, the fragment has {numel}",
                    agg.len()
                ),
            });
        }
        let mut off = 0;
        for i in tensors {
            let n = self.global[i].len();
            self.global[i] = opt.step(&self.global[i], &agg[off..off + n], &mut self.momentum[i]);
            off += n;
        }
        self.syncs[p as usize] += 1;
        Ok(())
    }

    /// Merges fragment `p`'s global weights into `local`: α·local + (1−α)·θ_g (α = 0: a copy).
    pub fn merge(&self, p: u32, local: &mut [Vec<f32>], alpha: f32) -> Result<(), StreamingError> {
        for i in self.fragment(p, Some(local))? {
            if alpha == 0.0 {
                local[i].copy_from_slice(&self.global[i]);
            } else {
                for (l, g) in local[i].iter_mut().zip(&self.global[i]) {
                    *l = alpha * *l + (1.0 - alpha) * g;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "streaming_tests.rs"]
mod tests;
