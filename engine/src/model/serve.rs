//! How the held weights are served: f32 as trained, or an int8 copy (per output channel,
//! symmetric; `Backend::quantize_int8`) used by the decode matmuls of generation
//! and prefill matmuls of generation ([`Model::linear`], [`Model::lm_head`]), as llama.cpp's
//! q8_0 does. Training always uses the f32 weights.
//!
//! Refresh rule: whatever changes the weights (an optimizer step, a checkpoint or weights
//! load) calls [`Model::weights_changed`], which marks the int8 copy stale; the runtime
//! calls [`Model::refresh_serving`] before admitting or stepping generation, which
//! re-quantizes a stale copy. A decode matmul never reads a stale copy: it falls back to the
//! f32 weights until the refresh.

use crate::backend::{Backend, Int8Weight};

use super::layer::{PARAMS_PER_LAYER, WD, WG, WK, WO, WQ, WU, WV};
use super::{Model, Result};

/// Which weights decode reads (`inference.weights` in the daemon's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeWeights {
    #[default]
    F32,
    Int8,
}

impl std::str::FromStr for ServeWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(ServeWeights::F32),
            "int8" => Ok(ServeWeights::Int8),
            other => Err(format!("weights {other:?} is not f32 or int8")),
        }
    }
}

/// The serving state of a model: the mode and, in int8 mode, the quantized matmul weights
/// indexed like `Model::params` (None for norms and the embedding).
pub struct Serving<B: Backend> {
    pub mode: ServeWeights,
    int8: Vec<Option<Int8Weight<B::Buf>>>,
    stale: bool,
    /// The adversary build's `truncated_model` cheat (issue #19 tests; `--serve-truncated`,
    /// which only a daemon built with its `adversary` feature passes): generation and
    /// pipeline inference skip every held layer but the first and the last (of two, the
    /// last), while the model
    /// and its hash stay whole. Training never skips.
    pub truncated: bool,
}

impl<B: Backend> Default for Serving<B> {
    fn default() -> Self {
        Serving {
            mode: ServeWeights::F32,
            int8: Vec::new(),
            stale: true,
            truncated: false,
        }
    }
}

impl<B: Backend> Serving<B> {
    /// The weights changed (callable while other fields of the model are borrowed).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether serving runs held layer `l` of `layers`: all of them unless truncated, then
    /// the first and the last (of two layers, the first alone).
    pub fn runs_layer(&self, l: usize, layers: usize) -> bool {
        !self.truncated || l == 0 || (l + 1 == layers && layers > 2)
    }
}

impl<B: Backend> Model<B> {
    /// Chooses the serving weights; int8 quantizes now.
    pub fn set_serve_weights(&mut self, mode: ServeWeights) -> Result<()> {
        self.serving.mode = mode;
        self.serving.stale = true;
        self.serving.int8.clear();
        self.refresh_serving()
    }

    /// The weights changed: the int8 copy (if any) is stale until [`Model::refresh_serving`].
    pub fn weights_changed(&mut self) {
        self.serving.mark_stale();
    }

