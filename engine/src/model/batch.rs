//! Continuous-batching generation: each request is a [`Sequence`] with its own KV cache,
//! prefilled alone when it is admitted; then every decode step runs the next token of all
//! active sequences through the model together. The projections, the MLP and the LM head are
//! one decode matmul each over the batch rows [N,C] (`Backend::matmul_decode`: every weight
//! read once per step for all rows); RoPE, the cache append and attention are one
//! `Backend::attention_decode` call per layer for all sequences, each at its own position
//! over its own cache (ragged lengths).
//!
//! Each row of a batched matmul is computed exactly as the same row alone, so a sequence gets
//! the tokens it would get decoded by itself ([`Model::generate`]), whatever else shares the
//! batch (checked in `model/tests.rs`).

use crate::backend::{Backend, DecodeAttnShape, DecodeCache};

use super::generate::{BOS_ID, EOS_ID, Finish, Sampling, sample};
use super::layer::{ATTN_NORM, MLP_NORM, PARAMS_PER_LAYER, WD, WG, WK, WO, WQ, WU, WV};
use super::params::SplitMix64;
use super::{Model, ModelError, Result};
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::toploc::{self, ChunkCommit};

/// Bytes of the KV cache of one sequence of `rows` positions: layers × 2 (k and v) × rows ×
/// kv_heads × head_dim × 4 (f32).
pub fn kv_cache_bytes(cfg: &ModelConfig, rows: usize) -> u64 {
    cfg.layers as u64 * 2 * rows as u64 * cfg.kv_heads as u64 * cfg.head_dim() as u64 * 4
}

/// Cache rows a request reserves: its prompt plus the tokens it may generate, at most the
/// model's context.
pub fn reserved_rows(cfg: &ModelConfig, prompt_len: usize, max_tokens: u32) -> usize {
    (prompt_len.max(1) + max_tokens as usize).min(cfg.max_seq as usize)
}

/// One token produced for a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub token: u32,
    pub index: u32,
    /// Set on the sequence's last token.
    pub finish: Option<Finish>,
    /// When the sequence commits (`commit_k > 0`) and this token ends a chunk of
    /// [`toploc::CHUNK_TOKENS`] or the sequence: the top entries of the logits it was drawn
    /// from (`neuroshard_shared::toploc`).
    pub commit: Option<ChunkCommit>,
}

/// A request being generated: its KV cache (reserved for its whole length at admission), its
/// position and its sampler.
pub struct Sequence<B: Backend> {
    kc: Vec<B::Buf>,
    vc: Vec<B::Buf>,
    /// Rows reserved in each cache.
    rows: usize,
    /// Rows filled (the position of the next input token).
    pos: usize,
    /// The last token produced: the next step's input.
    next: u32,
    /// Tokens produced so far.
    produced: u32,
    max_tokens: u32,
    sampling: Sampling,
    rng: SplitMix64,
    finished: bool,
    /// Entries of the TOPLOC-style commitment per chunk (0: none).
    commit_k: usize,
}

impl<B: Backend> Sequence<B> {
    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Buffers of one batched decode step over `n` sequences.
pub struct BatchScratch<B: Backend> {
    n: usize,
    x: B::Buf,
    nrm: B::Buf,
    rstd: B::Buf,
    q_pre: B::Buf,
    k_pre: B::Buf,
    v: B::Buf,
    att: B::Buf,
    proj: B::Buf,
    x2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
    logits: B::Buf,
    host_logits: Vec<f32>,
}

impl<B: Backend> Model<B> {
    pub(super) fn check_generation(&self, prompt: &[u32]) -> Result<()> {
        if !self.spec.is_full(&self.cfg) {
            return Err(ModelError::Stage(
                "generation needs the full model on this node".into(),
            ));
        }
        let vocab = self.cfg.vocab_size as usize;
        let max_seq = self.cfg.max_seq as usize;
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
        Ok(())
    }

    /// Admits a request: reserves its KV cache, prefills the prompt (bos when empty) and
    /// samples its first token.
    pub fn start_sequence(
        &self,
        prompt: &[u32],
        max_tokens: u32,
        sampling: Sampling,
    ) -> Result<(Sequence<B>, Emitted)> {
        self.start_sequence_committed(prompt, max_tokens, sampling, 0)
    }

