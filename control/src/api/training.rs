//! Training verification: `GET /api/training/global` and `GET /api/training/verify` (no
//! `/v1`, as the contract has them). Every figure comes from what this node measured itself
//! and what its replicas reported; with no replica, the network is this node alone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::diloco::round::LOSS_EMA_ALPHA;

/// Losses compared to judge the trend (the latest ones).
const TREND_WINDOW: usize = 200;
/// Fewer samples than this say nothing about a trend.
const TREND_MIN: usize = 20;
/// Round loss checkpoints needed before training counts as verified.
const VERIFY_CHECKPOINTS: usize = 5;
/// A step older than this means the node is not training now.
const TRAINING_IDLE: Duration = Duration::from_secs(120);

#[derive(Serialize, ToSchema)]
pub struct GlobalTraining {
    /// Mean of the loss EMAs of the training nodes (this node's over its steps, each
    /// replica's over the rounds it reported); null before any step.
    pub global_avg_loss: Option<f64>,
    pub global_min_loss: Option<f64>,
    /// Among this node and its connected replicas in the same DiLoCo round, the share holding
    /// the most common model hash (0 to 1).
    pub hash_agreement_rate: f64,
    pub total_nodes_training: usize,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    /// successful / (successful + failed); null before the first sync.
    pub sync_success_rate: Option<f64>,
    pub global_steps: u64,
    pub global_tokens: u64,
    pub data_shards_covered: Vec<u32>,
    /// Agreement at least 50% and the loss trend not degrading.
    pub is_converging: bool,
    /// At least 5 round loss checkpoints and the mean of the last 3 below 0.9 x the mean
    /// of the first 3.
    pub training_verified: bool,
    /// improving_strongly (> 10% lower), improving (> 2%), stable (within 2%), degrading
    /// or insufficient_data: the newer half of the recent losses against the older half.
    pub loss_trend: String,
    /// Round loss checkpoints this node has (one per DiLoCo round it finished).
    pub loss_checkpoints: usize,
    pub local: LocalTraining,
    /// The connected replicas: their DiLoCo state and the losses they reported.
    pub peers: Vec<PeerTraining>,
    pub diloco: DilocoProgress,
}

#[derive(Serialize, ToSchema)]
pub struct LocalTraining {
    pub node_id: String,
    /// Training steps of this node's model.
    pub training_rounds: u64,
    pub current_loss: Option<f64>,
    /// EMA (alpha 0.1) of this node's step losses.
    pub loss_ema: Option<f64>,
    pub is_training: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PeerTraining {
    pub node_id: String,
    /// The DiLoCo round the replica is in and the hash it started from.
    pub round: u64,
    pub round_hash: String,
    /// The mean inner loss it reported with its latest contribution, and the round.
    pub loss: Option<f64>,
    pub loss_round: Option<u64>,
    /// EMA (alpha 0.1) over the rounds it reported.
    pub loss_ema: Option<f64>,
    pub rounds_reported: u64,
}

#[derive(Serialize, ToSchema)]
pub struct DilocoProgress {
    pub enabled: bool,
    /// Inner steps done in the current round.
    pub inner_step_count: u64,
    /// Inner steps of this round (training.diloco_steps, its share of them with fragments).
    pub inner_steps_total: u64,
    pub progress: f64,
    /// Outer steps applied with replicas.
    pub outer_step_count: u64,
    /// The DiLoCo round this node is in and the model hash it started from: replicas that
    /// agree show the same pair.
    pub round: u64,
    pub round_hash: String,
    /// The layers this node agrees on with its replicas (`peers`): every layer for a full
    /// replica, its stage's range for a pipeline stage (whose rounds are clock periods of
    /// `training.stage_round_secs`, the same for every stage).
    pub layers: Vec<u32>,
    /// Replicas averaged in the last round (this node included).
    pub last_round_contributors: usize,
    pub bytes_sent_last_round: u64,
    /// The most bytes one round sent (its pseudo-gradient to every replica).
    pub bytes_sent_max_round: u64,
    /// Times this node adopted the replicas' agreed weights after falling out of step.
    pub catch_ups: u64,
    /// Pseudo-gradients accepted from peers, and refused ones by reason.
    pub contributions_accepted: u64,
    pub contributions_rejected: std::collections::BTreeMap<String, u64>,
    /// Accepted contributions the robust aggregator set aside (not chosen by Krum, trimmed
    /// away almost everywhere by the trimmed mean or median), in all rounds, and the senders
    /// set aside in the last round.
    pub contributions_outvoted: u64,
    pub last_round_outvoted: Vec<String>,
    pub outvoted_by_sender: std::collections::BTreeMap<String, u64>,
    /// Rounds with too few contributions to outvote a bad one, stepped with this node's own
    /// delta only (the replicas' majority state is adopted at the next boundary).
    pub rounds_alone: u64,
    /// Streaming DiLoCo (`training.diloco_fragments`): the fragments the model is synced in,
    /// one per round, and the one this round syncs (round mod fragments).
    pub fragments: u32,
    pub fragment: u32,
}

/// Compares the mean of the older and the newer half of the latest losses (the notes'
/// thresholds: 10% and 2%).
pub fn loss_trend(losses: &[f32]) -> &'static str {
    let recent = &losses[losses.len().saturating_sub(TREND_WINDOW)..];
    if recent.len() < TREND_MIN {
        return "insufficient_data";
    }
    let (old, new) = recent.split_at(recent.len() / 2);
    let mean = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
    let (a, b) = (mean(old), mean(new));
    if b < a * 0.9 {
        "improving_strongly"
    } else if b < a * 0.98 {
        "improving"
    } else if b <= a * 1.02 {
        "stable"
    } else {
        "degrading"
    }
}

