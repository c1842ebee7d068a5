//! The daemon's peer transport against plain gRPC (issue 21 item 6, "the transport's CPU cost
//! per GB against today's plain gRPC"): the same tensor bytes pushed by unary gRPC calls
//! (tonic, one call in flight, as a pipeline stage sends activations) over
//!
//! - the daemon's own path: two `neuroshard_net` swarms (`p2p::swarm::start`, every
//!   behaviour the daemon runs), the client dialing the server on loopback over TCP (noise +
//!   yamux) or over QUIC only, the calls on a `/neuroshard/peer/1` stream through
//!   `p2p::io::channel` and `p2p::io::incoming`, exactly as `peer.proto` runs;
//! - plain tonic over loopback TCP (what the peer port was before issue 21: HTTP/2 in clear).
//!
//! Both ends run in this process, so `getrusage(RUSAGE_SELF)` counts the CPU of sender and
//! receiver together. The server answers each call with the byte count it received (8
//! bytes), which the client checks.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use neuroshard_net::p2p::{self, Transport};
use neuroshard_net::{PeerState, admission::Caps};
use neuroshard_proto::raw::{self, RawCodec};
use serde_json::{Value, json};
use tonic::codegen::{BoxFuture, http};
use tonic::transport::{Channel, Endpoint, Server};

/// The gRPC method the sink serves.
const METHOD: &str = "/neuroshard.bench.Sink/Push";

/// A message larger than any chunk the bench sends is refused by the sink.
const MAX_MESSAGE: usize = 256 << 20;

/// Which path the bytes take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// tonic over loopback TCP, no encryption.
    GrpcTcp,
    /// tonic over a `/neuroshard/peer/1` stream of a TCP + noise + yamux connection.
    P2pTcp,
    /// tonic over a `/neuroshard/peer/1` stream of a QUIC connection.
    P2pQuic,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::GrpcTcp, Path::P2pTcp, Path::P2pQuic];

    pub fn label(self) -> &'static str {
        match self {
            Path::GrpcTcp => "plain gRPC over TCP (no encryption)",
            Path::P2pTcp => "libp2p TCP + noise + yamux",
            Path::P2pQuic => "libp2p QUIC",
        }
    }
}

/// What to push.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Bytes of one call (one activation tensor).
    pub chunk: usize,
    /// Bytes pushed in one measured run.
    pub total: u64,
    /// Runs of each path (the table takes their median).
    pub reps: usize,
}

/// The sink: a unary gRPC method that answers the length of what it got.
#[derive(Clone)]
struct Sink;

impl tonic::server::NamedService for Sink {
    const NAME: &'static str = "neuroshard.bench.Sink";
}

struct Push;

impl tonic::server::UnaryService<Vec<u8>> for Push {
    type Response = Vec<u8>;
    type Future = std::future::Ready<Result<tonic::Response<Vec<u8>>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        let n = request.into_inner().len() as u64;
        std::future::ready(Ok(tonic::Response::new(n.to_le_bytes().to_vec())))
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Sink {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() != METHOD {
                return Ok(
                    tonic::Status::unimplemented(request.uri().path().to_string()).into_http(),
                );
            }
            let mut grpc =
                tonic::server::Grpc::new(RawCodec).max_decoding_message_size(MAX_MESSAGE);
            Ok(grpc.unary(Push, request).await)
        })
    }
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> anyhow::Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(s(u.user_time()) + s(u.system_time()))
}

