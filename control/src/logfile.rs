//! The daemon's log file, `<data-dir>/logs/neuroshard.log`, next to its stderr: what
//! `neuroshard logs` reads. Bounded by size: when a line would take the file past
//! [`MAX_BYTES`], it is renamed `neuroshard.log.1` (the older ones shifting to `.2`, `.3`; the
//! oldest past [`KEEP`] dropped) and a new file starts, so the logs of a node never take more
//! than `(KEEP + 1) * MAX_BYTES` (40 MB).
//!
//! Reading: [`tail`] (the last lines, from the rotated file too when the current one is short)
//! and [`Follower`] (new lines as they are written, across rotations, as `tail -F` does).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

pub const LOG_DIR: &str = "logs";
pub const LOG_FILE: &str = "neuroshard.log";
/// Size at which the file is rotated.
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept (`.1` newest to `.KEEP` oldest).
pub const KEEP: usize = 3;
/// Set (to anything) by `restart` for a node it starts in the background: that node logs to
/// its log file only, not to stderr too.
pub const NO_STDERR_ENV: &str = "NEUROSHARD_LOG_FILE_ONLY";

/// `<data-dir>/logs/neuroshard.log`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_DIR).join(LOG_FILE)
}

/// `path` with `.n` appended.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// An append-only file rotated by size; one `write` is one log event (the fmt layer writes
/// each formatted event at once), so an event never straddles two files.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    state: Mutex<State>,
}

struct State {
    file: Option<File>,
    size: u64,
}

impl RotatingFile {
    /// Opens (creating, with its folder) `path` for appending.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<RotatingFile> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            state: Mutex::new(State {
                file: Some(file),
                size,
            }),
        })
    }

    /// The daemon's log file in `data_dir`, with the default bounds.
    pub fn for_data_dir(data_dir: &Path) -> std::io::Result<RotatingFile> {
        RotatingFile::open(&path(data_dir), MAX_BYTES, KEEP)
    }

    fn rotate(&self, state: &mut State) -> std::io::Result<()> {
        state.file = None;
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        state.file = Some(open_append(&self.path)?);
        state.size = 0;
        Ok(())
    }

    fn write_event(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.state.lock();
        if state.size > 0 && state.size + buf.len() as u64 > self.max_bytes {
            self.rotate(&mut state)?;
        }
        if state.file.is_none() {
            // A rotation that failed half way: try the file again.
            state.file = Some(open_append(&self.path)?);
        }
        let file = state.file.as_mut().expect("opened above");
        file.write_all(buf)?;
        state.size += buf.len() as u64;
        Ok(buf.len())
    }
}

/// The writer the fmt layer gets for one event.
pub struct EventWriter<'a>(&'a RotatingFile);

impl Write for EventWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_event(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingFile {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter(self)
    }
}

/// Installs the binary's tracing subscriber: `RUST_LOG` (default `info`) to stderr, and to
/// `file` when given. A panic is logged too, so the log file says why a node died.
pub fn install_subscriber(file: Option<RotatingFile>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr on a full disk) is dropped. With internal
    // errors logged, tracing-subscriber reports it with `eprintln!`, which panics when stderr
    // refuses that too: the task that logged died (an HTTP request got no answer at all).
    let stderr = tracing_subscriber::fmt::layer()
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let has_file = file.is_some();
    let stderr = (!has_file || std::env::var_os(NO_STDERR_ENV).is_none()).then_some(stderr);
    let file = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .log_internal_errors(false)
            .with_ansi(false)
            .with_writer(f)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .init();
    if has_file {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            tracing::error!(%info, "panic");
            default(info);
        }));
    }
}

/// The last `n` lines of the log at `path`, oldest first: from the current file, and from
/// the newest rotated one when the current file holds fewer.
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let current = std::fs::read(path)?;
    let mut lines = last_lines(&current, n);
    if lines.len() < n
        && let Ok(older) = std::fs::read(rotated(path, 1))
    {
        let mut before = last_lines(&older, n - lines.len());
        before.append(&mut lines);
        lines = before;
    }
    Ok(lines)
}

fn last_lines(bytes: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Reads what is appended to a log file, following it to the new file after a rotation.
pub struct Follower {
    path: PathBuf,
    file: File,
    inode: u64,
    pos: u64,
}

impl Follower {
    /// Starts at the current end of `path`.
    pub fn at_end(path: &Path) -> std::io::Result<Follower> {
        let mut file = File::open(path)?;
        let pos = file.seek(SeekFrom::End(0))?;
        let inode = file.metadata()?.ino();
        Ok(Follower {
            path: path.to_path_buf(),
            file,
            inode,
            pos,
        })
    }

    /// Bytes written since the last call: the rest of the file being read, then, when the
    /// path now names a new file (rotated), that file from its start.
    pub fn poll(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.file.read_to_end(&mut out)?;
        self.pos += out.len() as u64;
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.ino() != self.inode => {
                // Rotated: what was written to the old file before the rename is read above;
                // read it once more in case a last event landed in between.
                let mut rest = Vec::new();
                self.file.read_to_end(&mut rest)?;
                out.extend_from_slice(&rest);
                self.file = File::open(&self.path)?;
                self.inode = self.file.metadata()?.ino();
                self.pos = 0;
                let mut fresh = Vec::new();
                self.file.read_to_end(&mut fresh)?;
                self.pos += fresh.len() as u64;
                out.extend_from_slice(&fresh);
            }
            Ok(meta) if meta.len() < self.pos => {
                // Truncated in place: start again from its beginning.
                self.file.seek(SeekFrom::Start(0))?;
                self.pos = 0;
            }
            // Between a rename and the next open the path may be missing for a moment.
            _ => {}
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_file_bounded_and_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join(LOG_FILE);
        let log = RotatingFile::open(&path, 100, 2).unwrap();
        for i in 0..50 {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&log);
            w.write_all(format!("line {i:03}\n").as_bytes()).unwrap();
        }
        // Every file is under the bound and only `keep` rotated ones are left.
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(
                std::fs::metadata(&p).unwrap().len() <= 100,
                "{}",
                p.display()
            );
        }
        assert!(!rotated(&path, 3).exists());
        // The last lines come across the rotation, in order.
        let last = tail(&path, 12).unwrap();
        let want: Vec<String> = (38..50).map(|i| format!("line {i:03}")).collect();
        assert_eq!(last, want);
        assert_eq!(tail(&path, 0).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_follower_reads_every_line_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let log = RotatingFile::open(&path, 64, 1).unwrap();
        let write = |i: usize| {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&log);
            w.write_all(format!("event {i}\n").as_bytes()).unwrap();
        };
        write(0);
        let mut follower = Follower::at_end(&path).unwrap();
        let mut seen = Vec::new();
        for i in 1..40 {
            write(i);
            // Poll every third write, so some rotations happen between two polls.
            if i % 3 == 0 {
                seen.extend(follower.poll().unwrap());
            }
        }
        seen.extend(follower.poll().unwrap());
        let text = String::from_utf8(seen).unwrap();
        let want: String = (1..40).map(|i| format!("event {i}\n")).collect();
        assert_eq!(text, want);
    }
}