/// EMA (alpha 0.1) of `xs`, oldest first, started at the first value.
pub fn ema(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    xs.into_iter().fold(None, |acc, x| {
        Some(match acc {
            None => x,
            Some(e) => LOSS_EMA_ALPHA * x + (1.0 - LOSS_EMA_ALPHA) * e,
        })
    })
}

/// The notes' rule on the loss checkpoints (one per DiLoCo round): at least 5, and the mean
/// of the last 3 below 0.9 x the mean of the first 3.
fn verified_by_rounds(round_losses: &[f32]) -> bool {
    if round_losses.len() < VERIFY_CHECKPOINTS {
        return false;
    }
    let mean = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
    mean(&round_losses[round_losses.len() - 3..]) < 0.9 * mean(&round_losses[..3])
}

/// Share of `states` equal to the most common one; 0 with none.
fn agreement<T: Ord>(states: &[T]) -> f64 {
    let mut tally: std::collections::BTreeMap<&T, usize> = std::collections::BTreeMap::new();
    for s in states {
        *tally.entry(s).or_default() += 1;
    }
    let best = tally.values().copied().max().unwrap_or(0);
    if states.is_empty() {
        0.0
    } else {
        best as f64 / states.len() as f64
    }
}

pub fn global(state: &AppState) -> GlobalTraining {
    let cfg = state.config();
    let t = state.training();
    let losses: Vec<f32> = t.history.iter().map(|(_, l)| *l).collect();
    let trend = loss_trend(&losses);
    let is_training = cfg.training.enabled
        && t.model_loaded
        && t.last_step_at
            .is_some_and(|at| at.elapsed() < TRAINING_IDLE);
    let loss = t.loss.map(f64::from);
    let loss_ema = ema(losses.iter().map(|&l| f64::from(l)));
    let d = &state.diloco;
    let figures = d.figures.lock().clone();
    let (round, round_hash, inner, initialized, fragments) = {
        let s = d.state.lock();
        (
            s.round,
            s.start_hash.clone(),
            u64::from(s.inner_step),
            s.initialized,
            s.fragments.max(1),
        )
    };
    let (accepted, rejected): (u64, std::collections::BTreeMap<String, u64>) = {
        let i = d.inbox.lock();
        (
            i.accepted,
            i.rejected
                .iter()
                .map(|(r, n)| (r.name().to_string(), *n))
                .collect(),
        )
    };
    // The connected replicas with a known DiLoCo state, and what they reported.
    let connected: Vec<String> = state
        .net
        .peers
        .peer_infos()
        .into_iter()
        .map(|i| i.id)
        .collect();
    let peers: Vec<PeerTraining> = figures
        .replica_states
        .iter()
        .filter(|(id, _, _)| connected.contains(id))
        .map(|(id, r, h)| {
            let reported = figures.peer_losses.get(id);
            PeerTraining {
                node_id: id.clone(),
                round: *r,
                round_hash: h.clone(),
                loss: reported.map(|p| f64::from(p.loss)),
                loss_round: reported.map(|p| p.round),
                loss_ema: reported.map(|p| p.ema),
                rounds_reported: reported.map_or(0, |p| p.reports),
            }
        })
        .collect();
    let nodes_training = if is_training { 1 + peers.len() } else { 0 };
    // The notes: the share holding the most common hash among the nodes in the same round
    // (one a round ahead or behind is passing a boundary, not disagreeing).
    let mut states: Vec<&str> = peers
        .iter()
        .filter(|p| p.round == round)
        .map(|p| p.round_hash.as_str())
        .collect();
    if initialized {
        states.push(round_hash.as_str());
    }
    let hash_agreement_rate = if nodes_training == 0 {
        0.0
    } else if states.is_empty() {
        1.0
    } else {
        agreement(&states)
    };
    let node_losses: Vec<f64> = loss_ema
        .into_iter()
        .chain(peers.iter().filter_map(|p| p.loss_ema))
        .collect();
    let ok = state.metrics.syncs_ok.load(Ordering::Relaxed);
    let failed = state.metrics.syncs_failed.load(Ordering::Relaxed);
    let h = u64::from(
        crate::diloco::streaming::round_steps(cfg.training.diloco_steps, fragments, round).max(1),
    );
    // The notes' rule: at least half the replicas agree and the loss is not getting worse.
    let is_converging = nodes_training > 0 && hash_agreement_rate >= 0.5 && trend != "degrading";
    GlobalTraining {
        global_avg_loss: (!node_losses.is_empty())
            .then(|| node_losses.iter().sum::<f64>() / node_losses.len() as f64),
        global_min_loss: node_losses.iter().copied().reduce(f64::min),
        hash_agreement_rate,
        total_nodes_training: nodes_training,
        successful_syncs: ok,
        failed_syncs: failed,
        sync_success_rate: (ok + failed > 0).then(|| ok as f64 / (ok + failed) as f64),
        global_steps: t.step,
        global_tokens: t.tokens,
        data_shards_covered: t.shards.iter().copied().collect(),
        is_converging,
        training_verified: verified_by_rounds(&figures.round_losses),
        loss_trend: trend.into(),
        loss_checkpoints: figures.round_losses.len(),
        local: LocalTraining {
            node_id: state.node_id.clone(),
            training_rounds: t.step,
            current_loss: loss,
            loss_ema,
            is_training,
        },
        peers,
        diloco: DilocoProgress {
            enabled: cfg.training.enabled,
            inner_step_count: inner,
            inner_steps_total: h,
            progress: ((inner.min(h)) as f64 / h as f64 * 1000.0).round() / 1000.0,
            outer_step_count: figures.outer_steps,
            round,
            round_hash,
            layers: state.net.local_role().layers,
            last_round_contributors: figures.last_contributors,
            bytes_sent_last_round: figures.bytes_sent_last_round,
            bytes_sent_max_round: figures.bytes_sent_max_round,
            catch_ups: figures.catch_ups,
            contributions_accepted: accepted,
            contributions_rejected: rejected,
            contributions_outvoted: figures.outvoted_total,
            last_round_outvoted: figures.last_outvoted.clone(),
            outvoted_by_sender: figures.outvoted_by.clone(),
            rounds_alone: figures.rounds_alone,
            fragments,
            fragment: (round % u64::from(fragments)) as u32,
        },
    }
}

