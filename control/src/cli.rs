//! The `neuroshard` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{CONFIG_FILE, Config, ConfigError, EngineMode};
use crate::daemon::{self, Paths};

#[derive(Parser, Debug)]
#[command(
    name = "neuroshard",
    version,
    about = "NeuroShard node: train and serve NeuroLLM together, earn NEURO"
)]
pub struct Cli {
    /// Where the node keeps its state (config, ledger, checkpoints, keys).
    #[arg(long, global = true, env = "NEUROSHARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (default: <data-dir>/neuroshard.toml).
    #[arg(long, global = true, env = "NEUROSHARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `start`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node in the foreground (REST API, peer service, engine supervision).
    Start(StartArgs),
    /// Create the data directory, the node wallet and a config file with the defaults.
    Setup,
    /// Show the status of the running node.
    Status(crate::ops::Conn),
    /// Wallet of the token's account: balance, send, stake, unstake, history.
    Wallet {
        #[command(flatten)]
        conn: crate::ops::Conn,
        #[command(subcommand)]
        command: crate::ops::WalletCommand,
    },
    /// Peers of the running node.
    Peers(crate::ops::Conn),
    /// The trained model: `model export --format hf|gguf --out DIR`.
    #[command(subcommand)]
    Model(ModelCommand),
    /// API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(crate::ops::TokenCommand),
    /// Stop the running node (SIGTERM, waits for a clean exit).
    Stop,
    /// Stop the running node and start it again with the arguments it was started with (in
    /// the background; `--foreground` to run it in this terminal).
    Restart(crate::nodectl::RestartArgs),
    /// Print the running node's log (<data-dir>/logs/neuroshard.log): the last lines, `-f` to
    /// follow.
    Logs(crate::nodectl::LogsArgs),
    /// Show or change the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Developer tools (run by the engine binary).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Benchmarks (run by the engine binary).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a tracker: nodes started with `--tracker http://HOST:PORT` announce themselves to
    /// it and learn each other's addresses from it.
    Tracker(TrackerArgs),
}

#[derive(Args, Debug)]
pub struct TrackerArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8765)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Database (default: SQLite `tracker.db` in the data directory).
    #[arg(long, env = "NEUROSHARD_TRACKER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A node is listed this many seconds after its last announcement.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub ttl_secs: u64,
    /// Most connections one client address may hold open (more are refused at accept).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections_per_address: u64,
    /// Most connections open at once from other machines (lowered to fit the open-file limit).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Seconds a connection may take to send a request head (also the keep-alive idle time).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
    /// New connections one address may open per second (bursts of 4 s worth; 127.0.0.1 and
    /// ::1 are exempt).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connection_rate_per_address: u32,
    /// PEM certificate served beyond loopback (default: a self-signed `tls.crt` in the data
    /// directory, made at the first start).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP beyond loopback (behind a TLS-terminating proxy); logged as a warning.
    #[arg(long)]
    pub insecure_http: bool,
}

