//! An observer for the network scenarios: an in-process peer with its own wallet that
//! handshakes with real nodes over their peer service, reads their peer tables and ledgers,
//! and injects signed ledger blocks as any node could.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use neuroshard::gossip::{gossip_ledger, sync_ledger};
use neuroshard_ledger::proof::Proof;
use neuroshard_ledger::{Address, Balance, Ledger, Message, ProofType, SignedProof, Wallet};
use neuroshard_net::client::PeerConn;
use neuroshard_net::{LocalRole, Network, PeerState};
use neuroshard_tests::Node;

/// Layers of the `tiny` model the test nodes run.
pub const TINY_LAYERS: u32 = 2;

/// The ledger rules of the test nodes (`neuroshard_tests::INSTANT_LEDGER`, model `tiny`).
pub fn tiny_rules() -> neuroshard_ledger::Rules {
    neuroshard_ledger::Rules::new(0, TINY_LAYERS)
        .expect("valid rules")
        .unattested()
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

pub struct Observer {
    pub rt: tokio::runtime::Runtime,
    pub net: Arc<Network>,
    /// The observer's own ledger: what it signs, and where it checks what nodes hold.
    ledger: Ledger,
    _dir: tempfile::TempDir,
    /// Stops the observer's transport when dropped.
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Observer {
    /// An observer whose wallet's ledger lives in a temporary directory. It announces port 1,
    /// where nothing listens: nodes that try to dial it back fail and forget it.
    pub fn new() -> anyhow::Result<Observer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let dir = tempfile::tempdir()?;
        let ledger = rt.block_on(Ledger::open_data_dir(dir.path(), tiny_rules()))?;
        // Nobody pulls from the peers the observer connects to: the events are dropped.
        let (connected, _) = tokio::sync::mpsc::unbounded_channel();
        let net = Network::new(
            Arc::new(Wallet::generate()),
            Arc::new(PeerState::default()),
            0,
            1,
            LocalRole {
                role: "observer".into(),
                layers: Vec::new(),
                serve_only: false,
            },
            neuroshard_net::no_advert(),
            connected,
        );
        // Its own libp2p transport, dialing only.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        rt.block_on(net.start_client(stopped))?;
        Ok(Observer {
            rt,
            net,
            ledger,
            _dir: dir,
            _stop: stop,
        })
    }

    pub fn wallet(&self) -> &Wallet {
        &self.net.wallet
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Handshakes with `node`'s peer service; the connection's `id` is the node's identity.
    pub fn connect(&self, node: &Node) -> anyhow::Result<PeerConn> {
        let addr = node.peer_addr();
        self.rt
            .block_on(PeerConn::connect(self.net.clone(), &addr))
            .with_context(|| format!("handshake with {addr}"))
    }

    /// Closes the observer's connection to `node`: its next call opens a new one (a new
    /// connection, with a score of its own).
    pub fn disconnect(&self, node: &Node) {
        if let Ok(t) = self.net.transport() {
            t.disconnect(&node.peer_addr());
        }
    }

    /// The identities in `conn`'s node's peer table (this observer is never in it).
    pub fn peer_ids(&self, conn: &PeerConn) -> Option<BTreeSet<Address>> {
        let peers = self.rt.block_on(conn.get_peers()).ok()?;
        peers
            .iter()
            .map(|p| Address::parse(&p.node_id).ok())
            .collect()
    }

    /// Every ledger message `conn`'s node holds, through its anti-entropy service.
    pub fn messages(&self, conn: &PeerConn) -> anyhow::Result<Vec<Message>> {
        let mut after = 0;
        let mut out = Vec::new();
        loop {
            let page = self.rt.block_on(sync_ledger(conn, after))?;
            if page.messages.is_empty() {
                return Ok(out);
            }
            for bytes in &page.messages {
                out.push(Message::from_bytes(bytes)?);
            }
            after = page.next_seq;
        }
    }

    /// Hashes of the blocks `conn`'s node holds.
    pub fn block_hashes(&self, conn: &PeerConn) -> Option<BTreeSet<String>> {
        let msgs = self.messages(conn).ok()?;
        Some(
            msgs.iter()
                .flat_map(|m| m.blocks().into_iter().map(|b| b.hash().to_hex()))
                .collect(),
        )
    }

    /// The balances of `accounts` as of `now`, derived from exactly the blocks `conn`'s node
    /// holds (in a fresh ledger of the observer's).
    pub fn balances_held_by(
        &self,
        conn: &PeerConn,
        accounts: &[Address],
        now: i64,
    ) -> anyhow::Result<Vec<Balance>> {
        let dir = tempfile::tempdir()?;
        let messages = self.messages(conn)?;
        self.rt.block_on(async {
            let ledger = Ledger::open_data_dir(dir.path(), tiny_rules()).await?;
            for m in &messages {
                ledger.apply(m, now_s()).await?;
            }
            let mut out = Vec::new();
            for a in accounts {
                out.push(ledger.balance(a, now).await);
            }
            ledger.close().await;
            Ok(out)
        })
    }

    /// Mints the observer's wallet a training reward (one proof: 600 batches on both layers
    /// of the `tiny` model, 0.9 NEURO), as a node that trains alone does for its work, in the
    /// observer's own ledger.
    pub fn mint(&self, now: i64) -> anyhow::Result<()> {
        let w = self.wallet();
        let proof = SignedProof::sign(
            Proof {
                node_id: w.address(),
                proof_type: ProofType::Training,
                timestamp: now,
                nonce: now as u64,
                uptime_seconds: 60,
                tokens_processed: 600 * 2048,
                training_batches: 600,
                data_samples: 0,
                request_id: String::new(),
                model_hash: "ab".repeat(32),
                layers_held: (0..TINY_LAYERS).collect(),
                holds_embedding: true,
                holds_lm_head: true,
                epoch_id: Proof::epoch_of(now),
                model_hash_start: format!("{now:064x}"),
                model_hash_end: format!("{:064x}", now + 1),
                gradient_commitment: "cc".repeat(32),
                current_loss: 2.0,
                // Nobody received this work: the test nodes' development ledger takes it.
                receipts: Vec::new(),
            },
            w,
        );
        self.rt
            .block_on(self.ledger().submit_proof(w, proof, now))?;
        Ok(())
    }

    /// Sends `units` from the observer's wallet to `to`, in the observer's own ledger.
    pub fn send(&self, to: Address, units: u64, now: i64) -> anyhow::Result<()> {
        self.rt.block_on(
            self.ledger()
                .send(self.wallet(), to, units, "observer", now),
        )?;
        Ok(())
    }

    /// Pushes the observer's ledger messages stored after `after_seq` to one node only.
    /// Returns the last sequence number pushed.
    pub fn push_to(&self, conn: &PeerConn, after_seq: i64) -> anyhow::Result<i64> {
        let page = self
            .rt
            .block_on(self.ledger().messages_since(after_seq, 1000))?;
        let last = page.last().map(|(s, _)| *s).unwrap_or(after_seq);
        let bytes = page.iter().map(|(_, m)| m.to_bytes()).collect();
        let reply = self.rt.block_on(gossip_ledger(conn, bytes))?;
        anyhow::ensure!(
            reply.rejected == 0,
            "node rejected {} of the observer's messages",
            reply.rejected
        );
        Ok(last)
    }

    /// The hashes (hex) of the first block of each of the observer's first `limit` ledger
    /// messages: what the nodes must end up holding.
    pub fn own_block_hashes(&self, limit: i64) -> BTreeSet<String> {
        self.rt
            .block_on(self.ledger().messages_since(0, limit))
            .unwrap()
            .iter()
            .map(|(_, m)| m.blocks()[0].hash().to_hex())
            .collect()
    }
}

/// An open network's ledger (issue #19) for a scenario's config: no challenge window to wait
/// out, but training earns only what other nodes' receipts attest.
pub const ATTESTED_LEDGER: &str =
    "\n[ledger]\nchallenge_window_secs = 0\naccept_unattested_training = false\n";

/// The address of `node`'s own wallet.
pub fn address(node: &Node) -> String {
    node.authed(reqwest::Method::GET, "/api/v1/wallet/balance", None)
        .and_then(|(_, b)| b["address"].as_str().map(String::from))
        .unwrap_or_default()
}

/// The training proofs of `node` that earned: (reward, the nodes whose receipts back it).
pub fn attested_training(node: &Node) -> Vec<(f64, Vec<String>)> {
    let Some((_, page)) = node.authed(reqwest::Method::GET, "/api/v1/proofs?limit=100", None)
    else {
        return Vec::new();
    };
    let proofs = page["proofs"].as_array().cloned().unwrap_or_default();
    proofs
        .iter()
        .filter(|p| p["type"] == "training" && p["verified"] == true)
        .map(|p| {
            let by = p["attested_by"].as_array().cloned().unwrap_or_default();
            (
                p["reward"].as_f64().unwrap_or(0.0),
                by.iter()
                    .filter_map(|a| a.as_str().map(String::from))
                    .collect(),
            )
        })
        .collect()
}

/// Waits until `node` earned a training reward backed by receipts of all of `attesters`, and
/// checks that every training reward it earned has a receipt, and only from them.
pub fn wait_attested_training(
    node: &Node,
    attesters: &[String],
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let proofs = neuroshard_tests::wait_for(
        "a training reward attested by the expected nodes",
        timeout,
        std::time::Duration::from_millis(500),
        || {
            let p = attested_training(node);
            p.iter()
                .any(|(_, by)| by.len() == attesters.len())
                .then_some(p)
        },
    )?;
    for (reward, by) in &proofs {
        anyhow::ensure!(*reward > 0.0, "a training proof without reward: {proofs:?}");
        anyhow::ensure!(
            !by.is_empty(),
            "a training reward without receipts: {proofs:?}"
        );
        anyhow::ensure!(
            by.iter().all(|x| attesters.contains(x)),
            "attested by {by:?}, expected only {attesters:?}"
        );
    }
    Ok(())
}