/// `GET /api/training/global`.
#[utoipa::path(get, path = "/api/training/global", tag = "training",
    responses((status = 200, description = "Is distributed training working?", body = GlobalTraining)))]
pub async fn training_global(State(state): State<AppState>) -> Json<GlobalTraining> {
    Json(global(&state))
}

#[derive(Serialize, ToSchema)]
pub struct VerifyResponse {
    pub is_working: bool,
    pub reason: String,
    /// Present when training works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<VerifyMetrics>,
    /// What to do, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct VerifyMetrics {
    pub loss_trend: String,
    /// e.g. "100.0%".
    pub hash_agreement: String,
    pub global_loss: Option<f64>,
}

/// `GET /api/training/verify`: a yes/no answer with the reason.
#[utoipa::path(get, path = "/api/training/verify", tag = "training",
    responses((status = 200, description = "Whether training works, and why", body = VerifyResponse)))]
pub async fn training_verify(State(state): State<AppState>) -> Json<VerifyResponse> {
    Json(verdict(&global(&state)))
}

/// Whether the figures say training works; when not, the first reason found and what to do.
pub fn verdict(g: &GlobalTraining) -> VerifyResponse {
    let agreement = format!("{:.1}%", g.hash_agreement_rate * 100.0);
    let fail = |reason: String, action: &str| VerifyResponse {
        is_working: false,
        reason,
        metrics: None,
        action: Some(action.into()),
    };
    let replicas = g.total_nodes_training > 1;
    if !g.local.is_training {
        fail(
            "This node is not training.".into(),
            "Check that training.enabled is true and the engine is up (GET /api/v1/health).",
        )
    } else if g.hash_agreement_rate < 0.5 {
        fail(
            format!("Network NOT converging! Only {agreement} hash agreement."),
            "Nodes have diverged. Check gradient sync is working.",
        )
    } else if g.loss_trend == "degrading" {
        fail(
            "Loss is rising (trend: degrading).".into(),
            "Lower training.learning_rate, or check the data shards.",
        )
    } else if replicas && g.sync_success_rate.is_some_and(|r| r < 0.5) {
        fail(
            format!(
                "Only {:.1}% of DiLoCo syncs succeeded ({} of {}).",
                g.sync_success_rate.unwrap_or(0.0) * 100.0,
                g.successful_syncs,
                g.successful_syncs + g.failed_syncs
            ),
            "Replicas miss each other's rounds: check peer connectivity and \
             training.diloco_round_timeout_secs.",
        )
    } else if g.loss_checkpoints < VERIFY_CHECKPOINTS {
        fail(
            format!(
                "Not verified yet: {} of {VERIFY_CHECKPOINTS} round loss checkpoints.",
                g.loss_checkpoints
            ),
            "Wait for more DiLoCo rounds (training.diloco_steps inner steps each).",
        )
    } else if !g.training_verified {
        fail(
            "Loss has not fallen 10% between the first and the last 3 rounds.".into(),
            "Check the data and training.learning_rate; training may have stalled.",
        )
    } else {
        VerifyResponse {
            is_working: true,
            reason: "Training verified! Loss is decreasing and network is converging.".into(),
            metrics: Some(VerifyMetrics {
                loss_trend: g.loss_trend.clone(),
                hash_agreement: agreement,
                global_loss: g.global_avg_loss,
            }),
            action: None,
        }
    }
}

