//! The training commands: Forward and Backward of a micro-batch through shm slots,
//! OptimizerStep, NextBatch, GradNorm, ResetGrads and a whole local TrainStep.

use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::{Segment, Tensor, TensorRef};

use super::RuntimeError;
use super::state::State;
use crate::backend::Backend;
use crate::model::StageInput;
use crate::optim::AdamState;

/// Micro-batch id TrainStep uses internally (control's ids never reach it in practice).
const TRAIN_MICRO: u64 = u64::MAX;

impl<B: Backend> State<B> {
    /// One local training step on a full model: next batch, forward, backward, AdamW.
    pub fn train_once(&mut self) -> Result<(f32, f32, u64, u64), RuntimeError> {
        if !self.model.spec.is_full(&self.model.cfg) {
            return Err(RuntimeError::Invalid(
                "TrainStep needs the full model on this node".into(),
            ));
        }
        let batch = self.loader()?.next_batch()?;
        let shard = self
            .loader
            .as_ref()
            .map(|l| l.position().shard_id)
            .unwrap_or(0);
        if self.model.accumulated > 0 {
            tracing::warn!(
                micro_batches = self.model.accumulated,
                "dropping pipeline gradients before a local step"
            );
            self.model.zero_grads()?;
        }
        let (b, t) = (batch.batch, batch.seq);
        let loss = self
            .model
            .forward(
                TRAIN_MICRO,
                b,
                t,
                StageInput::Ids(&batch.input_ids),
                Some(&batch.labels),
            )?
            .ok_or_else(|| RuntimeError::Invalid("no loss from the head".into()))?;
        self.model.backward(TRAIN_MICRO, None)?;
        let lr = self.train.optim.lr;
        let norm = self.adam.step(&mut self.model, &self.train.optim, lr)?;
        Ok((loss, norm, (b * t) as u64, shard))
    }

    pub(super) fn forward(
        &mut self,
        req: &pb::ForwardRequest,
        seg: &Segment,
    ) -> Result<pb::ForwardReply, RuntimeError> {
        let input = read(seg, req.input, "input")?
            .ok_or_else(|| RuntimeError::Invalid("missing tensor reference `input`".into()))?;
        let labels = read(seg, req.labels, "labels")?;
        let c = self.model.cfg.hidden as u64;
        let (b, t, loss) = if self.model.spec.has_embedding {
            let ids = input.to_u32().ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "input of the first stage must be u32 token ids, got {:?}",
                    input.dtype
                ))
            })?;
            let (b, t) = bt_of(&input.shape, "input", None)?;
            let labels = labels_of(labels.as_ref(), b, t)?;
            (
                b,
                t,
                self.model.forward(
                    req.micro_batch,
                    b,
                    t,
                    StageInput::Ids(&ids),
                    labels.as_deref(),
                )?,
            )
        } else {
            let x = input.to_f32().ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "input activations must be f32, got {:?}",
                    input.dtype
                ))
            })?;
            let (b, t) = bt_of(&input.shape, "input", Some(c))?;
            let labels = labels_of(labels.as_ref(), b, t)?;
            (
                b,
                t,
                self.model.forward(
                    req.micro_batch,
                    b,
                    t,
                    StageInput::Acts(&x),
                    labels.as_deref(),
                )?,
            )
        };
        let _ = (b, t);
        let output = if loss.is_some() {
            None
        } else {
            let written = self.model.with_output(req.micro_batch, |v, shape| {
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                seg.write_f32(req.output_slot, &shape, v)
            })?;
            match written {
                Ok(r) => Some(pbref(r)),
                Err(e) => {
                    // The activations stay saved: control may retry with a bigger slot.
                    return Err(e.into());
                }
            }
        };
        Ok(pb::ForwardReply { output, loss })
    }

    pub(super) fn backward(
        &mut self,
        req: &pb::BackwardRequest,
        seg: &Segment,
    ) -> Result<pb::BackwardReply, RuntimeError> {
        let g = read(seg, req.grad_output, "grad_output")?;
        let grad = match &g {
            Some(t) => {
                let (b, t_len) = self.model.micro_batch_shape(req.micro_batch).ok_or(
                    crate::model::ModelError::NoActivations {
                        micro_batch: req.micro_batch,
                    },
                )?;
                let width = if self.model.spec.has_head {
                    self.model.cfg.vocab_size
                } else {
                    self.model.cfg.hidden
                } as u64;
                if t.shape != [b as u64, t_len as u64, width] {
                    return Err(RuntimeError::Invalid(format!(
                        "grad_output has shape {:?}, expected [{b}, {t_len}, {width}]",
                        t.shape
                    )));
                }
                Some(
                    t.to_f32()
                        .ok_or_else(|| RuntimeError::Invalid("grad_output must be f32".into()))?,
                )
            }
            None => None,
        };
        let shape = self.model.micro_batch_shape(req.micro_batch);
        self.model.backward(req.micro_batch, grad.as_deref())?;
        if self.model.spec.has_embedding {
            return Ok(pb::BackwardReply { grad_input: None });
        }
        let (b, t) = shape.expect("backward succeeded, so the micro-batch existed");
        let c = self.model.cfg.hidden as u64;
        let r = self.model.with_grad_input(|gi| {
            seg.write_f32(req.grad_input_slot, &[b as u64, t as u64, c], gi)
        })??;
        Ok(pb::BackwardReply {
            grad_input: Some(pbref(r)),
        })
    }

    pub(super) fn optimizer_step(
        &mut self,
        req: &pb::OptimizerStepRequest,
    ) -> Result<pb::OptimizerStepReply, RuntimeError> {
        let lr = if req.learning_rate > 0.0 && req.learning_rate.is_finite() {
            req.learning_rate
        } else {
            self.train.optim.lr
        };
        let global = req.global_norm.filter(|n| n.is_finite() && *n >= 0.0);
        let norm = self
            .adam
            .step_clipped_by(&mut self.model, &self.train.optim, lr, global)?;
        Ok(pb::OptimizerStepReply {
            step: self.adam.step,
            grad_norm: norm,
        })
    }

    pub(super) fn next_batch(
        &mut self,
        req: &pb::NextBatchRequest,
        seg: &Segment,
    ) -> Result<pb::NextBatchReply, RuntimeError> {
        if !self.model.spec.has_embedding {
            return Err(RuntimeError::Invalid(
                "NextBatch needs the embedding (the first pipeline stage)".into(),
            ));
        }
        if req.ids_slot == req.labels_slot {
            return Err(RuntimeError::Invalid(
                "ids and labels need two different slots".into(),
            ));
        }
        let batch = self.loader()?.next_batch()?;
        let shard = self
            .loader
            .as_ref()
            .map(|l| l.position().shard_id)
            .unwrap_or(0);
        let shape = [batch.batch as u64, batch.seq as u64];
        let ids = Tensor::from_u32(&shape, &batch.input_ids);
        let ids = seg.write(req.ids_slot, ids.dtype, &ids.shape, &ids.bytes)?;
        let labels = Tensor::from_u32(&shape, &batch.labels);
        let labels = seg.write(req.labels_slot, labels.dtype, &labels.shape, &labels.bytes)?;
        Ok(pb::NextBatchReply {
            ids: Some(pbref(ids)),
            labels: Some(pbref(labels)),
            shard: shard as u32,
        })
    }

    pub(super) fn grad_norm(&mut self) -> Result<pb::GradNormReply, RuntimeError> {
        Ok(pb::GradNormReply {
            sq_norm: AdamState::sq_grad_norm(&self.model)?,
            micro_batches: self.model.accumulated,
        })
    }

    pub(super) fn reset_grads(&mut self) -> Result<(), RuntimeError> {
        self.model.clear_activations();
        self.model.zero_grads()?;
        Ok(())
    }

    pub(super) fn train_step(
        &mut self,
        req: &pb::TrainStepRequest,
    ) -> Result<pb::TrainStepReply, RuntimeError> {
        let (loss, grad_norm, tokens, shard) = self.train_once()?;
        Ok(pb::TrainStepReply {
            loss,
            step: self.adam.step,
            tokens,
            grad_norm,
            shard: shard as u32,
            state_hash: if req.state_hash {
                self.state_hash()?
            } else {
                String::new()
            },
        })
    }
}

