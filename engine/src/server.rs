//! The RPC edge of the engine: the `Engine` gRPC service on the local Unix socket.
//!
//! Every command runs on a blocking thread against the one `Runtime` (commands are serialized
//! by its mutex: the data plane does one thing at a time). Generate is the exception: it joins
//! the continuous batch of `batcher.rs`, whose thread takes the same mutex once per decode
//! step, so commands interleave with generation. Shared-memory references are
//! resolved here. A device fault is answered and then ends the process with a non-zero code,
//! so the supervisor restarts the engine from the last checkpoint instead of serving results
//! from a broken context.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use neuroshard_proto::engine as pb;
use neuroshard_proto::engine::engine_server::{Engine, EngineServer};
use neuroshard_shared::shm::{Segment, TensorRef};
use parking_lot::{Mutex, RwLock};
use tokio::net::UnixListener;
use tokio_stream::wrappers::{UnboundedReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::batcher::{BatchLimits, Batcher};
use crate::runtime::{Runtime, RuntimeError, RuntimeHealth, fault_exits};

#[derive(Clone)]
pub struct EngineService {
    runtime: Arc<Mutex<Runtime>>,
    segment: Arc<RwLock<Option<Arc<Segment>>>>,
    /// The runtime's figures as of the end of the last command: what `Health` answers while
    /// a command holds the runtime.
    last_health: Arc<Mutex<RuntimeHealth>>,
    /// Generate requests go through the continuous-batching scheduler (`batcher.rs`).
    batcher: Arc<Batcher>,
}

impl EngineService {
    /// The service over `runtime`; starts the generation scheduler thread.
    pub fn new(runtime: Runtime, limits: BatchLimits) -> std::io::Result<EngineService> {
        let last_health = Arc::new(Mutex::new(runtime.health()));
        let runtime = Arc::new(Mutex::new(runtime));
        let batcher = Batcher::start(runtime.clone(), last_health.clone(), limits)?;
        Ok(EngineService {
            last_health,
            runtime,
            segment: Arc::new(RwLock::new(None)),
            batcher: Arc::new(batcher),
        })
    }

    fn segment(&self) -> Result<Arc<Segment>, Status> {
        self.segment
            .read()
            .clone()
            .ok_or_else(|| RuntimeError::NotAttached.into())
    }

    /// Runs `f` against the runtime on a blocking thread.
    async fn with_runtime<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Runtime) -> Result<T, RuntimeError> + Send + 'static,
    {
        let runtime = self.runtime.clone();
        let last_health = self.last_health.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut rt = runtime.lock();
            let result = f(&mut rt);
            *last_health.lock() = rt.health();
            result
        })
        .await
        .map_err(|e| Status::internal(format!("engine task failed: {e}")))?;
        result.map_err(fault_exits)
    }
}

fn tensor_ref(r: Option<pb::TensorRef>, what: &str) -> Result<TensorRef, Status> {
    let r =
        r.ok_or_else(|| Status::invalid_argument(format!("missing tensor reference `{what}`")))?;
    Ok(TensorRef {
        slot: r.slot,
        seq: r.seq,
    })
}

pub fn to_pb(r: TensorRef) -> pb::TensorRef {
    pb::TensorRef {
        slot: r.slot,
        seq: r.seq,
    }
}

