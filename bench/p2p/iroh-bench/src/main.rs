//! iroh on the NAT lab (issue 21 item 1): `relay` runs an iroh-relay server (relay over HTTPS
//! and QUIC address discovery, a self-signed certificate the clients trust) on a public
//! address; `server` binds an endpoint that uses only that relay and serves the bench protocol
//! (`common.rs`); `client` dials the server by its endpoint id and relay URL, waits for hole
//! punching, times a download and prints one JSON line. `h2-server` / `h2-client` are the
//! baseline: one HTTP/2 stream over plain TCP, what our gRPC uses today.

#[path = "../../common/common.rs"]
mod common;
mod h2bench;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMap, RelayMode, RelayUrl, TransportAddr};

const ALPN: &[u8] = b"neuroshard/p2p-bench/1";
const RELAY_HTTP_PORT: u16 = 3340;
const RELAY_HTTPS_PORT: u16 = 3341;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The relay, on `ip`; writes `dir/relay.der` (its certificate) and `dir/relay.url`.
    Relay {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        dir: PathBuf,
    },
    /// A server endpoint using the relay in `dir`; writes `dir/<name>.addr` once online.
    Server {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// Dials `dir/<name>.addr`, waits up to `wait_direct` s for a direct path, downloads.
    Client {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 10.0)]
        wait_direct: f64,
        /// No IP transport on the client: every byte goes through the relay.
        #[arg(long)]
        relay_only: bool,
        /// Gives up (an error, exit 1) when connecting takes longer.
        #[arg(long, default_value_t = 20.0)]
        connect_timeout: f64,
    },
    H2Server {
        #[arg(long)]
        listen: SocketAddr,
    },
    H2Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Relay { ip, dir } => relay(ip, &dir).await,
        Cmd::Server { dir, name } => server(&dir, &name).await,
        Cmd::Client {
            dir,
            name,
            bytes,
            wait_direct,
            relay_only,
            connect_timeout,
        } => client(&dir, &name, bytes, wait_direct, relay_only, connect_timeout).await,
        Cmd::H2Server { listen } => h2bench::server(listen).await,
        Cmd::H2Client { connect, bytes } => h2bench::client(connect, bytes).await,
    };
    if let Err(e) = result {
        println!(
            "{}",
            serde_json::json!({"stack": "iroh", "error": format!("{e:#}")})
        );
        std::process::exit(1);
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn relay(ip: IpAddr, dir: &Path) -> anyhow::Result<()> {
    use iroh_relay::server::{
        CertConfig, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig,
    };
    let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()])?;
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::from(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    // The provider iroh-relay's own test relays use (iroh is built with ring).
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    let mut relay = RelayConfig::new(SocketAddr::new(ip, RELAY_HTTP_PORT));
    relay.tls = Some(TlsConfig::new(
        SocketAddr::new(ip, RELAY_HTTPS_PORT),
        CertConfig::Manual {
            server_config: tls.clone(),
        },
    ));
    relay.key_cache_capacity = Some(1024);
    let mut config = ServerConfig::default();
    config.relay = Some(relay);
    let mut quic = QuicConfig::new(SocketAddr::new(
        ip,
        iroh_relay::defaults::DEFAULT_RELAY_QUIC_PORT,
    ));
    quic.server_config = Some(tls);
    config.quic = Some(quic);
    let server = Server::spawn(config).await.context("starting the relay")?;
    write_atomic(&dir.join("relay.der"), der.as_ref())?;
    write_atomic(
        &dir.join("relay.url"),
        format!("https://{}/", SocketAddr::new(ip, RELAY_HTTPS_PORT)).as_bytes(),
    )?;
    eprintln!("relay up on {ip}");
    tokio::signal::ctrl_c().await.ok();
    server.shutdown().await.ok();
    Ok(())
}

/// An endpoint that knows only the lab's relay.
async fn endpoint(dir: &Path, relay_only: bool) -> anyhow::Result<(Endpoint, RelayUrl)> {
    let der = std::fs::read(dir.join("relay.der")).context("reading relay.der")?;
    let url: RelayUrl = std::fs::read_to_string(dir.join("relay.url"))
        .context("reading relay.url")?
        .trim()
        .parse()?;
    let mut builder = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Custom(RelayMap::from(url.clone())))
        .ca_tls_config(iroh::tls::CaTlsConfig::custom_roots([der.into()]))
        .portmapper_config(PortmapperConfig::Disabled)
        .alpns(vec![ALPN.to_vec()]);
    if relay_only {
        builder = builder.clear_ip_transports();
    }
    let ep = builder.bind().await.context("binding the endpoint")?;
    Ok((ep, url))
}

