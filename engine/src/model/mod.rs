//! NeuroLLM for any layer range: a stage holds optionally the embedding, transformer layers
//! `[layer_start, layer_end)`, and optionally the final norm + LM head. Forward maps token ids
//! (first stage) or activations [B,T,C] to activations or logits/loss; backward maps the
//! output gradient to the input gradient and accumulates parameter gradients, so stages chain
//! across processes.
//!
//! Saved activations are keyed by micro-batch id and dropped on backward; at most
//! `max_outstanding` micro-batches may wait for their backward (a clear error beyond). Buffers
//! are pooled per shape: a steady training loop allocates nothing per step.

pub mod batch;
pub mod generate;
pub mod layer;
pub mod params;
pub mod serve;
pub mod stage_gen;

use std::collections::HashMap;

use neuroshard_shared::model::ModelConfig;

use crate::backend::{Backend, BackendError};
use layer::{Dims, LayerActs, PARAMS_PER_LAYER, Scratch, layer_backward, layer_forward};
use params::{EMBED, FINAL_NORM, Init, LM_HEAD, ModelHasher, Param, layer_specs, make_param};

/// Default cap on micro-batches whose activations wait for a backward.
pub const DEFAULT_MAX_OUTSTANDING: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid stage: {0}")]
    Stage(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(
        "no saved activations for micro-batch {micro_batch} (forward it first; each backward consumes them)"
    )]
    NoActivations { micro_batch: u64 },
    #[error(
        "{outstanding} micro-batches already wait for their backward (limit {limit}); run backward first"
    )]
    TooManyOutstanding { outstanding: usize, limit: usize },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Which part of the model a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageSpec {
    pub layer_start: u32,
    pub layer_end: u32,
    pub has_embedding: bool,
    pub has_head: bool,
}

impl StageSpec {
    pub fn full(cfg: &ModelConfig) -> StageSpec {
        StageSpec {
            layer_start: 0,
            layer_end: cfg.layers,
            has_embedding: true,
            has_head: true,
        }
    }

    pub fn is_full(&self, cfg: &ModelConfig) -> bool {
        *self == StageSpec::full(cfg)
    }

    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layer_start > self.layer_end || self.layer_end > cfg.layers {
            return Err(ModelError::Stage(format!(
                "layer range {}..{} not within 0..{}",
                self.layer_start, self.layer_end, cfg.layers
            )));
        }
        if self.layer_start == self.layer_end && !self.has_embedding && !self.has_head {
            return Err(ModelError::Stage(
                "holds nothing: no layers, no embedding, no head".into(),
            ));
        }
        if self.has_embedding && self.layer_start != 0 {
            return Err(ModelError::Stage(
                "the embedding stage must start at layer 0".into(),
            ));
        }
        if self.has_head && self.layer_end != cfg.layers {
            return Err(ModelError::Stage(format!(
                "the head stage must end at the last layer {}",
                cfg.layers
            )));
        }
        Ok(())
    }
}

