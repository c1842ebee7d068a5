//! Model loading: bringing the engine's model up after every engine start (the latest
//! checkpoint, else the peers' weights, else the seed), changing its layer range, and
//! checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use super::*;

impl Trainer {
    /// Fetches from connected peers whose layers are at step `min_step` or later a checkpoint
    /// of each stage that holds some of `needed` (`pipeline::export::fetch_layers`).
    pub(super) async fn fetch_layers(
        &self,
        needed: std::ops::Range<u32>,
        min_step: u64,
    ) -> Vec<(PathBuf, String, Vec<u32>)> {
        let cfg = self.config();
        let model = cfg.training.model.config();
        let dir = self.data_dir.join("checkpoints");
        // A progress bar on a terminal (plain lines otherwise) once a transfer is under way.
        let mut progress: Option<crate::progress::Progress> = None;
        let mut shown = 0;
        crate::pipeline::export::fetch_layers(
            &self.net,
            &dir,
            model,
            needed.collect(),
            min_step,
            |done, wanted| {
                let p = progress.get_or_insert_with(|| {
                    crate::progress::Progress::steps(
                        "fetching layer weights from peers",
                        wanted as u64,
                    )
                });
                p.inc(done.saturating_sub(shown) as u64);
                shown = done;
                if done >= wanted {
                    p.finish();
                }
            },
        )
        .await
    }

    /// LoadModel for `a` from checkpoints of stages (`sources`: path, expected hash).
    pub(super) async fn load_from(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
        sources: &[(PathBuf, String)],
    ) -> Result<Loaded, String> {
        let mut spec = load_spec(&self.config(), &self.node_id, None, a);
        spec.sources = sources.to_vec();
        client.load_model(&spec).await.map_err(|e| e.message())
    }

    /// Counts where the layers `new` (those not in `kept`) came from after a load with
    /// sources, warns about those that start from the seed, and records the loaded model.
    pub(super) fn record_load(
        &self,
        reply: &Loaded,
        a: &crate::pipeline::Assignment,
        kept: &std::ops::Range<u32>,
        from_peers: &[u32],
    ) {
        let new: Vec<u32> = a.layers.clone().filter(|l| !kept.contains(l)).collect();
        let seeded: Vec<u32> = reply
            .seeded_layers
            .iter()
            .copied()
            .filter(|l| new.contains(l))
            .collect();
        let peer = new
            .iter()
            .filter(|l| from_peers.contains(l) && !seeded.contains(l))
            .count();
        let ckpt = new.len() - peer - seeded.len();
        if !seeded.is_empty() {
            tracing::warn!(layers = ?seeded, "no replica and no checkpoint holds these layers; they start from the seed");
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let counters = &self.stage.counters;
            counters.layers_from_peer.fetch_add(peer as u64, Relaxed);
            counters
                .layers_from_checkpoint
                .fetch_add(ckpt as u64, Relaxed);
            counters
                .layers_from_init
                .fetch_add(seeded.len() as u64, Relaxed);
        }
        tracing::info!(layers = ?a.layers, step = reply.step, hash = %reply.model_hash, from_peers = peer, from_checkpoint = ckpt, from_seed = seeded.len(), "model loaded");
        *self.diloco.verifier.replay_class.lock() = reply.replay_class.clone();
        self.stage.oplog.set_class(&reply.replay_class);
        self.update(|s| {
            s.model_loaded = true;
            s.model_hash = reply.model_hash.clone();
            s.parameters = reply.parameters;
            s.step = reply.step;
            s.started.get_or_insert_with(Instant::now);
        });
    }

    /// Changes the engine's layers from `old` to `new` under the stage lock: the layers kept
    /// from this node's current state, the new ones from a peer holding them, else from this
    /// node's latest checkpoint, else from the seed. With `refresh` (resync, `new` == `old`)
    /// every layer comes from peers whose layers are at that step or later where they hold
    /// it, the optimizer step with them. On failure the old range is back.
    pub(super) async fn reload(
        &self,
        client: &EngineHandle,
        old: &crate::pipeline::Assignment,
        new: &crate::pipeline::Assignment,
        refresh: Option<u64>,
    ) -> Result<(), String> {
        let stage = &self.stage;
        // Fetched before the stage lock is taken: a peer fetching from this node meanwhile
        // must not wait for it.
        let fetched = match refresh {
            Some(min_step) => {
                let fetched = self.fetch_layers(new.layers.clone(), min_step).await;
                if fetched.is_empty() {
                    return Err("no peer ahead served its weights".into());
                }
                fetched
            }
            None => {
                let needed = new.layers.start.max(old.layers.end)..new.layers.end;
                let below = new.layers.start..new.layers.end.min(old.layers.start);
                let mut fetched = self.fetch_layers(needed, 0).await;
                fetched.extend(self.fetch_layers(below, 0).await);
                fetched
            }
        };
        let _lock = stage.exclusive().await;
        let own = crate::engine::checkpoints_dir(&self.data_dir).join("takeover.ckpt");
        if let Err(e) = client.checkpoint(&own).await {
            for (p, _, _) in &fetched {
                let _ = std::fs::remove_file(p);
            }
            return Err(format!("checkpoint before the reload: {e}"));
        }
        self.update(|s| s.model_loaded = false);
        let from_peers: Vec<u32> = fetched.iter().flat_map(|f| f.2.clone()).collect();
        // A layer comes from the first source that holds it, the optimizer step from the
        // first source: this node's own state first, unless refreshing from peers ahead.
        let own_source = (own.clone(), String::new());
        let peer_sources = fetched.iter().map(|(p, h, _)| (p.clone(), h.clone()));
        let mut sources: Vec<(PathBuf, String)> = match refresh {
            Some(_) => peer_sources.chain(std::iter::once(own_source)).collect(),
            None => std::iter::once(own_source).chain(peer_sources).collect(),
        };
        let latest = checkpoint_path(&self.data_dir);
        if latest.exists() {
            sources.push((latest.clone(), String::new()));
        }
        let result = match self.load_from(client, new, &sources).await {
            Ok(r) => Ok((r, from_peers)),
            Err(e) => {
                tracing::warn!(error = %e, "loading the new layers with the fetched weights failed; without them");
                self.load_from(client, new, &[(own.clone(), String::new())])
                    .await
                    .map(|r| (r, Vec::new()))
            }
        };
        for (p, _, _) in &fetched {
            let _ = std::fs::remove_file(p);
        }
        match result {
            Ok((reply, from_peers)) => {
                let kept = if refresh.is_some() {
                    0..0
                } else {
                    old.layers.clone()
                };
                self.record_load(&reply, new, &kept, &from_peers);
                self.publish(new);
                // The latest checkpoint is of the new range from now on.
                self.checkpoint(client).await;
                let _ = std::fs::remove_file(&own);
                Ok(())
            }
            Err(e) => {
                // Back to the old range from the state saved a moment ago.
                let back = client
                    .load_model(&load_spec(&self.config(), &self.node_id, Some(&own), old))
                    .await;
                if back.is_ok() {
                    self.update(|s| s.model_loaded = true);
                }
                Err(format!("loading layers {:?}: {e}", new.layers))
            }
        }
    }

