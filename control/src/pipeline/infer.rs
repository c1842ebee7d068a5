//! Distributed inference: a node that does not hold every layer serves a generation through
//! the peers holding the others.
//!
//! The requesting node plans a route over the stages (itself included where it holds the next
//! layers; peers by their advertised layers, lowest latency first), opens the session's front
//! end on its own engine (prompt tokenized, sampler seeded: `StageStart`), then for every token
//! sends each stage in turn its input (`InferForward`: token ids to the stage holding the
//! embedding, activations after it) and takes its output back; the last stage answers with the
//! next-token logits, which the requester's engine samples (`StageSample`), exactly as a full
//! node samples. Each stage keeps the session's KV cache of its own layers, so a decode step
//! sends one row of activations per stage. Activations come back to the requester between
//! stages (a star, not a chain): the requester knows which stage failed, and a stage never has
//! to reach another.
//!
//! Every call has the pipeline deadline (`training.pipeline_timeout_secs`); a peer stage that
//! dies, refuses or is late ends the route: every stage's session is freed (`InferEnd`, best
//! effort: the engines also drop sessions idle for two minutes) and, where other peers cover
//! its layers, the generation goes on over a route without it (at most `MAX_FAILOVERS` times):
//! a new session is prefilled with the prompt and the tokens produced so far, and the client
//! sees one uninterrupted stream. Decoding continues exactly: greedy, and seeded sampling too
//! (the new front end skips the sampler draws already made). Without another route the
//! generation ends with the error.
//!
//! Inference on a stage uses its own shared-memory slots (4 and 5) under its own lock, so it
//! runs between training commands without touching the training slots; with fewer than six
//! slots it shares the training slots and takes the training stage lock.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use neuroshard_proto::peer as pb;
use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::shm::DType;
use tokio::sync::mpsc;

use super::{Hop, PipeError, Stage, Wire, WireDType, check_acts, engine_err, within};
use crate::engine::{EngineError, EngineHandle, Sampling, Slots, Token};
use neuroshard_net::Network;
use neuroshard_net::error::NetworkError;

/// Most times one generation moves to another route after a peer stage failed.
const MAX_FAILOVERS: usize = 2;

/// What a generation has produced so far, so that it can go on over another route.
#[derive(Debug, Default)]
struct Generated {
    /// The prompt as the first route's front end tokenized it (empty before it started).
    prompt_ids: Vec<u32>,
    /// The token budget the front end settled on.
    max_tokens: u32,
    tokens: Vec<u32>,
}

/// The shared-memory slots an inference command may use, held while it runs.
struct SlotGuard<'a> {
    _infer: tokio::sync::MutexGuard<'a, ()>,
    _train: Option<tokio::sync::MutexGuard<'a, super::stage::InFlight>>,
    slots: Slots,
}

/// Inference state of a stage: the lock over the inference slots.
#[derive(Default)]
pub struct InferState {
    lock: tokio::sync::Mutex<()>,
}

/// One stage of an inference route.
#[derive(Clone)]
pub enum Target {
    /// This node's own layers.
    Local(Range<u32>),
    Peer(Box<Hop>),
}

impl Target {
    fn layers(&self) -> Range<u32> {
        match self {
            Target::Local(r) => r.clone(),
            Target::Peer(h) => h.layers.clone(),
        }
    }

    fn name(&self) -> String {
        match self {
            Target::Local(_) => "local".into(),
            Target::Peer(h) => h.conn.id.to_string(),
        }
    }
}

/// The stages from layer 0 to the head: this node's own layers where they fit (they cost no
/// peer call), and the connected peers' (lowest latency, then id) for the rest; see
/// [`super::shortest_route`].
/// Peers named in `avoid` (stages that failed this generation) are left out.
pub fn plan_inference(
    net: &Network,
    own: Option<Range<u32>>,
    total: u32,
    avoid: &[String],
) -> Result<Vec<Target>, PipeError> {
    let targets: Vec<Target> = own
        .filter(|r| r.end > r.start)
        .map(Target::Local)
        .into_iter()
        .chain(
            super::candidate_hops(net, total)
                .into_iter()
                .filter(|h| !avoid.contains(&h.conn.id.to_string()))
                .map(|h| Target::Peer(Box::new(h))),
        )
        .collect();
    let ranges: Vec<_> = targets.iter().map(Target::layers).collect();
    let remote = |i: usize| matches!(targets[i], Target::Peer(_));
    let route = super::shortest_route(&ranges, remote, 0, total).ok_or_else(|| {
        net.want_layers(0..total);
        PipeError::NoRoute(format!(
            "the connected peers do not cover layers 0..{total}; the model is not covered"
        ))
    })?;
    Ok(route.into_iter().map(|i| targets[i].clone()).collect())
}

