//! The daemon: owns the data directory, the shared-memory segment and every long-running
//! task of a node, and tears them down in order on shutdown.
//!
//! Start-up order: lock the data directory, create (or reclaim) the shm segment, bind both
//! listeners, start the engine supervisor, then the trainer and the servers. Shutdown runs
//! the other way: trainer (last checkpoint), servers, engine, segment, lock.

use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_shared::shm::{Segment, segment_name_for};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::AppState;
use crate::config::{Config, LiveConfig};
use crate::engine::supervisor::{self, SupervisorConfig};
use crate::resources::Sampler;
use crate::trainer::{Trainer, TrainingStats};
use neuroshard_ledger::Ledger;

pub const PID_FILE: &str = "neuroshard.pid";
const LOCK_FILE: &str = "neuroshard.lock";
const NODE_ID_FILE: &str = "node_id";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another node is already running with data directory {path} (pid {pid})")]
    Locked { path: PathBuf, pid: String },
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("peer port {port}: {source}")]
    PeerPort {
        port: u16,
        source: neuroshard_net::NetworkError,
    },
    #[error(transparent)]
    Shm(#[from] neuroshard_shared::shm::ShmError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("TLS of the REST API: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("ledger: {0}")]
    Ledger(#[from] neuroshard_ledger::LedgerError),
    #[error("runtime file: {0}")]
    RunFile(#[from] crate::runfile::RunFileError),
}

/// The node's keystore fails as it did inside the ledger: `ledger: keystore …`.
impl From<neuroshard_ledger::IdentityError> for DaemonError {
    fn from(e: neuroshard_ledger::IdentityError) -> DaemonError {
        DaemonError::Ledger(e.into())
    }
}

/// Where the node keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
}

/// The exclusive hold on a data directory; released (and the pid file removed) on drop.
pub struct DataDirLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
    pid_file: PathBuf,
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// Creates the data directory (mode 0700) and takes its lock, so two daemons never share it.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, DaemonError> {
    let io = |source| DaemonError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(data_dir.join(LOCK_FILE))
        .map_err(io)?;
    let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::Locked {
            path: data_dir.to_path_buf(),
            pid: std::fs::read_to_string(data_dir.join(PID_FILE))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        })?;
    let pid_file = data_dir.join(PID_FILE);
    crate::config::write_atomic(&pid_file, std::process::id().to_string().as_bytes())
        .map_err(io)?;
    Ok(DataDirLock {
        _flock: flock,
        pid_file,
    })
}

