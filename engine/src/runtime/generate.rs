//! Generation: one Generate request alone, and the continuous-batching steps `batcher.rs`
//! drives (prepare, admit, one decode step of the whole batch, cancel).

use neuroshard_proto::engine as pb;

use super::RuntimeError;
use super::state::State;
use crate::backend::Backend;
use crate::model::batch::{Emitted, Sequence, kv_cache_bytes, reserved_rows};
use crate::model::generate::Sampling;

/// A Generate request checked and tokenized, waiting for a place in the batch.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// KV cache bytes the request reserves for its whole length.
    pub kv_bytes: u64,
    /// Entries of the TOPLOC-style commitment per chunk (0: none).
    pub commit_top_k: usize,
}

/// A sequence in the batch with the bytes of a character its text has not completed yet.
pub(super) struct Active<B: Backend> {
    id: u64,
    seq: Sequence<B>,
    pending_text: Vec<u8>,
}

impl<B: Backend> State<B> {
    /// One request alone (no batching): each token goes to `emit` as it is produced; stops
    /// early when `emit` returns false. Commits nothing (the server's batched path does).
    pub(super) fn generate(
        &mut self,
        req: &pb::GenerateRequest,
        emit: &mut dyn FnMut(pb::GenerateReply) -> bool,
    ) -> Result<(), RuntimeError> {
        let p = self.gen_prepare(req)?;
        self.model.refresh_serving()?;
        let tokenizer = self.tokenizer.as_ref().expect("loaded by gen_prepare");
        let prompt_tokens = p.prompt_ids.len() as u32;
        let mut decode = tokenizer.decode_stream();
        self.model.generate(
            &p.prompt_ids,
            p.max_tokens,
            p.sampling,
            &mut |token, index, finish| {
                emit(pb::GenerateReply {
                    token_id: token,
                    index,
                    finish_reason: finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
                    text: decode.step(token),
                    prompt_tokens: if index == 0 { prompt_tokens } else { 0 },
                    queue_us: 0,
                    ..Default::default()
                })
            },
        )?;
        Ok(())
    }

    /// Tokenizes and checks a Generate request, and says how much KV cache it reserves; the
    /// batch is untouched.
    pub(super) fn gen_prepare(
        &mut self,
        req: &pb::GenerateRequest,
    ) -> Result<Prepared, RuntimeError> {
        let (prompt_ids, max_tokens, sampling) =
            self.gen_prepare_parts(&req.prompt, &req.prompt_ids, req.max_tokens, req.sampling)?;
        let rows = reserved_rows(&self.model.cfg, prompt_ids.len(), max_tokens);
        // A commitment larger than the vocabulary is the whole row.
        let commit_top_k = (req.commit_top_k as usize).min(self.model.v_live);
        Ok(Prepared {
            kv_bytes: kv_cache_bytes(&self.model.cfg, rows),
            prompt_ids,
            max_tokens,
            sampling,
            commit_top_k,
        })
    }

    /// Admits a prepared request into the batch under `id`: prefill and first token. A request
    /// whose first token is its last is not kept.
    pub(super) fn gen_admit(
        &mut self,
        id: u64,
        p: &Prepared,
    ) -> Result<pb::GenerateReply, RuntimeError> {
        self.model.refresh_serving()?;
        let (seq, first) = self.model.start_sequence_committed(
            &p.prompt_ids,
            p.max_tokens,
            p.sampling,
            p.commit_top_k,
        )?;
        let mut active = Active {
            id,
            seq,
            pending_text: Vec::new(),
        };
        let last = first.finish.is_some();
        let mut reply = self.reply(&mut active, first)?;
        reply.prompt_tokens = p.prompt_ids.len() as u32;
        if p.commit_top_k > 0 {
            // As generated from: an empty prompt is BOS alone.
            reply.prompt_ids = if p.prompt_ids.is_empty() {
                vec![crate::model::generate::BOS_ID]
            } else {
                p.prompt_ids.clone()
            };
        }
        if !last {
            self.active.retain(|a| a.id != id);
            self.active.push(active);
        }
        Ok(reply)
    }

    /// One decode step of every sequence in the batch: a reply per sequence; finished ones
    /// leave. On an error the batch is emptied.
    pub(super) fn gen_step(&mut self) -> Result<Vec<(u64, pb::GenerateReply)>, RuntimeError> {
        if let Err(e) = self.model.refresh_serving() {
            self.active.clear();
            return Err(e.into());
        }
        let mut refs: Vec<&mut Sequence<B>> = self.active.iter_mut().map(|a| &mut a.seq).collect();
        let emitted = match self.model.decode_batch(&mut refs, &mut self.batch_scratch) {
            Ok(e) => e,
            Err(e) => {
                self.active.clear();
                return Err(e.into());
            }
        };
        let mut active = std::mem::take(&mut self.active);
        let mut out = Vec::with_capacity(active.len());
        for (a, e) in active.iter_mut().zip(emitted) {
            out.push((a.id, self.reply(a, e)?));
        }
        active.retain(|a| !a.seq.finished());
        self.active = active;
        Ok(out)
    }

    /// Drops a sequence (its client went away), freeing its KV cache.
    pub(super) fn gen_cancel(&mut self, id: u64) {
        self.active.retain(|a| a.id != id);
    }

    /// A generation request's prompt ids (a text prompt tokenized after a document
    /// separator), max_tokens (0: the model's context) and sampling (no seed: from the clock).
    pub(super) fn gen_prepare_parts(
        &mut self,
        prompt: &str,
        prompt_ids: &[u32],
        max_tokens: u32,
        sampling: Option<pb::SamplingParams>,
    ) -> Result<(Vec<u32>, u32, Sampling), RuntimeError> {
        let s = sampling.unwrap_or_default();
        let seed = s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let sampling = Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed,
        };
        let max_tokens = if max_tokens == 0 {
            self.model.cfg.max_seq
        } else {
            max_tokens
        };
        let tokenizer = self.tokenizer()?;
        // A text prompt starts a new document, as documents start after EOS in training.
        let prompt_ids: Vec<u32> = if prompt.is_empty() {
            prompt_ids.to_vec()
        } else {
            std::iter::once(neuroshard_shared::tokenizer::EOS_ID)
                .chain(tokenizer.encode(prompt))
                .collect()
        };
        Ok((prompt_ids, max_tokens, sampling))
    }

    /// The reply carrying one produced token of `a`, with the text it completes.
    fn reply(&mut self, a: &mut Active<B>, e: Emitted) -> Result<pb::GenerateReply, RuntimeError> {
        let tokenizer = self.tokenizer()?;
        let mut decode = neuroshard_shared::tokenizer::DecodeStream::resume(
            tokenizer,
            std::mem::take(&mut a.pending_text),
        );
        let text = decode.step(e.token);
        a.pending_text = decode.into_pending();
        let (commit_indices, commit_values) = e.commit.map_or((Vec::new(), Vec::new()), |c| {
            (c.indices, c.values.into_iter().map(u32::from).collect())
        });
        Ok(pb::GenerateReply {
            token_id: e.token,
            index: e.index,
            finish_reason: e.finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
            text,
            prompt_tokens: 0,
            queue_us: 0,
            prompt_ids: Vec::new(),
            commit_indices,
            commit_values,
        })
    }
}