/// A free loopback port (bound, then closed).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A swarm as the daemon starts one, listening on `port` (None: dial only).
async fn swarm(
    seed: u64,
    port: Option<u16>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Transport> {
    let admission = p2p::swarm::Admission {
        caps: Caps {
            per_address: 64,
            total: 256,
            new_per_second: 100,
        },
        state: Arc::new(PeerState::default()),
    };
    let wallet = neuroshard_identity::Wallet::from_seed(seed);
    Ok(p2p::swarm::start(
        &wallet,
        port,
        admission,
        p2p::relay::Options::default(),
        stop.clone(),
    )
    .await?)
}

/// Starts the sink behind `path` and answers a channel to it.
async fn connect(path: Path, stop: &tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Channel> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut done = stop.clone();
    let shutdown = async move {
        // Either way the bench is over.
        let _ = done.wait_for(|s| *s).await;
    };
    if path == Path::GrpcTcp {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let incoming = futures::stream::unfold(listener, |l| async move {
            let accepted = l.accept().await.map(|(s, _)| {
                // As tonic's own listener does: no Nagle delay on small frames.
                let _ = s.set_nodelay(true);
                s
            });
            Some((accepted, l))
        });
        tokio::spawn(
            Server::builder()
                .add_service(Sink)
                .serve_with_incoming_shutdown(incoming, shutdown),
        );
        return Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?);
    }
    let server = swarm(1, Some(port), stop).await?;
    let incoming = p2p::io::incoming(&server)?;
    tokio::spawn(
        Server::builder()
            .add_service(Sink)
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    let client = swarm(2, None, stop).await?;
    let target: std::net::SocketAddr = addr.parse()?;
    // TCP first, then QUIC: pick the one this path measures.
    let [tcp, quic] = <[_; 2]>::try_from(p2p::multiaddrs(target))
        .map_err(|_| anyhow::anyhow!("expected a TCP and a QUIC address"))?;
    let dial = if path == Path::P2pTcp { tcp } else { quic };
    let peer = client.dial(&addr, vec![dial]).await?;
    client.learn(&addr, peer);
    if client.is_relayed(&peer) {
        bail!("a loopback connection came up relayed");
    }
    Ok(p2p::io::channel(&client, peer, &addr).await?)
}

/// One run: `total` bytes in calls of `chunk`; its figures as JSON.
async fn push(channel: &Channel, tensor: &[u8], total: u64) -> anyhow::Result<Value> {
    let calls = total.div_ceil(tensor.len() as u64).max(1);
    let cpu0 = cpu_seconds()?;
    let t0 = Instant::now();
    for _ in 0..calls {
        let reply = raw::unary(channel.clone(), METHOD, tensor.to_vec()).await?;
        let got = <[u8; 8]>::try_from(reply.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| anyhow::anyhow!("a reply of {} bytes", reply.len()))?;
        if got != tensor.len() as u64 {
            bail!("the sink got {got} bytes of {}", tensor.len());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;
    let bytes = calls * tensor.len() as u64;
    let gb = bytes as f64 / 1e9;
    Ok(json!({
        "bytes": bytes,
        "calls": calls,
        "secs": secs,
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / gb,
        "gbit_s": gb * 8.0 / secs,
        "ms_per_call": secs * 1000.0 / calls as f64,
    }))
}

/// Every path, `reps` runs each after one warm-up call; one JSON report per run.
pub async fn run(options: Options) -> anyhow::Result<Vec<Value>> {
    // A tensor of f32 values, as an activation is sent (little-endian).
    let tensor: Vec<u8> = (0..options.chunk / 4)
        .flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes())
        .collect();
    let mut reports = Vec::new();
    for path in Path::ALL {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let channel = tokio::time::timeout(Duration::from_secs(30), connect(path, &stopped))
            .await
            .with_context(|| format!("{path:?}: connecting timed out"))??;
        push(&channel, &tensor, 1).await?;
        for rep in 0..options.reps {
            let mut r = push(&channel, &tensor, options.total).await?;
            r["path"] = json!(format!("{path:?}"));
            r["rep"] = json!(rep);
            r["chunk"] = json!(tensor.len());
            reports.push(r);
        }
        drop(channel);
        let _ = stop.send(true);
        // The swarms and servers wind down before the next path is measured.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(reports)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The Markdown table of `reports`: medians per path, CPU per GB also as a ratio to plain
/// gRPC (the anchor, measured in the same run).
pub fn table(reports: &[Value]) -> String {
    let of = |path: Path, key: &str| -> f64 {
        median(
            reports
                .iter()
                .filter(|r| r["path"] == format!("{path:?}"))
                .filter_map(|r| r[key].as_f64())
                .collect(),
        )
    };
    let anchor = of(Path::GrpcTcp, "cpu_s_per_gb");
    let mut out = vec![
        "| path | CPU s/GB (both ends) | x plain gRPC | Gbit/s | ms per call |".to_string(),
        "|---|---|---|---|---|".to_string(),
    ];
    for path in Path::ALL {
        let cpu = of(path, "cpu_s_per_gb");
        out.push(format!(
            "| {} | {cpu:.2} | {:.2} | {:.2} | {:.2} |",
            path.label(),
            cpu / anchor,
            of(path, "gbit_s"),
            of(path, "ms_per_call"),
        ));
    }
    out.join("\n")
}
