//! `peer.proto` over the swarm's streams, tonic unchanged: one HTTP/2 connection per
//! `/neuroshard/peer/1` stream. The client side is a tonic [`Channel`] whose connector opens
//! a stream to one peer id ([`channel`]); the server side is the stream of accepted streams
//! ([`incoming`]) that `serve_with_incoming` takes. A stream runs on whichever connection to
//! the peer is open, so a call to a node behind a NAT reuses the connection it opened to us.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use libp2p::PeerId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

use super::Transport;
use crate::{CONNECT_TIMEOUT, NetworkError};

/// Who is at the other end of an accepted stream: the peer id its connection's transport
/// handshake proved, and the address the connection comes from (None when relayed). The
/// guard layer copies the address into the request as a [`TcpConnectInfo`], so handlers read
/// it with `remote_addr()`; the handshake reads the peer id.
#[derive(Debug, Clone)]
pub struct PeerConnectInfo {
    pub peer: PeerId,
    pub remote: Option<SocketAddr>,
}

impl PeerConnectInfo {
    /// The address as tonic's handlers read it.
    pub fn tcp(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: None,
            remote_addr: self.remote,
        }
    }
}

/// A `/neuroshard/peer/1` stream, accepted (as tonic's server sees it) or opened (under a
/// client channel), its bytes counted in [`crate::PeerState::stream_bytes`] by the path the
/// peer was on when it opened.
pub struct PeerStream {
    io: Compat<libp2p::Stream>,
    info: PeerConnectInfo,
    state: Arc<crate::PeerState>,
    relayed: bool,
}

impl PeerStream {
    fn new(transport: &Transport, peer: PeerId, stream: libp2p::Stream) -> PeerStream {
        PeerStream {
            io: stream.compat(),
            info: PeerConnectInfo {
                peer,
                remote: transport.remote_of(&peer),
            },
            state: transport.book.state.clone(),
            relayed: transport.is_relayed(&peer),
        }
    }

    fn count(&self, sent: bool, n: usize) {
        let (tx, rx) = self.state.stream_bytes.of(self.relayed);
        let c = if sent { tx } else { rx };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerConnectInfo;

    fn connect_info(&self) -> PeerConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.count(false, buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count(true, n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The `/neuroshard/peer/1` streams peers open to this node, for `serve_with_incoming`.
pub fn incoming(
    transport: &Transport,
) -> Result<impl futures::Stream<Item = Result<PeerStream, Infallible>> + use<>, NetworkError> {
    let streams = transport.accept()?;
    let transport = transport.clone();
    Ok(streams.map(move |(peer, stream)| Ok(PeerStream::new(&transport, peer, stream))))
}

/// Opens streams to one peer for a tonic channel.
#[derive(Clone)]
struct Connector {
    transport: Transport,
    peer: PeerId,
    /// Where the peer was dialed (`host:port` or a circuit address).
    addr: String,
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<PeerStream>, NetworkError>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<PeerStream>;
    type Error = NetworkError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), NetworkError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Connecting {
        let (transport, peer, addr) = (self.transport.clone(), self.peer, self.addr.clone());
        Box::pin(async move {
            if !transport.is_connected(&peer) {
                redial(&transport, peer, &addr).await?;
            }
            let stream = transport.open_stream(peer).await?;
            Ok(TokioIo::new(PeerStream::new(&transport, peer, stream)))
        })
    }
}

/// The peer's connection is gone (its channel is reconnecting): dials it again where it was
/// dialed, TCP first. A peer that is down fails the call at once: the refused TCP dial ends
/// it (a dial by peer id would try every address the swarm knows, QUIC ones and
/// unreachable interfaces included, and fail only when the slowest timed out). A peer not
/// reached there (a stalled host, one only a relay reaches now) is left to the stream's own
/// dial of every address the swarm knows, within the channel's connect timeout.
async fn redial(transport: &Transport, peer: PeerId, addr: &str) -> Result<(), NetworkError> {
    match transport.resolve(addr).await {
        Ok(p) if p == peer => Ok(()),
        Ok(other) => Err(NetworkError::Handshake {
            addr: addr.into(),
            reason: format!("{other} answers there now, not {peer}"),
        }),
        Err(e @ NetworkError::PeerDown { .. }) => Err(e),
        Err(e) => {
            tracing::debug!(%peer, %addr, error = %e, "redial failed: dialing the peer at every known address");
            Ok(())
        }
    }
}

/// A tonic channel to `peer` (dialed as `addr`, named in errors): its HTTP/2 connection runs
/// on a `/neuroshard/peer/1` stream, reopened on the peer's open connection when it breaks.
pub async fn channel(
    transport: &Transport,
    peer: PeerId,
    addr: &str,
) -> Result<Channel, NetworkError> {
    let endpoint = Endpoint::from_shared(format!("http://{peer}"))
        .map_err(|_| NetworkError::BadAddress { addr: addr.into() })?
        .connect_timeout(CONNECT_TIMEOUT);
    endpoint
        .connect_with_connector(Connector {
            transport: transport.clone(),
            peer,
            addr: addr.into(),
        })
        .await
        .map_err(|source| NetworkError::Connect {
            addr: addr.into(),
            source,
        })
}