/// Most points `GET /training/history` answers (older ones are thinned evenly).
const HISTORY_POINTS: usize = 500;

#[derive(Serialize, ToSchema)]
pub struct LossHistory {
    /// [step, loss] pairs, oldest first: the latest training losses of this node.
    pub points: Vec<(u64, f32)>,
    /// [unix seconds, tokens per second] pairs, oldest first, over the last hour: tokens
    /// trained on and generated by this node.
    pub tokens_per_second: Vec<(i64, f64)>,
    /// [unix seconds, connected peers] pairs, oldest first, over the last hour.
    pub peers: Vec<(i64, usize)>,
}

/// `GET /api/v1/training/history`: the loss curve, the throughput and the peer count for the
/// dashboard.
#[utoipa::path(get, path = "/api/v1/training/history", tag = "training",
    responses((status = 200, description = "Recent training losses, throughput and peer counts", body = LossHistory)))]
pub async fn history(State(state): State<AppState>) -> Json<LossHistory> {
    let t = state.training();
    let n = t.history.len();
    let stride = n.div_ceil(HISTORY_POINTS).max(1);
    let mut points: Vec<(u64, f32)> = t.history.iter().step_by(stride).copied().collect();
    if let Some(last) = t.history.back()
        && points.last() != Some(last)
    {
        points.push(*last);
    }
    let samples = thin(&state.samples.points(), HISTORY_POINTS);
    Json(LossHistory {
        points,
        tokens_per_second: samples
            .iter()
            .map(|s| (s.at, (s.tokens_per_second * 10.0).round() / 10.0))
            .collect(),
        peers: samples.iter().map(|s| (s.at, s.peers)).collect(),
    })
}

