//! Progress of a long operation (a first start's model build, layers fetched from peers, a
//! model export): a bar on a terminal (`indicatif`), plain lines when stdout is not one (a
//! log file, a pipe, a test), one at the start, one per tenth done and one at the end.
//!
//! ```ignore
//! let p = Progress::new("exporting the model", total_bytes);
//! p.inc(chunk.len() as u64);
//! p.finish();
//! ```
//!
//! [`Progress::new`] counts bytes, [`Progress::steps`] counts things (layers, files). A
//! `Progress` dropped before [`Progress::finish`] says that the operation stopped there.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;

/// What the total counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    Steps,
}

/// One long operation's progress.
pub struct Progress {
    label: String,
    total: u64,
    unit: Unit,
    started: Instant,
    out: Output,
}

enum Output {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    sink: Box<dyn Write + Send>,
    done: u64,
    /// Tenths already reported.
    tenths: u64,
    finished: bool,
}

impl Progress {
    /// An operation over `total_bytes` bytes.
    pub fn new(label: &str, total_bytes: u64) -> Progress {
        Self::start(label, total_bytes, Unit::Bytes, None)
    }

    /// An operation of `total` steps (layers, files).
    pub fn steps(label: &str, total: u64) -> Progress {
        Self::start(label, total, Unit::Steps, None)
    }

    /// Plain lines to `sink` whatever stdout is (tests, or a caller with a log of its own).
    pub fn to_lines(label: &str, total: u64, bytes: bool, sink: Box<dyn Write + Send>) -> Progress {
        let unit = if bytes { Unit::Bytes } else { Unit::Steps };
        Self::start(label, total, unit, Some(sink))
    }

    fn start(label: &str, total: u64, unit: Unit, sink: Option<Box<dyn Write + Send>>) -> Progress {
        let out = match sink {
            None if std::io::stdout().is_terminal() => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
                let counts = match unit {
                    Unit::Bytes => "{bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
                    Unit::Steps => "{pos}/{len} ({elapsed})",
                };
                let style = ProgressStyle::with_template(&format!(
                    "{{spinner}} {{msg}} [{{bar:30}}] {counts}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_message(label.to_string());
                // The spinner and the elapsed time move while one long step runs.
                bar.enable_steady_tick(Duration::from_millis(200));
                Output::Bar(bar)
            }
            sink => {
                let sink = sink.unwrap_or_else(|| Box::new(std::io::stdout()));
                let p = Lines {
                    sink,
                    done: 0,
                    tenths: 0,
                    finished: false,
                };
                Output::Lines(Mutex::new(p))
            }
        };
        let p = Progress {
            label: label.to_string(),
            total,
            unit,
            started: Instant::now(),
            out,
        };
        if let Output::Lines(lines) = &p.out {
            let mut l = lines.lock();
            let text = format!("{}: started, {}", p.label, p.amount(p.total));
            l.say(&text);
        }
        p
    }

    /// `n` more bytes (or steps) done.
    pub fn inc(&self, n: u64) {
        match &self.out {
            Output::Bar(bar) => bar.inc(n),
            Output::Lines(lines) => {
                let mut l = lines.lock();
                l.done = l.done.saturating_add(n).min(self.total.max(l.done));
                let tenths = if self.total == 0 {
                    10
                } else {
                    (u128::from(l.done) * 10 / u128::from(self.total)) as u64
                };
                if tenths > l.tenths && tenths < 10 {
                    l.tenths = tenths;
                    let text = format!(
                        "{}: {}% ({} of {})",
                        self.label,
                        tenths * 10,
                        self.amount(l.done),
                        self.amount(self.total)
                    );
                    l.say(&text);
                }
            }
        }
    }

    /// The operation is over: the bar is completed, or the last line written.
    pub fn finish(&self) {
        match &self.out {
            Output::Bar(bar) => bar.finish_with_message(format!("{}: done", self.label)),
            Output::Lines(lines) => {
                let mut l = lines.lock();
                if l.finished {
                    return;
                }
                l.finished = true;
                let text = format!(
                    "{}: done, {} in {:.1} s",
                    self.label,
                    self.amount(l.done.max(self.total)),
                    self.started.elapsed().as_secs_f64()
                );
                l.say(&text);
            }
        }
    }

    fn amount(&self, n: u64) -> String {
        match self.unit {
            Unit::Bytes => bytes(n),
            Unit::Steps => n.to_string(),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        match &self.out {
            Output::Bar(bar) => {
                if !bar.is_finished() {
                    bar.abandon_with_message(format!("{}: stopped", self.label));
                }
            }
            Output::Lines(lines) => {
                let mut l = lines.lock();
                if !l.finished {
                    let text = format!(
                        "{}: stopped at {} of {}",
                        self.label,
                        self.amount(l.done),
                        self.amount(self.total)
                    );
                    l.say(&text);
                }
            }
        }
    }
}

impl Lines {
    fn say(&mut self, line: &str) {
        // A closed stdout must not stop the operation it reports on.
        let _ = writeln!(self.sink, "{line}");
        let _ = self.sink.flush();
    }
}

/// Bytes as people read them: "512 B", "1.5 MB", "2.00 GB" (powers of 1024).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A sink the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().clone())
                .unwrap()
                .lines()
                .map(|l| {
                    // The duration varies: keep what comes before it.
                    l.split(" in ").next().unwrap().to_string()
                })
                .collect()
        }
    }

    #[test]
    fn plain_lines_start_each_tenth_and_end() {
        let sink = Shared::default();
        let p = Progress::to_lines("fetching", 4 << 20, true, Box::new(sink.clone()));
        for _ in 0..8 {
            p.inc(512 << 10);
        }
        p.finish();
        p.finish();
        drop(p);
        assert_eq!(
            sink.lines(),
            [
                "fetching: started, 4.0 MB",
                "fetching: 10% (512.0 KB of 4.0 MB)",
                "fetching: 20% (1.0 MB of 4.0 MB)",
                "fetching: 30% (1.5 MB of 4.0 MB)",
                "fetching: 50% (2.0 MB of 4.0 MB)",
                "fetching: 60% (2.5 MB of 4.0 MB)",
                "fetching: 70% (3.0 MB of 4.0 MB)",
                "fetching: 80% (3.5 MB of 4.0 MB)",
                "fetching: done, 4.0 MB",
            ]
        );
    }

    #[test]
    fn steps_and_an_operation_cut_short() {
        let sink = Shared::default();
        let p = Progress::to_lines("layers", 3, false, Box::new(sink.clone()));
        p.inc(1);
        p.inc(5);
        drop(p);
        assert_eq!(
            sink.lines(),
            [
                "layers: started, 3",
                "layers: 30% (1 of 3)",
                "layers: stopped at 3 of 3",
            ]
        );
    }

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KB");
        assert_eq!(bytes(3 << 30), "3.0 GB");
    }
}
