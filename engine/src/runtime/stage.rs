//! Stage sessions of distributed inference (see `StageStart` … `StageEnd` in
//! `proto/engine.proto`). A session is keyed by the requester's random id and holds, on this
//! engine, the KV cache of the layers held here (opened by the first StageForward) and, on the
//! requesting node's engine, the front end: the sampler and the text decoder (StageStart,
//! StageSample). Sessions count against a KV byte budget and a session cap; one idle longer
//! than [`STAGE_IDLE`] is dropped (a requester that died never leaks memory); StageEnd frees
//! one at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::{Segment, TensorRef};

use super::RuntimeError;
use super::state::State;
use crate::backend::Backend;
use crate::model::batch::reserved_rows;
use crate::model::generate::{BOS_ID, EOS_ID, Finish, Sampling, sample};
use crate::model::params::SplitMix64;
use crate::model::stage_gen::{PassInput, StageCache};

/// Open stage sessions at most per engine.
pub const MAX_STAGE_SESSIONS: usize = 64;
/// KV cache bytes all stage sessions may hold together.
pub const STAGE_KV_BUDGET: u64 = 256 << 20;
/// A session untouched this long is dropped.
pub const STAGE_IDLE: Duration = Duration::from_secs(120);

/// The requester's side of a session: sampling and text.
struct Front {
    sampling: Sampling,
    rng: SplitMix64,
    prompt_len: usize,
    max_tokens: u32,
    rows: usize,
    /// Positions the stages have processed (prompt, then one per sampled token fed back).
    pos: usize,
    produced: u32,
    pending_text: Vec<u8>,
}

pub(super) struct StageSession<B: Backend> {
    cache: Option<StageCache<B>>,
    kv_bytes: u64,
    front: Option<Front>,
    last_used: Instant,
}

impl<B: Backend> StageSession<B> {
    fn new() -> StageSession<B> {
        StageSession {
            cache: None,
            kv_bytes: 0,
            front: None,
            last_used: Instant::now(),
        }
    }
}

pub(super) type StageSessions<B> = HashMap<u64, StageSession<B>>;

fn read(
    seg: &Segment,
    r: Option<pb::TensorRef>,
    what: &str,
) -> Result<neuroshard_shared::shm::Tensor, RuntimeError> {
    let r = r.ok_or_else(|| RuntimeError::Invalid(format!("missing tensor reference `{what}`")))?;
    Ok(seg.read(TensorRef {
        slot: r.slot,
        seq: r.seq,
    })?)
}

impl<B: Backend> State<B> {
    /// KV bytes held by every open stage session.
    pub(super) fn stage_kv_bytes(&self) -> u64 {
        self.stage_sessions.values().map(|s| s.kv_bytes).sum()
    }

    /// Drops the sessions idle longer than [`STAGE_IDLE`].
    pub(super) fn stage_prune(&mut self) {
        let before = self.stage_sessions.len();
        self.stage_sessions
            .retain(|_, s| s.last_used.elapsed() < STAGE_IDLE);
        let dropped = before - self.stage_sessions.len();
        if dropped > 0 {
            tracing::info!(dropped, "idle inference stage sessions dropped");
        }
    }

    fn stage_session(&mut self, id: u64) -> Result<&mut StageSession<B>, RuntimeError> {
        self.stage_prune();
        if !self.stage_sessions.contains_key(&id) && self.stage_sessions.len() >= MAX_STAGE_SESSIONS
        {
            return Err(RuntimeError::Busy(format!(
                "{MAX_STAGE_SESSIONS} inference sessions are open on this stage"
            )));
        }
        let s = self
            .stage_sessions
            .entry(id)
            .or_insert_with(StageSession::new);
        s.last_used = Instant::now();
        Ok(s)
    }

    /// The requester's front end of a session: the sampler and the text decoder.
    pub(super) fn stage_start(
        &mut self,
        req: &pb::StageStartRequest,
    ) -> Result<pb::StageStartReply, RuntimeError> {
        let p =
            self.gen_prepare_parts(&req.prompt, &req.prompt_ids, req.max_tokens, req.sampling)?;
        let (mut prompt_ids, max_tokens, sampling) = p;
        if prompt_ids.is_empty() {
            prompt_ids = vec![BOS_ID];
        }
        let cfg = &self.model.cfg;
        if let Some(&bad) = prompt_ids.iter().find(|&&i| i >= cfg.vocab_size) {
            return Err(RuntimeError::Invalid(format!(
                "prompt token {bad} not below vocab_size {}",
                cfg.vocab_size
            )));
        }
        if prompt_ids.len() >= cfg.max_seq as usize {
            return Err(RuntimeError::Invalid(format!(
                "prompt of {} tokens leaves no room below max_seq {}",
                prompt_ids.len(),
                cfg.max_seq
            )));
        }
        if req.draws >= cfg.max_seq {
            return Err(RuntimeError::Invalid(format!(
                "draws {} not below max_seq {}",
                req.draws, cfg.max_seq
            )));
        }
        let rows = reserved_rows(cfg, prompt_ids.len(), max_tokens);
        // One draw per token sampled (`sample`): a resumed generation's sampler goes on from
        // where the first route's left off.
        let mut rng = SplitMix64(sampling.seed);
        for _ in 0..req.draws {
            rng.next_u64();
        }
        let front = Front {
            sampling,
            rng,
            prompt_len: prompt_ids.len(),
            max_tokens,
            rows,
            pos: 0,
            produced: 0,
            pending_text: Vec::new(),
        };
        self.stage_session(req.session)?.front = Some(front);
        Ok(pb::StageStartReply {
            prompt_ids,
            max_tokens,
            rows: rows as u32,
        })
    }