/// At most about `max` of `all`, evenly spaced, always with the newest.
fn thin<T: Copy + PartialEq>(all: &[T], max: usize) -> Vec<T> {
    let stride = all.len().div_ceil(max).max(1);
    let mut out: Vec<T> = all.iter().step_by(stride).copied().collect();
    if let Some(last) = all.last()
        && out.last() != Some(last)
    {
        out.push(*last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trend_of_losses() {
        let falling: Vec<f32> = (0..100).map(|i| 8.0 - i as f32 * 0.03).collect();
        assert_eq!(loss_trend(&falling), "improving_strongly");
        let gently: Vec<f32> = (0..100).map(|i| 8.0 - i as f32 * 0.005).collect();
        assert_eq!(loss_trend(&gently), "improving");
        let rising: Vec<f32> = falling.iter().rev().copied().collect();
        assert_eq!(loss_trend(&rising), "degrading");
        assert_eq!(loss_trend(&[5.0; 100]), "stable");
        assert_eq!(loss_trend(&[5.0; 5]), "insufficient_data");
    }

    #[test]
    fn rounds_verify_training_when_the_loss_fell_ten_percent() {
        assert!(verified_by_rounds(&[5.0, 5.0, 5.0, 4.0, 4.0, 4.0]));
        assert!(!verified_by_rounds(&[5.0, 5.0, 5.0, 4.8, 4.7, 4.6]));
        // Fewer than 5 checkpoints never verify, however steep.
        assert!(!verified_by_rounds(&[5.0, 4.0, 3.0, 2.0]));
    }

    #[test]
    fn ema_and_agreement() {
        assert_eq!(ema([]), None);
        let e = ema([10.0, 0.0]).unwrap();
        assert!((e - 9.0).abs() < 1e-12);
        assert_eq!(agreement::<u8>(&[]), 0.0);
        assert_eq!(agreement(&["a", "a", "b"]), 2.0 / 3.0);
        assert_eq!(agreement(&["a", "b"]), 0.5);
    }

    fn figures() -> GlobalTraining {
        GlobalTraining {
            global_avg_loss: Some(4.0),
            global_min_loss: Some(3.5),
            hash_agreement_rate: 1.0,
            total_nodes_training: 3,
            successful_syncs: 6,
            failed_syncs: 1,
            sync_success_rate: Some(6.0 / 7.0),
            global_steps: 140,
            global_tokens: 1000,
            data_shards_covered: vec![0],
            is_converging: true,
            training_verified: true,
            loss_trend: "improving".into(),
            loss_checkpoints: 6,
            local: LocalTraining {
                node_id: "0xa".into(),
                training_rounds: 140,
                current_loss: Some(4.0),
                loss_ema: Some(4.1),
                is_training: true,
            },
            peers: vec![],
            diloco: DilocoProgress {
                enabled: true,
                inner_step_count: 0,
                inner_steps_total: 20,
                progress: 0.0,
                outer_step_count: 6,
                round: 6,
                round_hash: "h".into(),
                layers: vec![0, 1],
                last_round_contributors: 3,
                bytes_sent_last_round: 1,
                bytes_sent_max_round: 1,
                catch_ups: 0,
                contributions_accepted: 12,
                contributions_rejected: Default::default(),
                contributions_outvoted: 0,
                last_round_outvoted: vec![],
                outvoted_by_sender: Default::default(),
                rounds_alone: 0,
                fragments: 1,
                fragment: 0,
            },
        }
    }

    #[test]
    fn verify_says_why_training_does_not_work() {
        let ok = verdict(&figures());
        assert!(ok.is_working && ok.action.is_none() && ok.metrics.is_some());
        type Case = (fn(&mut GlobalTraining), &'static str);
        let cases: Vec<Case> = vec![
            (|g| g.local.is_training = false, "not training"),
            (
                |g| g.hash_agreement_rate = 1.0 / 3.0,
                "33.3% hash agreement",
            ),
            (|g| g.loss_trend = "degrading".into(), "rising"),
            (
                |g| g.sync_success_rate = Some(0.25),
                "25.0% of DiLoCo syncs",
            ),
            (|g| g.loss_checkpoints = 2, "2 of 5"),
            (|g| g.training_verified = false, "not fallen 10%"),
        ];
        for (spoil, reason) in cases {
            let mut g = figures();
            spoil(&mut g);
            let v = verdict(&g);
            assert!(!v.is_working, "{reason}");
            assert!(v.reason.contains(reason), "{}: {reason}", v.reason);
            assert!(v.action.is_some() && v.metrics.is_none());
        }
        // A lone node's sync figures do not count against it.
        let mut g = figures();
        g.total_nodes_training = 1;
        g.sync_success_rate = Some(0.0);
        assert!(verdict(&g).is_working);
    }
}