    /// As [`Model::start_sequence`], committing the top `commit_k` logits of every chunk's
    /// last token (0: no commitment).
    pub fn start_sequence_committed(
        &self,
        prompt: &[u32],
        max_tokens: u32,
        sampling: Sampling,
        commit_k: usize,
    ) -> Result<(Sequence<B>, Emitted)> {
        let prompt: Vec<u32> = if prompt.is_empty() {
            vec![BOS_ID]
        } else {
            prompt.to_vec()
        };
        self.check_generation(&prompt)?;
        if max_tokens == 0 {
            return Err(ModelError::Input("max_tokens must be at least 1".into()));
        }
        let be = &self.be;
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let rows = reserved_rows(&self.cfg, prompt.len(), max_tokens);
        let layers = self.num_layers();
        let mut kc = Vec::with_capacity(layers);
        let mut vc = Vec::with_capacity(layers);
        for _ in 0..layers {
            kc.push(be.zeros(rows * kv)?);
            vc.push(be.zeros(rows * kv)?);
        }
        let mut st = self.step_buffers(prompt.len())?;
        self.decode_pass(&prompt, 0, rows, &mut st, &mut kc, &mut vc)?;
        let mut logits = vec![0.0f32; self.cfg.vocab_size as usize];
        be.download(&st.logits, &mut logits)?;
        let mut seq = Sequence {
            kc,
            vc,
            rows,
            pos: prompt.len(),
            next: 0,
            produced: 0,
            max_tokens,
            sampling,
            rng: SplitMix64(sampling.seed),
            finished: false,
            commit_k,
        };
        let row = &mut logits[..self.v_live];
        let token = sample(row, sampling, &mut seq.rng);
        let emitted = seq.record(token, self.cfg.max_seq as usize, row);
        Ok((seq, emitted))
    }

    fn batch_scratch(&self, n: usize) -> Result<BatchScratch<B>> {
        let be = &self.be;
        let c = self.cfg.hidden as usize;
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let f = self.cfg.ffn as usize;
        let v = self.cfg.vocab_size as usize;
        Ok(BatchScratch {
            n,
            x: be.zeros(n * c)?,
            nrm: be.zeros(n * c)?,
            rstd: be.zeros(n)?,
            q_pre: be.zeros(n * c)?,
            k_pre: be.zeros(n * kv)?,
            v: be.zeros(n * kv)?,
            att: be.zeros(n * c)?,
            proj: be.zeros(n * c)?,
            x2: be.zeros(n * c)?,
            gate: be.zeros(n * f)?,
            up: be.zeros(n * f)?,
            h: be.zeros(n * f)?,
            logits: be.zeros(n * v)?,
            host_logits: vec![0.0; n * v],
        })
    }