/// Input of a forward.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids [B,T] (a stage holding the embedding).
    Ids(&'a [u32]),
    /// Activations [B,T,C] (any other stage).
    Acts(&'a [f32]),
}

/// What one forward saved.
struct Acts<B: Backend> {
    b: usize,
    t: usize,
    ids: Option<B::Ids>,
    targets: Option<B::Ids>,
    /// Residual stream: xs[i] is the input of held layer i, xs[L] the stage output.
    xs: Vec<B::Buf>,
    layers: Vec<LayerActs<B>>,
    head: Option<HeadActs<B>>,
}

struct HeadActs<B: Backend> {
    nf: B::Buf,
    rstdf: B::Buf,
    logits: B::Buf,
    /// bf16 copy of nf, the LM head's GEMM input (bf16 compute only).
    nf_half: Option<B::Half>,
}

/// Per-shape shared buffers: (B, T, layer scratch, residual gradient dres [Bt,C], dlogits
/// [Bt,V] on a head stage).
type ShapeScratch<B> = (
    usize,
    usize,
    Scratch<B>,
    <B as Backend>::Buf,
    <B as Backend>::Buf,
);

pub struct Model<B: Backend> {
    pub be: B,
    pub cfg: ModelConfig,
    pub spec: StageSpec,
    pub seed: u64,
    /// Held parameters in canonical order: embedding, layers ascending (9 each), final norm,
    /// LM head.
    pub params: Vec<Param<B>>,
    /// Vocabulary entries that are live (logits at or above are masked).
    pub v_live: usize,
    pub max_outstanding: usize,
    /// Micro-batches whose backward accumulated into the gradients since the last zeroing.
    pub accumulated: u32,
    /// f32 or int8 decode weights (`serve.rs`).
    pub serving: serve::Serving<B>,
    scratch: Option<ShapeScratch<B>>,
    /// bf16 copy of the logits gradient [Bt,V] (bf16 compute on a head stage).
    dlogits_half: Option<B::Half>,
    pool: Vec<Acts<B>>,
    outstanding: HashMap<u64, Acts<B>>,
}

impl<B: Backend> Model<B> {
    /// Builds the stage with weights initialized from `seed`.
    pub fn new(be: B, cfg: ModelConfig, spec: StageSpec, seed: u64) -> Result<Model<B>> {
        cfg.validate()
            .map_err(|e| ModelError::Stage(e.to_string()))?;
        spec.validate(&cfg)?;
        let (c, v) = (cfg.hidden as usize, cfg.vocab_size as usize);
        let mut specs = Vec::new();
        if spec.has_embedding {
            specs.push((EMBED.to_string(), vec![v, c], Init::Normal));
        }
        for l in spec.layer_start..spec.layer_end {
            specs.extend(layer_specs(&cfg, l));
        }
        if spec.has_head {
            specs.push((FINAL_NORM.to_string(), vec![c], Init::Ones));
            specs.push((LM_HEAD.to_string(), vec![v, c], Init::Normal));
        }
        let params = specs
            .into_iter()
            .map(|(name, shape, init)| make_param(&be, seed, name, shape, init))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Model {
            be,
            v_live: v,
            cfg,
            spec,
            seed,
            params,
            max_outstanding: DEFAULT_MAX_OUTSTANDING,
            accumulated: 0,
            serving: serve::Serving::default(),
            scratch: None,
            dlogits_half: None,
            pool: Vec::new(),
            outstanding: HashMap::new(),
        })
    }

    /// Rewrites the bf16 copies of the GEMM weights from the f32 master weights (bf16
    /// compute; nothing in f32). Called after every change of the weights: an optimizer step,
    /// a checkpoint or weight-source load.
    pub fn refresh_half(&mut self) -> Result<()> {
        let be = &self.be;
        for p in &mut self.params {
            if let Some(h) = &mut p.half {
                be.to_half(h, &p.value)?;
            }
        }
        Ok(())
    }

    pub fn num_layers(&self) -> usize {
        (self.spec.layer_end - self.spec.layer_start) as usize
    }

    fn layer_offset(&self) -> usize {
        usize::from(self.spec.has_embedding)
    }

    pub fn parameter_count(&self) -> u64 {
        self.params.iter().map(|p| p.numel() as u64).sum()
    }

    fn dims(&self, b: usize, t: usize) -> Dims {
        let cfg = &self.cfg;
        Dims {
            b,
            t,
            c: cfg.hidden as usize,
            h: cfg.heads as usize,
            kvh: cfg.kv_heads as usize,
            d: cfg.head_dim() as usize,
            f: cfg.ffn as usize,
            eps: cfg.norm_eps,
            theta: cfg.rope_theta,
        }
    }

    /// sha256 over every held parameter in canonical order (see `params::ModelHasher`).
    pub fn hash(&self) -> Result<String> {
        let mut h = ModelHasher::default();
        let mut host = Vec::new();
        for p in &self.params {
            match self.be.host_view(&p.value) {
                Some(v) => h.update(&p.name, &p.shape, v),
                None => {
                    host.resize(p.numel(), 0.0);
                    self.be.download(&p.value, &mut host)?;
                    h.update(&p.name, &p.shape, &host);
                }
            }
        }
        Ok(h.hex())
    }

    /// Zeroes every gradient and forgets the accumulated micro-batch count.
    pub fn zero_grads(&mut self) -> Result<()> {
        for p in &mut self.params {
            self.be.fill(&mut p.grad, 0.0)?;
        }
        self.accumulated = 0;
        Ok(())
    }

    /// Drops saved activations of every outstanding micro-batch (e.g. after a failed step).
    pub fn clear_activations(&mut self) {
        let drained: Vec<_> = self.outstanding.drain().map(|(_, a)| a).collect();
        for a in drained {
            self.recycle(a);
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    fn recycle(&mut self, a: Acts<B>) {
        if self.pool.len() < self.max_outstanding {
            self.pool.push(a);
        }
    }

    fn ensure_scratch(&mut self, b: usize, t: usize) -> Result<()> {
        if !matches!(&self.scratch, Some((sb, st, ..)) if *sb == b && *st == t) {
            self.scratch = None; // free the old shape first
            let d = self.dims(b, t);
            let s = Scratch::new(&self.be, &d)?;
            let dres = self.be.zeros(b * t * d.c)?;
            let dlogits = if self.spec.has_head {
                self.be.zeros(b * t * self.cfg.vocab_size as usize)?
            } else {
                self.be.zeros(0)?
            };
            self.scratch = Some((b, t, s, dres, dlogits));
        }
        Ok(())
    }

    fn take_acts(&mut self, b: usize, t: usize) -> Result<Acts<B>> {
        if let Some(i) = self.pool.iter().position(|a| a.b == b && a.t == t) {
            return Ok(self.pool.swap_remove(i));
        }
        self.pool.retain(|a| a.b == b && a.t == t);
        let d = self.dims(b, t);
        let be = &self.be;
        let l = self.num_layers();
        let xs = (0..=l)
            .map(|_| be.zeros(b * t * d.c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let layers = (0..l)
            .map(|_| LayerActs::new(be, &d))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let head = if self.spec.has_head {
            Some(HeadActs {
                nf: be.zeros(b * t * d.c)?,
                rstdf: be.zeros(b * t)?,
                logits: be.zeros(b * t * self.cfg.vocab_size as usize)?,
                nf_half: match be.compute_dtype() {
                    crate::backend::Dtype::Bf16 => Some(be.zeros_half(b * t * d.c)?),
                    crate::backend::Dtype::F32 => None,
                },
            })
        } else {
            None
        };
        Ok(Acts {
            b,
            t,
            ids: None,
            targets: None,
            xs,
            layers,
            head,
        })
    }

    fn check_bt(&self, b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 {
            return Err(ModelError::Input(format!("empty batch [{b}, {t}]")));
        }
        if t > self.cfg.max_seq as usize {
            return Err(ModelError::Input(format!(
                "sequence length {t} exceeds max_seq {}",
                self.cfg.max_seq
            )));
        }
        Ok(())
    }

    /// Forward of micro-batch `micro` of shape [b, t]. Returns the mean loss when `labels`
    /// ([B,T]) are given (head stage only). The output (activations, or logits when the head is
    /// held) is read with [`Model::with_output`].
    pub fn forward(
        &mut self,
        micro: u64,
        b: usize,
        t: usize,
        input: StageInput<'_>,
        labels: Option<&[u32]>,
    ) -> Result<Option<f32>> {
        self.check_bt(b, t)?;
        let c = self.cfg.hidden as usize;
        let vocab = self.cfg.vocab_size as usize;
        match (input, self.spec.has_embedding) {
            (StageInput::Ids(ids), true) => {
                if ids.len() != b * t {
                    return Err(ModelError::Input(format!(
                        "{} token ids, expected [{b}, {t}]",
                        ids.len()
                    )));
                }
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ModelError::Input(format!(
                        "token id {bad} not below vocab_size {vocab}"
                    )));
                }
            }
            (StageInput::Acts(x), false) => {
                if x.len() != b * t * c {
                    return Err(ModelError::Input(format!(
                        "{} activations, expected [{b}, {t}, {c}]",
                        x.len()
                    )));
                }
            }
            (StageInput::Ids(_), false) => {
                return Err(ModelError::Input(
                    "this stage takes activations, not token ids".into(),
                ));
            }
            (StageInput::Acts(_), true) => {
                return Err(ModelError::Input(
                    "this stage holds the embedding: it takes token ids".into(),
                ));
            }
        }
        if let Some(l) = labels {
            if !self.spec.has_head {
                return Err(ModelError::Input(
                    "labels given to a stage without the LM head".into(),
                ));
            }
            if l.len() != b * t {
                return Err(ModelError::Input(format!(
                    "{} labels, expected [{b}, {t}]",
                    l.len()
                )));
            }
            if let Some(&bad) = l.iter().find(|&&i| i as usize >= self.v_live) {
                return Err(ModelError::Input(format!(
                    "label {bad} not below the live vocabulary {}",
                    self.v_live
                )));
            }
        }
        // A repeated id replaces the old activations (e.g. a retried pipeline step).
        if let Some(old) = self.outstanding.remove(&micro) {
            self.recycle(old);
        }
        if self.outstanding.len() >= self.max_outstanding {
            return Err(ModelError::TooManyOutstanding {
                outstanding: self.outstanding.len(),
                limit: self.max_outstanding,
            });
        }
        self.ensure_scratch(b, t)?;
        let mut acts = self.take_acts(b, t)?;
        let result = self.forward_into(&mut acts, input, labels);
        match result {
            Ok(loss) => {
                self.outstanding.insert(micro, acts);
                Ok(loss)
            }
            Err(e) => {
                self.recycle(acts);
                Err(e)
            }
        }
    }

    fn forward_into(
        &mut self,
        a: &mut Acts<B>,
        input: StageInput<'_>,
        labels: Option<&[u32]>,
    ) -> Result<Option<f32>> {
        let d = self.dims(a.b, a.t);
        let (bt, c) = (d.bt(), d.c);
        let vocab = self.cfg.vocab_size as usize;
        let v_live = self.v_live;
        let off = self.layer_offset();
        let be = &self.be;
        let (_, _, s, _, _) = self.scratch.as_mut().expect("scratch allocated by forward");
        match input {
            StageInput::Ids(ids) => {
                let ids = a.ids.insert(be.upload_ids(ids)?);
                be.embedding_forward(&mut a.xs[0], ids, &self.params[0].value, c)?;
            }
            StageInput::Acts(x) => be.write(&mut a.xs[0], x)?,
        }
        for i in 0..a.layers.len() {
            let w = &self.params[off + i * PARAMS_PER_LAYER..off + (i + 1) * PARAMS_PER_LAYER];
            let (lo, hi) = a.xs.split_at_mut(i + 1);
            layer_forward(be, w, &lo[i], &mut hi[0], &mut a.layers[i], s, &d)?;
        }
        a.targets = None;
        if let Some(head) = &mut a.head {
            let n = self.params.len();
            let (norm, lm) = (&self.params[n - 2], &self.params[n - 1]);
            let x = a.xs.last().expect("xs has L+1 entries");
            be.rmsnorm_forward(&mut head.nf, &mut head.rstdf, x, &norm.value, bt, c, d.eps)?;
            let nfh = layer::round(be, head.nf_half.as_mut(), &head.nf)?;
            layer::linear_forward(be, &mut head.logits, &head.nf, nfh, lm, bt, c, vocab)?;
            if let Some(l) = labels {
                let targets = be.upload_ids(l)?;
                let loss = be.cross_entropy_forward(&head.logits, &targets, bt, vocab, v_live)?;
                a.targets = Some(targets);
                return Ok(Some(loss));
            }
        }
        Ok(None)
    }

    /// Calls `f` with the output of micro-batch `micro`'s forward: logits [B,T,V] on a head
    /// stage, else activations [B,T,C]. Returns `f`'s value and the output's shape.
    pub fn with_output<R>(&self, micro: u64, f: impl FnOnce(&[f32], [usize; 3]) -> R) -> Result<R> {
        let a = self
            .outstanding
            .get(&micro)
            .ok_or(ModelError::NoActivations { micro_batch: micro })?;
        let (buf, width) = match &a.head {
            Some(h) => (&h.logits, self.cfg.vocab_size as usize),
            None => (
                a.xs.last().expect("xs has L+1 entries"),
                self.cfg.hidden as usize,
            ),
        };
        let shape = [a.b, a.t, width];
        Ok(self.view(buf, |v| f(v, shape))?)
    }

    fn view<R>(
        &self,
        buf: &B::Buf,
        f: impl FnOnce(&[f32]) -> R,
    ) -> std::result::Result<R, BackendError> {
        match self.be.host_view(buf) {
            Some(v) => Ok(f(v)),
            None => {
                let mut host = vec![0.0; self.be.len(buf)];
                self.be.download(buf, &mut host)?;
                Ok(f(&host))
            }
        }
    }

    /// Shape [B, T] of an outstanding micro-batch.
    pub fn micro_batch_shape(&self, micro: u64) -> Option<(usize, usize)> {
        self.outstanding.get(&micro).map(|a| (a.b, a.t))
    }

    /// Backward of micro-batch `micro`. `grad_output` is the gradient of the stage output
    /// ([B,T,C], or [B,T,V] logits on a head stage that was run without labels); `None` on a
    /// head stage whose forward computed the loss (d loss = 1). Consumes the saved activations;
    /// the input gradient is read with [`Model::with_grad_input`] (not on the first stage).
    pub fn backward(&mut self, micro: u64, grad_output: Option<&[f32]>) -> Result<()> {
        let a = self
            .outstanding
            .remove(&micro)
            .ok_or(ModelError::NoActivations { micro_batch: micro })?;
        let result = self.backward_from(&a, grad_output);
        self.recycle(a);
        result?;
        self.accumulated += 1;
        Ok(())
    }

    fn backward_from(&mut self, a: &Acts<B>, grad_output: Option<&[f32]>) -> Result<()> {
        self.ensure_scratch(a.b, a.t)?;
        let d = self.dims(a.b, a.t);
        let (bt, c) = (d.bt(), d.c);
        let vocab = self.cfg.vocab_size as usize;
        let v_live = self.v_live;
        let off = self.layer_offset();
        let n = self.params.len();
        let be = &self.be;
        let (_, _, s, dres, dlogits) = self.scratch.as_mut().expect("scratch allocated");
        match (&a.head, &a.targets, grad_output) {
            (Some(head), targets, g) => {
                match (targets, g) {
                    (Some(targets), None) => be.cross_entropy_backward(
                        dlogits,
                        &head.logits,
                        targets,
                        bt,
                        vocab,
                        v_live,
                        1.0,
                    )?,
                    (_, Some(g)) => {
                        if g.len() != bt * vocab {
                            return Err(ModelError::Input(format!(
                                "grad_output has {} values, expected logits [{}, {}, {vocab}]",
                                g.len(),
                                a.b,
                                a.t
                            )));
                        }
                        be.write(dlogits, g)?
                    }
                    (None, None) => {
                        return Err(ModelError::Input(
                            "backward on the head stage needs labels in forward or a logits gradient".into(),
                        ));
                    }
                }
                let (norm, lm) = {
                    let (lo, hi) = self.params.split_at_mut(n - 1);
                    (&mut lo[n - 2], &mut hi[0])
                };
                be.fill(&mut s.dn, 0.0)?;
                if head.nf_half.is_some()
                    && self.dlogits_half.as_ref().map(|h| be.half_len(h)) != Some(bt * vocab)
                {
                    self.dlogits_half = None; // free the old shape first
                    self.dlogits_half = Some(be.zeros_half(bt * vocab)?);
                }
                let dh = match head.nf_half {
                    Some(_) => layer::round(be, self.dlogits_half.as_mut(), dlogits)?,
                    None => None,
                };
                let io = (&*dlogits, dh, &head.nf, head.nf_half.as_ref());
                layer::linear_backward(be, &mut s.dn, lm, io, bt, c, vocab)?;
                be.fill(dres, 0.0)?;
                let x = a.xs.last().expect("xs has L+1 entries");
                be.rmsnorm_backward(
                    dres,
                    &mut norm.grad,
                    &s.dn,
                    x,
                    &norm.value,
                    &head.rstdf,
                    bt,
                    c,
                )?;
            }
            (None, _, Some(g)) => {
                if g.len() != bt * c {
                    return Err(ModelError::Input(format!(
                        "grad_output has {} values, expected [{}, {}, {c}]",
                        g.len(),
                        a.b,
                        a.t
                    )));
                }
                be.write(dres, g)?;
            }
            (None, _, None) => {
                return Err(ModelError::Input(
                    "grad_output is required on a stage without the head".into(),
                ));
            }
        }
        for i in (0..a.layers.len()).rev() {
            let w = &mut self.params[off + i * PARAMS_PER_LAYER..off + (i + 1) * PARAMS_PER_LAYER];
            layer_backward(be, w, &a.xs[i], &a.layers[i], s, dres, &d)?;
        }
        if let Some(ids) = &a.ids {
            be.embedding_backward(&mut self.params[0].grad, dres, ids, c)?;
        }
        Ok(())
    }

    /// Calls `f` with the input gradient [B*T*C] of the last backward (a stage without the
    /// embedding).
    pub fn with_grad_input<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let (_, _, _, dres, _) = self
            .scratch
            .as_ref()
            .ok_or_else(|| ModelError::Input("no backward has run".into()))?;
        Ok(self.view(dres, f)?)
    }

    /// The values of a parameter as host f32 (copied).
    pub fn param_values(&self, i: usize) -> Result<Vec<f32>> {
        Ok(self.view(&self.params[i].value, |v| v.to_vec())?)
    }

    /// The gradient of a parameter as host f32 (copied).
    pub fn param_grad(&self, i: usize) -> Result<Vec<f32>> {
        Ok(self.view(&self.params[i].grad, |v| v.to_vec())?)
    }
}

// Mixed-precision tests (a `tests.rs`, so the module-cycle rule reads it as test code).
#[cfg(test)]
#[path = "bf16/tests.rs"]
mod bf16_tests;
#[cfg(test)]
#[path = "stage_replay/tests.rs"]
mod stage_replay_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod toploc_tests;
