//! Continuous batching of Generate requests: one scheduler thread owns the batch.
//!
//! Between two decode steps it takes the runtime lock once, drops the sequences whose client
//! went away (stream dropped), admits waiting requests in arrival order (prefill + first token)
//! while the batch has a free place and the KV memory budget has room, then runs one decode
//! step of every active sequence and sends each stream its token. Finished sequences leave
//! without stopping the others. The lock is released after every step, so other commands
//! (training, checkpoints) interleave with generation instead of waiting for it to drain.
//!
//! Each admitted request reserves the KV cache for its whole length
//! (`layers × 2 × rows × kv_heads × head_dim × 4` bytes, rows = prompt + max_tokens capped at
//! max_seq). A request that can never fit the budget, or that arrives while the wait queue is
//! full, is refused with RESOURCE_EXHAUSTED; one that fits the budget but not right now waits.
//! A model reload ends the sequences of the old model with UNAVAILABLE.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use neuroshard_proto::engine as pb;
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::runtime::{Prepared, Runtime, RuntimeError, RuntimeHealth};

/// What one stream receives.
pub type Reply = Result<pb::GenerateReply, Status>;

/// Bounds of the batch (the engine's `--max-batch`, `--kv-budget-mb`, `--max-waiting`).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// KV cache bytes all admitted sequences may reserve together.
    pub kv_budget_bytes: u64,
    /// Requests that may wait for a place; more are refused at once.
    pub max_waiting: usize,
}

impl Default for BatchLimits {
    fn default() -> BatchLimits {
        BatchLimits {
            max_batch: 8,
            kv_budget_bytes: 256 << 20,
            max_waiting: 64,
        }
    }
}

/// Figures for `Health`, updated by the scheduler without the runtime lock.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub active: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_bytes_used: AtomicU64,
}

struct Job {
    req: pb::GenerateRequest,
    tx: UnboundedSender<Reply>,
    arrived: Instant,
}

/// A sequence in the batch, as the scheduler sees it.
struct Live {
    tx: UnboundedSender<Reply>,
    kv_bytes: u64,
    epoch: u64,
}

/// The handle the RPC edge submits requests through.
pub struct Batcher {
    jobs: Mutex<mpsc::Sender<Job>>,
    limits: BatchLimits,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the scheduler thread; it ends when the `Batcher` is dropped and the batch is
    /// drained.
    pub fn start(
        runtime: Arc<Mutex<Runtime>>,
        last_health: Arc<Mutex<RuntimeHealth>>,
        limits: BatchLimits,
    ) -> std::io::Result<Batcher> {
        let limits = BatchLimits {
            max_batch: limits.max_batch.max(1),
            ..limits
        };
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let scheduler = Scheduler::new(runtime, last_health, limits, stats.clone());
        std::thread::Builder::new()
            .name("generate-batch".into())
            .spawn(move || scheduler.run(rx))?;
        Ok(Batcher {
            jobs: Mutex::new(tx),
            limits,
            stats,
        })
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Queues a request whose replies go to `tx`; refused at once when the wait queue is full.
    pub fn submit(
        &self,
        req: pb::GenerateRequest,
        tx: UnboundedSender<Reply>,
    ) -> Result<(), Status> {
        // Counted here, so a burst is bounded before the scheduler sees it.
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.limits.max_waiting as u64 {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "{waiting} generation requests are already waiting for the batch; try again shortly"
            )));
        }
        let job = Job {
            req,
            tx,
            arrived: Instant::now(),
        };
        let sent = self
            .jobs
            .lock()
            .map_err(|_| Status::internal("batch queue lock poisoned"))?
            .send(job);
        if sent.is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::unavailable("the generation scheduler has stopped"));
        }
        Ok(())
    }
}

struct Scheduler {
    runtime: Arc<Mutex<Runtime>>,
    last_health: Arc<Mutex<RuntimeHealth>>,
    limits: BatchLimits,
    stats: Arc<BatchStats>,
    /// Requests in arrival order, with their preparation once done (and the epoch it is for).
    waiting: VecDeque<(Job, Option<(u64, Prepared)>)>,
    live: HashMap<u64, Live>,
    kv_used: u64,
    next_id: u64,
}

