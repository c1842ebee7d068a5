//! Autoregressive generation on a full model: prefill the prompt into a per-layer KV cache,
//! then decode one token at a time, sampling with temperature / top-k / top-p from a seeded
//! generator. Stops at eos, after `max_tokens`, or when the sequence reaches `max_seq`.

use crate::backend::{Backend, CachedAttnShape};

use super::layer::{ATTN_NORM, MLP_NORM, PARAMS_PER_LAYER, WD, WG, WK, WO, WQ, WU, WV};
use super::params::SplitMix64;
use super::{Model, ModelError, Result};

/// The eos id of the tokenizer layout.
pub const EOS_ID: u32 = 2;
/// The bos id, used as the prompt when none is given.
pub const BOS_ID: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 or >= 1 means no nucleus cut.
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    pub seed: u64,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    Eos,
    MaxSeq,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Eos => "eos",
            Finish::MaxSeq => "max_seq",
        }
    }
}

/// Per-shape buffers of one decoding pass over `tq` tokens.
pub(super) struct Step<B: Backend> {
    pub(super) x: B::Buf,
    pub(super) n: B::Buf,
    pub(super) rstd: B::Buf,
    pub(super) q_pre: B::Buf,
    pub(super) q: B::Buf,
    pub(super) k_pre: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) att: B::Buf,
    pub(super) proj: B::Buf,
    pub(super) x2: B::Buf,
    pub(super) gate: B::Buf,
    pub(super) up: B::Buf,
    pub(super) h: B::Buf,
    pub(super) last: B::Buf,
    pub(super) nlast: B::Buf,
    pub(super) rlast: B::Buf,
    pub(super) logits: B::Buf,
}

