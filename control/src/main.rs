//! `neuroshard`: the node daemon and its command line.

use clap::Parser;

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
    neuroshard::cli::run(neuroshard::cli::Cli::parse())
}
