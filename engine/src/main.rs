//! `neuroshard-engine`: the data-plane process. Thin: parses flags, installs logging and
//! hands over to the library.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use neuroshard_engine::batcher::BatchLimits;
use neuroshard_engine::runtime::{DeviceChoice, Runtime};
use neuroshard_engine::{server, watchdog};

#[derive(Parser, Debug)]
#[command(
    name = "neuroshard-engine",
    version,
    about = "NeuroShard engine: the data plane of a node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the engine commands on a Unix socket (control starts this).
    Serve(ServeArgs),
    /// Write a model, a batch and every parameter gradient for an independent check.
    GradDump(neuroshard_engine::dev::GradDumpArgs),
    /// Time full training steps of a preset and print tokens/s, step time and GFLOP/s.
    BenchTrain(neuroshard_engine::bench::BenchTrainArgs),
    /// Time generation with continuous batching: time to first token and decode tokens/s per
    /// batch size.
    BenchGenerate(neuroshard_engine::bench_generate::BenchGenerateArgs),
    /// Perplexity of held-out text decoded with f32 and with int8 weights (a model trained
    /// on the rest of the built-in corpus).
    BenchPpl(neuroshard_engine::bench_ppl::BenchPplArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Path of the Unix socket to listen on.
    #[arg(long, env = "NEUROSHARD_ENGINE_SOCKET")]
    socket: PathBuf,
    /// Exit when this process (the control daemon) is gone.
    #[arg(long)]
    parent_pid: Option<u32>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto", env = "NEUROSHARD_DEVICE")]
    device: DeviceChoice,
    /// CPU threads for the numerics (default: all cores).
    #[arg(long, env = "NEUROSHARD_CPU_THREADS")]
    threads: Option<usize>,
    /// Generate requests decoded together at most (continuous batching).
    #[arg(long, default_value_t = 8, env = "NEUROSHARD_MAX_BATCH")]
    max_batch: usize,
    /// MiB of KV cache the batch may reserve; a request reserves its whole length on admission.
    #[arg(long, default_value_t = 256, env = "NEUROSHARD_KV_BUDGET_MB")]
    kv_budget_mb: u64,
    /// Generate requests that may wait for a place in the batch; more are refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 64, env = "NEUROSHARD_MAX_WAITING")]
    max_waiting: usize,
    /// Decode weights: f32 as trained, or an int8 copy per output channel (CPU only; the
    /// copy is re-quantized after the weights change).
    #[arg(
        long,
        value_enum,
        default_value = "f32",
        env = "NEUROSHARD_SERVE_WEIGHTS"
    )]
    weights: neuroshard_engine::model::serve::ServeWeights,
    /// Test only (issue #19): serve generation from a truncated model (every layer but the
    /// first and the last skipped; of two layers, the last) while the model and its hash stay
    /// whole. Only a daemon built with its `adversary` feature passes it (cheat
    /// `truncated_model`), and only an engine built with its own `adversary` feature accepts
    /// it: any other engine refuses to start with it.
    #[arg(long, hide = true)]
    serve_truncated: bool,
}

fn main() -> anyhow::Result<()> {
    // A log line that cannot be written (stderr on a full disk) is dropped. With internal
    // errors logged, tracing-subscriber reports it with `eprintln!`, which panics when stderr
    // refuses that too: the task that logged died (an HTTP request got no answer at all).
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::GradDump(args) => {
            let loss = neuroshard_engine::dev::grad_dump(&args)?;
            tracing::info!(loss, out = %args.out.display(), "gradients written");
            Ok(())
        }
        Command::BenchTrain(args) => neuroshard_engine::bench::run(&args),
        Command::BenchGenerate(args) => neuroshard_engine::bench_generate::run(&args),
        Command::BenchPpl(args) => neuroshard_engine::bench_ppl::run(&args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.serve_truncated && !cfg!(feature = "adversary") {
        anyhow::bail!(
            "--serve-truncated is a cheat for the checked-work tests: this engine was built \
             without its `adversary` feature and refuses it"
        );
    }
    if let Some(threads) = args.threads.filter(|&t| t > 0) {
        rayon_threads(threads);
    }
    let runtime = Runtime::new(args.device)?
        .with_serve_weights(args.weights)?
        .with_serve_truncated(args.serve_truncated);
    if args.serve_truncated {
        tracing::warn!("serving a truncated model (adversary test build)");
    }
    if args.weights != neuroshard_engine::model::serve::ServeWeights::F32 {
        tracing::info!(weights = ?args.weights, "decode weights");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = server::bind(&args.socket)?;
        tracing::info!(socket = %args.socket.display(), pid = std::process::id(), "engine listening");
        let parent = args.parent_pid;
        let shutdown = async move {
            let parent_gone = async {
                match parent {
                    Some(pid) => watchdog::parent_gone(pid, Duration::from_millis(500)).await,
                    None => std::future::pending().await,
                }
            };
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = parent_gone => tracing::warn!("control process is gone; engine exiting"),
                _ = term.recv() => tracing::info!("SIGTERM; engine exiting"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; engine exiting"),
            }
        };
        let limits = BatchLimits {
            max_batch: args.max_batch,
            kv_budget_bytes: args.kv_budget_mb.saturating_mul(1 << 20),
            max_waiting: args.max_waiting,
        };
        let service = server::EngineService::new(runtime, limits)?;
        let result = server::serve(listener, service, shutdown).await;
        let _ = std::fs::remove_file(&args.socket);
        result?;
        anyhow::Ok(())
    })
}

fn rayon_threads(threads: usize) {
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        tracing::warn!(error = %e, "could not size the compute thread pool");
    }
}