impl<B: Backend> Model<B> {
    /// Generates up to `max_tokens` tokens after `prompt`, calling `emit(token, index, finish)`
    /// for each (finish set on the last); stops early when `emit` returns false.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: u32,
        sampling: Sampling,
        emit: &mut dyn FnMut(u32, u32, Option<Finish>) -> bool,
    ) -> Result<()> {
        if !self.spec.is_full(&self.cfg) {
            return Err(ModelError::Stage(
                "generation needs the full model on this node".into(),
            ));
        }
        let vocab = self.cfg.vocab_size as usize;
        let max_seq = self.cfg.max_seq as usize;
        let prompt: Vec<u32> = if prompt.is_empty() {
            vec![BOS_ID]
        } else {
            prompt.to_vec()
        };
        if let Some(&bad) = prompt.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "prompt token {bad} not below vocab_size {vocab}"
            )));
        }
        if prompt.len() >= max_seq {
            return Err(ModelError::Input(format!(
                "prompt of {} tokens leaves no room below max_seq {max_seq}",
                prompt.len()
            )));
        }
        if max_tokens == 0 {
            return Ok(());
        }
        let be = &self.be;
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let layers = self.num_layers();
        let mut kcache = Vec::with_capacity(layers);
        let mut vcache = Vec::with_capacity(layers);
        for _ in 0..layers {
            kcache.push(be.zeros(max_seq * kv)?);
            vcache.push(be.zeros(max_seq * kv)?);
        }
        let mut rng = SplitMix64(sampling.seed);
        let mut logits = vec![0.0f32; vocab];
        let mut pos = 0usize;
        let mut input = prompt;
        let mut step_bufs: Option<(usize, Step<B>)> = None;
        for index in 0..max_tokens {
            let tq = input.len();
            if step_bufs.as_ref().is_none_or(|(n, _)| *n != tq) {
                step_bufs = Some((tq, self.step_buffers(tq)?));
            }
            let (_, st) = step_bufs.as_mut().expect("just set");
            self.decode_pass(&input, pos, max_seq, st, &mut kcache, &mut vcache)?;
            be.download(&st.logits, &mut logits)?;
            pos += tq;
            let token = sample(&mut logits[..self.v_live], sampling, &mut rng);
            let finish = if token == EOS_ID {
                Some(Finish::Eos)
            } else if index + 1 == max_tokens {
                Some(Finish::Length)
            } else if pos >= max_seq {
                Some(Finish::MaxSeq)
            } else {
                None
            };
            if !emit(token, index, finish) || finish.is_some() {
                return Ok(());
            }
            input = vec![token];
        }
        Ok(())
    }

    pub(super) fn step_buffers(&self, tq: usize) -> Result<Step<B>> {
        let be = &self.be;
        let c = self.cfg.hidden as usize;
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let f = self.cfg.ffn as usize;
        Ok(Step {
            x: be.zeros(tq * c)?,
            n: be.zeros(tq * c)?,
            rstd: be.zeros(tq)?,
            q_pre: be.zeros(tq * c)?,
            q: be.zeros(tq * c)?,
            k_pre: be.zeros(tq * kv)?,
            k: be.zeros(tq * kv)?,
            v: be.zeros(tq * kv)?,
            att: be.zeros(tq * c)?,
            proj: be.zeros(tq * c)?,
            x2: be.zeros(tq * c)?,
            gate: be.zeros(tq * f)?,
            up: be.zeros(tq * f)?,
            h: be.zeros(tq * f)?,
            last: be.zeros(c)?,
            nlast: be.zeros(c)?,
            rlast: be.zeros(1)?,
            logits: be.zeros(self.cfg.vocab_size as usize)?,
        })
    }

    /// Runs `tokens` at positions `past..`, appending their keys/values to the caches (of `tmax`
    /// rows), and
    /// leaves the next-token logits of the last position in `st.logits`.
    pub(super) fn decode_pass(
        &self,
        tokens: &[u32],
        past: usize,
        tmax: usize,
        st: &mut Step<B>,
        kc: &mut [B::Buf],
        vc: &mut [B::Buf],
    ) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (tq, c) = (tokens.len(), cfg.hidden as usize);
        let ids = be.upload_ids(tokens)?;
        be.embedding_forward(&mut st.x, &ids, &self.params[0].value, c)?;
        self.cached_layers(1, tq, past, tmax, st, kc, vc)?;
        self.last_logits(tq, st)
    }

    /// Final norm and LM head on the last of `tq` positions of `st.x`: the next-token logits
    /// (full vocabulary) in `st.logits`.
    pub(super) fn last_logits(&self, tq: usize, st: &mut Step<B>) -> Result<()> {
        let be = &self.be;
        let c = self.cfg.hidden as usize;
        let n = self.params.len();
        be.copy_range(&mut st.last, 0, &st.x, (tq - 1) * c, c)?;
        be.rmsnorm_forward(
            &mut st.nlast,
            &mut st.rlast,
            &st.last,
            &self.params[n - 2].value,
            1,
            c,
            self.cfg.norm_eps,
        )?;
        self.lm_head(&mut st.logits, &st.nlast, 1)
    }

    /// Runs the held transformer layers over the `tq` rows in `st.x` (in place) at positions
    /// `past..`, appending keys/values to the caches (of `tmax` rows); the layer parameters
    /// start at `self.params[first]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cached_layers(
        &self,
        first: usize,
        tq: usize,
        past: usize,
        tmax: usize,
        st: &mut Step<B>,
        kc: &mut [B::Buf],
        vc: &mut [B::Buf],
    ) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let c = cfg.hidden as usize;
        let (h, kvh, d) = (
            cfg.heads as usize,
            cfg.kv_heads as usize,
            cfg.head_dim() as usize,
        );
        let kv = kvh * d;
        let (eps, theta) = (cfg.norm_eps, cfg.rope_theta);
        for l in 0..self.num_layers() {
            if !self.serving.runs_layer(l, self.num_layers()) {
                continue;
            }
            let at = first + l * PARAMS_PER_LAYER;
            let w = &self.params[at..at + PARAMS_PER_LAYER];
            // The decode matmul for every row count, prefill included: for the few to few
            // hundred rows of generation it reads each weight row once for all rows and beats
            // the packing GEMM (BENCHMARKS.md), and a sequence's rows get the same bits alone
            // and batched.
            let mm = |out: &mut B::Buf, inp: &B::Buf, which: usize| {
                self.linear(at + which, out, inp, tq)
            };
            be.rmsnorm_forward(
                &mut st.n,
                &mut st.rstd,
                &st.x,
                &w[ATTN_NORM].value,
                tq,
                c,
                eps,
            )?;
            mm(&mut st.q_pre, &st.n, WQ)?;
            be.rope_forward(&mut st.q, &st.q_pre, 1, tq, h, d, past, theta)?;
            mm(&mut st.k_pre, &st.n, WK)?;
            be.rope_forward(&mut st.k, &st.k_pre, 1, tq, kvh, d, past, theta)?;
            mm(&mut st.v, &st.n, WV)?;
            be.copy_range(&mut kc[l], past * kv, &st.k, 0, tq * kv)?;
            be.copy_range(&mut vc[l], past * kv, &st.v, 0, tq * kv)?;
            let shape = CachedAttnShape {
                b: 1,
                tq,
                past,
                tmax,
                h,
                kvh,
                d,
            };
            be.attention_cached(&mut st.att, &st.q, &kc[l], &vc[l], shape)?;
            mm(&mut st.proj, &st.att, WO)?;
            be.add(&mut st.x2, &st.x, &st.proj)?;
            be.rmsnorm_forward(
                &mut st.n,
                &mut st.rstd,
                &st.x2,
                &w[MLP_NORM].value,
                tq,
                c,
                eps,
            )?;
            mm(&mut st.gate, &st.n, WG)?;
            mm(&mut st.up, &st.n, WU)?;
            be.swiglu_forward(&mut st.h, &st.gate, &st.up)?;
            mm(&mut st.proj, &st.h, WD)?;
            be.add(&mut st.x, &st.x2, &st.proj)?;
        }
        Ok(())
    }
}

/// Picks a token from `logits` (modified in place): greedy at temperature 0, else softmax at
/// the temperature restricted to the top-k and then to the smallest set whose mass reaches
/// top-p.
pub fn sample(logits: &mut [f32], s: Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 || !s.temperature.is_finite() {
        return argmax();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if s.top_k > 0 && (s.top_k as usize) < idx.len() {
        idx.truncate(s.top_k as usize);
    }
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / s.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i];
        }
    }
    *idx.last().expect("at least one candidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let mut rng = SplitMix64(1);
        let base = [0.0f32, 3.0, 1.0, 2.5];
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        };
        assert_eq!(sample(&mut base.clone(), greedy, &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
            seed: 0,
        };
        for _ in 0..20 {
            assert_eq!(sample(&mut base.clone(), top1, &mut rng), 1);
        }
        let top2 = Sampling {
            temperature: 1.0,
            top_p: 0.0,
            top_k: 2,
            seed: 0,
        };
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[sample(&mut base.clone(), top2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0);
        assert!(seen[1] > seen[3] && seen[3] > 50, "{seen:?}");
        // top_p 0.5: token 1 alone holds more than half the mass.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            seed: 0,
        };
        for _ in 0..20 {
            assert_eq!(sample(&mut base.clone(), nucleus, &mut rng), 1);
        }
    }
}