fn infer_peer_err(hop: &Hop, e: NetworkError) -> PipeError {
    if let NetworkError::Rpc { source, .. } = &e
        && matches!(
            source.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
    {
        return PipeError::Timeout(hop.conn.id.to_string());
    }
    super::peer_err(hop, e)
}

/// Checks token ids from a peer: u32 [T], 1 <= T < max_seq, every id in the vocabulary.
fn check_ids(t: Option<&pb::PipelineTensor>, m: &ModelConfig) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused("input missing".into()))?;
    let n = t.shape.first().copied().unwrap_or(0);
    if !WireDType::U32.is_of(t)
        || t.shape.len() != 1
        || !(1..u64::from(m.max_seq)).contains(&n)
        || t.data.len() as u64 != n * 4
    {
        return Err(PipeError::Refused(format!(
            "token ids must be u32 [T] with 1 <= T < {} ({} bytes), got {:?} {:?} ({} bytes)",
            m.max_seq,
            n * 4,
            t.dtype,
            t.shape,
            t.data.len()
        )));
    }
    super::u32_below_vocab(t, m, "a token id")
}

/// Checks next-token logits from the last stage: f32 [V], 1 <= V <= vocabulary, finite.
fn check_logits(t: Option<&pb::PipelineTensor>, m: &ModelConfig) -> Result<Wire, PipeError> {
    let t = t.ok_or_else(|| PipeError::Refused("logits missing".into()))?;
    let n = t.shape.first().copied().unwrap_or(0);
    if !WireDType::F32.is_of(t)
        || t.shape.len() != 1
        || !(1..=u64::from(m.vocab_size)).contains(&n)
        || t.data.len() as u64 != n * 4
    {
        return Err(PipeError::Refused(format!(
            "logits must be f32 [V] with V <= {}, got {:?} {:?} ({} bytes)",
            m.vocab_size,
            t.dtype,
            t.shape,
            t.data.len()
        )));
    }
    if t.data
        .chunks_exact(4)
        .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
    {
        return Err(PipeError::Refused("logits hold NaN or Inf".into()));
    }
    Ok(Wire {
        dtype: DType::F32,
        shape: t.shape.clone(),
        data: t.data.clone(),
    })
}

/// What a generation through the pipeline is asked for.
#[derive(Debug, Clone)]
pub struct InferRequest {
    pub prompt: String,
    pub max_tokens: u32,
    pub sampling: Sampling,
}

/// The tokens of a generation as they are produced; the channel closes after the last one or
/// after an error.
pub type TokenStream = mpsc::UnboundedReceiver<Result<Token, PipeError>>;

impl Stage {
    /// Runs this node's layers for one step of `session` on the engine.
    async fn infer_local(
        &self,
        session: u64,
        position: u32,
        rows: u32,
        input: &Wire,
    ) -> Result<Wire, PipeError> {
        let engine = self.handle()?;
        let slots = self.infer_slots(&engine).await;
        let out = engine
            .stage_forward(session, slots.slots, input.view(), position, rows)
            .await
            .map_err(infer_engine_err)?;
        Ok(out.into())
    }

    /// Frees `session` on this node's engine.
    async fn infer_end_local(&self, session: u64) -> bool {
        let Ok(engine) = self.handle() else {
            return false;
        };
        engine.stage_end(session).await.unwrap_or(false)
    }

