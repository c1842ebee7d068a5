//! rust-libp2p on the NAT lab (issue 21 item 1): `relay` runs a public node with relay v2
//! (no byte or time cap on a circuit, so a 64 MiB relayed transfer is measurable), identify
//! and an AutoNAT server; `server` and `client` are peers with TCP and QUIC, the relay client,
//! DCUtR, identify, AutoNAT and a raw stream protocol (libp2p-stream) carrying the bench
//! protocol (`common.rs`). The server listens through the relay (a reservation); the client
//! dials it (its relayed address, and its own addresses), waits for DCUtR to upgrade to a
//! direct connection, closes the relayed one and times a download. One JSON line out.

#[path = "../../common/common.rs"]
mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, identify, noise, ping, relay, tcp,
    yamux,
};
use tokio_util::compat::FuturesAsyncReadCompatExt;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/neuroshard/p2p-bench/1");
const RELAY_PORT: u16 = 4001;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The relay, on `ip`; writes `dir/relay.addr` (its QUIC multiaddr with its peer id).
    Relay {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        dir: PathBuf,
    },
    /// A peer reachable through the relay; writes `dir/<name>.addr` once reserved.
    Server {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// Dials `dir/<name>.addr`, waits up to `wait_direct` s for DCUtR, downloads.
    Client {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 10.0)]
        wait_direct: f64,
        /// No DCUtR and only the relayed address: every byte goes through the relay.
        #[arg(long)]
        relay_only: bool,
        #[arg(long, default_value_t = 20.0)]
        connect_timeout: f64,
    },
}

#[derive(NetworkBehaviour)]
struct RelayNode {
    relay: relay::Behaviour,
    ping: ping::Behaviour,
    identify: identify::Behaviour,
    autonat: autonat::Behaviour,
}

