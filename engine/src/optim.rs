//! AdamW over a stage's held parameters with global-norm gradient clipping.
//!
//! One step: gradients accumulated over `n` micro-batches are averaged (scaled by 1/n), the
//! global L2 norm over every held gradient is taken, gradients are scaled by
//! `min(1, clip / (norm + 1e-6))`, AdamW (PyTorch semantics, decoupled weight decay) updates
//! the weights, and the gradients are zeroed. The reported norm is the one before clipping.
//! Every stage of a pipeline averages by its own count of backwards, which is the same number
//! on all stages, so the split model takes exactly the step the whole model would.

use neuroshard_proto::engine as pb;
use neuroshard_shared::model::ModelConfig;

use crate::backend::{AdamW, Backend};
use crate::model::{Model, ModelError};

/// Training hyper-parameters (the engine applies the LoadModel `TrainSpec` values).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub weight_decay: f32,
    pub clip_norm: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-4,
            weight_decay: 0.01,
            clip_norm: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        }
    }
}

/// Training settings from LoadModel's `TrainSpec` (zeros replaced by defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainSettings {
    pub optim: OptimConfig,
    pub batch_size: u32,
    pub seq_len: u32,
    /// Empty: the built-in corpus.
    pub data_path: String,
    pub node_id: String,
}

impl TrainSettings {
    pub fn from_spec(
        spec: Option<&pb::TrainSpec>,
        cfg: &ModelConfig,
        node_id: &str,
    ) -> TrainSettings {
        let d = OptimConfig::default();
        let s = spec.cloned().unwrap_or_default();
        let or = |v: f32, default: f32| if v > 0.0 && v.is_finite() { v } else { default };
        TrainSettings {
            optim: OptimConfig {
                lr: or(s.learning_rate, d.lr),
                weight_decay: if s.weight_decay >= 0.0
                    && s.weight_decay.is_finite()
                    && s.weight_decay != 0.0
                {
                    s.weight_decay
                } else {
                    d.weight_decay
                },
                clip_norm: or(s.clip_norm, d.clip_norm),
                ..d
            },
            batch_size: if s.batch_size > 0 { s.batch_size } else { 4 },
            seq_len: if s.seq_len > 0 {
                s.seq_len.min(cfg.max_seq)
            } else {
                cfg.max_seq.min(256)
            },
            data_path: s.data_path,
            node_id: node_id.to_string(),
        }
    }
}

/// Moments for every held parameter (same order as `Model::params`) and the step count.
pub struct AdamState<B: Backend> {
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Optimizer steps taken (AdamW's `t` of the last step).
    pub step: u64,
}

impl<B: Backend> AdamState<B> {
    pub fn new(model: &Model<B>) -> Result<AdamState<B>, ModelError> {
        let mut m = Vec::with_capacity(model.params.len());
        let mut v = Vec::with_capacity(model.params.len());
        for p in &model.params {
            m.push(model.be.zeros(p.numel())?);
            v.push(model.be.zeros(p.numel())?);
        }
        Ok(AdamState { m, v, step: 0 })
    }

    /// One optimizer step with learning rate `lr`; returns the pre-clip gradient norm.
    /// A call with no accumulated backward is an error (it would only decay the weights).
    pub fn step(
        &mut self,
        model: &mut Model<B>,
        cfg: &OptimConfig,
        lr: f32,
    ) -> Result<f32, ModelError> {
        self.step_clipped_by(model, cfg, lr, None)
    }

    /// The squared norm of the gradients averaged over the accumulated micro-batches (what
    /// [`AdamState::step`] clips by), without changing them.
    pub fn sq_grad_norm(model: &Model<B>) -> Result<f64, ModelError> {
        if model.accumulated == 0 {
            return Err(ModelError::Input(
                "gradient norm asked without any backward since the last step".into(),
            ));
        }
        let grads: Vec<&B::Buf> = model.params.iter().map(|p| &p.grad).collect();
        let norm = f64::from(model.be.global_norm(&grads)?) / f64::from(model.accumulated);
        Ok(norm * norm)
    }

    /// [`AdamState::step`], clipping by `global_norm` when given (the norm over every pipeline
    /// stage's gradients) instead of the norm of the held gradients.
    pub fn step_clipped_by(
        &mut self,
        model: &mut Model<B>,
        cfg: &OptimConfig,
        lr: f32,
        global_norm: Option<f32>,
    ) -> Result<f32, ModelError> {
        if model.accumulated == 0 {
            return Err(ModelError::Input(
                "optimizer step without any backward since the last step".into(),
            ));
        }
        let be = &model.be;
        // The mean over the accumulated micro-batches and the clip are one factor on the
        // gradients, applied inside the update (no pass of their own).
        let mean = 1.0 / model.accumulated as f32;
        let grads: Vec<&B::Buf> = model.params.iter().map(|p| &p.grad).collect();
        let norm = match global_norm {
            Some(n) => n,
            None => be.global_norm(&grads)? * mean,
        };
        if !norm.is_finite() {
            model.zero_grads()?;
            return Err(ModelError::Input(format!(
                "gradient norm is {norm}: step skipped, gradients dropped"
            )));
        }
        let clip = neuroshard_kernels::cpu::fast::clip_scale(norm, cfg.clip_norm);
        let grad_scale = mean * clip;
        let hp = AdamW {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        };
        self.step += 1;
        model.serving.mark_stale();
        for (i, p) in model.params.iter_mut().enumerate() {
            be.adamw_step_zeroing(
                &mut p.value,
                &mut p.grad,
                &mut self.m[i],
                &mut self.v[i],
                self.step,
                hp,
                grad_scale,
            )?;
        }
        // The update zeroed the gradients.
        model.accumulated = 0;
        model.refresh_half()?;
        Ok(norm)
    }
}