    /// InferForward from a peer: checks the input against this stage, runs its layers.
    pub async fn serve_infer(
        &self,
        req: pb::InferForwardRequest,
    ) -> Result<pb::InferForwardReply, PipeError> {
        let a = self.ready()?;
        let m = self.model()?;
        let checked = (|| {
            if req.layer_start != a.layers.start {
                return Err(PipeError::Refused(format!(
                    "input for layer {}, this stage starts at {}",
                    req.layer_start, a.layers.start
                )));
            }
            if req.rows == 0 || req.rows > m.max_seq || req.position >= req.rows {
                return Err(PipeError::Refused(format!(
                    "position {} of {} rows (at most {})",
                    req.position, req.rows, m.max_seq
                )));
            }
            let input = if a.has_embedding() {
                check_ids(req.input.as_ref(), &m)?
            } else {
                let w = check_acts(req.input.as_ref(), "input", &m, None)?;
                if w.shape[0] != 1 {
                    return Err(PipeError::Refused(format!(
                        "input has shape {:?}, expected [1, T, {}]",
                        w.shape, m.hidden
                    )));
                }
                w
            };
            let t = input.shape[input.shape.len().min(2) - 1];
            if u64::from(req.position) + t > u64::from(req.rows) {
                return Err(PipeError::Refused(format!(
                    "{} cached + {t} new positions exceed the {} rows",
                    req.position, req.rows
                )));
            }
            Ok(input)
        })();
        let input = checked.map_err(|e| self.refused_infer(e))?;
        self.counters
            .tensor_bytes
            .fetch_add(input.data.len() as u64, Ordering::Relaxed);
        let out = self
            .infer_local(req.session, req.position, req.rows, &input)
            .await
            .map_err(|e| self.refused_infer(e))?;
        self.counters
            .tensor_bytes
            .fetch_add(out.data.len() as u64, Ordering::Relaxed);
        Ok(pb::InferForwardReply {
            output: Some(out.to_pb()),
        })
    }

    /// InferEnd from a peer: frees the session here.
    pub async fn serve_infer_end(&self, req: pb::InferEndRequest) -> pb::InferEndReply {
        pb::InferEndReply {
            ended: self.infer_end_local(req.session).await,
        }
    }

    /// Starts a generation through the pipeline from this node; tokens arrive on the returned
    /// channel as they are produced. Dropping the channel stops the generation (at the next
    /// token) and frees every stage's session.
    pub fn generate_remote(
        self: &Arc<Self>,
        net: Arc<Network>,
        req: InferRequest,
    ) -> Result<TokenStream, PipeError> {
        let a = self.ready()?;
        let own = Some(a.layers.clone());
        let route = plan_inference(&net, own.clone(), a.total, &[])?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stage = self.clone();
        tokio::spawn(async move {
            let (mut route, mut failed) = (route, Vec::<String>::new());
            let mut done = Generated::default();
            loop {
                let session = rand::random::<u64>();
                let result = stage
                    .run_generation(&route, session, &req, &mut done, &tx)
                    .await;
                stage.end_everywhere(&route, session).await;
                let Err(e) = result else {
                    return;
                };
                tracing::warn!(error = %e, session = format!("{session:x}"), tokens = done.tokens.len(), "pipeline inference failed");
                // A peer stage failed: on over a route without it, if there is one.
                let next = match e.failed_stage() {
                    Some(s) if failed.len() < MAX_FAILOVERS && !tx.is_closed() => {
                        failed.push(s.to_string());
                        plan_inference(&net, own.clone(), a.total, &failed).ok()
                    }
                    _ => None,
                };
                let Some(next) = next else {
                    let _ = tx.send(Err(e));
                    return;
                };
                tracing::warn!(avoiding = ?failed, stages = next.len(), tokens = done.tokens.len(), "generation goes on over another route");
                stage.counters.failovers.fetch_add(1, Ordering::Relaxed);
                route = next;
            }
        });
        Ok(rx)
    }

