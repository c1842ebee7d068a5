//! The RPC edge of the engine: the `Engine` gRPC service on the local Unix socket.
//!
//! Every command runs on a blocking thread against the one `Runtime` (commands are serialized
//! by its mutex: the data plane does one thing at a time). Shared-memory references are
//! resolved here. A device fault is answered and then ends the process with a non-zero code,
//! so the supervisor restarts the engine from the last checkpoint instead of serving results
//! from a broken context.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use neuroshard_proto::engine as pb;
use neuroshard_proto::engine::engine_server::{Engine, EngineServer};
use neuroshard_shared::shm::{Segment, TensorRef};
use tokio::net::UnixListener;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::runtime::{Runtime, RuntimeError, RuntimeHealth};

/// Exit code after a device fault: tells the supervisor to restart us.
pub const EXIT_DEVICE_FAULT: i32 = 70;

#[derive(Clone)]
pub struct EngineService {
    runtime: Arc<Mutex<Runtime>>,
    segment: Arc<RwLock<Option<Arc<Segment>>>>,
    /// The runtime's figures as of the end of the last command: what `Health` answers while
    /// a command holds the runtime.
    last_health: Arc<Mutex<RuntimeHealth>>,
}

impl EngineService {
    pub fn new(runtime: Runtime) -> EngineService {
        EngineService {
            last_health: Arc::new(Mutex::new(runtime.health())),
            runtime: Arc::new(Mutex::new(runtime)),
            segment: Arc::new(RwLock::new(None)),
        }
    }

    fn segment(&self) -> Result<Arc<Segment>, Status> {
        self.segment
            .read()
            .map_err(|_| Status::internal("segment lock poisoned"))?
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
            let mut rt = runtime
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let result = f(&mut rt);
            if let Ok(mut h) = last_health.lock() {
                *h = rt.health();
            }
            result
        })
        .await
        .map_err(|e| Status::internal(format!("engine task failed: {e}")))?;
        result.map_err(fault_exits)
    }
}

/// Converts a runtime error to a status; a device fault also schedules the process exit.
fn fault_exits(e: RuntimeError) -> Status {
    if let RuntimeError::DeviceFault { op, message } = &e {
        tracing::error!(op, %message, "device fault: exiting so the supervisor restarts the engine");
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            std::process::exit(EXIT_DEVICE_FAULT);
        });
    }
    e.into()
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
        let attached = self.segment.read().map(|s| s.is_some()).unwrap_or(false);
        // Health must answer while a long command holds the runtime: never wait for the lock.
        let h = match self.runtime.try_lock() {
            Ok(rt) => {
                let h = rt.health();
                if let Ok(mut last) = self.last_health.lock() {
                    *last = h.clone();
                }
                h
            }
            Err(_) => self
                .last_health
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default(),
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
        *self
            .segment
            .write()
            .map_err(|_| Status::internal("segment lock poisoned"))? = Some(Arc::new(seg));
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

    type GenerateStream = ReceiverStream<Result<pb::GenerateReply, Status>>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || {
            let mut rt = runtime
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut emit = |reply: pb::GenerateReply| tx.blocking_send(Ok(reply)).is_ok();
            if let Err(e) = rt.generate(&req, &mut emit) {
                let status = e.into();
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