    /// Restores the latest checkpoint if there is one, else builds the model from the seed.
    pub(super) async fn bring_up(
        &self,
        client: &EngineHandle,
        a: &crate::pipeline::Assignment,
    ) -> Result<(), String> {
        let cfg = self.config();
        let ckpt = checkpoint_path(&self.data_dir);
        // A stage whose layers peers hold (a late joiner, a redundant replica) starts from
        // their current weights, step and moments; what they lack comes from this node's
        // checkpoint, else the seed.
        if !a.is_full() {
            let fetched = self.fetch_layers(a.layers.clone(), 0).await;
            if !fetched.is_empty() {
                let mut sources: Vec<(PathBuf, String)> = fetched
                    .iter()
                    .map(|(p, h, _)| (p.clone(), h.clone()))
                    .collect();
                if ckpt.exists() {
                    sources.push((ckpt.clone(), String::new()));
                }
                let from_peers: Vec<u32> = fetched.iter().flat_map(|f| f.2.clone()).collect();
                let r = self.load_from(client, a, &sources).await;
                for (p, _, _) in &fetched {
                    let _ = std::fs::remove_file(p);
                }
                match r {
                    Ok(reply) => {
                        self.record_load(&reply, a, &(0..0), &from_peers);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not load the peers' weights; starting from this node's checkpoint or the seed");
                    }
                }
            }
        }
        let existing = ckpt.exists().then_some(ckpt.as_path());
        let spec = load_spec(&cfg, &self.node_id, existing, a);
        // A first start builds the model from the seed: the longest wait of a new node.
        let progress = existing.is_none().then(|| {
            crate::progress::Progress::steps("first start: building the model from the seed", 1)
        });
        let reply = match client.load_model(&spec).await {
            Ok(r) => r,
            // Only the engine's verdict on the file (invalid argument) condemns a checkpoint; a
            // transport error (the engine died while loading) is retried with the same file.
            Err(EngineError::Invalid(why)) if existing.is_some() => {
                // A checkpoint the engine cannot read must not stop the node: keep it aside for
                // inspection and start from the seed.
                tracing::error!(error = %why, path = %ckpt.display(), "checkpoint unreadable; starting from seed");
                let aside = ckpt.with_extension(format!("bad-{}", chrono::Utc::now().timestamp()));
                let _ = std::fs::rename(&ckpt, &aside);
                client
                    .load_model(&load_spec(&cfg, &self.node_id, None, a))
                    .await
                    .map_err(|e| e.message())?
            }
            Err(e) => return Err(e.message()),
        };
        if let Some(p) = progress {
            p.inc(1);
            p.finish();
        }
        tracing::info!(step = reply.step, params = reply.parameters, hash = %reply.model_hash, restored = existing.is_some(), class = %reply.replay_class, "model loaded");
        *self.diloco.verifier.replay_class.lock() = reply.replay_class.clone();
        self.stage.oplog.set_class(&reply.replay_class);
        self.update(|s| {
            s.model_loaded = true;
            s.model_hash = reply.model_hash;
            s.parameters = reply.parameters;
            s.step = reply.step;
            s.started.get_or_insert_with(Instant::now);
            s.last_checkpoint_step = existing.map(|_| reply.step);
        });
        Ok(())
    }

    pub(super) async fn checkpoint(&self, client: &EngineHandle) {
        let path = checkpoint_path(&self.data_dir);
        match client.checkpoint(&path).await {
            Ok(step) => {
                tracing::debug!(step, "checkpoint written");
                self.update(|s| s.last_checkpoint_step = Some(step));
                crate::storage::prune_and_log(
                    &self.data_dir,
                    self.config().resources.max_storage_mb,
                );
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
    }
}