fn read(
    seg: &Segment,
    r: Option<pb::TensorRef>,
    what: &str,
) -> Result<Option<Tensor>, RuntimeError> {
    match r {
        None => Ok(None),
        Some(r) => {
            let t = seg.read(TensorRef {
                slot: r.slot,
                seq: r.seq,
            })?;
            if t.shape.contains(&0) && what != "grad_output" {
                return Err(RuntimeError::Invalid(format!(
                    "{what} is empty: shape {:?}",
                    t.shape
                )));
            }
            Ok(Some(t))
        }
    }
}

pub(super) fn pbref(r: TensorRef) -> pb::TensorRef {
    pb::TensorRef {
        slot: r.slot,
        seq: r.seq,
    }
}

fn bt_of(shape: &[u64], what: &str, inner: Option<u64>) -> Result<(usize, usize), RuntimeError> {
    let ok = match inner {
        None => shape.len() == 2,
        Some(c) => shape.len() == 3 && shape[2] == c,
    };
    if !ok {
        return Err(RuntimeError::Invalid(format!(
            "{what} has shape {shape:?}, expected [B, T{}]",
            inner.map(|c| format!(", {c}")).unwrap_or_default()
        )));
    }
    Ok((shape[0] as usize, shape[1] as usize))
}

fn labels_of(t: Option<&Tensor>, b: usize, tl: usize) -> Result<Option<Vec<u32>>, RuntimeError> {
    match t {
        None => Ok(None),
        Some(t) => {
            let v = t.to_u32().ok_or_else(|| {
                RuntimeError::Invalid(format!("labels must be u32, got {:?}", t.dtype))
            })?;
            if t.shape != [b as u64, tl as u64] {
                return Err(RuntimeError::Invalid(format!(
                    "labels have shape {:?}, expected [{b}, {tl}]",
                    t.shape
                )));
            }
            Ok(Some(v))
        }
    }
}