async fn server(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (ep, url) = endpoint(dir, false).await?;
    tokio::time::timeout(Duration::from_secs(20), ep.online())
        .await
        .context("the relay did not answer in 20 s")?;
    let addr = ep.addr();
    let mut text = format!("{}\nrelay {url}\n", ep.id());
    for ip in addr.ip_addrs() {
        text += &format!("ip {ip}\n");
    }
    write_atomic(&dir.join(format!("{name}.addr")), text.as_bytes())?;
    eprintln!("server {} online: {addr:?}", ep.id());
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let conn = match incoming.accept() {
                Ok(a) => match a.await {
                    Ok(c) => c,
                    Err(e) => return eprintln!("handshake: {e:#}"),
                },
                Err(e) => return eprintln!("incoming: {e:#}"),
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if let Err(e) = common::serve(recv, send).await {
                        eprintln!("request: {e:#}");
                    }
                });
            }
        });
    }
    Ok(())
}

fn read_addr(path: &Path) -> anyhow::Result<EndpointAddr> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let mut lines = text.lines();
    let id: EndpointId = lines.next().context("empty address file")?.parse()?;
    let mut addrs = Vec::new();
    for l in lines {
        match l.split_once(' ') {
            Some(("relay", u)) => addrs.push(TransportAddr::Relay(u.parse()?)),
            Some(("ip", a)) => addrs.push(TransportAddr::Ip(a.parse()?)),
            _ => bail!("bad line {l:?} in {path:?}"),
        }
    }
    Ok(EndpointAddr::from_parts(id, addrs))
}

async fn client(
    dir: &Path,
    name: &str,
    bytes: u64,
    wait_direct: f64,
    relay_only: bool,
    connect_timeout: f64,
) -> anyhow::Result<()> {
    let remote = read_addr(&dir.join(format!("{name}.addr")))?;
    let (ep, _) = endpoint(dir, relay_only).await?;
    // Connected to its relay first, as the libp2p client is (and a long-running node is):
    // the clock times the connection to the peer only.
    tokio::time::timeout(Duration::from_secs_f64(connect_timeout), ep.online())
        .await
        .map_err(|_| anyhow::anyhow!("the relay did not answer within {connect_timeout} s"))?;
    let start = Instant::now();
    let conn = tokio::time::timeout(
        Duration::from_secs_f64(connect_timeout),
        ep.connect(remote, ALPN),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no connection within {connect_timeout} s"))?
    .context("connecting")?;
    let connected = start.elapsed();
    // A round trip on a stream: the connection is usable end to end.
    {
        let (mut send, mut recv) = conn.open_bi().await?;
        common::request(&mut send, common::OP_PING, 0).await?;
        tokio::io::AsyncReadExt::read_u8(&mut recv).await?;
    }
    let first_rtt = start.elapsed();
    let direct = |conn: &iroh::endpoint::Connection| {
        conn.paths().iter().any(|p| p.is_selected() && p.is_ip())
    };
    let mut direct_at = None;
    let deadline = Instant::now() + Duration::from_secs_f64(wait_direct);
    while Instant::now() < deadline {
        if direct(&conn) {
            direct_at = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let open = || async {
        let (s, r) = conn.open_bi().await?;
        Ok::<_, anyhow::Error>((r, s))
    };
    let t = common::measure(open, bytes).await?;
    let path = if direct(&conn) { "direct" } else { "relay" };
    let mut out = serde_json::json!({
        "stack": "iroh",
        "connect_ms": common::ms(connected),
        "first_rtt_ms": common::ms(first_rtt),
        "direct_ms": direct_at.map(common::ms),
        "path": path,
        "relay_only": relay_only,
    });
    out["transfer"] = t.json();
    println!("{out}");
    conn.close(0u32.into(), b"done");
    ep.close().await;
    Ok(())
}
