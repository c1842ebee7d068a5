//! One DiLoCo round boundary, run by the trainer after H inner steps: catch up when this
//! replica is in a minority state, else compute and send its pseudo-gradient, wait for the
//! other replicas (until they all arrived or the deadline), aggregate in sender order, take
//! the outer step from θ_start and import the result into the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use neuroshard_proto::Message as _;
use neuroshard_proto::peer as pb;

use neuroshard_coordination::catch_up::state_to_adopt;

use super::aggregate::Input;
use super::compress;
use super::round::{self, Diloco, Settings};
use super::validate::{Contribution, Layout};
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use neuroshard_identity::Address;
use neuroshard_net::client::PeerConn;
use neuroshard_net::{Network, NetworkError};

/// The role of a node that holds every layer and trains alone (no pipeline).
const FULL_ROLE: &str = "full";

/// How [`Round::send`] ended.
pub enum Sending {
    /// This replica was out of step and adopted the agreed state instead.
    CaughtUp(Outcome),
    /// The round's pseudo-gradient is on its way; [`Round::complete`] finishes the round.
    Sent(Sent),
}

/// A round whose pseudo-gradient was sent, waiting for the replicas' contributions.
pub struct Sent {
    round: u64,
    start_hash: String,
    me: String,
    streaming: bool,
    fragment: Vec<usize>,
    layout: Layout,
    theta_local: Vec<Vec<f32>>,
    loss: f32,
    size: u64,
    sends: Vec<tokio::task::JoinHandle<(Address, Result<pb::DeltaAck, NetworkError>)>>,
    replicas: Vec<(PeerConn, pb::NodeInfo)>,
    /// Inner steps the trainer took since the pseudo-gradient was sent (Streaming DiLoCo's
    /// overlap τ); 0 when completed at once.
    pub steps_after: u32,
}

impl Sent {
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// What a round boundary did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Aggregated with `contributors` replicas (this one included); the new start hash.
    Stepped { contributors: usize, hash: String },
    /// Adopted the agreed weights of round `round` from a peer.
    CaughtUp { round: u64, hash: String },
}

pub struct Round<'a> {
    pub diloco: &'a Diloco,
    pub net: &'a Arc<Network>,
    pub metrics: &'a Metrics,
    /// Receipts: this node signs those of the contributions it aggregates, keeps those its
    /// replicas sign of its own.
    pub attest: &'a crate::attest::Attestations,
    pub settings: Settings,
    /// Folder for the weight files exchanged with the engine.
    pub dir: PathBuf,
    /// The pipeline stage whose holders this round agrees (`stage.rs`); None for full
    /// replicas.
    pub stage: Option<&'a dyn super::stage::StageLock>,
}

/// Connected peers of `net` that train the same layers as this node (full replicas among
/// full replicas, the holders of the same layer range among pipeline stages; serve-only
/// nodes never), in id order, each with its info; the (round, hash) there is the fresher of
/// its last ping and its last contribution.
pub fn replicas(net: &Network, diloco: &Diloco) -> Vec<(PeerConn, pb::NodeInfo)> {
    let me = net.local_role();
    let full = me.role == FULL_ROLE;
    let mut r: Vec<_> = net
        .peers
        .conns_with_info()
        .into_iter()
        .filter(|(_, i)| {
            !i.serve_only && (i.role == FULL_ROLE) == full && (full || i.layers == me.layers)
        })
        .collect();
    {
        let inbox = diloco.inbox.lock();
        for (_, info) in &mut r {
            if let Some((round, hash)) = inbox.latest_of(&info.node_id)
                && round >= info.diloco_round
            {
                info.diloco_round = round;
                info.round_hash = hash;
            }
        }
    }
    r.sort_by(|a, b| a.1.node_id.cmp(&b.1.node_id));
    r
}

/// Reads the engine's weights: layout (sorted by name), values, model hash.
pub(super) async fn export(
    engine: &EngineHandle,
    dir: &Path,
) -> Result<(Layout, Vec<Vec<f32>>, String), String> {
    let path = dir.join("local.safetensors");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let model_hash = engine
        .export_weights(&path)
        .await
        .map_err(|e| format!("export weights: {e}"))?;
    let tensors = round::read_weights_file(&path).map_err(|e| e.to_string())?;
    let layout = Layout::new(
        tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect(),
    );
    let values = tensors.into_iter().map(|(_, _, v)| v).collect();
    Ok((layout, values, model_hash))
}

