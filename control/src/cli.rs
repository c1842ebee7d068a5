//! The `neuroshard` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{CONFIG_FILE, Config, EngineMode};
use crate::daemon::{self, PID_FILE, Paths};

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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node in the foreground (REST API, peer service, engine supervision).
    Start(StartArgs),
    /// Show the status of the running node.
    Status(PortArg),
    /// Stop the running node (SIGTERM, waits for a clean exit).
    Stop,
    /// Show or change the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Developer tools (run by the engine binary).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Benchmarks (run by the engine binary).
    #[command(subcommand)]
    Bench(BenchCommand),
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
    /// Compute threads for the engine (0 = all cores).
    #[arg(long, env = "NEUROSHARD_CPU_THREADS")]
    pub cpu_threads: Option<u32>,
    /// Inner steps per DiLoCo round.
    #[arg(long, env = "NEUROSHARD_DILOCO_STEPS")]
    pub diloco_steps: Option<u32>,
    /// Tracker URL.
    #[arg(long, env = "NEUROSHARD_TRACKER")]
    pub tracker: Option<String>,
    /// Comma-separated host:port peers to start from.
    #[arg(long, env = "NEUROSHARD_SEED_PEERS", value_delimiter = ',')]
    pub seed_peers: Option<Vec<String>>,
    /// Ledger database URL (default: SQLite in the data directory).
    #[arg(long, env = "NEUROSHARD_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct PortArg {
    /// Port of the running node (default: from the config file).
    #[arg(long, env = "NEUROSHARD_PORT")]
    pub port: Option<u16>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration file contents.
    Show,
    /// Set a dotted key, e.g. `training.batch_size 16`.
    Set { key: String, value: String },
    /// Print the config file path.
    Path,
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

/// Applies command-line flags (and their environment variables) over the file's values.
pub fn apply_flags(mut cfg: Config, a: &StartArgs) -> Config {
    if let Some(v) = a.port {
        cfg.port = v;
    }
    if let Some(v) = &a.host {
        cfg.host = v.clone();
    }
    if let Some(v) = &a.device {
        cfg.resources.device = v.clone();
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
        cfg.training.model = v.clone();
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
    if let Some(v) = &a.seed_peers {
        cfg.seed_peers = v.clone();
    }
    if let Some(v) = &a.database_url {
        cfg.database_url = v.clone();
    }
    cfg
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = cli.paths();
    match cli.command {
        Command::Start(args) => {
            let cfg = apply_flags(Config::load(&paths.config_path)?, &args);
            cfg.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(cfg, paths, daemon::shutdown_signal()))?;
            Ok(())
        }
        Command::Status(p) => {
            let cfg = Config::load(&paths.config_path)?;
            let port = p.port.unwrap_or(cfg.port);
            let body = http_get(port, "/api/v1/status")
                .with_context(|| format!("no node answering on 127.0.0.1:{port}"))?;
            println!("{body}");
            Ok(())
        }
        Command::Stop => stop(&paths),
        Command::Config(c) => config_command(c, &paths),
        Command::Dev(DevCommand::GradDump { args }) => exec_engine("grad-dump", &args),
        Command::Bench(BenchCommand::Train { args }) => exec_engine("bench-train", &args),
    }
}

fn config_command(c: ConfigCommand, paths: &Paths) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Path => println!("{}", paths.config_path.display()),
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

/// Sends SIGTERM to the daemon named by the pid file and waits up to 30 s for it to exit.
fn stop(paths: &Paths) -> anyhow::Result<()> {
    let pid_path = paths.data_dir.join(PID_FILE);
    let pid: i32 = match std::fs::read_to_string(&pid_path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("{} is not a pid", pid_path.display()))?,
        Err(_) => bail!(
            "no node is running with data directory {}",
            paths.data_dir.display()
        ),
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        bail!("no node is running (stale pid file {})", pid_path.display());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running(pid) {
        if std::time::Instant::now() > deadline {
            bail!("node {pid} did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped node {pid}");
    Ok(())
}

/// Whether `pid` is a live process (an exited one waiting to be reaped, a zombie, is not).
fn running(pid: nix::unistd::Pid) -> bool {
    if nix::sys::signal::kill(pid, None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Replaces this process with the engine binary running `subcommand args...`.
fn exec_engine(subcommand: &str, args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let binary = crate::supervisor::default_engine_binary();
    let err = std::process::Command::new(&binary)
        .arg(subcommand)
        .args(args)
        .exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}

/// A minimal HTTP/1.1 GET to the local node; returns the body.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{}: {body}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
