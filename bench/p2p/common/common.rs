//! What both stacks' bench binaries share: the wire protocol on one bidirectional stream, the
//! CPU clock and the report. Included by each binary with `#[path]` (two crates, no third).
//!
//! A request is one op byte and a big-endian u64: `OP_DOWNLOAD n` is answered with n bytes
//! and the end of the stream, `OP_CPU` with the server process's CPU seconds (user + system,
//! getrusage) as big-endian f64 bits, `OP_PING` with one byte.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const OP_DOWNLOAD: u8 = 0;
pub const OP_CPU: u8 = 1;
pub const OP_PING: u8 = 2;
const CHUNK: usize = 64 * 1024;

/// This process's CPU seconds so far (user + system).
pub fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

/// Serves one request on a stream (server side).
pub async fn serve<R, W>(mut r: R, mut w: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let op = r.read_u8().await.context("reading the op")?;
    let arg = r.read_u64().await.context("reading the argument")?;
    match op {
        OP_DOWNLOAD => {
            let buf = vec![0x5a_u8; CHUNK];
            let mut left = arg;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                w.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
        }
        OP_CPU => w.write_u64(cpu_seconds().to_bits()).await?,
        OP_PING => w.write_u8(1).await?,
        other => bail!("unknown op {other}"),
    }
    w.flush().await?;
    w.shutdown().await?;
    Ok(())
}

/// Sends a request (client side).
pub async fn request<W: AsyncWrite + Unpin>(w: &mut W, op: u8, arg: u64) -> anyhow::Result<()> {
    w.write_u8(op).await?;
    w.write_u64(arg).await?;
    w.flush().await?;
    Ok(())
}

/// Reads a download to its end; the bytes read.
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Reads the server's answer to `OP_CPU`.
pub async fn read_cpu<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<f64> {
    Ok(f64::from_bits(r.read_u64().await?))
}

/// Milliseconds, rounded to 0.1.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The figures of one transfer: wall time, both processes' CPU seconds.
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
    pub client_cpu: f64,
    pub server_cpu: f64,
}

impl Transfer {
    pub fn json(&self) -> serde_json::Value {
        let gb = self.bytes as f64 / 1e9;
        serde_json::json!({
            "bytes": self.bytes,
            "secs": (self.secs * 1000.0).round() / 1000.0,
            "mbit_s": ((self.bytes as f64 * 8.0 / self.secs / 1e6) * 10.0).round() / 10.0,
            "client_cpu_s": self.client_cpu,
            "server_cpu_s": self.server_cpu,
            "cpu_s_per_gb": (((self.client_cpu + self.server_cpu) / gb) * 100.0).round() / 100.0,
        })
    }
}

/// Times a transfer given a way to open a (reader, writer) stream pair to the server.
pub async fn measure<R, W, F, Fut>(mut open: F, bytes: u64) -> anyhow::Result<Transfer>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(R, W)>>,
{
    let server_cpu = async |open: &mut F| -> anyhow::Result<f64> {
        let (mut r, mut w) = open().await?;
        request(&mut w, OP_CPU, 0).await?;
        read_cpu(&mut r).await
    };
    let s0 = server_cpu(&mut open).await?;
    let c0 = cpu_seconds();
    let start = Instant::now();
    let (mut r, mut w) = open().await?;
    request(&mut w, OP_DOWNLOAD, bytes).await?;
    let got = read_to_end(&mut r).await?;
    let secs = start.elapsed().as_secs_f64();
    let c1 = cpu_seconds();
    let s1 = server_cpu(&mut open).await?;
    if got != bytes {
        bail!("the download ended after {got} of {bytes} bytes");
    }
    Ok(Transfer {
        bytes,
        secs,
        client_cpu: c1 - c0,
        server_cpu: s1 - s0,
    })
}