    /// Re-quantizes a stale int8 copy (nothing in f32 mode).
    pub fn refresh_serving(&mut self) -> Result<()> {
        if self.serving.mode != ServeWeights::Int8 || !self.serving.stale {
            return Ok(());
        }
        let first = usize::from(self.spec.has_embedding);
        let layers = self.num_layers();
        let mut q = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let in_layer = i >= first && i < first + layers * PARAMS_PER_LAYER;
            let matmul = in_layer
                && [WQ, WK, WV, WO, WG, WU, WD].contains(&((i - first) % PARAMS_PER_LAYER));
            let head = self.spec.has_head && i + 1 == self.params.len();
            q.push(if matmul || head {
                Some(self.be.quantize_int8(&p.value, p.shape[0], p.shape[1])?)
            } else {
                None
            });
        }
        self.serving.int8 = q;
        self.serving.stale = false;
        Ok(())
    }

    /// Bytes of the int8 copy (0 in f32 mode).
    pub fn int8_bytes(&self) -> u64 {
        self.serving
            .int8
            .iter()
            .flatten()
            .map(|w| (w.n * w.k + 8 * w.n) as u64)
            .sum()
    }

    /// Negative log-likelihood (nats, summed) of `tokens[1..]`, each predicted from the
    /// tokens before it through the decode path (one token per step, the serving weights):
    /// what a client of this node's generation would be scored on. A full model only.
    pub fn decode_nll(&self, tokens: &[u32]) -> Result<f64> {
        if tokens.len() < 2 {
            return Ok(0.0);
        }
        self.check_generation(&tokens[..tokens.len() - 1])?;
        let be = &self.be;
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let rows = tokens.len();
        let mut kc = Vec::with_capacity(self.num_layers());
        let mut vc = Vec::with_capacity(self.num_layers());
        for _ in 0..self.num_layers() {
            kc.push(be.zeros(rows * kv)?);
            vc.push(be.zeros(rows * kv)?);
        }
        let mut st = self.step_buffers(1)?;
        let mut logits = vec![0.0f32; self.cfg.vocab_size as usize];
        let mut nll = 0.0f64;
        for (pos, pair) in tokens.windows(2).enumerate() {
            self.decode_pass(&pair[..1], pos, rows, &mut st, &mut kc, &mut vc)?;
            be.download(&st.logits, &mut logits)?;
            let live = &logits[..self.v_live];
            let max = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let sum: f64 = live.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll += max + sum.ln() - logits[pair[1] as usize] as f64;
        }
        Ok(nll)
    }

    /// `out [rows,N] = inp [rows,K] @ params[pi]^T` for decode rows: the int8 copy when
    /// serving int8 and fresh, else the f32 weight through `matmul_decode`.
    pub(super) fn linear(
        &self,
        pi: usize,
        out: &mut B::Buf,
        inp: &B::Buf,
        rows: usize,
    ) -> Result<()> {
        if !self.serving.stale
            && let Some(Some(w)) = self.serving.int8.get(pi)
        {
            return Ok(self.be.matmul_int8(out, inp, w, rows)?);
        }
        let p = &self.params[pi];
        let (n, k) = (p.shape[0], p.shape[1]);
        Ok(self.be.matmul_decode(out, inp, &p.value, rows, k, n)?)
    }

    /// The projection `which` (WQ..WD) of held layer `l`, for decode rows (a full model).
    pub(super) fn layer_linear(
        &self,
        l: usize,
        which: usize,
        out: &mut B::Buf,
        inp: &B::Buf,
        rows: usize,
    ) -> Result<()> {
        let first = usize::from(self.spec.has_embedding);
        self.linear(first + l * PARAMS_PER_LAYER + which, out, inp, rows)
    }

    /// The LM head on decode rows.
    pub(super) fn lm_head(&self, out: &mut B::Buf, inp: &B::Buf, rows: usize) -> Result<()> {
        self.linear(self.params.len() - 1, out, inp, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::StageSpec;
    use crate::model::batch::{BatchScratch, Sequence};
    use crate::model::generate::Sampling;
    use neuroshard_shared::model::ModelConfig;

    fn model(mode: ServeWeights) -> Model<CpuBackend> {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let mut m = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 42).unwrap();
        m.set_serve_weights(mode).unwrap();
        m
    }

    /// Next-token logits after `tokens` fed one decode step at a time after `prompt`.
    fn logits_along(m: &Model<CpuBackend>, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
        let be = &m.be;
        let kv = (m.cfg.kv_heads * m.cfg.head_dim()) as usize;
        let rows = m.cfg.max_seq as usize;
        let mut kc: Vec<Vec<f32>> = (0..m.num_layers()).map(|_| vec![0.0; rows * kv]).collect();
        let mut vc = kc.clone();
        let mut st = m.step_buffers(prompt.len()).unwrap();
        m.decode_pass(prompt, 0, rows, &mut st, &mut kc, &mut vc)
            .unwrap();
        let mut out = vec![st.logits.clone()];
        let mut st1 = m.step_buffers(1).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            m.decode_pass(&[t], prompt.len() + i, rows, &mut st1, &mut kc, &mut vc)
                .unwrap();
            let mut l = vec![0.0; m.cfg.vocab_size as usize];
            be.download(&st1.logits, &mut l).unwrap();
            out.push(l);
        }
        out
    }

    /// int8 decode logits against f32 on the same weights and inputs (tiny preset, seeded
    /// initial weights): max |Δ| / std(logits) measured 0.040 over these nine positions (prefill in
    /// int8 too); the bound is 2.5 times that.
    #[test]
    fn int8_logits_stay_close_to_f32() {
        let (f, q) = (model(ServeWeights::F32), model(ServeWeights::Int8));
        assert!(q.int8_bytes() > 0 && f.int8_bytes() == 0);
        let prompt: Vec<u32> = (0..20).map(|i| 5 + i * 13).collect();
        let tokens: Vec<u32> = (0..8).map(|i| 40 + i * 29).collect();
        let (lf, lq) = (
            logits_along(&f, &prompt, &tokens),
            logits_along(&q, &prompt, &tokens),
        );
        let mut worst = 0.0f32;
        for (a, b) in lf.iter().zip(&lq) {
            let mean = a.iter().sum::<f32>() / a.len() as f32;
            let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            worst = worst.max(diff / std);
        }
        eprintln!("int8 vs f32: max |logit diff| / logit std = {worst}");
        assert!(
            worst > 0.0,
            "int8 logits are the f32 ones: int8 was not used"
        );
        assert!(
            worst < 0.1,
            "int8 logits drift {worst} of their std from f32"
        );
    }

    /// In int8 too, a sequence decoded in a batch gets the tokens it gets alone.
    #[test]
    fn int8_batched_decoding_matches_alone() {
        let m = model(ServeWeights::Int8);
        let s = |seed| Sampling {
            temperature: if seed % 2 == 0 { 0.0 } else { 0.9 },
            top_p: 0.95,
            top_k: 0,
            seed,
        };
        let prompts: Vec<Vec<u32>> = (0..6u32)
            .map(|i| (0..1 + i * 5).map(|j| 7 + j * i).collect())
            .collect();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut active = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (seq, first) = m.start_sequence(p, 10, s(i as u64)).unwrap();
            got[i].push(first.token);
            if first.finish.is_none() {
                active.push((i, seq));
            }
        }
        let mut scratch: Option<BatchScratch<CpuBackend>> = None;
        while !active.is_empty() {
            let mut refs: Vec<&mut Sequence<CpuBackend>> =
                active.iter_mut().map(|(_, s)| s).collect();
            let out = m.decode_batch(&mut refs, &mut scratch).unwrap();
            for ((i, _), e) in active.iter().zip(&out) {
                got[*i].push(e.token);
            }
            active.retain(|(_, s)| !s.finished());
        }
        for (i, p) in prompts.iter().enumerate() {
            let mut alone = Vec::new();
            m.generate(p, 10, s(i as u64), &mut |t, _, _| {
                alone.push(t);
                true
            })
            .unwrap();
            assert_eq!(got[i], alone, "request {i}");
        }
    }

    /// Changed weights: decode reads f32 (never the stale copy) until the refresh, which
    /// quantizes the new weights.
    #[test]
    fn changed_weights_are_requantized() {
        let prompt = [5u32, 6, 7];
        let tokens = [9u32, 10];
        let mut q = model(ServeWeights::Int8);
        let mut f = model(ServeWeights::F32);
        for m in [&mut q, &mut f] {
            let head = m.params.len() - 1;
            m.params[head].value.iter_mut().for_each(|w| *w *= -2.0);
            m.weights_changed();
        }
        assert_eq!(
            logits_along(&q, &prompt, &tokens),
            logits_along(&f, &prompt, &tokens)
        );
        q.refresh_serving().unwrap();
        let mut fresh = model(ServeWeights::F32);
        let head = fresh.params.len() - 1;
        fresh.params[head].value.iter_mut().for_each(|w| *w *= -2.0);
        fresh.set_serve_weights(ServeWeights::Int8).unwrap();
        let got = logits_along(&q, &prompt, &tokens);
        assert_ne!(got, logits_along(&f, &prompt, &tokens));
        assert_eq!(got, logits_along(&fresh, &prompt, &tokens));
    }
}