#[derive(NetworkBehaviour)]
struct Peer {
    relay_client: relay::client::Behaviour,
    ping: ping::Behaviour,
    identify: identify::Behaviour,
    dcutr: Toggle<dcutr::Behaviour>,
    autonat: autonat::Behaviour,
    stream: libp2p_stream::Behaviour,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().cmd {
        Cmd::Relay { ip, dir } => run_relay(ip, &dir).await,
        Cmd::Server { dir, name } => server(&dir, &name).await,
        Cmd::Client {
            dir,
            name,
            bytes,
            wait_direct,
            relay_only,
            connect_timeout,
        } => {
            let deadline = Duration::from_secs_f64(connect_timeout);
            client(&dir, &name, bytes, wait_direct, relay_only, deadline).await
        }
    };
    if let Err(e) = result {
        println!(
            "{}",
            serde_json::json!({"stack": "libp2p", "error": format!("{e:#}")})
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

/// A secp256k1 identity, the wallet's key type: a node's peer id can be its wallet key, so
/// the transport's handshake proves the wallet address (docs/p2p.md).
fn identity() -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::generate_secp256k1()
}

fn identify_config(key: &libp2p::identity::Keypair) -> identify::Config {
    identify::Config::new("/neuroshard-bench/1".into(), key.public())
}

fn autonat_config() -> autonat::Config {
    // The lab's public network is private address space.
    autonat::Config {
        only_global_ips: false,
        ..Default::default()
    }
}

async fn run_relay(ip: IpAddr, dir: &Path) -> anyhow::Result<()> {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            RelayNode {
                relay: relay::Behaviour::new(
                    id,
                    relay::Config {
                        max_circuit_bytes: 0,
                        max_circuit_duration: Duration::from_secs(3600),
                        ..Default::default()
                    },
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                identify: identify::Behaviour::new(identify_config(key)),
                autonat: autonat::Behaviour::new(id, autonat_config()),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    let quic: Multiaddr = format!("/ip4/{ip}/udp/{RELAY_PORT}/quic-v1").parse()?;
    let tcp: Multiaddr = format!("/ip4/{ip}/tcp/{RELAY_PORT}").parse()?;
    swarm.listen_on(quic.clone())?;
    swarm.listen_on(tcp.clone())?;
    // Its reservations hand out its confirmed addresses: these are public by construction.
    swarm.add_external_address(quic.clone());
    swarm.add_external_address(tcp);
    let me = *swarm.local_peer_id();
    let mut listening = 0;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => {
                eprintln!("relay listening on {address}");
                listening += 1;
                if listening == 2 {
                    let addr = quic.clone().with(Protocol::P2p(me));
                    write_atomic(&dir.join("relay.addr"), addr.to_string().as_bytes())?;
                }
            }
            SwarmEvent::Behaviour(RelayNodeEvent::Relay(e)) => eprintln!("relay: {e:?}"),
            _ => {}
        }
    }
}

/// A peer, listening on every interface (QUIC and TCP), connected to the relay and told its
/// observed address (identify both ways done).
async fn peer(dir: &Path, hole_punch: bool) -> anyhow::Result<(Swarm<Peer>, Multiaddr)> {
    let relay_addr: Multiaddr = std::fs::read_to_string(dir.join("relay.addr"))
        .context("reading relay.addr")?
        .trim()
        .parse()?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let id = key.public().to_peer_id();
            Peer {
                relay_client,
                ping: ping::Behaviour::new(ping::Config::new()),
                identify: identify::Behaviour::new(identify_config(key)),
                dcutr: Toggle::from(hole_punch.then(|| dcutr::Behaviour::new(id))),
                autonat: autonat::Behaviour::new(id, autonat_config()),
                stream: libp2p_stream::Behaviour::new(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm.listen_on("/ip4/0.0.0.0/udp/0/quic-v1".parse()?)?;
    swarm.listen_on("/ip4/0.0.0.0/tcp/0".parse()?)?;
    let mut listening = 0;
    while listening < 2 {
        if let SwarmEvent::NewListenAddr { .. } = swarm.select_next_some().await {
            listening += 1;
        }
    }
    swarm.dial(relay_addr.clone())?;
    let (mut learned, mut told) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(learned && told) {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("the relay did not answer in 20 s")?;
        match event {
            SwarmEvent::Behaviour(PeerEvent::Identify(identify::Event::Sent { .. })) => told = true,
            SwarmEvent::Behaviour(PeerEvent::Identify(identify::Event::Received {
                info, ..
            })) => {
                eprintln!("observed as {}", info.observed_addr);
                learned = true
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                bail!("dialing the relay: {error}")
            }
            _ => {}
        }
    }
    Ok((swarm, relay_addr))
}

async fn server(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (mut swarm, relay_addr) = peer(dir, true).await?;
    let me = *swarm.local_peer_id();
    swarm.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("no reservation on the relay in 20 s")?;
        if let SwarmEvent::Behaviour(PeerEvent::RelayClient(
            relay::client::Event::ReservationReqAccepted { .. },
        )) = event
        {
            break;
        }
    }
    let mut text = format!(
        "{me}\nrelay {}\n",
        relay_addr
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(me))
    );
    for a in swarm.listeners() {
        let loopback = a
            .iter()
            .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback()));
        if !loopback && !a.iter().any(|p| p == Protocol::P2pCircuit) {
            text += &format!("ip {a}\n");
        }
    }
    let mut incoming = swarm
        .behaviour()
        .stream
        .new_control()
        .accept(PROTOCOL)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            tokio::spawn(async move {
                let (r, w) = tokio::io::split(stream.compat());
                if let Err(e) = common::serve(r, w).await {
                    eprintln!("request: {e:#}");
                }
            });
        }
    });
    write_atomic(&dir.join(format!("{name}.addr")), text.as_bytes())?;
    eprintln!("server {me} reserved");
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(PeerEvent::Dcutr(e)) => eprintln!("dcutr: {e:?}"),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => eprintln!("connected {peer_id} at {}", endpoint.get_remote_address()),
            _ => {}
        }
    }
}

/// What the client's swarm task saw of the server.
#[derive(Default)]
struct Seen {
    connected_at: Option<Duration>,
    direct_at: Option<Duration>,
    /// The transport of the first direct connection ("quic" or "tcp").
    direct_transport: Option<&'static str>,
    /// Open connections to the server: relayed or not.
    open: HashMap<ConnectionId, bool>,
    dial_error: Option<String>,
}

