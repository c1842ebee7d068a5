//! The baseline: HTTP/2 over plain TCP (no TLS), what `peer.proto` over tonic uses today.
//! `GET /download/<n>` answers n bytes, `GET /cpu` the server's CPU seconds. Windows as
//! hyper's defaults (2 MiB a stream, 5 MiB a connection), which tonic inherits.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

use crate::common;

const STREAM_WINDOW: u32 = 2 << 20;
const CONN_WINDOW: u32 = 5 << 20;
const CHUNK: usize = 64 * 1024;

pub async fn server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("h2 server on {listen}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(e) = connection(tcp).await {
                eprintln!("h2 connection: {e:#}");
            }
        });
    }
}

async fn connection(tcp: TcpStream) -> anyhow::Result<()> {
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await?;
    while let Some(req) = conn.accept().await {
        let (req, mut respond) = req?;
        tokio::spawn(async move {
            let path = req.uri().path().to_string();
            let body = if path == "/cpu" {
                Some(Bytes::from(
                    common::cpu_seconds().to_bits().to_be_bytes().to_vec(),
                ))
            } else {
                None
            };
            let n: u64 = path
                .strip_prefix("/download/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            if let Some(b) = body {
                let _ = send.send_data(b, true);
                return;
            }
            let chunk = Bytes::from(vec![0x5a_u8; CHUNK]);
            let mut left = n;
            while left > 0 {
                send.reserve_capacity(left.min(CHUNK as u64) as usize);
                let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => c,
                    _ => return,
                };
                let n = cap.min(left as usize);
                if send.send_data(chunk.slice(..n), false).is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = send.send_data(Bytes::new(), true);
        });
    }
    Ok(())
}

async fn get(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> anyhow::Result<(u64, Bytes)> {
    let req = http::Request::get(format!("http://bench{path}")).body(())?;
    let mut ready = send.clone().ready().await?;
    let (resp, _) = ready.send_request(req, true)?;
    let mut body = resp.await?.into_body();
    let mut total = 0u64;
    let mut first = Bytes::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        total += chunk.len() as u64;
        let _ = body.flow_control().release_capacity(chunk.len());
        if first.is_empty() {
            first = chunk;
        }
    }
    Ok((total, first))
}

async fn server_cpu(send: &mut h2::client::SendRequest<Bytes>) -> anyhow::Result<f64> {
    let (_, b) = get(send, "/cpu").await?;
    let bits: [u8; 8] = b.as_ref().try_into().context("a short /cpu answer")?;
    Ok(f64::from_bits(u64::from_be_bytes(bits)))
}

pub async fn client(addr: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let connected = start.elapsed();
    let s0 = server_cpu(&mut send).await?;
    let first_rtt = start.elapsed();
    let c0 = common::cpu_seconds();
    let t = Instant::now();
    let (got, _) = get(&mut send, &format!("/download/{bytes}")).await?;
    let secs = t.elapsed().as_secs_f64();
    let c1 = common::cpu_seconds();
    let s1 = server_cpu(&mut send).await?;
    if got != bytes {
        bail!("the download ended after {got} of {bytes} bytes");
    }
    let transfer = common::Transfer {
        bytes,
        secs,
        client_cpu: c1 - c0,
        server_cpu: s1 - s0,
    };
    let out = serde_json::json!({
        "stack": "h2-tcp",
        "connect_ms": common::ms(connected),
        "first_rtt_ms": common::ms(first_rtt),
        "direct_ms": common::ms(connected),
        "path": "direct",
        "relay_only": false,
        "transfer": transfer.json(),
    });
    println!("{out}");
    Ok(())
}
