//! `EngineHandle`: the one way control talks to its engine. One typed method per engine
//! command; tensors go through the shared-memory segment, into the slots `slots` names, and
//! never over the socket; every failure is an [`EngineError`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use neuroshard_proto::engine as pb;
use neuroshard_proto::engine::engine_client::EngineClient;
use neuroshard_shared::shm::{Segment, Tensor};
use tonic::transport::{Channel, Endpoint};

use super::error::EngineError;
use super::slots::{self, Slots};
use super::types::{
    EngineHealth, LoadSpec, Loaded, Sampling, StageStarted, TensorIn, Token, TrainStepped,
};

/// A connected engine and the segment it shares with this daemon. Cheap to clone: clones
/// share the connection.
#[derive(Clone)]
pub struct EngineHandle {
    client: EngineClient<Channel>,
    segment: Arc<Segment>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("slots", &self.segment.slot_count())
            .finish_non_exhaustive()
    }
}

/// What a stage's forward of one micro-batch produced.
#[derive(Debug)]
pub enum Forwarded {
    /// The stage holds the head and was given labels: the micro-batch's loss.
    Loss(f32),
    /// Activations (or logits) for the next stage.
    Output(Tensor),
}

/// Connects a gRPC client to the engine's Unix socket.
pub(super) async fn connect(
    socket: std::path::PathBuf,
) -> Result<EngineClient<Channel>, EngineError> {
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://engine.local")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
    Ok(EngineClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// The tokens of a generation on this node's engine, as they are produced.
pub struct TokenStream(tonic::Streaming<pb::GenerateReply>);

impl TokenStream {
    /// The next token; `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<Token>, EngineError> {
        Ok(self.0.message().await?.map(Token::from))
    }
}

impl EngineHandle {
    pub(super) fn new(client: EngineClient<Channel>, segment: Arc<Segment>) -> Self {
        EngineHandle { client, segment }
    }

    fn rpc(&self) -> EngineClient<Channel> {
        self.client.clone()
    }

    fn put(&self, slot: u32, t: TensorIn<'_>) -> Result<pb::TensorRef, EngineError> {
        let r = self.segment.write(slot, t.dtype, t.shape, t.bytes)?;
        Ok(pb::TensorRef {
            slot: r.slot,
            seq: r.seq,
        })
    }

    fn get(&self, r: Option<pb::TensorRef>) -> Result<Tensor, EngineError> {
        let r = r.ok_or_else(|| EngineError::Failed("engine returned no tensor".into()))?;
        Ok(self.segment.read(neuroshard_shared::shm::TensorRef {
            slot: r.slot,
            seq: r.seq,
        })?)
    }

    /// The slots inference uses: its own when the segment has them, else `None` (then it
    /// shares the training slots, under the training lock).
    pub fn inference_slots(&self) -> Option<Slots> {
        slots::inference(self.segment.slot_count())
    }

    pub async fn health(&self) -> Result<EngineHealth, EngineError> {
        Ok(self
            .rpc()
            .health(pb::HealthRequest {})
            .await?
            .into_inner()
            .into())
    }

    /// Maps the daemon's shared-memory segment into the engine.
    pub async fn attach(&self, segment_name: &str) -> Result<(), EngineError> {
        self.rpc()
            .attach(pb::AttachRequest {
                segment_name: segment_name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Builds the model `spec` describes (from the seed, a checkpoint or other stages').
    pub async fn load_model(&self, spec: &LoadSpec) -> Result<Loaded, EngineError> {
        Ok(self
            .rpc()
            .load_model(pb::LoadModelRequest::from(spec))
            .await?
            .into_inner()
            .into())
    }

    /// One whole training step on the engine's own batch (every layer held here); with
    /// `state_hash`, the hash of the state after it too.
    pub async fn train_step(&self, state_hash: bool) -> Result<TrainStepped, EngineError> {
        let r = self
            .rpc()
            .train_step(pb::TrainStepRequest { state_hash })
            .await?
            .into_inner();
        Ok(TrainStepped {
            loss: r.loss,
            step: r.step,
            tokens: r.tokens,
            grad_norm: r.grad_norm,
            shard: r.shard,
            state_hash: r.state_hash,
        })
    }

    /// Writes a checkpoint (weights, AdamW moments, step) to `path`, its folder created;
    /// returns the step it holds.
    pub async fn checkpoint(&self, path: &Path) -> Result<u64, EngineError> {
        Ok(self.checkpoint_state(path).await?.0)
    }

    /// [`EngineHandle::checkpoint`], returning the step and the state's hash.
    pub async fn checkpoint_state(&self, path: &Path) -> Result<(u64, String), EngineError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::Failed(format!("{}: {e}", dir.display())))?;
        }
        let r = self
            .rpc()
            .checkpoint(pb::CheckpointRequest {
                path: path.display().to_string(),
            })
            .await?
            .into_inner();
        Ok((r.step, r.state_hash))
    }

    /// Replaces the loaded model with a checkpoint's; returns (step, model hash, state hash).
    pub async fn restore(&self, path: &Path) -> Result<(u64, String, String), EngineError> {
        let r = self
            .rpc()
            .restore(pb::RestoreRequest {
                path: path.display().to_string(),
            })
            .await?
            .into_inner();
        Ok((r.step, r.model_hash, r.state_hash))
    }

    pub async fn model_hash(&self) -> Result<String, EngineError> {
        Ok(self
            .rpc()
            .model_hash(pb::ModelHashRequest {})
            .await?
            .into_inner()
            .model_hash)
    }

    /// Exports the held parameters as safetensors to `path`; returns the model hash.
    pub async fn export_weights(&self, path: &Path) -> Result<String, EngineError> {
        Ok(self
            .rpc()
            .export_weights(pb::ExportWeightsRequest {
                dest: Some(pb::export_weights_request::Dest::Path(
                    path.display().to_string(),
                )),
                format: "safetensors".into(),
                sources: Vec::new(),
            })
            .await?
            .into_inner()
            .model_hash)
    }

    /// Writes the full model in `format` ("hf-llama": a folder, "gguf": a file) to `path`, the
    /// parameters this engine does not hold taken from `sources` (checkpoints of other stages,
    /// each with the hash its holder claimed, which the engine checks); returns the full
    /// model's hash and the bytes of the weights written.
    pub async fn export_model(
        &self,
        format: &str,
        path: &Path,
        sources: &[(std::path::PathBuf, String)],
    ) -> Result<(String, u64), EngineError> {
        let reply = self
            .rpc()
            .export_weights(pb::ExportWeightsRequest {
                dest: Some(pb::export_weights_request::Dest::Path(
                    path.display().to_string(),
                )),
                format: format.into(),
                sources: sources
                    .iter()
                    .map(|(p, h)| pb::WeightSource {
                        path: p.display().to_string(),
                        model_hash: h.clone(),
                    })
                    .collect(),
            })
            .await?
            .into_inner();
        Ok((reply.model_hash, reply.bytes))
    }

    /// Replaces the held parameters by those in the safetensors file `path`; the new hash.
    pub async fn import_weights(&self, path: &Path) -> Result<String, EngineError> {
        Ok(self
            .rpc()
            .import_weights(pb::ImportWeightsRequest {
                src: Some(pb::import_weights_request::Src::Path(
                    path.display().to_string(),
                )),
            })
            .await?
            .into_inner()
            .model_hash)
    }

    /// Drops saved activations and accumulated gradients (a new pipeline step begins).
    pub async fn reset_grads(&self) -> Result<(), EngineError> {
        self.rpc().reset_grads(pb::ResetGradsRequest {}).await?;
        Ok(())
    }

    /// The driver's next batch from the engine's data loader: ids, labels, shard.
    pub async fn next_batch(&self) -> Result<(Tensor, Tensor, u32), EngineError> {
        let r = self
            .rpc()
            .next_batch(pb::NextBatchRequest {
                ids_slot: slots::TRAIN_INPUT,
                labels_slot: slots::TRAIN_LABELS,
            })
            .await?
            .into_inner();
        Ok((self.get(r.ids)?, self.get(r.labels)?, r.shard))
    }

    /// This stage's forward of micro-batch `micro_batch` (ids or activations in).
    pub async fn forward(
        &self,
        input: TensorIn<'_>,
        labels: Option<TensorIn<'_>>,
        micro_batch: u64,
    ) -> Result<Forwarded, EngineError> {
        let input = self.put(slots::TRAIN_INPUT, input)?;
        let labels = labels
            .map(|l| self.put(slots::TRAIN_LABELS, l))
            .transpose()?;
        let r = self
            .rpc()
            .forward(pb::ForwardRequest {
                input: Some(input),
                labels,
                output_slot: slots::TRAIN_OUTPUT,
                micro_batch,
            })
            .await?
            .into_inner();
        match r.loss {
            Some(l) => Ok(Forwarded::Loss(l)),
            None => Ok(Forwarded::Output(self.get(r.output)?)),
        }
    }

    /// This stage's backward of `micro_batch`; the gradient w.r.t. its input (none on the
    /// stage that holds the embedding).
    pub async fn backward(
        &self,
        grad_output: Option<TensorIn<'_>>,
        micro_batch: u64,
    ) -> Result<Option<Tensor>, EngineError> {
        let grad = grad_output
            .map(|g| self.put(slots::TRAIN_GRAD, g))
            .transpose()?;
        let r = self
            .rpc()
            .backward(pb::BackwardRequest {
                grad_output: grad,
                grad_input_slot: slots::TRAIN_OUTPUT,
                micro_batch,
            })
            .await?
            .into_inner();
        r.grad_input.map(|t| self.get(Some(t))).transpose()
    }

    /// Squared norm of the accumulated gradients.
    pub async fn grad_sq_norm(&self) -> Result<f64, EngineError> {
        Ok(self
            .rpc()
            .grad_norm(pb::GradNormRequest {})
            .await?
            .into_inner()
            .sq_norm)
    }

    /// One optimizer step clipped by the pipeline's `global_norm`; the new step.
    pub async fn optimizer_step(&self, global_norm: f32) -> Result<u64, EngineError> {
        Ok(self
            .rpc()
            .optimizer_step(pb::OptimizerStepRequest {
                learning_rate: 0.0,
                global_norm: Some(global_norm),
            })
            .await?
            .into_inner()
            .step)
    }

    /// A generation on this node's engine (it holds every layer), batched with the others;
    /// with `commit_top_k` > 0 the tokens carry the TOPLOC-style commitment (`Token::commit`).
    pub async fn generate(
        &self,
        prompt: &str,
        max_tokens: u32,
        sampling: Sampling,
        request_id: &str,
        commit_top_k: u32,
    ) -> Result<TokenStream, EngineError> {
        let stream = self
            .rpc()
            .generate(pb::GenerateRequest {
                prompt: prompt.to_string(),
                max_tokens,
                sampling: Some(sampling.into()),
                request_id: request_id.to_string(),
                prompt_ids: Vec::new(),
                commit_top_k,
            })
            .await?
            .into_inner();
        Ok(TokenStream(stream))
    }

    /// Starts distributed-inference session `session` on this node's stage: the prompt (or,
    /// resumed over a new route, the context ids), skipping `draws` sampler draws.
    pub async fn stage_start(
        &self,
        session: u64,
        prompt: String,
        prompt_ids: Vec<u32>,
        max_tokens: u32,
        sampling: Sampling,
        draws: u32,
    ) -> Result<StageStarted, EngineError> {
        let r = self
            .rpc()
            .stage_start(pb::StageStartRequest {
                session,
                prompt,
                prompt_ids,
                max_tokens,
                sampling: Some(sampling.into()),
                draws,
            })
            .await?
            .into_inner();
        Ok(StageStarted {
            prompt_ids: r.prompt_ids,
            max_tokens: r.max_tokens,
            rows: r.rows,
        })
    }

    /// Runs this node's layers for one step of `session`, through `slots`.
    pub async fn stage_forward(
        &self,
        session: u64,
        slots: Slots,
        input: TensorIn<'_>,
        position: u32,
        rows: u32,
    ) -> Result<Tensor, EngineError> {
        let input = self.put(slots.input, input)?;
        let r = self
            .rpc()
            .stage_forward(pb::StageForwardRequest {
                session,
                input: Some(input),
                output_slot: slots.output,
                position,
                rows,
            })
            .await?
            .into_inner();
        self.get(r.output)
    }

    /// Samples the next token of `session` from `logits`.
    pub async fn stage_sample(
        &self,
        session: u64,
        slots: Slots,
        logits: TensorIn<'_>,
    ) -> Result<Token, EngineError> {
        let logits = self.put(slots.input, logits)?;
        self.rpc()
            .stage_sample(pb::StageSampleRequest {
                session,
                logits: Some(logits),
            })
            .await?
            .into_inner()
            .token
            .map(Token::from)
            .ok_or_else(|| EngineError::Failed("the engine sampled no token".into()))
    }

    /// Frees `session`; whether it existed.
    pub async fn stage_end(&self, session: u64) -> Result<bool, EngineError> {
        Ok(self
            .rpc()
            .stage_end(pb::StageEndRequest { session })
            .await?
            .into_inner()
            .ended)
    }
}