/// The node's id, created once and kept in the data directory.
pub fn node_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = format!("node_{}", hex::encode(rand::random::<[u8; 8]>()));
            crate::config::write_atomic(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    paths: Paths,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    config.validate()?;
    // Keys, tokens, the ledger database and checkpoints are the node's alone: every file the
    // daemon (and the engine it spawns) creates is private to its user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Every client connection takes a descriptor: take all the system allows, and size the
    // REST port's connection cap so that the node's own files keep their room.
    let nofile = open_file_limit();
    // The REST port and the peer port share what is left after the headroom.
    let total_cap = |key: &str, configured: u32| {
        let cap = neuroshard_net::admission::total_cap(configured as usize, nofile, 2);
        if cap < configured as usize {
            tracing::warn!(
                key,
                configured,
                cap,
                nofile,
                "connection cap lowered to fit the open-file limit"
            );
        }
        cap
    };
    let http_cap = total_cap("api.max_connections", config.api.max_connections);
    let peer_caps = config.peer.caps(total_cap(
        "peer.max_connections",
        config.peer.max_connections,
    ));
    let http_limits = config.api.limits(http_cap);
    let data_dir = &paths.data_dir;
    let _lock = lock_data_dir(data_dir)?;
    let node_id = node_id(data_dir).map_err(|source| DaemonError::DataDir {
        path: data_dir.clone(),
        source,
    })?;

    crate::storage::prune_and_log(data_dir, config.resources.max_storage_mb);

    // The node's wallet key and the ledger come before anything that could earn or spend.
    let passphrase = std::env::var("NEUROSHARD_WALLET_PASSPHRASE").ok();
    // `--wallet FILE` runs the node as an existing wallet; else the data directory's own.
    let wallet = Arc::new(if config.node.wallet_file.is_empty() {
        neuroshard_ledger::keystore::load_or_create(data_dir, passphrase.as_deref())?
    } else {
        neuroshard_ledger::keystore::load(
            Path::new(&config.node.wallet_file),
            passphrase.as_deref(),
        )?
    });
    let rules = config.ledger.rules(config.training.model.config().layers)?;
    let ledger = Arc::new(if config.database_url.is_empty() {
        Ledger::open_data_dir(data_dir, rules).await?
    } else {
        Ledger::open(&config.database_url, rules).await?
    });
    tracing::info!(address = %wallet.address(), "wallet loaded");

    let segment_name = segment_name_for(data_dir);
    let (segment, reclaimed) = Segment::create(
        &segment_name,
        config.engine.shm_slots,
        config.engine.shm_slot_mb as u64 * 1024 * 1024,
    )?;
    let segment = Arc::new(segment);
    if reclaimed {
        tracing::warn!(segment = %segment_name, "reclaimed a shared-memory segment left by a crashed daemon");
    }

    // Beyond loopback the REST API serves HTTPS (made before binding: a bad certificate
    // fails the start before anything listens).
    let http_tls = crate::tls::for_node(
        data_dir,
        config.host.ip(),
        config.host.as_str(),
        &config.tls,
    )?;
    let http_addr = format!("{}:{}", config.host, config.port);
    let http = TcpListener::bind(&http_addr)
        .await
        .map_err(|source| DaemonError::Bind {
            what: "REST API",
            addr: http_addr.clone(),
            source,
        })?;
    // The peer port: the peer-to-peer transport, TCP and QUIC (UDP) on the same number,
    // keyed by the wallet; it stops when the servers do.
    let peer_addr = neuroshard_net::bind_address(config.grpc_port());
    let network = Arc::new(neuroshard_net::PeerState::default());
    let (stop_servers_tx, stop_servers_rx) = watch::channel(false);
    let peer = neuroshard_net::p2p::swarm::start(
        &wallet,
        Some(config.grpc_port()),
        neuroshard_net::p2p::swarm::Admission {
            caps: peer_caps,
            state: network.clone(),
        },
        neuroshard_net::p2p::relay::Options {
            limits: config.peer.relay_limits(),
            external: config
                .node
                .external_address(config.grpc_port())
                .into_iter()
                .collect(),
        },
        stop_servers_rx.clone(),
    )
    .await
    .map_err(|source| DaemonError::PeerPort {
        port: config.grpc_port(),
        source,
    })?;

    // Both ports are bound: the CLI finds this node by its runtime file from now on.
    let _run_file = crate::runfile::write(
        data_dir,
        &crate::runfile::RunInfo {
            pid: std::process::id(),
            host: config.host.to_string(),
            port: http.local_addr().map_or(config.port, |a| a.port()),
            peer_port: config.grpc_port(),
            scheme: if http_tls.is_some() { "https" } else { "http" }.into(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            wallet: wallet.address().to_string(),
            launch: crate::runfile::Launch::current(),
        },
    )?;

    let socket = if config.engine.socket.is_empty() {
        data_dir.join("engine.sock")
    } else {
        PathBuf::from(&config.engine.socket)
    };
    let binary = if config.engine.binary.is_empty() {
        supervisor::default_engine_binary()
    } else {
        PathBuf::from(&config.engine.binary)
    };
    let mut sup_cfg = SupervisorConfig::new(
        config.engine.mode,
        socket.clone(),
        binary,
        segment_name.clone(),
    );
    sup_cfg.device = config.resources.device.to_string();
    sup_cfg.cpu_threads = config.resources.cpu_threads;
    sup_cfg.serve_weights = config.inference.weights.clone();
    sup_cfg.serve_truncated = config.adversary.serves_truncated();

    let (stop_engine_tx, stop_engine_rx) = watch::channel(false);
    let (stop_trainer_tx, stop_trainer_rx) = watch::channel(false);
    let (engine, supervisor_task) = supervisor::start(sup_cfg, segment.clone(), stop_engine_rx);

    // The live configuration: the API's PATCH handler is its one writer, the rest read it.
    let (config_tx, config) = LiveConfig::channel(config);
    let training = Arc::new(Mutex::new(TrainingStats::default()));
    let auth = Arc::new(crate::auth::Authenticator::start(
        data_dir,
        wallet.address(),
    )?);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let api_config = config.get().api.clone();
    // Built in dependency order, nothing started yet: the network (transport), the ledger's
    // gossip over it, this node's pipeline stage, then the state the API reads.
    let diloco = Arc::new(crate::diloco::round::Diloco::default());
    // New connections, for the ledger's anti-entropy to pull from at once.
    let (connected_tx, connected_rx) = tokio::sync::mpsc::unbounded_channel();
    let (peer_net, seeds) = {
        let cfg = config.get();
        // A node that cannot hold the whole model says nothing about its layers until the
        // trainer has chosen them (after meeting its peers).
        let all = crate::stats::held_layers(&cfg);
        let fits = crate::pipeline::assign::capacity(&cfg, cfg.training.model.config()) >= all.end;
        let serve_only = !cfg.training.enabled;
        let local = if cfg.node.observer {
            // An observer holds nothing: the layer pool never counts it.
            neuroshard_net::LocalRole {
                role: "observer".into(),
                layers: Vec::new(),
                serve_only,
            }
        } else if fits {
            neuroshard_net::LocalRole {
                role: "full".into(),
                layers: all.collect(),
                serve_only,
            }
        } else {
            neuroshard_net::LocalRole {
                role: "worker".into(),
                layers: Vec::new(),
                serve_only,
            }
        };
        let net = neuroshard_net::Network::new(
            wallet.clone(),
            network.clone(),
            cfg.port,
            cfg.grpc_port(),
            local,
            {
                let diloco = diloco.clone();
                Box::new(move || diloco.advertised())
            },
            connected_tx,
        );
        net.set_announced(
            cfg.node.announce_host(),
            (cfg.node.announce_port != 0).then_some(cfg.node.announce_port),
        );
        net.set_max_peers(cfg.peer.max_peers as usize);
        // Gossip joins its topics on this transport before the peer task starts.
        net.attach(peer.clone());
        (net, cfg.seed_peers.clone())
    };
    let keyring = Arc::new(crate::wallets::Keyring::new(
        data_dir,
        wallet.clone(),
        passphrase,
    ));
    let gossip = crate::gossip::Gossip::claiming(peer_net.clone(), ledger.clone(), keyring.clone());
    let attest = Arc::new(crate::attest::Attestations::new(wallet.clone()));
    peer_net.set_witness(attest.clone());
    let stage = Arc::new(crate::pipeline::Stage::new(
        engine.subscribe(),
        config.clone(),
        training.clone(),
        data_dir.clone(),
        attest.clone(),
    ));
    let evidence = Arc::new(crate::evidence::Store::new(data_dir));
    // The peer port: the transport's own service, then each subsystem's, behind one guard.
    let edge = neuroshard_net::service::PeerEdge::new(peer_net.clone());
    let peer_routes = neuroshard_net::service::PeerService::routes(edge.clone())
        .add_service(crate::gossip::LedgerService::server(
            edge.clone(),
            gossip.clone(),
        ))
        .add_service(crate::diloco::service::DilocoService::server(
            edge.clone(),
            diloco.clone(),
        ))
        .add_service(crate::pipeline::service::PipelineService::server(
            edge,
            stage.clone(),
            evidence.clone(),
        ));
    let samples = Arc::new(crate::samples::Samples::default());
    tokio::spawn(crate::samples::run(
        samples.clone(),
        crate::samples::Sources {
            training: training.clone(),
            metrics: metrics.clone(),
            net: peer_net.clone(),
        },
        stop_servers_rx.clone(),
    ));
    let state = AppState {
        node_id: node_id.clone(),
        started: Instant::now(),
        data_dir: data_dir.clone(),
        config_path: paths.config_path.clone(),
        config: config.clone(),
        engine: engine.clone(),
        resources: Sampler::start(Duration::from_secs(1)),
        training: training.clone(),
        network: network.clone(),
        ledger: ledger.clone(),
        wallet: wallet.clone(),
        keyring,
        auth,
        limits: Arc::new(crate::api::RateLimits::new(&api_config)),
        metrics: metrics.clone(),
        config_write: Arc::new(tokio::sync::Mutex::new(config_tx)),
        inference_slots: Arc::new(tokio::sync::Semaphore::new(
            crate::api::inference::QUEUE_LIMIT,
        )),
        net: peer_net.clone(),
        diloco: diloco.clone(),
        stage: stage.clone(),
        samples: samples.clone(),
        evidence,
    };
    let minter = crate::work::Minter {
        config: config.clone(),
        training: training.clone(),
        metrics: metrics.clone(),
        engine: engine.clone(),
        wallet: wallet.clone(),
        ledger: ledger.clone(),
        attest,
        verifier: diloco.verifier.clone(),
    };
    let work_task = tokio::spawn(crate::work::run(minter, stop_trainer_rx.clone()));
    // Sampled checks of other nodes' paid generations (issue #19).
    tokio::spawn(crate::infercheck::run(
        crate::infercheck::Checker {
            config: config.clone(),
            ledger: ledger.clone(),
            net: peer_net.clone(),
            engine: engine.clone(),
            verifier: diloco.verifier.clone(),
            data_dir: data_dir.clone(),
        },
        stop_trainer_rx.clone(),
    ));

    let rest_task = tokio::spawn(crate::api::serve(
        http,
        state,
        http_limits,
        http_tls,
        wait_true(stop_servers_rx.clone()),
    ));
    let (tracker_url, tracker_pin) = {
        let c = config.get();
        (c.tracker_url.clone(), c.tracker_fingerprint.clone())
    };
    if !tracker_url.is_empty() {
        tokio::spawn(crate::tracker::client::run(
            peer_net.clone(),
            tracker_url,
            tracker_pin,
            stop_servers_rx.clone(),
        ));
    }
    let trainer = Trainer {
        engine: engine.clone(),
        config: config.clone(),
        stats: training,
        data_dir: data_dir.clone(),
        node_id: node_id.clone(),
        metrics: metrics.clone(),
        net: peer_net.clone(),
        diloco,
        stage,
    };
    let observer = config.get().node.observer;
    let trainer_task = tokio::spawn(async move {
        // An observer loads no layers and trains nothing.
        if !observer {
            trainer.run(stop_trainer_rx).await;
        }
    });
    let gossip_task = tokio::spawn(crate::gossip::run(
        gossip,
        connected_rx,
        stop_servers_rx.clone(),
    ));
    let peer_task = tokio::spawn(neuroshard_net::run(
        peer_net,
        peer_routes,
        peer,
        seeds,
        stop_servers_rx,
    ));
    tracing::info!(
        %node_id,
        api = %http_addr,
        peer = %peer_addr,
        data_dir = %data_dir.display(),
        engine = ?config.get().engine.mode,
        "node running"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_trainer_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(20), trainer_task)
        .await
        .is_err()
    {
        tracing::warn!("trainer did not finish its last checkpoint in time");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), work_task).await;
    let _ = stop_servers_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), rest_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = peer_task.await;
        let _ = gossip_task.await;
    })
    .await;
    let _ = stop_engine_tx.send(true);
    let _ = supervisor_task.await;
    drop(segment);
    // The pipeline stage may still hold a reference in a finished task's state: unlink by
    // name so no segment outlives a clean exit.
    let _ = Segment::unlink(&segment_name);
    ledger.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft open-file limit to the hard one and logs both; the soft limit after, or
/// 1024 (the usual default) when it cannot be read.
pub fn open_file_limit() -> u64 {
    match crate::listen::raise_nofile_limit() {
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "open-file limit");
            soft
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            1024
        }
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