    /// One generation over `route` as session `session`, from where `done` left off (the
    /// prompt's start on the first route; on another one, the prompt and the tokens produced
    /// so far are prefilled and the token budget is what is left).
    async fn run_generation(
        &self,
        route: &[Target],
        session: u64,
        req: &InferRequest,
        done: &mut Generated,
        tx: &mpsc::UnboundedSender<Result<Token, PipeError>>,
    ) -> Result<(), PipeError> {
        let m = self.model()?;
        let secs = self.config().training.pipeline_timeout_secs;
        let engine = self.handle()?;
        let resumed = !done.prompt_ids.is_empty();
        let base = done.tokens.len() as u32;
        let (prompt, prompt_ids, max_tokens) = if resumed {
            let context = [done.prompt_ids.as_slice(), &done.tokens].concat();
            (
                String::new(),
                context,
                done.max_tokens.saturating_sub(base).max(1),
            )
        } else {
            (req.prompt.clone(), Vec::new(), req.max_tokens)
        };
        let start = engine
            .stage_start(session, prompt, prompt_ids, max_tokens, req.sampling, base)
            .await
            .map_err(infer_engine_err)?;
        if !resumed {
            done.prompt_ids = start.prompt_ids.clone();
            done.max_tokens = start.max_tokens;
        }
        let rows = start.rows;
        let prompt_tokens = done.prompt_ids.len() as u32;
        let started = std::time::Instant::now();
        let mut spent = vec![Duration::ZERO; route.len() + 1];
        let mut produced = 0u32;
        let mut input: Vec<u32> = start.prompt_ids;
        let mut position = 0u32;
        loop {
            let ids = Wire {
                dtype: DType::U32,
                shape: vec![input.len() as u64],
                data: input.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let logits = self
                .step_route(route, session, position, rows, ids, &m, secs, &mut spent)
                .await?;
            let sampled_at = std::time::Instant::now();
            let slots = self.infer_slots(&engine).await;
            let mut reply = engine
                .stage_sample(session, slots.slots, logits.view())
                .await
                .map_err(infer_engine_err)?;
            drop(slots);
            spent[route.len()] += sampled_at.elapsed();
            produced += 1;
            reply.index += base;
            if reply.index == 0 {
                reply.prompt_tokens = prompt_tokens;
            }
            done.tokens.push(reply.token_id);
            position += input.len() as u32;
            let finished = !reply.finish_reason.is_empty();
            let token = reply.token_id;
            if tx.send(Ok(reply)).is_err() || finished {
                let per_stage: Vec<String> = route
                    .iter()
                    .map(Target::name)
                    .chain(std::iter::once("sample".to_string()))
                    .zip(&spent)
                    .map(|(n, d)| {
                        format!("{n}={:.2}ms", d.as_secs_f64() * 1e3 / f64::from(produced))
                    })
                    .collect();
                tracing::info!(
                    tokens = produced,
                    stages = route.len(),
                    ms = started.elapsed().as_millis() as u64,
                    per_token = %per_stage.join(" "),
                    "pipeline generation"
                );
                return Ok(());
            }
            input = vec![token];
        }
    }

    /// Takes the inference slots: its own (4, 5) under the inference lock, or, with fewer
    /// than six slots, the training slots under the training stage lock as well.
    async fn infer_slots(&self, engine: &EngineHandle) -> SlotGuard<'_> {
        let infer = self.infer.lock.lock().await;
        match engine.inference_slots() {
            Some(slots) => SlotGuard {
                _infer: infer,
                _train: None,
                slots,
            },
            None => SlotGuard {
                _infer: infer,
                _train: Some(self.current.lock().await),
                slots: crate::engine::slots::TRAINING,
            },
        }
    }