async fn client(
    dir: &Path,
    name: &str,
    bytes: u64,
    wait_direct: f64,
    relay_only: bool,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.addr")))?;
    let mut lines = text.lines();
    let server: PeerId = lines.next().context("empty address file")?.parse()?;
    let mut addrs = Vec::new();
    for l in lines {
        match l.split_once(' ') {
            Some(("relay", a)) => addrs.push(a.parse::<Multiaddr>()?),
            Some(("ip", a)) if !relay_only => addrs.push(a.parse()?),
            Some(("ip", _)) => {}
            _ => bail!("bad line {l:?}"),
        }
    }
    let (mut swarm, _) = peer(dir, !relay_only).await?;
    let control = swarm.behaviour().stream.new_control();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let start = Instant::now();
    swarm.dial(DialOpts::peer_id(server).addresses(addrs).build())?;
    let task_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let event = swarm.select_next_some().await;
            let mut s = task_seen.lock().expect("the lock");
            match event {
                SwarmEvent::ConnectionEstablished {
                    peer_id,
                    connection_id,
                    endpoint,
                    ..
                } if peer_id == server => {
                    let relayed = endpoint.is_relayed();
                    s.connected_at.get_or_insert(start.elapsed());
                    if !relayed {
                        s.direct_at.get_or_insert(start.elapsed());
                        let quic = endpoint
                            .get_remote_address()
                            .iter()
                            .any(|p| p == Protocol::QuicV1);
                        s.direct_transport
                            .get_or_insert(if quic { "quic" } else { "tcp" });
                    }
                    s.open.insert(connection_id, relayed);
                    if s.open.values().any(|r| !r) {
                        // A direct connection: the relayed ones go (streams pick a connection
                        // at random).
                        let relayed: Vec<_> = s
                            .open
                            .iter()
                            .filter(|(_, r)| **r)
                            .map(|(c, _)| *c)
                            .collect();
                        for c in relayed {
                            swarm.close_connection(c);
                        }
                    }
                }
                SwarmEvent::ConnectionClosed { connection_id, .. } => {
                    s.open.remove(&connection_id);
                }
                SwarmEvent::OutgoingConnectionError {
                    peer_id: Some(p),
                    error,
                    ..
                } if p == server && s.connected_at.is_none() => {
                    s.dial_error = Some(error.to_string());
                }
                SwarmEvent::Behaviour(PeerEvent::Dcutr(e)) => eprintln!("dcutr: {e:?}"),
                _ => {}
            }
        }
    });
    let deadline = Instant::now() + connect_timeout;
    let connected = loop {
        {
            let s = seen.lock().expect("the lock");
            if let Some(t) = s.connected_at {
                break t;
            }
            if let Some(e) = &s.dial_error {
                bail!("connecting: {e}");
            }
        }
        if Instant::now() > deadline {
            bail!("no connection within {connect_timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let open = || {
        let mut control = control.clone();
        async move {
            let s = control
                .open_stream(server, PROTOCOL)
                .await
                .map_err(|e| anyhow::anyhow!("opening a stream: {e}"))?;
            Ok::<_, anyhow::Error>(tokio::io::split(s.compat()))
        }
    };
    {
        let (mut r, mut w) = open().await?;
        common::request(&mut w, common::OP_PING, 0).await?;
        tokio::io::AsyncReadExt::read_u8(&mut r).await?;
    }
    let first_rtt = start.elapsed();
    let direct_now = |seen: &Mutex<Seen>| {
        let s = seen.lock().expect("the lock");
        !s.open.is_empty() && s.open.values().all(|r| !r)
    };
    let until = Instant::now() + Duration::from_secs_f64(wait_direct);
    while Instant::now() < until && !direct_now(&seen) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = common::measure(open, bytes).await?;
    let path = if direct_now(&seen) { "direct" } else { "relay" };
    let (direct_at, direct_transport) = {
        let s = seen.lock().expect("the lock");
        (s.direct_at, s.direct_transport)
    };
    let mut out = serde_json::json!({
        "stack": "libp2p",
        "connect_ms": common::ms(connected),
        "first_rtt_ms": common::ms(first_rtt),
        "direct_ms": direct_at.map(common::ms),
        "path": path,
        "direct_transport": direct_transport,
        "relay_only": relay_only,
    });
    out["transfer"] = t.json();
    println!("{out}");
    Ok(())
}