impl Scheduler {
    fn new(
        runtime: Arc<Mutex<Runtime>>,
        last_health: Arc<Mutex<RuntimeHealth>>,
        limits: BatchLimits,
        stats: Arc<BatchStats>,
    ) -> Scheduler {
        Scheduler {
            runtime,
            last_health,
            limits,
            stats,
            waiting: VecDeque::new(),
            live: HashMap::new(),
            kv_used: 0,
            next_id: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            if self.live.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back((job, None)),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back((job, None));
            }
            let runtime = self.runtime.clone();
            let mut rt = runtime
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.tick(&mut rt);
            if let Ok(mut h) = self.last_health.lock() {
                *h = rt.health();
            }
            drop(rt);
            self.publish();
        }
    }

    fn publish(&self) {
        self.stats
            .active
            .store(self.live.len() as u64, Ordering::SeqCst);
        self.stats
            .kv_bytes_used
            .store(self.kv_used, Ordering::SeqCst);
    }

    fn leave(&mut self, id: u64) {
        if let Some(l) = self.live.remove(&id) {
            self.kv_used -= l.kv_bytes;
        }
    }

    /// Refuses or answers a waiting request for good.
    fn unqueue(&self) {
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// One round under the runtime lock: retire, admit, decode one step.
    fn tick(&mut self, rt: &mut Runtime) {
        let epoch = rt.epoch();
        // Sequences of a replaced model are gone with it; clients that went away free theirs.
        let ids: Vec<u64> = self.live.keys().copied().collect();
        for id in ids {
            let l = &self.live[&id];
            if l.epoch != epoch {
                let _ = l.tx.send(Err(Status::unavailable(
                    "the model was reloaded during generation; try again",
                )));
                self.leave(id);
            } else if l.tx.is_closed() {
                rt.gen_cancel(id);
                self.leave(id);
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|(job, _)| !job.tx.is_closed());
        for _ in self.waiting.len()..before {
            self.unqueue();
        }
        self.admit(rt, epoch);
        if self.live.is_empty() {
            return;
        }
        match rt.gen_step() {
            Ok(replies) => {
                // A sequence the model no longer holds cannot progress: end it.
                let held: std::collections::HashSet<u64> =
                    replies.iter().map(|(id, _)| *id).collect();
                let lost: Vec<u64> = self
                    .live
                    .keys()
                    .filter(|id| !held.contains(id))
                    .copied()
                    .collect();
                for id in lost {
                    if let Some(l) = self.live.get(&id) {
                        let _ =
                            l.tx.send(Err(Status::internal("the sequence was lost by the engine")));
                    }
                    self.leave(id);
                }
                for (id, reply) in replies {
                    let finished = !reply.finish_reason.is_empty();
                    let delivered = self
                        .live
                        .get(&id)
                        .is_some_and(|l| l.tx.send(Ok(reply)).is_ok());
                    if finished || !delivered {
                        if !finished {
                            rt.gen_cancel(id);
                        }
                        self.leave(id);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sequences = self.live.len(), "batched decode step failed");
                let status = crate::runtime::fault_exits(e);
                for (_, l) in self.live.drain() {
                    let _ = l.tx.send(Err(status.clone()));
                }
                self.kv_used = 0;
            }
        }
    }

    fn admit(&mut self, rt: &mut Runtime, epoch: u64) {
        while self.live.len() < self.limits.max_batch {
            let Some((job, prepared)) = self.waiting.front_mut() else {
                return;
            };
            let stale = prepared.as_ref().is_none_or(|(e, _)| *e != epoch);
            if stale {
                match rt.gen_prepare(&job.req) {
                    Ok(p) => *prepared = Some((epoch, p)),
                    Err(e) => {
                        let _ = job.tx.send(Err(status(e)));
                        self.waiting.pop_front();
                        self.unqueue();
                        continue;
                    }
                }
            }
            let bytes = prepared.as_ref().map(|(_, p)| p.kv_bytes).unwrap_or(0);
            if bytes > self.limits.kv_budget_bytes {
                let _ = job.tx.send(Err(Status::resource_exhausted(format!(
                    "the request needs {bytes} bytes of KV cache, more than the engine's budget of {} bytes; ask for fewer tokens",
                    self.limits.kv_budget_bytes
                ))));
                self.waiting.pop_front();
                self.unqueue();
                continue;
            }
            if self.kv_used + bytes > self.limits.kv_budget_bytes {
                // Waits (in order) for running sequences to free their caches.
                return;
            }
            let Some((job, Some((_, p)))) = self.waiting.pop_front() else {
                return;
            };
            self.unqueue();
            let id = self.next_id;
            self.next_id += 1;
            match rt.gen_admit(id, &p) {
                Ok(mut reply) => {
                    reply.queue_us = job.arrived.elapsed().as_micros() as u64;
                    let finished = !reply.finish_reason.is_empty();
                    let delivered = job.tx.send(Ok(reply)).is_ok();
                    if !finished && delivered {
                        self.kv_used += p.kv_bytes;
                        self.live.insert(
                            id,
                            Live {
                                tx: job.tx,
                                kv_bytes: p.kv_bytes,
                                epoch,
                            },
                        );
                    } else if !finished {
                        rt.gen_cancel(id);
                    }
                }
                Err(e) => {
                    let _ = job.tx.send(Err(status(e)));
                }
            }
        }
    }
}

fn status(e: RuntimeError) -> Status {
    crate::runtime::fault_exits(e)
}

#[cfg(test)]
mod tests;