    fn refused_infer(&self, e: PipeError) -> PipeError {
        if matches!(e, PipeError::Refused(_)) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "inference request refused");
        }
        e
    }

    /// One generation step through every stage of `route`: the last stage's logits.
    #[allow(clippy::too_many_arguments)]
    async fn step_route(
        &self,
        route: &[Target],
        session: u64,
        position: u32,
        rows: u32,
        ids: Wire,
        m: &ModelConfig,
        secs: u32,
        spent: &mut [Duration],
    ) -> Result<Wire, PipeError> {
        let mut x = ids;
        let t = x.shape[0];
        for (i, target) in route.iter().enumerate() {
            let last = i + 1 == route.len();
            let began = std::time::Instant::now();
            let out = match target {
                Target::Local(_) => {
                    within(secs, "local", self.infer_local(session, position, rows, &x)).await?
                }
                Target::Peer(hop) => {
                    let req = pb::InferForwardRequest {
                        auth: None,
                        session,
                        layer_start: hop.layers.start,
                        input: Some(x.to_pb()),
                        position,
                        rows,
                    };
                    self.counters
                        .tensor_bytes
                        .fetch_add(x.data.len() as u64, Ordering::Relaxed);
                    let r = within(secs, &target.name(), async {
                        hop.conn
                            .infer_forward(req, Duration::from_secs(u64::from(secs)))
                            .await
                            .map_err(|e| infer_peer_err(hop, e))
                    })
                    .await?;
                    let checked = if last {
                        check_logits(r.output.as_ref(), m)
                    } else {
                        check_acts(r.output.as_ref(), "output", m, Some((1, t)))
                    };
                    let w = checked.map_err(|e| PipeError::Peer {
                        stage: target.name(),
                        message: e.to_string(),
                    })?;
                    self.counters
                        .tensor_bytes
                        .fetch_add(w.data.len() as u64, Ordering::Relaxed);
                    w
                }
            };
            spent[i] += began.elapsed();
            x = out;
        }
        Ok(x)
    }

    /// Frees the session on every stage of the route (and the front end here), in parallel,
    /// each with a short deadline.
    async fn end_everywhere(&self, route: &[Target], session: u64) {
        let ends = route.iter().filter_map(|t| match t {
            Target::Peer(hop) => Some(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    hop.conn.infer_end(
                        pb::InferEndRequest {
                            auth: None,
                            session,
                        },
                        Duration::from_secs(5),
                    ),
                )
                .await;
                if !matches!(r, Ok(Ok(_))) {
                    tracing::debug!(stage = %hop.conn.id, "could not end the inference session there (it expires)");
                }
            }),
            Target::Local(_) => None,
        });
        futures_util::future::join_all(ends).await;
        self.infer_end_local(session).await;
    }
}

/// The engine's refusals keep their meaning; everything else is an engine failure.
fn infer_engine_err(e: EngineError) -> PipeError {
    match e {
        EngineError::Invalid(m) => PipeError::Refused(m),
        EngineError::Unavailable(m) | EngineError::NotReady(m) => PipeError::NotReady(m),
        e => engine_err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    fn u32s(shape: Vec<u64>, v: &[u32]) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: "u32".into(),
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn f32s(shape: Vec<u64>, v: &[f32]) -> pb::PipelineTensor {
        pb::PipelineTensor {
            dtype: "f32".into(),
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn token_ids_from_a_peer_are_checked() {
        let m = model();
        assert!(check_ids(Some(&u32s(vec![3], &[1, 2, 3])), &m).is_ok());
        assert!(check_ids(None, &m).is_err());
        assert!(check_ids(Some(&u32s(vec![2], &[1, 2, 3])), &m).is_err());
        assert!(check_ids(Some(&u32s(vec![1, 3], &[1, 2, 3])), &m).is_err());
        assert!(check_ids(Some(&u32s(vec![0], &[])), &m).is_err());
        assert!(check_ids(Some(&u32s(vec![1], &[m.vocab_size])), &m).is_err());
        let long = vec![1u32; m.max_seq as usize];
        assert!(check_ids(Some(&u32s(vec![m.max_seq as u64], &long)), &m).is_err());
        let mut f = u32s(vec![1], &[1]);
        f.dtype = "f32".into();
        assert!(check_ids(Some(&f), &m).is_err());
    }

    #[test]
    fn logits_from_the_last_stage_are_checked() {
        let m = model();
        assert!(check_logits(Some(&f32s(vec![2], &[0.5, -1.0])), &m).is_ok());
        assert!(check_logits(Some(&f32s(vec![2], &[0.5, f32::NAN])), &m).is_err());
        assert!(check_logits(Some(&f32s(vec![3], &[0.5, 1.0])), &m).is_err());
        assert!(check_logits(Some(&f32s(vec![1, 2], &[0.5, 1.0])), &m).is_err());
        let big = vec![0.0; m.vocab_size as usize + 1];
        assert!(check_logits(Some(&f32s(vec![big.len() as u64], &big)), &m).is_err());
        assert!(check_logits(None, &m).is_err());
    }
}