    /// One decode step of every sequence in `seqs` (none finished): feeds each its last
    /// token, appends to its cache and samples its next token. `scratch` is reused while the
    /// batch size stays the same.
    pub fn decode_batch(
        &self,
        seqs: &mut [&mut Sequence<B>],
        scratch: &mut Option<BatchScratch<B>>,
    ) -> Result<Vec<Emitted>> {
        let n = seqs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(s) = seqs.iter().find(|s| s.finished || s.pos >= s.rows) {
            return Err(ModelError::Input(format!(
                "sequence at position {} of {} reserved rows cannot be decoded further",
                s.pos, s.rows
            )));
        }
        if scratch.as_ref().is_none_or(|s| s.n != n) {
            *scratch = Some(self.batch_scratch(n)?);
        }
        let st = scratch.as_mut().expect("just set");
        let be = &self.be;
        let cfg = &self.cfg;
        let (c, vocab) = (cfg.hidden as usize, cfg.vocab_size as usize);
        let (h, kvh, d) = (
            cfg.heads as usize,
            cfg.kv_heads as usize,
            cfg.head_dim() as usize,
        );
        let (eps, theta) = (cfg.norm_eps, cfg.rope_theta);
        let shape = DecodeAttnShape { h, kvh, d, theta };
        let tokens: Vec<u32> = seqs.iter().map(|s| s.next).collect();
        let ids = be.upload_ids(&tokens)?;
        be.embedding_forward(&mut st.x, &ids, &self.params[0].value, c)?;
        for l in 0..self.num_layers() {
            if !self.serving.runs_layer(l, self.num_layers()) {
                continue;
            }
            let w = &self.params[1 + l * PARAMS_PER_LAYER..1 + (l + 1) * PARAMS_PER_LAYER];
            be.rmsnorm_forward(
                &mut st.nrm,
                &mut st.rstd,
                &st.x,
                &w[ATTN_NORM].value,
                n,
                c,
                eps,
            )?;
            self.layer_linear(l, WQ, &mut st.q_pre, &st.nrm, n)?;
            self.layer_linear(l, WK, &mut st.k_pre, &st.nrm, n)?;
            self.layer_linear(l, WV, &mut st.v, &st.nrm, n)?;
            let mut caches: Vec<DecodeCache<'_, B::Buf>> = seqs
                .iter_mut()
                .map(|s| {
                    let s = &mut **s;
                    DecodeCache {
                        k: &mut s.kc[l],
                        v: &mut s.vc[l],
                        pos: s.pos,
                        rows: s.rows,
                    }
                })
                .collect();
            be.attention_decode(&mut st.att, &st.q_pre, &st.k_pre, &st.v, &mut caches, shape)?;
            self.layer_linear(l, WO, &mut st.proj, &st.att, n)?;
            be.add(&mut st.x2, &st.x, &st.proj)?;
            be.rmsnorm_forward(
                &mut st.nrm,
                &mut st.rstd,
                &st.x2,
                &w[MLP_NORM].value,
                n,
                c,
                eps,
            )?;
            self.layer_linear(l, WG, &mut st.gate, &st.nrm, n)?;
            self.layer_linear(l, WU, &mut st.up, &st.nrm, n)?;
            be.swiglu_forward(&mut st.h, &st.gate, &st.up)?;
            self.layer_linear(l, WD, &mut st.proj, &st.h, n)?;
            be.add(&mut st.x, &st.x2, &st.proj)?;
        }
        let np = self.params.len();
        be.rmsnorm_forward(
            &mut st.nrm,
            &mut st.rstd,
            &st.x,
            &self.params[np - 2].value,
            n,
            c,
            eps,
        )?;
        self.lm_head(&mut st.logits, &st.nrm, n)?;
        be.download(&st.logits, &mut st.host_logits)?;
        let max_seq = cfg.max_seq as usize;
        let mut out = Vec::with_capacity(n);
        for (i, s) in seqs.iter_mut().enumerate() {
            s.pos += 1;
            let row = &mut st.host_logits[i * vocab..i * vocab + self.v_live];
            let token = sample(row, s.sampling, &mut s.rng);
            out.push(s.record(token, max_seq, row));
        }
        Ok(out)
    }
}

impl<B: Backend> Sequence<B> {
    /// Counts a produced token and decides whether the sequence ends with it (the same rules
    /// as [`Model::generate`]); commits `row` (the live logits the token was drawn from, which
    /// `sample` leaves as they are) when the token ends a chunk or the sequence.
    fn record(&mut self, token: u32, max_seq: usize, row: &[f32]) -> Emitted {
        let index = self.produced;
        self.produced += 1;
        self.next = token;
        let finish = if token == EOS_ID {
            Some(Finish::Eos)
        } else if index + 1 == self.max_tokens {
            Some(Finish::Length)
        } else if self.pos >= max_seq || self.pos >= self.rows {
            Some(Finish::MaxSeq)
        } else {
            None
        };
        self.finished = finish.is_some();
        let chunk_end = (index as usize + 1).is_multiple_of(toploc::CHUNK_TOKENS);
        let commit = (self.commit_k > 0 && (chunk_end || self.finished))
            .then(|| toploc::commit_row(row, self.commit_k));
        Emitted {
            token,
            index,
            finish,
            commit,
        }
    }
}