#[derive(Args, Debug, Default)]
pub struct StartArgs {
    /// REST API port; the peer service uses port + 1000.
    #[arg(long, env = "NEUROSHARD_PORT")]
    pub port: Option<u16>,
    /// Address the REST API binds.
    #[arg(long, env = "NEUROSHARD_HOST")]
    pub host: Option<String>,
    /// Compute device for the engine.
    #[arg(long, env = "NEUROSHARD_DEVICE", value_parser = ["auto", "cpu", "cuda"])]
    pub device: Option<String>,
    /// `spawn` the engine and supervise it, or connect to an `external` one.
    #[arg(long, value_enum, env = "NEUROSHARD_ENGINE")]
    pub engine: Option<EngineMode>,
    /// Engine socket (with --engine external: where the engine listens).
    #[arg(long, env = "NEUROSHARD_ENGINE_SOCKET")]
    pub engine_socket: Option<PathBuf>,
    /// Engine binary to spawn.
    #[arg(long, env = "NEUROSHARD_ENGINE_BINARY")]
    pub engine_binary: Option<PathBuf>,
    /// Model preset to train: tiny, default, bench, gpt2-small.
    #[arg(long, env = "NEUROSHARD_MODEL")]
    pub model: Option<String>,
    /// Do not train (serve only).
    #[arg(long)]
    pub no_training: bool,
    /// Do not open the dashboard in a browser.
    #[arg(long, env = "NEUROSHARD_NO_BROWSER")]
    pub no_browser: bool,
    /// Compute threads for the engine (0 = all cores).
    #[arg(long, env = "NEUROSHARD_CPU_THREADS")]
    pub cpu_threads: Option<u32>,
    /// Inner steps per DiLoCo round.
    #[arg(long, env = "NEUROSHARD_DILOCO_STEPS")]
    pub diloco_steps: Option<u32>,
    /// Tracker URL.
    #[arg(long, env = "NEUROSHARD_TRACKER")]
    pub tracker: Option<String>,
    /// Serve the REST API over plain HTTP even beyond loopback (tokens cross the network in
    /// clear; for a TLS-terminating proxy in front). Logged as a warning.
    #[arg(long, env = "NEUROSHARD_INSECURE_HTTP")]
    pub insecure_http: bool,
    /// Comma-separated host:port peers to start from.
    #[arg(long, env = "NEUROSHARD_SEED_PEERS", value_delimiter = ',')]
    pub seed_peers: Option<Vec<String>>,
    /// Ledger database URL (default: SQLite in the data directory).
    #[arg(long, env = "NEUROSHARD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Memory the node offers, in MB: sets how many layers it takes
    /// (`resources.max_memory_gb`).
    #[arg(long, value_name = "MB", env = "NEUROSHARD_MEMORY",
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub memory: Option<u64>,
    /// Most MB of checkpoints kept in the data directory; the oldest are removed first,
    /// never the latest (`resources.max_storage_mb`; 0: no bound).
    #[arg(long, value_name = "MB", env = "NEUROSHARD_MAX_STORAGE")]
    pub max_storage: Option<u64>,
    /// IP or host name peers and the tracker are told to dial (default: the address a
    /// connection comes from).
    #[arg(long, value_name = "IP", env = "NEUROSHARD_ANNOUNCE_IP")]
    pub announce_ip: Option<String>,
    /// Peer port peers and the tracker are told to dial (default: the peer port, port + 1000),
    /// e.g. the outside port of a NAT's forward.
    #[arg(long, value_name = "PORT", env = "NEUROSHARD_ANNOUNCE_PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub announce_port: Option<u16>,
    /// Follow the network and the ledger and serve the API, holding no layers and training
    /// nothing.
    #[arg(long)]
    pub observer: bool,
    /// Run as an existing wallet: its keystore file (as `setup` writes it in
    /// <data-dir>/wallet.json; its passphrase from NEUROSHARD_WALLET_PASSPHRASE).
    #[arg(long, value_name = "FILE", env = "NEUROSHARD_WALLET")]
    pub wallet: Option<PathBuf>,
    /// Not taken: the original's wallet secret on the command line (see --wallet).
    #[arg(long, hide = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration file contents.
    Show,
    /// Set a dotted key, e.g. `training.batch_size 16`.
    Set { key: String, value: String },
    /// Print the config file path.
    Path,
    /// Write the defaults over the config file (atomically; the old file kept as <file>.bak).
    Reset {
        /// Confirm: without it nothing is changed.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Export the network's current model from the running node: the Hugging Face Llama
    /// layout (`hf`) or a GGUF file for llama.cpp (`gguf`). A node holding some layers fetches
    /// the others from their holders first.
    Export(crate::model_export::ExportArgs),
}

#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Dump a model, a batch, the loss and every gradient for an independent check.
    GradDump {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time training steps and print tokens/s (see `neuroshard bench train --help`).
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

impl Cli {
    /// The data directory whose log file the daemon writes, for `start`; `None` for the
    /// other commands (they log to stderr only).
    pub fn daemon_data_dir(&self) -> Option<PathBuf> {
        matches!(self.command, Command::Start(_)).then(|| self.paths().data_dir)
    }

    pub fn paths(&self) -> Paths {
        let data_dir = self.data_dir.clone().unwrap_or_else(default_data_dir);
        let config_path = self
            .config
            .clone()
            .unwrap_or_else(|| data_dir.join(CONFIG_FILE));
        Paths {
            data_dir,
            config_path,
        }
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".neuroshard")
}

/// Applies command-line flags (and their environment variables) over the file's values. A
/// bad host or model is refused as validation refuses it (a bad port first, as there).
pub fn apply_flags(mut cfg: Config, a: &StartArgs) -> Result<Config, ConfigError> {
    if let Some(v) = a.port {
        cfg.port = v;
    }
    if let Some(v) = &a.host {
        cfg.host = cfg.parse_value(v)?;
    }
    if let Some(v) = &a.device {
        cfg.resources.device = cfg.parse_value(v)?;
    }
    if let Some(v) = a.engine {
        cfg.engine.mode = v;
    }
    if let Some(v) = &a.engine_socket {
        cfg.engine.socket = v.display().to_string();
    }
    if let Some(v) = &a.engine_binary {
        cfg.engine.binary = v.display().to_string();
    }
    if let Some(v) = &a.model {
        cfg.training.model = cfg.parse_value(v)?;
    }
    if a.no_training {
        cfg.training.enabled = false;
    }
    if let Some(v) = a.cpu_threads {
        cfg.resources.cpu_threads = v;
    }
    if let Some(v) = a.diloco_steps {
        cfg.training.diloco_steps = v;
    }
    if let Some(v) = &a.tracker {
        cfg.tracker_url = v.clone();
    }
    if a.insecure_http {
        cfg.tls.insecure_http = true;
    }
    if let Some(v) = &a.seed_peers {
        cfg.seed_peers = v.clone();
    }
    if let Some(v) = &a.database_url {
        cfg.database_url = v.clone();
    }
    if let Some(mb) = a.memory {
        cfg.resources.max_memory_gb = mb as f64 / 1024.0;
    }
    if let Some(mb) = a.max_storage {
        cfg.resources.max_storage_mb = mb;
    }
    if let Some(v) = &a.announce_ip {
        cfg.node.announce_ip = v.clone();
    }
    if let Some(v) = a.announce_port {
        cfg.node.announce_port = v;
    }
    if a.observer {
        cfg.node.observer = true;
        cfg.training.enabled = false;
    }
    if let Some(v) = &a.wallet {
        cfg.node.wallet_file = v.display().to_string();
    }
    Ok(cfg)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = cli.paths();
    match cli.command {
        Command::Start(args) => {
            if args.token.is_some() {
                bail!(
                    "--token is not taken: a wallet secret on the command line is visible to every user through `ps`. Run as an existing wallet with --wallet FILE (an encrypted keystore; its passphrase in NEUROSHARD_WALLET_PASSPHRASE)"
                );
            }
            let cfg = apply_flags(Config::load(&paths.config_path)?, &args)?;
            cfg.validate()?;
            let host = match cfg.host.as_str() {
                "0.0.0.0" | "::" => "127.0.0.1",
                host => host,
            };
            let scheme = if crate::tls::serves_tls(cfg.host.ip(), cfg.tls.insecure_http) {
                "https"
            } else {
                "http"
            };
            let url = format!("{scheme}://{host}:{}/", cfg.port);
            println!("NeuroShard node starting; dashboard at {url}");
            if !args.no_browser {
                open_browser(url);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(cfg, paths, daemon::shutdown_signal()))?;
            Ok(())
        }
        Command::Setup => crate::ops::setup(&paths),
        Command::Status(conn) => crate::ops::status(&paths, &conn),
        Command::Wallet { conn, command } => crate::ops::wallet(&paths, &conn, command),
        Command::Peers(conn) => crate::ops::peers(&paths, &conn),
        Command::Model(ModelCommand::Export(args)) => crate::model_export::export(&paths, &args),
        Command::Token(c) => crate::ops::token_command(&paths, c),
        Command::Stop => crate::nodectl::stop(&paths),
        Command::Restart(args) => crate::nodectl::restart(&paths, &args),
        Command::Logs(args) => crate::nodectl::logs(&paths, &args),
        Command::Config(c) => config_command(c, &paths),
        Command::Dev(DevCommand::GradDump { args }) => exec_engine("grad-dump", &args),
        Command::Bench(BenchCommand::Train { args }) => exec_engine("bench-train", &args),
        Command::Tracker(args) => tracker(&paths, args),
    }
}

fn tracker(paths: &Paths, args: TrackerArgs) -> anyhow::Result<()> {
    let tls = tracker_tls(paths, &args)?;
    let database_url = match args.database_url {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&paths.data_dir)
                .with_context(|| format!("creating {}", paths.data_dir.display()))?;
            format!("sqlite://{}/tracker.db?mode=rwc", paths.data_dir.display())
        }
    };
    let nofile = daemon::open_file_limit();
    let header_timeout = Duration::from_secs(args.header_timeout_secs);
    let opts = crate::tracker::TrackerOptions {
        database_url,
        ttl: Duration::from_secs(args.ttl_secs),
        limits: crate::listen::Limits {
            per_address: args.max_connections_per_address as usize,
            total: neuroshard_net::admission::total_cap(args.max_connections as usize, nofile, 1),
            header_timeout,
            // Announcements are a few hundred bytes.
            body_timeout: header_timeout,
            new_per_second: args.connection_rate_per_address,
        },
        tls,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding the tracker to {addr}"))?;
        tracing::info!(%addr, ttl_secs = args.ttl_secs, "tracker running");
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        println!("NeuroShard tracker listening on {scheme}://{addr}");
        crate::tracker::serve(listener, opts, daemon::shutdown_signal()).await
    })
}

