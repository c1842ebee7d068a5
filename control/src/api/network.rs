//! Network endpoints: peers, the layers this node holds, the network as this node sees it.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::Caller;
use crate::engine::EngineState;

#[derive(Serialize, ToSchema)]
pub struct PeersResponse {
    pub peers: Vec<PeerEntry>,
    pub total: usize,
    /// Of `total`, the peers reached through a relay only (the others are direct).
    pub relayed: usize,
    /// The relays (libp2p peer ids) holding a reservation for this node: a node behind a
    /// NAT is reached through them; empty for a node reachable directly.
    pub relays: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PeerEntry {
    pub id: String,
    /// host:port of the peer service.
    pub address: String,
    pub role: String,
    pub layers: Vec<u32>,
    /// Round-trip time of the latest ping, in milliseconds.
    pub latency_ms: f64,
    /// RFC 3339, UTC.
    pub connected_since: String,
    /// `direct`, or `relayed` when every connection to the peer goes through a relay.
    pub path: String,
}

/// `GET /peers`.
#[utoipa::path(get, path = "/api/v1/peers", tag = "network", security(("bearer" = [])),
    responses((status = 200, description = "Connected peers", body = PeersResponse),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn peers(State(state): State<AppState>, _caller: Caller) -> Json<PeersResponse> {
    let peers: Vec<PeerEntry> = state
        .net
        .peers
        .peer_infos()
        .into_iter()
        .map(|p| PeerEntry {
            path: if state.net.is_relayed(&p.address) {
                "relayed"
            } else {
                "direct"
            }
            .into(),
            id: p.id,
            address: p.address,
            role: p.role,
            layers: p.layers,
            latency_ms: (p.latency_ms * 10.0).round() / 10.0,
            connected_since: p
                .connected_since
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
        .collect();
    Json(PeersResponse {
        total: peers.len(),
        relayed: peers.iter().filter(|p| p.path == "relayed").count(),
        relays: state.net.relays(),
        peers,
    })
}

#[derive(Serialize, ToSchema)]
pub struct LayersResponse {
    pub layers: Vec<LayerEntry>,
    /// Transformer layers of the model.
    pub total_layers: u32,
    pub my_layer_count: usize,
}

#[derive(Serialize, ToSchema)]
pub struct LayerEntry {
    pub index: u32,
    /// transformer
    #[serde(rename = "type")]
    pub kind: String,
    /// f32 weights, gradients and the two AdamW moments of the layer.
    pub memory_mb: u64,
    /// active (the engine holds it) or loading.
    pub status: String,
}

/// Bytes per trained parameter: f32 weight, gradient, AdamW m and v.
const TRAIN_BYTES_PER_PARAM: u64 = 16;

/// `GET /layers`.
#[utoipa::path(get, path = "/api/v1/layers", tag = "network", security(("bearer" = [])),
    responses((status = 200, description = "Layers held by this node", body = LayersResponse),
              (status = 401, description = "No valid token", body = super::error::ErrorBody)))]
pub async fn layers(State(state): State<AppState>, _caller: Caller) -> Json<LayersResponse> {
    let cfg = state.config();
    let model = cfg.training.model.config();
    let active = state.training().model_loaded && state.engine.status().state == EngineState::Ok;
    let per_layer_mb = (model.layer_params() * TRAIN_BYTES_PER_PARAM).div_ceil(1024 * 1024);
    let layers: Vec<LayerEntry> = crate::stats::live_layers(&cfg, &state.training())
        .map(|index| LayerEntry {
            index,
            kind: "transformer".into(),
            memory_mb: per_layer_mb,
            status: if active { "active" } else { "loading" }.into(),
        })
        .collect();
    Json(LayersResponse {
        total_layers: model.layers,
        my_layer_count: layers.len(),
        layers,
    })
}

#[derive(Serialize, ToSchema)]
pub struct NetworkResponse {
    pub nodes: NodeCounts,
    pub architecture: Architecture,
    pub capacity: Capacity,
    pub training: NetworkTraining,
    pub ledger: LedgerSummary,
    pub coverage: Coverage,
    pub pipeline: PipelineSummary,
}

/// How many of the known nodes (this one and its connected peers) hold each layer.
#[derive(Serialize, ToSchema)]
pub struct Coverage {
    /// One entry per transformer layer, in order.
    pub layers: Vec<LayerCoverage>,
    /// Layers no known node holds: the network cannot train or serve while this is non-zero.
    pub uncovered: usize,
    /// Fewest holders of any layer (0 when a layer is uncovered).
    pub min_replicas: usize,
}

#[derive(Serialize, ToSchema)]
pub struct LayerCoverage {
    pub index: u32,
    /// Nodes holding the layer, this one included.
    pub holders: usize,
    pub held_here: bool,
}

/// Coverage of `total` layers by this node's `own` layers and each peer's.
fn coverage<'a>(total: u32, own: &[u32], peers: impl Iterator<Item = &'a [u32]>) -> Coverage {
    let mut holders = vec![0usize; total as usize];
    let mut count = |layers: &[u32]| {
        // A peer listing a layer twice (or one beyond the model) counts once, or not at all.
        let mut seen = std::collections::BTreeSet::new();
        for &l in layers {
            if l < total && seen.insert(l) {
                holders[l as usize] += 1;
            }
        }
    };
    count(own);
    peers.for_each(&mut count);
    let layers: Vec<LayerCoverage> = holders
        .iter()
        .enumerate()
        .map(|(i, &h)| LayerCoverage {
            index: i as u32,
            holders: h,
            held_here: own.contains(&(i as u32)),
        })
        .collect();
    Coverage {
        uncovered: holders.iter().filter(|&&h| h == 0).count(),
        min_replicas: holders.iter().copied().min().unwrap_or(0),
        layers,
    }
}

/// Pipeline training figures of this node (who holds which layer is in [`Coverage`]).
#[derive(Serialize, ToSchema)]
pub struct PipelineSummary {
    /// Pipeline steps this node drove to the end, and those that failed (a stage timed out,
    /// died or refused).
    pub steps: u64,
    pub failed_steps: u64,
    /// Malformed pipeline requests or tensors refused from peers.
    pub refused: u64,
    /// Tensor payload bytes this stage sent to or received from other stages.
    pub tensor_bytes: u64,
    /// Times this node took over layers nobody held any more.
    pub takeovers: u64,
    /// Times this node moved to another stage to even out the stages' training throughput.
    pub rebalances: u64,
    /// Times this node, a replica left off the training route, refreshed its layers from a
    /// holder that had trained them further.
    pub resyncs: u64,
    /// Generations from this node that went on over another route after a peer stage failed.
    pub inference_failovers: u64,
    /// Layers this node loaded (on a takeover or on joining) from a peer's weights, from its
    /// own checkpoint, or from the seed because nobody had them (a warning is logged).
    pub layers_from_peer: u64,
    pub layers_from_checkpoint: u64,
    pub layers_from_init: u64,
    /// Stage snapshots this node served to peers taking over or joining.
    pub weights_served: u64,
    /// Distributed inference sessions open on this node's engine (this node's layers for a
    /// generation here or at a peer) and the KV cache bytes they hold, as of the last engine
    /// health probe.
    pub inference_sessions: u32,
    pub inference_kv_bytes: u64,
}

/// This node and its connected peers, by role.
#[derive(Serialize, ToSchema)]
pub struct NodeCounts {
    pub total: usize,
    pub drivers: usize,
    pub workers: usize,
    pub validators: usize,
    /// Nodes holding the whole model.
    pub full: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Architecture {
    pub layers: u32,
    pub hidden_dim: u32,
    /// Total parameters, human readable (e.g. "23.1M").
    pub parameters: String,
    pub parameters_exact: u64,
}

/// Memory of the nodes that report it (this node: its configured budget and engine use).
#[derive(Serialize, ToSchema)]
pub struct Capacity {
    pub total_memory_gb: f64,
    pub used_memory_gb: f64,
}

#[derive(Serialize, ToSchema)]
pub struct NetworkTraining {
    pub epoch: u64,
    pub global_step: u64,
    pub loss: Option<f32>,
}

/// The ledger as this node holds it: equal root hashes mean equal ledgers.
#[derive(Serialize, ToSchema)]
pub struct LedgerSummary {
    pub root_hash: String,
    pub blocks: usize,
    /// NEURO ever minted by rewards, and burned by fees and slashing.
    pub minted: f64,
    pub burned: f64,
    /// minted == available + staked + pending + burned over every account.
    pub invariant_ok: bool,
    /// Fraud verdicts decided on the ledger: convictions (rewards voided, stake slashed) and
    /// acquittals (the accusers paid the accused).
    pub fraud: FraudSummary,
}

#[derive(Serialize, ToSchema)]
pub struct FraudSummary {
    pub convictions: usize,
    pub acquittals: usize,
    /// NEURO slashed from convicted nodes' stake.
    pub slashed: f64,
    /// Rewards voided by convictions, in NEURO.
    pub voided: f64,
    /// The latest 50 decisions, newest last.
    pub slashes: Vec<SlashView>,
    /// This node's own replays of other replicas' rounds (`diloco::verify`).
    pub replays: ReplayFigures,
}

#[derive(Serialize, ToSchema)]
pub struct ReplayFigures {
    pub sampled: u64,
    pub replayed: u64,
    pub guilty: u64,
    pub innocent: u64,
    /// Sampled, but the checkpoint was not served, the scratch engine failed or the claimant
    /// is of another replay class.
    pub unverifiable: u64,
    /// Sampled claims of another replay class (engine version, device, instruction set,
    /// dtype) without per-step commitments: not replayed, since a whole round only
    /// reproduces bit for bit within a class.
    pub other_class: u64,
    /// Checks by a short replay window of committed inner steps (`diloco::window`): judged
    /// in any class.
    pub windows: u64,
    /// Of those, claims of another replay class.
    pub cross_class: u64,
    /// Bytes the replay windows fetched from claimants.
    pub evidence_bytes: u64,
    /// Windows whose replay ended on the committed state hash bit for bit.
    pub exact_windows: u64,
    /// Largest distance of an innocent window's replay from the committed states (the
    /// window alone; `max_innocent_distance` includes the end check's wire rounding).
    pub max_innocent_window_distance: f64,
    pub verdicts_written: u64,
    /// Wall time spent replaying, in seconds.
    pub replay_seconds: f64,
    /// Largest relative distance among the innocent replays (the honest noise).
    pub max_innocent_distance: f64,
    /// Contributions attested in Streaming DiLoCo's rounds of one fragment
    /// (`training.diloco_fragments` > 1): not replayed, neither whole nor by window.
    pub unchecked_fragment_rounds: u64,
}

impl From<&crate::diloco::verify::Figures> for ReplayFigures {
    fn from(f: &crate::diloco::verify::Figures) -> Self {
        ReplayFigures {
            sampled: f.sampled,
            replayed: f.replayed,
            guilty: f.guilty,
            innocent: f.innocent,
            unverifiable: f.unverifiable,
            other_class: f.other_class,
            windows: f.windows,
            cross_class: f.cross_class,
            evidence_bytes: f.evidence_bytes,
            exact_windows: f.exact,
            max_innocent_window_distance: f.window_distances.iter().copied().fold(0.0, f64::max),
            verdicts_written: f.verdicts_written,
            replay_seconds: f.replay_ms as f64 / 1000.0,
            max_innocent_distance: f.distances.iter().copied().fold(0.0, f64::max),
            unchecked_fragment_rounds: f.unchecked_fragment_rounds,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SlashView {
    /// The judged reward block (`tx_<hash>`).
    pub target: String,
    pub accused: String,
    /// true: convicted; false: acquitted.
    pub convicted: bool,
    pub guilty_stake: f64,
    pub innocent_stake: f64,
    /// Verifiers on the winning side.
    pub verifiers: Vec<String>,
    pub voided: f64,
    /// Stake slashed from the accused (convicted) or taken from its accusers (acquitted).
    pub slashed: f64,
    /// Paid to the verifiers (convicted) or to the accused (acquitted).
    pub paid: f64,
    pub decided_at: String,
}

/// The ledger's fraud decisions as `/network` shows them.
pub fn fraud_summary(
    decisions: &[neuroshard_ledger::fraud::Decision],
    replays: ReplayFigures,
) -> FraudSummary {
    use neuroshard_ledger::units_to_neuro;
    let convicted = decisions.iter().filter(|d| d.convicted);
    FraudSummary {
        convictions: convicted.clone().count(),
        acquittals: decisions.len() - convicted.clone().count(),
        slashed: units_to_neuro(convicted.clone().map(|d| d.slashed).sum()),
        voided: units_to_neuro(convicted.map(|d| d.voided).sum()),
        replays,
        slashes: decisions
            .iter()
            .rev()
            .take(50)
            .rev()
            .map(|d| SlashView {
                target: format!("tx_{}", d.target.to_hex()),
                accused: d.accused.to_checksum(),
                convicted: d.convicted,
                guilty_stake: units_to_neuro(d.guilty_weight),
                innocent_stake: units_to_neuro(d.innocent_weight),
                verifiers: d.voters.iter().map(|v| v.to_checksum()).collect(),
                voided: units_to_neuro(d.voided),
                slashed: units_to_neuro(d.slashed),
                paid: units_to_neuro(d.paid),
                decided_at: neuroshard_ledger::views::timestamp_string(d.decided_at),
            })
            .collect(),
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `GET /network`.
#[utoipa::path(get, path = "/api/v1/network", tag = "network",
    responses((status = 200, description = "Network statistics", body = NetworkResponse)))]
pub async fn network(State(state): State<AppState>) -> Json<NetworkResponse> {
    let cfg = state.config();
    let model = cfg.training.model.config();
    let training = state.training();
    let peers = state.net.peers.peer_infos();
    let mut counts = NodeCounts {
        total: 1 + peers.len(),
        drivers: 0,
        workers: 0,
        validators: 0,
        full: 0,
    };
    let own_role = super::node::role(&state);
    for role in std::iter::once(own_role).chain(peers.iter().map(|p| p.role.as_str())) {
        match role {
            "driver" => counts.drivers += 1,
            "validator" => counts.validators += 1,
            "full" => counts.full += 1,
            _ => counts.workers += 1,
        }
    }
    let counter = |f: fn(&crate::pipeline::Counters) -> &std::sync::atomic::AtomicU64| {
        f(&state.stage.counters).load(std::sync::atomic::Ordering::Relaxed)
    };
    let pipeline = PipelineSummary {
        steps: counter(|c| &c.steps),
        failed_steps: counter(|c| &c.failed_steps),
        refused: counter(|c| &c.refused),
        tensor_bytes: counter(|c| &c.tensor_bytes),
        takeovers: counter(|c| &c.takeovers),
        rebalances: counter(|c| &c.rebalances),
        resyncs: counter(|c| &c.resyncs),
        inference_failovers: counter(|c| &c.failovers),
        layers_from_peer: counter(|c| &c.layers_from_peer),
        layers_from_checkpoint: counter(|c| &c.layers_from_checkpoint),
        layers_from_init: counter(|c| &c.layers_from_init),
        weights_served: counter(|c| &c.weights_served),
        inference_sessions: state
            .engine
            .status()
            .last_health
            .as_ref()
            .map_or(0, |h| h.stage_sessions),
        inference_kv_bytes: state
            .engine
            .status()
            .last_health
            .as_ref()
            .map_or(0, |h| h.stage_kv_bytes),
    };
    let used = state
        .engine
        .status()
        .last_health
        .as_ref()
        .map_or(0, |h| h.memory_used);
    let params = model.total_params();
    let root = state.ledger.root_hash().await.to_hex();
    let blocks = state.ledger.with_state(|s| s.block_count()).await;
    let fraud = state
        .ledger
        .with_state(|s| {
            fraud_summary(
                s.decisions(),
                ReplayFigures::from(&*state.diloco.verifier.figures.lock()),
            )
        })
        .await;
    let (minted, burned) = state.ledger.totals().await;
    let invariant_ok = match state.ledger.check_invariant().await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "ledger invariant violated");
            false
        }
    };
    let own: Vec<u32> = if training.model_loaded {
        crate::stats::live_layers(&cfg, &training).collect()
    } else {
        Vec::new()
    };
    let total_layers = model.layers;
    let coverage = coverage(
        total_layers,
        &own,
        peers.iter().map(|p| p.layers.as_slice()),
    );
    Json(NetworkResponse {
        coverage,
        nodes: counts,
        architecture: Architecture {
            layers: model.layers,
            hidden_dim: model.hidden,
            parameters: human(params),
            parameters_exact: params,
        },
        capacity: Capacity {
            total_memory_gb: cfg.resources.max_memory_gb,
            used_memory_gb: (used as f64 / (1u64 << 30) as f64 * 1000.0).round() / 1000.0,
        },
        training: NetworkTraining {
            epoch: training.step / u64::from(cfg.training.diloco_steps.max(1)),
            global_step: training.step,
            loss: training.loss,
        },
        ledger: LedgerSummary {
            root_hash: root,
            blocks,
            minted: minted as f64 / neuroshard_ledger::UNITS_PER_NEURO as f64,
            burned: burned as f64 / neuroshard_ledger::UNITS_PER_NEURO as f64,
            invariant_ok,
            fraud,
        },
        pipeline,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_parameter_counts() {
        assert_eq!(super::human(9_200_000_000), "9.2B");
        assert_eq!(super::human(23_100_000), "23.1M");
        assert_eq!(super::human(512), "512");
    }

    #[test]
    fn coverage_counts_each_holder_once() {
        let peers: Vec<Vec<u32>> = vec![vec![0, 1], vec![2, 2, 9], vec![]];
        let c = super::coverage(4, &[1], peers.iter().map(Vec::as_slice));
        let holders: Vec<usize> = c.layers.iter().map(|l| l.holders).collect();
        assert_eq!(holders, [1, 2, 1, 0]);
        assert_eq!((c.uncovered, c.min_replicas), (1, 0));
        assert!(c.layers[1].held_here && !c.layers[0].held_here);
        let full = super::coverage(2, &[0, 1], [[0u32, 1].as_slice()].into_iter());
        assert_eq!((full.uncovered, full.min_replicas), (0, 2));
        assert_eq!(super::coverage(0, &[], std::iter::empty()).min_replicas, 0);
    }
}
