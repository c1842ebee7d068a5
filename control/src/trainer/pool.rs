//! Pool membership: which layers this node holds (the dynamic layer pool), telling the peers,
//! taking over layers nobody holds, and resyncing a standby replica from a holder ahead.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use neuroshard_coordination::upkeep::Event;

use super::*;

impl Trainer {
    /// Decides which layers this node holds (dynamic layer pool): all of them when its
    /// capacity covers the model; else, once the seed peers are connected (or 10 s passed),
    /// the first layers nobody holds. Tells peers and the API. None when stopped meanwhile.
    pub(super) async fn assign(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<crate::pipeline::Assignment> {
        let cfg = self.config();
        let total = held_layers(&cfg).end;
        let capacity = crate::pipeline::assign::capacity(&cfg, cfg.training.model.config());
        let a = if capacity < total {
            let net = &self.net;
            let wanted = cfg.seed_peers.len().min(neuroshard_net::MAX_PEERS);
            let deadline = Instant::now() + ASSIGN_WAIT;
            while net.peers.len() < wanted && Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    return None;
                }
            }
            let held: Vec<Vec<u32>> = net
                .peers
                .node_infos()
                .into_iter()
                .map(|i| i.layers)
                .collect();
            crate::pipeline::assign::choose(total, capacity, &held)
        } else {
            crate::pipeline::Assignment::full(total)
        };
        tracing::info!(layers = ?a.layers, role = %a.role(), capacity, "layers assigned");
        self.net.set_capacity(capacity);
        self.publish(&a);
        Some(a)
    }

    /// Tells peers, the pipeline stage and the API which layers this node holds.
    pub(super) fn publish(&self, a: &crate::pipeline::Assignment) {
        self.net.set_local_role(neuroshard_net::LocalRole {
            role: a.role().as_str().into(),
            layers: a.layers.clone().collect(),
        });
        self.stage.set_assignment(a.clone());
        self.update(|s| s.assignment = Some(a.clone()));
    }

    /// (layers of the model, layers this node may hold).
    pub(super) fn capacity(&self) -> (u32, u32) {
        let cfg = self.config();
        let total = held_layers(&cfg).end;
        let capacity = crate::pipeline::assign::capacity(&cfg, cfg.training.model.config());
        (total, capacity)
    }

    /// The coverage as the takeover rule sees it now: the first run of layers nobody holds,
    /// and the range the rule gives this node for it (when that changes this node's range).
    /// Nothing while the model is not loaded.
    pub(super) fn coverage(&self, a: &crate::pipeline::Assignment) -> Event {
        use crate::pipeline::assign::{Holder, first_gap, takeover};
        let nothing = Event::Coverage {
            gap: None,
            mine: None,
        };
        let net = &self.net;
        if !self.stats.lock().model_loaded {
            return nothing;
        }
        let (total, capacity) = self.capacity();
        let me = Holder {
            id: net.id().to_string(),
            layers: a.layers.clone().collect(),
            capacity,
        };
        let peers: Vec<Holder> = net
            .peers
            .node_infos()
            .into_iter()
            .map(|i| Holder {
                id: i.node_id,
                layers: i.layers,
                capacity: i.capacity,
            })
            .collect();
        Event::Coverage {
            gap: first_gap(total, std::iter::once(&me).chain(&peers)),
            mine: takeover(total, &me, &peers).filter(|r| *r != a.layers),
        }
    }

    /// Reloads the engine with `new` (covering layers nobody holds) and tells the network.
    /// Whether it worked (else the old range is back).
    pub(super) async fn take_over(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        new: &crate::pipeline::Assignment,
    ) -> bool {
        tracing::warn!(from = ?a.layers, to = ?new.layers, "layers uncovered; taking them over");
        match self.reload(client, a, new, None).await {
            Ok(()) => {
                self.stage
                    .counters
                    .takeovers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "takeover failed; retrying");
                self.update(|s| s.last_error = Some(e));
                false
            }
        }
    }

    /// A replica left off the training route trains nothing while the route's holder of its
    /// layers goes on; should the route switch to it (that holder gone), training would step
    /// back to stale weights. So when a peer holding some of this node's layers has trained
    /// them `RESYNC_LAG` steps further, this node reloads them from such peers (weights, AdamW
    /// moments and step; its own state for layers they lack). True when it tried.
    pub(super) async fn resync(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        step: u64,
    ) -> bool {
        let net = &self.net;
        if !self.stats.lock().model_loaded {
            return false;
        }
        let min_step = step.saturating_add(RESYNC_LAG);
        let ahead =
            net.peers.node_infos().into_iter().find(|i| {
                i.train_step >= min_step && i.layers.iter().any(|l| a.layers.contains(l))
            });
        let Some(ahead) = ahead else {
            return false;
        };
        tracing::info!(step, peer = %ahead.node_id, peer_step = ahead.train_step, layers = ?a.layers, "replica behind another holder of its layers; fetching their weights");
        match self.reload(client, a, a, Some(min_step)).await {
            Ok(()) => {
                self.stage
                    .counters
                    .resyncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "resync failed; keeping this node's weights"),
        }
        true
    }
}
