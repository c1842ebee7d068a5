//! The one task that drives the swarm: it owns the `Swarm`, answers [`Command`]s from the
//! [`Transport`] handles, and keeps the [`Book`] of open connections current. Nothing else
//! touches the swarm; streams go through libp2p-stream's `Control`, which needs no task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::Transport as _;
use libp2p::kad::store::MemoryStore;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, kad, multiaddr::Protocol, noise,
    relay, tcp, yamux,
};
use neuroshard_identity::Wallet;
use tokio::sync::{mpsc, oneshot, watch};

pub use super::admit::Admission;
use super::admit::Admit;
use super::gossip::{self as gossip_topics, INBOUND_QUEUE, Inbound};
use super::kad::Discovery;
use super::relay::{self as paths, Paths};
use super::{AGENT_PROTOCOL, Book, Command, DialFailure, Transport, keypair};
use crate::NetworkError;

/// A connection with no stream open for this long is closed (a peer's channel keeps its
/// stream open, so connections in use never idle out).
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    admit: Admit,
    identify: identify::Behaviour,
    stream: libp2p_stream::Behaviour,
    // Reachability, relays and hole punching (`relay.rs`).
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay: relay::Behaviour,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: dcutr::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    gossip: gossipsub::Behaviour,
}

/// A dial in flight: the addresses left to try and who waits for the peer id.
struct Dial {
    rest: Vec<Multiaddr>,
    reply: oneshot::Sender<Result<PeerId, DialFailure>>,
}

