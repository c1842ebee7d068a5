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
            crate::pipeline::assign::choose(total, capacity, &self.holders())
        } else {
            crate::pipeline::Assignment::full(total)
        };
        tracing::info!(layers = ?a.layers, role = %a.role(), capacity, "layers assigned");
        self.net.set_capacity(capacity);
        self.publish(&a);
        Some(a)
    }

    /// The connected peers as the layer pool sees them (layers, capacity, measured training
    /// throughput, serve-only).
    ///
    /// A serve-only node covers layers for inference: it counts every peer's layers (serve-only
    /// ones too) when it chooses or takes over layers, so serve-only nodes together cover the
    /// model; a training node ignores serve-only peers (they are not training coverage).
    fn holders(&self) -> Vec<crate::pipeline::assign::Holder> {
        let serving = !self.config().training.enabled;
        self.net
            .peers
            .node_infos()
            .into_iter()
            .map(|i| crate::pipeline::assign::Holder {
                id: i.node_id,
                layers: i.layers,
                capacity: i.capacity,
                compute: i.train_compute,
                serve_only: i.serve_only && !serving,
            })
            .collect()
    }

    /// This node as the layer pool sees it.
    fn me(&self, a: &crate::pipeline::Assignment) -> crate::pipeline::assign::Holder {
        crate::pipeline::assign::Holder {
            id: self.net.id().to_string(),
            layers: a.layers.clone().collect(),
            capacity: self.capacity().1,
            compute: self.stage.compute_rate(),
            // As its own pool sees it (see `holders`): a serve-only node's rules are the
            // inference coverage's, in which it counts.
            serve_only: false,
        }
    }

    /// Tells peers, the pipeline stage and the API which layers this node holds.
    pub(super) fn publish(&self, a: &crate::pipeline::Assignment) {
        self.net.set_local_role(neuroshard_net::LocalRole {
            role: a.role().as_str().into(),
            layers: a.layers.clone().collect(),
            serve_only: !self.config().training.enabled,
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
        use crate::pipeline::assign::{first_gap, takeover};
        let nothing = Event::Coverage {
            gap: None,
            mine: None,
        };
        if !self.stats.lock().model_loaded {
            return nothing;
        }
        let total = self.capacity().0;
        let me = self.me(a);
        let peers = self.holders();
        Event::Coverage {
            gap: first_gap(total, std::iter::once(&me).chain(&peers)),
            mine: takeover(total, &me, &peers).filter(|r| *r != a.layers),
        }
    }

    /// The balance rule's move for this node now (`neuroshard_coordination::balance`), as
    /// the event the upkeep machine takes after a coverage check with no gap.
    pub(super) fn balance(&self, a: &crate::pipeline::Assignment) -> Event {
        // Serve-only nodes do not move for training throughput.
        let training = self.config().training.enabled;
        let mine = if training && self.stats.lock().model_loaded {
            let total = self.capacity().0;
            neuroshard_coordination::balance::rebalance(total, &self.me(a), &self.holders())
                .filter(|r| *r != a.layers)
        } else {
            None
        };
        Event::Balance { mine }
    }

    /// Moves this node to `new` to even the stages' training throughput out; as a takeover.
    pub(super) async fn move_for_balance(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        new: &crate::pipeline::Assignment,
    ) -> bool {
        tracing::info!(from = ?a.layers, to = ?new.layers, "moving to the stage with the least training throughput");
        match self.reload(client, a, new, None).await {
            Ok(()) => {
                self.stage
                    .counters
                    .rebalances
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "move for balance failed");
                self.update(|s| s.last_error = Some(e));
                false
            }
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
