//! `neuroshard model export --format hf|gguf --out DIR`: the network's current model from the
//! node running on the data directory, written to `DIR` (`GET /api/v1/model/export`: the node
//! gathers the layers it does not hold from their holders and has its engine write the file).
//!
//! `gguf` writes `DIR/neurollm.gguf`; `hf` unpacks the Hugging Face folder's files into `DIR`.
//! Every file is written under a temporary name and renamed when complete, so an interrupted
//! export never leaves a truncated model behind. Progress goes to stderr: a redrawn line on a
//! terminal, a plain line every 10 % otherwise.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::daemon::Paths;
use crate::ops::Conn;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The Hugging Face Llama layout (config.json, model.safetensors, tokenizer.json).
    Hf,
    /// One GGUF file (f32) for llama.cpp.
    Gguf,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Format of the export.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Folder to write into (created).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the command.
pub fn export(paths: &Paths, args: &ExportArgs) -> anyhow::Result<()> {
    let node = crate::ops::port(paths, &args.conn)?;
    let token = crate::ops::token(paths, &args.conn)?;
    let format = match args.format {
        Format::Hf => "hf",
        Format::Gguf => "gguf",
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    eprintln!(
        "asking the node on 127.0.0.1:{} for the model ({format}); a node holding some \
         layers first fetches the others from their holders",
        node.port
    );
    let answer = crate::client::download(
        &node,
        &format!("/api/v1/model/export?format={format}"),
        &token,
    )?;
    let hash = answer
        .headers()
        .get("x-model-hash")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let from_peers = answer
        .headers()
        .get("x-layers-from-peers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_string();
    let total = answer.content_length();
    let mut body = Counting {
        inner: answer,
        progress: Progress::new(total, std::io::stderr().is_terminal()),
    };
    let written = match args.format {
        Format::Gguf => {
            let path = args.out.join("neurollm.gguf");
            write_file(&path, &mut body)?;
            vec![path]
        }
        Format::Hf => unpack(&mut body, &args.out)?,
    };
    body.progress.finish();
    if args.conn.json {
        let v = serde_json::json!({
            "format": format,
            "model_hash": hash,
            "layers_from_peers": from_peers.parse::<u64>().unwrap_or(0),
            "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "exported model {hash} ({format}, {from_peers} layers fetched from peers) to {}",
            args.out.display()
        );
        for p in &written {
            println!("  {}", p.display());
        }
    }
    Ok(())
}

/// Copies `from` to `path` through `path.partial`, fsynced, renamed.
fn write_file(path: &Path, from: &mut impl Read) -> anyhow::Result<()> {
    let tmp = partial(path);
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::copy(from, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Unpacks the tar of the Hugging Face folder into `dir`: regular files with plain names only
/// (a name with a path separator or `..` is refused, so nothing lands outside `dir`).
fn unpack(from: &mut impl Read, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut archive = tar::Archive::new(from);
    let mut written = Vec::new();
    for entry in archive.entries().context("reading the export")? {
        let mut entry = entry.context("reading the export")?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().context("a name in the export")?.into_owned();
        let plain = name.components().count() == 1
            && matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            bail!(
                "the export holds a file outside its folder: {}",
                name.display()
            );
        }
        let path = dir.join(&name);
        write_file(&path, &mut entry)?;
        written.push(path);
    }
    if written.is_empty() {
        bail!("the export was empty");
    }
    Ok(written)
}

/// A reader that reports the bytes read to a [`Progress`].
struct Counting<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

/// A minimal download progress display on stderr (a private stand-in until the shared
/// progress module exists): on a terminal one line redrawn with `\r` per percent; otherwise
/// a line per 10 % (per 64 MiB when the size is unknown).
struct Progress {
    total: Option<u64>,
    done: u64,
    tty: bool,
    /// The last step shown (percent or tenths of the total; MiB or 64 MiB units).
    shown: u64,
    started: std::time::Instant,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Progress {
    fn new(total: Option<u64>, tty: bool) -> Progress {
        Progress {
            total,
            done: 0,
            tty,
            shown: 0,
            started: std::time::Instant::now(),
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / MIB / secs;
        match self.total {
            Some(t) if t > 0 => format!(
                "downloading {:.1}/{:.1} MiB ({:>3}%) {rate:.1} MiB/s",
                self.done as f64 / MIB,
                t as f64 / MIB,
                self.done * 100 / t
            ),
            _ => format!(
                "downloading {:.1} MiB {rate:.1} MiB/s",
                self.done as f64 / MIB
            ),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        // A terminal line is redrawn per percent (per MiB when the size is unknown), other
        // output gets a line per 10 % (per 64 MiB).
        let step = match (self.total, self.tty) {
            (Some(t), true) if t > 0 => self.done * 100 / t,
            (Some(t), false) if t > 0 => self.done * 10 / t,
            (_, true) => self.done >> 20,
            (_, false) => self.done >> 26,
        };
        if step > self.shown {
            self.shown = step;
            if self.tty {
                eprint!("\r{}", self.line());
            } else {
                eprintln!("{}", self.line());
            }
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!("\r{}", self.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpack_writes_plain_names_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_of(&[("config.json", b"{}"), ("model.safetensors", b"abc")]);
        let got = unpack(&mut t.as_slice(), dir.path()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            std::fs::read(dir.path().join("model.safetensors")).unwrap(),
            b"abc"
        );
        assert!(!dir.path().join("model.safetensors.partial").exists());
        let t = tar_of(&[("sub/x.json", b"{}")]);
        let e = unpack(&mut t.as_slice(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("outside its folder"), "{e}");
        assert!(unpack(&mut tar_of(&[]).as_slice(), dir.path()).is_err());
    }

    #[test]
    fn progress_shows_tenths_off_a_terminal_and_percents_on_one() {
        let mut p = Progress::new(Some(100), false);
        p.add(5);
        assert_eq!(p.shown, 0);
        p.add(30);
        assert_eq!(p.shown, 3);
        assert!(p.line().contains("( 35%)"), "{}", p.line());
        let mut t = Progress::new(Some(1000), true);
        t.add(5);
        assert_eq!(t.shown, 0);
        t.add(20);
        assert_eq!(t.shown, 2);
    }
}