/// Writes `theta` (layout order) and imports it into the engine; the engine's new hash.
async fn import(
    engine: &EngineHandle,
    dir: &Path,
    layout: &Layout,
    theta: &[Vec<f32>],
) -> Result<String, String> {
    let path = dir.join("import.safetensors");
    let bytes = round::encode_weights(layout, theta, None).map_err(|e| e.to_string())?;
    round::write_file(&path, &bytes).map_err(|e| e.to_string())?;
    engine
        .import_weights(&path)
        .await
        .map_err(|e| format!("import weights: {e}"))
}

/// Reads the loaded model into the round state when it has none yet (first start), for
/// rounds that sync one of `fragments` fragments each with `overlap` inner steps between a
/// send and its outer step (Streaming DiLoCo; 1 and 0: the whole model, no overlap).
pub async fn init(
    diloco: &Diloco,
    engine: &EngineHandle,
    dir: &Path,
    fragments: u32,
    overlap: u32,
) -> Result<(), String> {
    if diloco.state.lock().initialized {
        return Ok(());
    }
    let (layout, theta, mut hash) = export(engine, dir).await?;
    if fragments > 1 || overlap > 0 {
        let names: Vec<&str> = layout.tensors.iter().map(|(n, _)| n.as_str()).collect();
        super::streaming::Partition::new(&names, fragments).map_err(|e| e.to_string())?;
        hash = super::stage::content_hash(&layout, &theta)?;
    }
    let mut s = diloco.state.lock();
    s.fragments = fragments;
    s.overlap = overlap;
    s.momentum = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    s.theta_start = theta;
    s.layout = layout;
    s.start_hash = hash;
    s.round = 0;
    s.inner_step = 0;
    s.initialized = true;
    Ok(())
}

impl<'a> Round<'a> {
    /// A round boundary of `diloco` with the replicas among `net`'s peers, exchanging weight
    /// files in `dir`.
    pub fn new(
        net: &'a Arc<Network>,
        diloco: &'a Diloco,
        metrics: &'a Metrics,
        attest: &'a crate::attest::Attestations,
        settings: Settings,
        dir: PathBuf,
        stage: Option<&'a dyn super::stage::StageLock>,
    ) -> Round<'a> {
        Round {
            diloco,
            net,
            metrics,
            attest,
            settings,
            dir,
            stage,
        }
    }
}