/// The tracker's TLS: beyond loopback (a host that is not a loopback address or `localhost`),
/// the given pair or the data directory's self-signed one, made if missing; its fingerprint is
/// printed for nodes to pin (`tracker_fingerprint`).
fn tracker_tls(
    paths: &Paths,
    args: &TrackerArgs,
) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let loopback = args.host == "localhost"
        || args
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(None);
    }
    if args.insecure_http {
        tracing::warn!(
            host = %args.host,
            "the tracker serves plain HTTP beyond loopback (--insecure-http)"
        );
        return Ok(None);
    }
    let pair = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => crate::tls::Pair {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            std::fs::create_dir_all(&paths.data_dir)
                .with_context(|| format!("creating {}", paths.data_dir.display()))?;
            crate::tls::ensure_self_signed(&paths.data_dir, &args.host)?;
            crate::tls::Pair::self_signed(&paths.data_dir)
        }
    };
    let certified = crate::tls::load(&pair)?;
    println!(
        "tracker certificate {} sha256 {}",
        pair.cert.display(),
        certified.fingerprint()
    );
    Ok(Some(crate::tls::acceptor(&certified)?))
}

fn config_command(c: ConfigCommand, paths: &Paths) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Path => println!("{}", paths.config_path.display()),
        ConfigCommand::Reset { yes } => crate::nodectl::config_reset(&paths.config_path, yes)?,
        ConfigCommand::Show => {
            let cfg = Config::load(&paths.config_path)?;
            print!("{}", toml::to_string_pretty(&cfg)?);
        }
        ConfigCommand::Set { key, value } => {
            let cfg = Config::load(&paths.config_path)?.with_key(&key, &value)?;
            cfg.save(&paths.config_path)?;
            let note = if crate::config::needs_restart(&key) {
                " (takes effect at the next start)"
            } else {
                ""
            };
            println!("{key} = {value}{note}");
        }
    }
    Ok(())
}

/// Opens `url` in the desktop's browser a moment after start, when there is a desktop.
fn open_browser(url: String) {
    let desktop = std::env::var_os("DISPLAY").is_some()
        || std::env::var_os("WAYLAND_DISPLAY").is_some()
        || cfg!(target_os = "macos");
    if !desktop {
        return;
    }
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        if let Err(e) = std::process::Command::new(opener)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            tracing::debug!(error = %e, "could not open a browser");
        }
    });
}

/// Replaces this process with the engine binary running `subcommand args...`.
fn exec_engine(subcommand: &str, args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let binary = crate::engine::supervisor::default_engine_binary();
    let err = std::process::Command::new(&binary)
        .arg(subcommand)
        .args(args)
        .exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}