/// Starts the swarm keyed by `wallet`, listening on TCP and QUIC port `port` of every
/// interface (None: listens nowhere, dials only), and spawns its task, which runs until
/// `shutdown` turns true. Must be called inside a tokio runtime.
pub async fn start(
    wallet: &Wallet,
    port: Option<u16>,
    admission: Admission,
    options: paths::Options,
    shutdown: watch::Receiver<bool>,
) -> Result<Transport, NetworkError> {
    let state = admission.state.clone();
    let failed = |what: &str, e: String| NetworkError::Transport(format!("{what}: {e}"));
    // QUIC (TLS 1.3 with the peer id's key) and TCP + noise + yamux, both with a deadline
    // on the transport handshake: a connection that never finishes it holds a descriptor
    // (and its admission slot) no longer than that.
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair(wallet)?)
        .with_tokio()
        .with_quic_config(|mut c| {
            c.handshake_timeout = crate::PREFACE_TIMEOUT;
            c
        })
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .timeout(crate::PREFACE_TIMEOUT),
                )
            },
        )
        .map_err(|e| failed("tcp", e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| failed("relay client", e.to_string()))?
        .with_behaviour(
            |key, relay_client| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let me = key.public().to_peer_id();
                Ok(Behaviour {
                    admit: Admit::new(admission),
                    identify: identify::Behaviour::new(
                        identify::Config::new(AGENT_PROTOCOL.into(), key.public())
                            // Peers learn a new circuit address when a reservation is accepted.
                            .with_push_listen_addr_updates(true),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                    autonat: paths::autonat(me),
                    relay: paths::server(me, &options.limits),
                    relay_client,
                    dcutr: paths::dcutr(me),
                    kad: super::kad::behaviour(me, port.is_some()),
                    gossip: gossip_topics::behaviour(key)?,
                })
            },
        )
        .map_err(|e| failed("behaviour", e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    if let Some(port) = port {
        for addr in [
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
            format!("/ip4/0.0.0.0/tcp/{port}"),
        ] {
            let addr: Multiaddr = addr.parse().map_err(|e| failed(&addr, format!("{e}")))?;
            swarm
                .listen_on(addr.clone())
                .map_err(|e| failed(&format!("listening on {addr}"), e.to_string()))?;
        }
        wait_listening(&mut swarm, port).await?;
    }
    let paths = Paths::start(&mut swarm, &options);
    let (commands, rx) = mpsc::unbounded_channel();
    let book = Arc::new(Book {
        state: state.clone(),
        ..Book::default()
    });
    let (gossip_tx, gossip_rx) = mpsc::channel(INBOUND_QUEUE);
    let transport = Transport {
        peer_id: *swarm.local_peer_id(),
        control: swarm.behaviour().stream.new_control(),
        commands,
        book: book.clone(),
        gossip_in: Arc::new(parking_lot::Mutex::new(Some(gossip_rx))),
    };
    tokio::spawn(run(swarm, paths, rx, book, state, gossip_tx, shutdown));
    Ok(transport)
}

/// Waits until both listeners are up, or fails with the error of the one that is not (the
/// port taken): a node must not run with a peer port it does not hold.
async fn wait_listening(swarm: &mut Swarm<Behaviour>, port: u16) -> Result<(), NetworkError> {
    let mut up = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while up < 2 {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NetworkError::Transport(format!("peer port {port}: no listener")))?;
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "peer port listening");
                up += 1;
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NetworkError::Transport(format!(
                    "peer port {port}: {error}"
                )));
            }
            SwarmEvent::ListenerClosed { reason, .. } => {
                let reason = match reason {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(NetworkError::Transport(format!(
                    "peer port {port}: {reason}"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

async fn run(
    mut swarm: Swarm<Behaviour>,
    mut paths: Paths,
    mut commands: mpsc::UnboundedReceiver<Command>,
    book: Arc<Book>,
    state: Arc<crate::state::PeerState>,
    gossip_in: mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut dials: HashMap<ConnectionId, Dial> = HashMap::new();
    let mut discovery = Discovery::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Open connections per peer: the book forgets a peer when its last one closes.
    let mut open: HashMap<PeerId, usize> = HashMap::new();
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            command = commands.recv() => match command {
                Some(Command::Dial { addrs, reply }) => {
                    dial(&mut swarm, &mut dials, Dial { rest: addrs, reply });
                }
                Some(Command::Disconnect(peer)) => {
                    let _ = swarm.disconnect_peer_id(peer);
                }
                Some(other) => overlay_command(&mut swarm, &mut discovery, other),
                // Every handle is gone: nobody can use the swarm any more.
                None => return,
            },
            _ = tick.tick() => discovery.tick(&mut swarm.behaviour_mut().kad, std::time::Instant::now()),
            event = swarm.select_next_some() => {
            paths.on_event(&mut swarm, &book, &event);
            match event {
                SwarmEvent::Behaviour(event) => {
                    overlay_event(&mut swarm, &mut discovery, &book, &gossip_in, event);
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    if endpoint.is_dialer() {
                        // The address this node dialed is one the peer listens on.
                        let addr = endpoint.get_remote_address().clone();
                        swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                    *open.entry(peer_id).or_default() += 1;
                    book.remote
                        .write()
                        .insert(peer_id, endpoint.get_remote_address().clone());
                    tracing::debug!(%peer_id, remote = %endpoint.get_remote_address(), "peer connection up");
                    if let Some(d) = dials.remove(&connection_id) {
                        let _ = d.reply.send(Ok(peer_id));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, .. } => {
                    let n = open.entry(peer_id).or_default();
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        open.remove(&peer_id);
                        book.remote.write().remove(&peer_id);
                        book.listen.write().remove(&peer_id);
                    }
                }
                // Garbage, a failed noise/TLS handshake or one never finished in time.
                // (A connection the caps refused was counted as such.)
                SwarmEvent::IncomingConnectionError { error, send_back_addr, .. }
                    if !matches!(error, ListenError::Denied { .. }) =>
                {
                    tracing::debug!(%error, from = %send_back_addr, "peer port: connection refused in its handshake");
                    state.handshake_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(d) = dials.remove(&connection_id) {
                        if let DialError::LocalPeerId { .. } = error {
                            let _ = d.reply.send(Err(DialFailure::Itself));
                        } else if refused(&error) {
                            // Nothing listens there: its QUIC port is as closed as its TCP
                            // one, and a QUIC dial would only wait out its handshake timeout.
                            let _ = d.reply.send(Err(DialFailure::Refused(error.to_string())));
                        } else if d.rest.is_empty() {
                            let _ = d.reply.send(Err(DialFailure::Failed(error.to_string())));
                        } else {
                            tracing::debug!(%error, "dial failed, trying the next address");
                            dial(&mut swarm, &mut dials, d);
                        }
                    }
                }
                _ => {}
            }},
        }
    }
}

/// Whether a dial failed because its TCP connection was refused or its host is unreachable:
/// the address's host answered that nothing listens there (or the network said there is no
/// way to it). Every node listens on TCP and QUIC at one port, so the node is not there.
/// The `io::ErrorKind` is buried under the transport stack's `Either` layers, whose
/// `source()` skips a level, so it is read from the error's debug form (std's `Os { kind }`).
fn refused(error: &DialError) -> bool {
    let DialError::Transport(errors) = error else {
        return false;
    };
    !errors.is_empty()
        && errors.iter().all(|(addr, e)| {
            let tcp = addr.iter().any(|p| matches!(p, Protocol::Tcp(_)));
            let text = format!("{e:?}");
            tcp && ["ConnectionRefused", "HostUnreachable", "NetworkUnreachable"]
                .iter()
                .any(|k| text.contains(k))
        })
}

/// Dials the first of `d.rest` (removing it), or answers the error when none is left.
fn dial(swarm: &mut Swarm<Behaviour>, dials: &mut HashMap<ConnectionId, Dial>, mut d: Dial) {
    while let Some(addr) = d.rest.first().cloned() {
        let opts = DialOpts::unknown_peer_id().address(addr).build();
        let id = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                d.rest.remove(0);
                dials.insert(id, d);
                return;
            }
            Err(e) => {
                d.rest.remove(0);
                if d.rest.is_empty() {
                    let _ = d.reply.send(Err(DialFailure::Failed(e.to_string())));
                    return;
                }
            }
        }
    }
    let _ = d
        .reply
        .send(Err(DialFailure::Failed("no address to dial".into())));
}

/// Runs a command of the DHT or of gossip (the overlay on top of the connections).
fn overlay_command(swarm: &mut Swarm<Behaviour>, discovery: &mut Discovery, command: Command) {
    let b = swarm.behaviour_mut();
    match command {
        Command::Kad(c) => discovery.command(&mut b.kad, c),
        Command::Subscribe(name) => {
            let topic = gossip_topics::topic(&name);
            if let Err(e) = b.gossip.subscribe(&topic) {
                tracing::warn!(topic = %name, error = %e, "cannot join a gossip topic");
            }
            if let Err(e) = b
                .gossip
                .set_topic_params(topic, gossip_topics::topic_score_params())
            {
                tracing::warn!(topic = %name, error = %e, "gossip topic scores");
            }
        }
        Command::Publish { topic, data } => {
            match b.gossip.publish(gossip_topics::topic(&topic), data) {
                // Seen already (received, or published by another node): nothing to send.
                Ok(_) | Err(gossipsub::PublishError::Duplicate) => {}
                // No peer on the topic yet: anti-entropy brings it to them later.
                Err(e) => tracing::debug!(%topic, error = %e, "gossip publish"),
            }
        }
        Command::Report { id, from, verdict } => {
            b.gossip
                .report_message_validation_result(&id, &from, verdict.into());
        }
        Command::Dial { .. } | Command::Disconnect(_) => {}
    }
}

/// Handles an event of a behaviour: identify feeds the routing table and the book, the DHT
/// answers lookups (and the holders found are dialed), gossip hands its messages over.
fn overlay_event(
    swarm: &mut Swarm<Behaviour>,
    discovery: &mut Discovery,
    book: &Book,
    gossip_in: &mpsc::Sender<Inbound>,
    event: BehaviourEvent,
) {
    match event {
        BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
            for addr in super::kad::routable(&info.listen_addrs) {
                swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
            book.listen.write().insert(peer_id, info.listen_addrs);
        }
        BehaviourEvent::Kad(event) => {
            let local = *swarm.local_peer_id();
            let dials = discovery.on_event(&mut swarm.behaviour_mut().kad, event, local);
            for opts in dials {
                if let Err(e) = swarm.dial(opts) {
                    tracing::debug!(error = %e, "dialing a holder found in the DHT");
                }
            }
        }
        BehaviourEvent::Gossip(gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        }) => {
            let inbound = Inbound {
                topic: message.topic.into_string(),
                from: propagation_source,
                id: message_id.clone(),
                data: message.data,
            };
            if gossip_in.try_send(inbound).is_err() {
                // Nobody reads, or too much waits: drop it unforwarded, charging nobody.
                swarm
                    .behaviour_mut()
                    .gossip
                    .report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Ignore,
                    );
            }
        }
        _ => {}
    }
}