    /// This stage's layers for one step of a session.
    pub(super) fn stage_forward(
        &mut self,
        req: &pb::StageForwardRequest,
        seg: &Segment,
    ) -> Result<pb::StageForwardReply, RuntimeError> {
        let input = read(seg, req.input, "input")?;
        let c = u64::from(self.model.cfg.hidden);
        let used = self.stage_kv_bytes();
        let open = self
            .stage_sessions
            .get(&req.session)
            .and_then(|s| s.cache.as_ref())
            .is_some();
        if !open {
            if req.position != 0 {
                return Err(RuntimeError::SessionGone(format!(
                    "session {:x} is not open here (it ended or expired)",
                    req.session
                )));
            }
            let bytes = self.model.stage_cache_bytes(req.rows as usize);
            if used + bytes > STAGE_KV_BUDGET {
                return Err(RuntimeError::Busy(format!(
                    "the session's KV cache ({bytes} bytes) does not fit the stage budget \
                     ({used} of {STAGE_KV_BUDGET} bytes in use)"
                )));
            }
            let cache = self.model.stage_cache(req.rows as usize)?;
            let s = self.stage_session(req.session)?;
            s.cache = Some(cache);
            s.kv_bytes = bytes;
        }
        let s = self
            .stage_sessions
            .get_mut(&req.session)
            .ok_or_else(|| RuntimeError::Invalid("the session closed".into()))?;
        s.last_used = Instant::now();
        let model = &self.model;
        let cache = s.cache.as_mut().expect("opened above");
        if cache.position() != req.position as usize {
            return Err(RuntimeError::Invalid(format!(
                "session at position {}, the request says {}",
                cache.position(),
                req.position
            )));
        }
        let out = if model.spec.has_embedding {
            let ids = input.to_u32().ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "the first stage takes u32 ids, got {:?}",
                    input.dtype
                ))
            })?;
            if input.shape.len() != 1 {
                return Err(RuntimeError::Invalid(format!(
                    "token ids have shape {:?}, expected [T]",
                    input.shape
                )));
            }
            model.stage_pass(cache, PassInput::Ids(&ids))?
        } else {
            let x = input.to_f32().ok_or_else(|| {
                RuntimeError::Invalid(format!("activations must be f32, got {:?}", input.dtype))
            })?;
            if input.shape.len() != 3 || input.shape[0] != 1 || input.shape[2] != c {
                return Err(RuntimeError::Invalid(format!(
                    "activations have shape {:?}, expected [1, T, {c}]",
                    input.shape
                )));
            }
            model.stage_pass(cache, PassInput::Acts(&x))?
        };
        let shape: Vec<u64> = if model.spec.has_head {
            vec![out.len() as u64]
        } else {
            vec![1, out.len() as u64 / c, c]
        };
        let r = seg.write_f32(req.output_slot, &shape, &out)?;
        Ok(pb::StageForwardReply {
            output: Some(pb::TensorRef {
                slot: r.slot,
                seq: r.seq,
            }),
            kv_bytes: self.stage_kv_bytes(),
        })
    }

    /// The next token of a session from the last stage's logits.
    pub(super) fn stage_sample(
        &mut self,
        req: &pb::StageSampleRequest,
        seg: &Segment,
    ) -> Result<pb::StageSampleReply, RuntimeError> {
        let t = read(seg, req.logits, "logits")?;
        let vocab = self.model.cfg.vocab_size as usize;
        let max_seq = self.model.cfg.max_seq as usize;
        let mut logits = t.to_f32().ok_or_else(|| {
            RuntimeError::Invalid(format!("logits must be f32, got {:?}", t.dtype))
        })?;
        if t.shape.len() != 1 || logits.is_empty() || logits.len() > vocab {
            return Err(RuntimeError::Invalid(format!(
                "logits have shape {:?}, expected [V] with V in 1..={vocab}",
                t.shape
            )));
        }
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(RuntimeError::Invalid("logits hold NaN or Inf".into()));
        }
        let s = self.stage_session(req.session)?;
        let front = s.front.as_mut().ok_or_else(|| {
            RuntimeError::Invalid(format!("session {:x} was not started here", req.session))
        })?;
        if front.produced >= front.max_tokens || front.pos >= front.rows {
            return Err(RuntimeError::Invalid("the session already finished".into()));
        }
        front.pos += if front.produced == 0 {
            front.prompt_len
        } else {
            1
        };
        let token = sample(&mut logits, front.sampling, &mut front.rng);
        let index = front.produced;
        front.produced += 1;
        let finish = if token == EOS_ID {
            Some(Finish::Eos)
        } else if index + 1 == front.max_tokens {
            Some(Finish::Length)
        } else if front.pos >= max_seq || front.pos >= front.rows {
            Some(Finish::MaxSeq)
        } else {
            None
        };
        let pending = std::mem::take(&mut front.pending_text);
        let tokenizer = self.tokenizer()?;
        let mut decode = neuroshard_shared::tokenizer::DecodeStream::resume(tokenizer, pending);
        let text = decode.step(token);
        let pending = decode.into_pending();
        if let Some(front) = self
            .stage_sessions
            .get_mut(&req.session)
            .and_then(|s| s.front.as_mut())
        {
            front.pending_text = pending;
        }
        Ok(pb::StageSampleReply {
            token: Some(pb::GenerateReply {
                token_id: token,
                index,
                finish_reason: finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
                text,
                prompt_tokens: 0,
                queue_us: 0,
                ..Default::default()
            }),
        })
    }

    /// Frees a session; false when it was not open.
    pub(super) fn stage_end(&mut self, session: u64) -> bool {
        self.stage_prune();
        self.stage_sessions.remove(&session).is_some()
    }
}
