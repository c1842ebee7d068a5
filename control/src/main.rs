//! `neuroshard`: the node daemon and its command line.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = neuroshard::cli::Cli::parse();
    // `start` also logs to <data-dir>/logs/neuroshard.log (what `neuroshard logs` reads).
    let file = cli.daemon_data_dir().and_then(|dir| {
        neuroshard::logfile::RotatingFile::for_data_dir(&dir)
            .map_err(|e| eprintln!("warning: no log file in {}: {e}", dir.display()))
            .ok()
    });
    neuroshard::logfile::install_subscriber(file);
    neuroshard::cli::run(cli)
}