#[tonic::async_trait]
impl Engine for EngineService {
    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let attached = self.segment.read().is_some();
        // Health must answer while a long command holds the runtime: never wait for the lock.
        let h = match self.runtime.try_lock() {
            Some(mut rt) => {
                rt.stage_prune();
                let h = rt.health();
                *self.last_health.lock() = h.clone();
                h
            }
            None => self.last_health.lock().clone(),
        };
        Ok(Response::new(pb::HealthReply {
            device: h.device,
            device_name: h.device_name,
            memory_used: h.memory_used,
            memory_total: h.memory_total,
            model_loaded: h.model_loaded,
            attached,
            step: h.step,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            batch_size: self.batcher.stats().active.load(Ordering::SeqCst) as u32,
            batch_waiting: self.batcher.stats().waiting.load(Ordering::SeqCst) as u32,
            kv_bytes_used: self.batcher.stats().kv_bytes_used.load(Ordering::SeqCst),
            kv_bytes_budget: self.batcher.limits().kv_budget_bytes,
            max_batch: self.batcher.limits().max_batch as u32,
            stage_sessions: h.stage_sessions,
            stage_kv_bytes: h.stage_kv_bytes,
        }))
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachReply>, Status> {
        let name = req.into_inner().segment_name;
        let seg = Segment::open(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let reply = pb::AttachReply {
            slot_count: seg.slot_count(),
            slot_bytes: seg.slot_bytes(),
        };
        tracing::info!(segment = %name, slots = reply.slot_count, "attached shared memory");
        *self.segment.write() = Some(Arc::new(seg));
        Ok(Response::new(reply))
    }

    async fn echo(&self, req: Request<pb::EchoRequest>) -> Result<Response<pb::EchoReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        let input = tensor_ref(req.input, "input")?;
        let t = seg
            .read(input)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let values = t.to_f32().ok_or_else(|| {
            Status::invalid_argument(format!("echo takes f32 tensors, got {:?}", t.dtype))
        })?;
        let scaled: Vec<f32> = values.iter().map(|v| v * req.scale).collect();
        let out = seg
            .write_f32(req.output_slot, &t.shape, &scaled)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::EchoReply {
            output: Some(to_pb(out)),
        }))
    }

    async fn load_model(
        &self,
        req: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.load_model(&req))
            .await
            .map(Response::new)
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        self.with_runtime(move |rt| rt.forward(&req, &seg))
            .await
            .map(Response::new)
    }

    async fn backward(
        &self,
        req: Request<pb::BackwardRequest>,
    ) -> Result<Response<pb::BackwardReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        self.with_runtime(move |rt| rt.backward(&req, &seg))
            .await
            .map(Response::new)
    }

    async fn optimizer_step(
        &self,
        req: Request<pb::OptimizerStepRequest>,
    ) -> Result<Response<pb::OptimizerStepReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.optimizer_step(&req))
            .await
            .map(Response::new)
    }

    async fn next_batch(
        &self,
        req: Request<pb::NextBatchRequest>,
    ) -> Result<Response<pb::NextBatchReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        self.with_runtime(move |rt| rt.next_batch(&req, &seg))
            .await
            .map(Response::new)
    }

    async fn grad_norm(
        &self,
        _req: Request<pb::GradNormRequest>,
    ) -> Result<Response<pb::GradNormReply>, Status> {
        self.with_runtime(|rt| rt.grad_norm())
            .await
            .map(Response::new)
    }

    async fn reset_grads(
        &self,
        _req: Request<pb::ResetGradsRequest>,
    ) -> Result<Response<pb::ResetGradsReply>, Status> {
        self.with_runtime(|rt| rt.reset_grads())
            .await
            .map(Response::new)
    }

    async fn train_step(
        &self,
        req: Request<pb::TrainStepRequest>,
    ) -> Result<Response<pb::TrainStepReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.train_step(&req))
            .await
            .map(Response::new)
    }

    async fn export_weights(
        &self,
        req: Request<pb::ExportWeightsRequest>,
    ) -> Result<Response<pb::ExportWeightsReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment().ok();
        self.with_runtime(move |rt| rt.export_weights(&req, seg.as_deref()))
            .await
            .map(Response::new)
    }

    async fn import_weights(
        &self,
        req: Request<pb::ImportWeightsRequest>,
    ) -> Result<Response<pb::ImportWeightsReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment().ok();
        self.with_runtime(move |rt| rt.import_weights(&req, seg.as_deref()))
            .await
            .map(Response::new)
    }

    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.checkpoint(&req))
            .await
            .map(Response::new)
    }

    async fn restore(
        &self,
        req: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.restore(&req))
            .await
            .map(Response::new)
    }

    async fn model_hash(
        &self,
        _req: Request<pb::ModelHashRequest>,
    ) -> Result<Response<pb::ModelHashReply>, Status> {
        self.with_runtime(|rt| rt.model_hash())
            .await
            .map(Response::new)
    }

    type GenerateStream = UnboundedReceiverStream<Result<pb::GenerateReply, Status>>;

    /// Joins the continuous batch; the stream gets each token as it is produced. Dropping the
    /// stream frees the request's place and KV cache at the next step.
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // Unbounded: a request produces at most max_seq replies, and a slow reader must not
        // stall the whole batch.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.batcher.submit(req.into_inner(), tx)?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn stage_start(
        &self,
        req: Request<pb::StageStartRequest>,
    ) -> Result<Response<pb::StageStartReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.stage_start(&req))
            .await
            .map(Response::new)
    }

    async fn stage_forward(
        &self,
        req: Request<pb::StageForwardRequest>,
    ) -> Result<Response<pb::StageForwardReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        self.with_runtime(move |rt| rt.stage_forward(&req, &seg))
            .await
            .map(Response::new)
    }

    async fn stage_sample(
        &self,
        req: Request<pb::StageSampleRequest>,
    ) -> Result<Response<pb::StageSampleReply>, Status> {
        let req = req.into_inner();
        let seg = self.segment()?;
        self.with_runtime(move |rt| rt.stage_sample(&req, &seg))
            .await
            .map(Response::new)
    }

    async fn stage_end(
        &self,
        req: Request<pb::StageEndRequest>,
    ) -> Result<Response<pb::StageEndReply>, Status> {
        let req = req.into_inner();
        self.with_runtime(move |rt| rt.stage_end(&req))
            .await
            .map(Response::new)
    }
}

/// Serves the engine on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    service: EngineService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(EngineServer::new(service).max_decoding_message_size(16 << 20))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Binds the command socket at `path`, replacing a stale socket file a crashed engine left.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed stale engine socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}