impl Round<'_> {
    pub(super) fn replicas(&self) -> Vec<(PeerConn, pb::NodeInfo)> {
        replicas(self.net, self.diloco)
    }

    /// True when the agreed hash is of the weights' content (a stage's, or θ_g with
    /// Streaming DiLoCo), not the engine's model hash.
    fn content_hashed(&self) -> bool {
        self.stage.is_some() || self.diloco.state.lock().streaming()
    }

    /// When the most common (round, start hash) among the replicas and this node beats ours
    /// (more holders; ties to the later round, then the larger hash), adopts it from a peer.
    pub async fn catch_up(&self, engine: &EngineHandle) -> Result<Option<Outcome>, String> {
        let (round, hash) = self.diloco.advertised();
        let replicas = self.replicas();
        self.diloco.figures.lock().replica_states = replicas
            .iter()
            .filter(|(_, i)| !i.round_hash.is_empty())
            .map(|(_, i)| (i.node_id.clone(), i.diloco_round, i.round_hash.clone()))
            .collect();
        let states: Vec<(u64, &str)> = replicas
            .iter()
            .filter(|(_, i)| !i.round_hash.is_empty())
            .map(|(_, i)| (i.diloco_round, i.round_hash.as_str()))
            .collect();
        let Some(best) = state_to_adopt((round, &hash), &states) else {
            return Ok(None);
        };
        let layout = self.diloco.state.lock().layout.clone();
        let numel: usize = layout
            .tensors
            .iter()
            .filter_map(|(_, s)| Layout::numel(s))
            .sum();
        let max_bytes = 8 * numel + (1 << 20) + 64 * layout.tensors.len() * 8;
        let mut last_err = String::from("no peer holds the agreed state");
        for (conn, _) in replicas
            .iter()
            .filter(|(_, i)| (i.diloco_round, &i.round_hash) == (best.0, &best.1))
        {
            let (r, h, bytes) = match conn.get_weights(max_bytes).await {
                Ok(x) => x,
                Err(e) => {
                    last_err = e.to_string();
                    continue;
                }
            };
            // Pings lag up to 2 s behind a round change: the peer's answer is current, and
            // when it is where this node already is, or behind it, there is nothing to adopt.
            if (r, h.as_str()) == (round, hash.as_str()) || r < round {
                return Ok(None);
            }
            let split =
                round::decode_weights(&bytes).and_then(|t| round::split_snapshot(&layout, t));
            let (theta, momentum) = match split {
                Ok(x) => x,
                Err(e) => {
                    last_err = format!("{}: {e}", conn.id);
                    continue;
                }
            };
            let content = self.content_hashed();
            let got = match self.stage {
                None if !content => {
                    let got = import(engine, &self.dir, &layout, &theta).await?;
                    if got != h {
                        tracing::warn!(peer = %conn.id, claimed = %h, got = %got, "fetched weights do not match the peer's hash");
                    }
                    got
                }
                // A stage's agreed hash is of the weights themselves: a peer whose bytes do
                // not hash to its claim is not followed.
                // So is θ_g's with fragments (the engine then takes θ_g whole).
                stage => {
                    let got = super::stage::content_hash(&layout, &theta)?;
                    if got != h {
                        last_err =
                            format!("{}: weights hash to {got}, the peer claimed {h}", conn.id);
                        continue;
                    }
                    let _g = match stage {
                        Some(stage) => Some(stage.quiesced().await),
                        None => None,
                    };
                    import(engine, &self.dir, &layout, &theta).await?;
                    got
                }
            };
            {
                let mut s = self.diloco.state.lock();
                s.round = r;
                s.start_hash = got.clone();
                s.theta_start = theta;
                s.momentum = momentum;
                s.inner_step = 0;
            }
            self.diloco.inbox.lock().prune(r);
            self.diloco.figures.lock().catch_ups += 1;
            self.diloco.figures.lock().syncs_failed += 1;
            self.metrics.syncs_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %conn.id, round = r, hash = %got, "caught up with the replicas' agreed weights");
            return Ok(Some(Outcome::CaughtUp {
                round: r,
                hash: got,
            }));
        }
        Err(format!("catch-up failed: {last_err}"))
    }

    /// The round boundary after the inner steps (`loss`: their mean, `batches`: how many):
    /// [`Round::send`], then at once [`Round::complete`].
    pub async fn finish(
        &self,
        engine: &EngineHandle,
        loss: f32,
        batches: u64,
    ) -> Result<Outcome, String> {
        match self.send(engine, loss, batches).await? {
            Sending::CaughtUp(o) => Ok(o),
            Sending::Sent(sent) => self.complete(engine, sent).await,
        }
    }

    /// The first half of a round boundary: catches up when this replica is in a minority
    /// state, else exports the weights, files its own contribution and starts sending the
    /// pseudo-gradient of the round's fragment to the replicas (not waited for here).
    pub async fn send(
        &self,
        engine: &EngineHandle,
        loss: f32,
        batches: u64,
    ) -> Result<Sending, String> {
        if let Some(o) = self.catch_up(engine).await? {
            return Ok(Sending::CaughtUp(o));
        }
        let exported = match self.stage {
            // The stage lock serializes engine commands with the pipeline's.
            Some(stage) => {
                let _g = stage.exclusive().await;
                export(engine, &self.dir).await?
            }
            None => export(engine, &self.dir).await?,
        };
        let (layout, theta_local, _) = exported;
        let (round, start_hash, me, streaming, fragment) = {
            let s = self.diloco.state.lock();
            if s.layout != layout {
                return Err("the engine's tensors changed during the round".into());
            }
            // Streaming DiLoCo: this round exchanges fragment round mod P only.
            let fragment = s.fragment(s.round).map_err(|e| e.to_string())?;
            let streaming = self.stage.is_none() && s.streaming();
            let me = self.net.id().to_string();
            (s.round, s.start_hash.clone(), me, streaming, fragment)
        };
        // Pseudo-gradient, encoded; our own contribution is its decoded form, like everyone's.
        let encoding = self.settings.encoding;
        let mut wire = Vec::with_capacity(layout.tensors.len());
        let mut own = Vec::with_capacity(layout.tensors.len());
        {
            let s = self.diloco.state.lock();
            let mut residuals = self.diloco.residuals.lock();
            residuals.resize(layout.tensors.len(), Vec::new());
            for &i in &fragment {
                let ((name, shape), local) = (&layout.tensors[i], &theta_local[i]);
                let scale = self.settings.delta_scale;
                let delta: Vec<f32> = s.theta_start[i]
                    .iter()
                    .zip(local)
                    .map(|(a, b)| (a - b) * scale)
                    .collect();
                let data = compress::encode(encoding, &delta, &mut residuals[i]);
                own.push(
                    compress::decode(encoding, &data, delta.len()).map_err(|e| e.to_string())?,
                );
                wire.push(pb::DeltaTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    data,
                });
            }
        }
        self.diloco.inbox.lock().insert_own(Contribution {
            sender: me.clone(),
            round,
            model_hash: start_hash.clone(),
            loss,
            batches,
            tensors: own,
        });
        // Streaming DiLoCo's rounds are not replayed (`verify.rs`): nothing to commit to.
        let (commitment, step_root) = match streaming {
            false => (
                self.diloco.verifier.own_commitment(round),
                self.diloco.verifier.own_step_root(round, batches),
            ),
            true => Default::default(),
        };
        let msg = pb::DeltaMessage {
            auth: None,
            round,
            model_hash: start_hash.clone(),
            loss,
            batches,
            encoding: encoding.name().into(),
            tensors: wire,
            start_checkpoint: commitment.start_checkpoint,
            data_id: commitment.data_id,
            replay_class: commitment.replay_class,
            step_root,
        };
        let size = msg.encoded_len() as u64;
        let replicas = self.replicas();
        let sends: Vec<_> = replicas
            .iter()
            .map(|(conn, _)| {
                let conn = conn.clone();
                let msg = msg.clone();
                tokio::spawn(async move { (conn.id, conn.push_delta(msg).await) })
            })
            .collect();
        Ok(Sending::Sent(Sent {
            round,
            start_hash,
            me,
            streaming,
            fragment,
            layout,
            theta_local,
            loss,
            size,
            sends,
            replicas,
            steps_after: 0,
        }))
    }

    /// The second half of a round boundary: the replicas' contributions (until all arrived
    /// or the deadline), aggregated in sender order, the outer step of the round's fragment
    /// from θ_start, and the engine's weights: θ_g itself, or with Streaming DiLoCo's overlap
    /// (`sent.steps_after` > 0 inner steps since `send`) the merge α·θ_local + (1 − α)·θ_g
    /// of the fragment (α: `Settings::merge_alpha`).
    pub async fn complete(&self, engine: &EngineHandle, sent: Sent) -> Result<Outcome, String> {
        let Sent {
            round,
            start_hash,
            me,
            streaming,
            fragment,
            layout,
            theta_local,
            loss,
            size,
            sends,
            replicas,
            steps_after,
        } = sent;
        let mut sent_bytes = 0u64;
        for task in sends {
            match task.await {
                Ok((peer, Ok(ack))) => {
                    sent_bytes += size;
                    if !ack.accepted {
                        tracing::debug!(%peer, reason = %ack.reason, "peer refused our pseudo-gradient");
                    }
                    // The replica's receipt of our earlier contributions it aggregated.
                    if !ack.receipt.is_empty()
                        && let Err(e) = self.attest.keep(
                            &peer,
                            neuroshard_ledger::receipt::ReceiptKind::Contribution,
                            &ack.receipt,
                        )
                    {
                        self.net
                            .state
                            .rejected_messages
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %e, "receipt refused");
                    }
                }
                Ok((peer, Err(e))) => {
                    tracing::debug!(%peer, error = %e, "pseudo-gradient not delivered")
                }
                Err(_) => {}
            }
        }
        // Wait for every replica in the same state, or the deadline.
        let deadline = Instant::now() + self.settings.timeout;
        let needed = self.settings.aggregator.min_contributions();
        let mut missing;
        loop {
            // Wait for every replica not known to be ahead that has sent nothing for this
            // round yet: one in an earlier round or on another hash may be catching up
            // (pings are up to 2 s old). One that sent a delta from another start is done.
            let have = self.diloco.inbox.lock().senders(round);
            let now = self.replicas();
            missing = now
                .iter()
                .filter(|(_, i)| i.diloco_round <= round)
                .filter(|(_, i)| !have.contains(&i.node_id))
                .count();
            // Too few matching contributions to outvote a bad one while replicas are around:
            // keep waiting (until the deadline) for a replica out of step to catch up and
            // send a delta from our start, and catch up ourselves if we are the minority.
            let short = !now.is_empty()
                && self.diloco.inbox.lock().matching(round, &start_hash).len() < needed;
            // With fewer replicas than the aggregator needs, no wait can make up the count.
            let never = now.len() + 1 < needed;
            if (missing == 0 && (!short || never)) || Instant::now() >= deadline {
                break;
            }
            if short && missing == 0 {
                match self.catch_up(engine).await {
                    Ok(Some(o)) => return Ok(o),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "catch-up while waiting failed"),
                }
            }
            tokio::select! {
                _ = self.diloco.arrived.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        // The losses the replicas reported with this round's contributions.
        {
            let ids: Vec<&str> = replicas.iter().map(|(_, i)| i.node_id.as_str()).collect();
            let reported: Vec<(String, f32)> = self
                .diloco
                .inbox
                .lock()
                .in_round(round)
                .into_iter()
                .filter(|c| ids.contains(&c.sender.as_str()))
                .map(|c| (c.sender.clone(), c.loss))
                .collect();
            let mut f = self.diloco.figures.lock();
            for (sender, loss) in reported {
                f.peer_losses.entry(sender).or_default().record(round, loss);
            }
        }
        // Too few contributions for the aggregator to outvote one bad sender (a replica out of
        // step meets a stranger's delta alone, and nothing is trimmed from two): adopt the
        // replicas' state if they moved on without us, else step with our own delta only;
        // the replicas' majority state is adopted at the next boundary, so a bad delta never
        // decides a round.
        let matching = self.diloco.inbox.lock().matching(round, &start_hash).len();
        let alone = matching < needed;
        if alone && !replicas.is_empty() {
            match self.catch_up(engine).await {
                Ok(Some(o)) => return Ok(o),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "catch-up after a short round failed"),
            }
            tracing::warn!(
                round,
                contributions = matching,
                needed,
                "too few contributions to outvote a bad one; this round uses our own delta only"
            );
        }
        // Aggregate in sender order, outer step from θ_start, import.
        let (senders, flat, weights, batches) = {
            let inbox = self.diloco.inbox.lock();
            let mut senders = Vec::new();
            let mut flat = Vec::new();
            let mut weights = Vec::new();
            let mut batches = Vec::new();
            for c in inbox.matching(round, &start_hash) {
                if alone && c.sender != me {
                    continue;
                }
                senders.push(c.sender.clone());
                flat.push(c.flat());
                weights.push(c.batches as f32);
                batches.push(c.batches);
            }
            (senders, flat, weights, batches)
        };
        let contributors = flat.len();
        let inputs: Vec<Input<'_>> = flat
            .iter()
            .zip(&weights)
            .map(|(v, &w)| Input {
                values: v,
                weight: w,
            })
            .collect();
        let report = self
            .settings
            .aggregator
            .aggregate_report(&inputs)
            .map_err(|e| e.to_string())?;
        let outvoted: Vec<String> = report
            .outvoted
            .iter()
            .map(|&i| senders[i].clone())
            .collect();
        if !outvoted.is_empty() {
            tracing::info!(round, ?outvoted, "contributions outvoted by the aggregator");
        }
        let attested =
            self.attest_contributions(round, &start_hash, &senders, &batches, &report.outvoted);
        if self.stage.is_none() && !streaming {
            self.sample(round, &start_hash, &attested);
        } else if streaming {
            self.diloco
                .verifier
                .figures
                .lock()
                .unchecked_fragment_rounds += attested.len() as u64;
        }
        let agg = report.values;
        // New weights and momentum are computed aside and committed together after the
        // import, so GetWeights never serves a half-updated state.
        let (theta_new, momentum_new) = {
            let s = self.diloco.state.lock();
            let mut offset = 0;
            let mut out = s.theta_start.clone();
            let mut momentum = s.momentum.clone();
            for &i in &fragment {
                let t = &s.theta_start[i];
                let d = &agg[offset..offset + t.len()];
                offset += t.len();
                out[i] = self.settings.outer.step(t, d, &mut momentum[i]);
            }
            (out, momentum)
        };
        let hash = match self.stage {
            None if !streaming => import(engine, &self.dir, &layout, &theta_new).await?,
            // Streaming DiLoCo without overlap: the synced fragment takes θ_g, the others
            // keep training from their local weights; the agreed hash is θ_g's content.
            None if steps_after == 0 => {
                let mut engine_theta = theta_local;
                for &i in &fragment {
                    engine_theta[i].clone_from(&theta_new[i]);
                }
                import(engine, &self.dir, &layout, &engine_theta).await?;
                super::stage::content_hash(&layout, &theta_new)?
            }
            // With overlap the engine trained on meanwhile: its fragment keeps α of that.
            None => {
                let (now_layout, mut engine_theta, _) = export(engine, &self.dir).await?;
                if now_layout != layout {
                    return Err("the engine's tensors changed during the round".into());
                }
                let alpha = self.settings.merge_alpha;
                for &i in &fragment {
                    for (l, g) in engine_theta[i].iter_mut().zip(&theta_new[i]) {
                        *l = alpha * *l + (1.0 - alpha) * g;
                    }
                }
                import(engine, &self.dir, &layout, &engine_theta).await?;
                super::stage::content_hash(&layout, &theta_new)?
            }
            // The stage served pipeline steps while the round waited: keep them
            // (`stage::with_drift`), with no step between its forwards and its apply.
            Some(stage) => {
                let _g = stage.quiesced().await;
                let (now_layout, theta_now, _) = export(engine, &self.dir).await?;
                if now_layout != layout {
                    return Err("the engine's tensors changed during the round".into());
                }
                let engine_theta = super::stage::with_drift(&theta_new, &theta_now, &theta_local);
                import(engine, &self.dir, &layout, &engine_theta).await?;
                super::stage::content_hash(&layout, &theta_new)?
            }
        };
        {
            let mut s = self.diloco.state.lock();
            s.round = round + 1;
            s.start_hash = hash.clone();
            s.theta_start = theta_new;
            s.momentum = momentum_new;
            // Inner steps taken during the overlap count in the new round.
            s.inner_step = steps_after;
        }
        self.diloco.inbox.lock().prune(round + 1);
        let had_peers = !replicas.is_empty();
        let ok = !had_peers || contributors > 1;
        {
            let mut f = self.diloco.figures.lock();
            f.outer_steps += 1;
            f.bytes_sent_last_round = sent_bytes;
            f.bytes_sent_total += sent_bytes;
            f.bytes_sent_max_round = f.bytes_sent_max_round.max(sent_bytes);
            f.last_contributors = contributors;
            f.outvoted_total += outvoted.len() as u64;
            for sender in &outvoted {
                *f.outvoted_by.entry(sender.clone()).or_default() += 1;
            }
            f.last_outvoted = outvoted;
            if alone && had_peers {
                f.rounds_alone += 1;
            }
            f.agreeing = contributors;
            f.replicas = replicas.len() + 1;
            f.round_losses.push(loss);
            if f.round_losses.len() > 1000 {
                f.round_losses.remove(0);
            }
            if ok {
                f.syncs_ok += 1;
            } else {
                f.syncs_failed += 1;
            }
        }
        if ok {
            self.metrics.syncs_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.syncs_failed.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            round,
            contributors,
            missing,
            bytes = sent_bytes,
            hash = %hash,
            "DiLoCo outer step"
        );
        Ok(Outcome::Stepped { contributors, hash })
    }
}
