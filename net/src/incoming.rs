//! The peer port's accepted connections, before tonic sees them. tonic's server sets no
//! connection limit and waits for a client's HTTP/2 preface for as long as the client likes,
//! so one address could hold every descriptor of the node with connections that send half a
//! preface and then nothing. Here:
//!
//! * **At accept** ([`Incoming`]), a connection beyond the per-address cap or the total cap is
//!   closed at once and counted ([`crate::admission`], the same table as the REST port's;
//!   loopback is exempt from the total cap only). An accept error (out of descriptors) waits
//!   [`ACCEPT_BACKOFF`] instead of spinning.
//! * **Until its handshake** ([`PeerStream`]), a connection must send the 24-byte client
//!   preface and its first SETTINGS frame (9-byte header and the payload it announces) within
//!   [`PREFACE_TIMEOUT`](crate::PREFACE_TIMEOUT): after the deadline, reads fail and the
//!   server drops the connection. Once those bytes are in, the wrapper is a plain
//!   pass-through: an established connection is never timed here (HTTP/2 keep-alive pings
//!   drop dead ones, [`crate::service::serve`]).
//!
//! A [`PeerStream`] holds its connection's admission [`Slot`], so the slot is freed when tonic
//! drops the connection, and it reports the TCP stream's connect info, so the guard layer and
//! the handlers see the caller's address as before.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use super::admission::{self, Caps, Slot, Table};
use super::state::PeerState;

/// After an accept error (out of descriptors), the next accept waits this long.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Refusals in one poll of [`Incoming`] before it yields to other tasks (a flood must not
/// hold the runtime's thread).
const REFUSALS_PER_POLL: usize = 64;

/// The HTTP/2 client preface (RFC 9113, 3.4), followed by the client's SETTINGS frame.
const PREFACE_LEN: usize = 24;
/// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
const FRAME_HEADER_LEN: usize = 9;

/// The peer port's listener as a stream of admitted connections (it never yields an error).
pub struct Incoming {
    listener: TcpListener,
    table: Arc<Mutex<Table>>,
    caps: Caps,
    state: Arc<PeerState>,
    preface_timeout: Duration,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Admits `listener`'s connections under `caps`, counting them in `state.connections`;
    /// each must complete its preface within `preface_timeout`.
    pub fn new(
        listener: TcpListener,
        caps: Caps,
        state: Arc<PeerState>,
        preface_timeout: Duration,
    ) -> Incoming {
        Incoming {
            listener,
            table: Arc::new(Mutex::new(Table::default())),
            caps,
            state,
            preface_timeout,
            backoff: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = Result<PeerStream<TcpStream>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(backoff) = &mut this.backoff {
            ready!(backoff.as_mut().poll(cx));
            this.backoff = None;
        }
        for _ in 0..REFUSALS_PER_POLL {
            let (stream, remote) = match ready!(this.listener.poll_accept(cx)) {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept:
                    // neither ends the server.
                    tracing::debug!(error = %e, "peer port: accept failed");
                    let mut backoff = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF));
                    if backoff.as_mut().poll(cx).is_pending() {
                        this.backoff = Some(backoff);
                        return Poll::Pending;
                    }
                    continue;
                }
            };
            let connections = &this.state.connections;
            // Refused: closed at once (`admit` counted it).
            let Ok(slot) = admission::admit(&this.table, connections, this.caps, remote.ip())
            else {
                drop(stream);
                continue;
            };
            // The builder's tcp_nodelay only reaches sockets tonic accepts itself: set it on
            // ours, or Nagle holds small replies back until the caller's delayed ACK.
            let _ = stream.set_nodelay(true);
            let stream = PeerStream::new(stream, slot, this.state.clone(), this.preface_timeout);
            return Poll::Ready(Some(Ok(stream)));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// How much of the client's opening a connection has sent: the preface and the first frame's
/// header and payload (the length is read from the header as it arrives).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    seen: usize,
    length: [u8; 3],
}

impl Preface {
    /// Counts `bytes`, the next ones read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        let length_at = PREFACE_LEN..PREFACE_LEN + 3;
        let from = self.seen.max(length_at.start);
        let to = (self.seen + bytes.len()).min(length_at.end);
        for i in from..to {
            self.length[i - PREFACE_LEN] = bytes[i - self.seen];
        }
        self.seen = self.seen.saturating_add(bytes.len());
    }

    /// Whether the preface and the whole first frame have been read.
    pub fn complete(&self) -> bool {
        let [a, b, c] = self.length;
        let payload = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
        self.seen >= PREFACE_LEN + 3 && self.seen >= PREFACE_LEN + FRAME_HEADER_LEN + payload
    }
}

/// The connection did not send its HTTP/2 preface and first SETTINGS frame in time.
#[derive(Debug, thiserror::Error)]
#[error("no HTTP/2 preface and SETTINGS frame within {0:?}")]
pub struct PrefaceTimeout(pub Duration);

/// An admitted connection of the peer port: it holds its admission slot, and its reads fail
/// once its preface deadline has passed until the preface is complete (then it is a plain
/// pass-through).
pub struct PeerStream<S> {
    inner: S,
    _slot: Slot,
    preface: Preface,
    /// `None` once the preface is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    /// The deadline passed (counted once, however often the server reads after it).
    timed_out: bool,
    state: Arc<PeerState>,
}

impl<S> PeerStream<S> {
    /// `inner`, whose preface must be in within `timeout` from now.
    pub fn new(inner: S, slot: Slot, state: Arc<PeerState>, timeout: Duration) -> Self {
        PeerStream {
            inner,
            _slot: slot,
            preface: Preface::default(),
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            timeout,
            timed_out: false,
            state,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(deadline) = &mut this.deadline else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        // Polled first, so that a read that stays pending is woken at the deadline too.
        if deadline.as_mut().poll(cx).is_ready() {
            if !this.timed_out {
                this.timed_out = true;
                this.state
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                PrefaceTimeout(this.timeout),
            )));
        }
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        this.preface.feed(&buf.filled()[before..]);
        if this.preface.complete() {
            this.deadline = None;
        }
        Poll::Ready(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TCP stream's connect info (`TcpConnectInfo`): the guard layer and the handshake read
/// the caller's address from it.
impl<S: Connected> Connected for PeerStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CLIENT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// The preface and a SETTINGS frame with `payload` bytes of settings.
    fn opening(payload: usize) -> Vec<u8> {
        let mut bytes = CLIENT_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, (payload >> 8) as u8, payload as u8, 4, 0, 0, 0, 0, 0]);
        bytes.extend(vec![0u8; payload]);
        bytes
    }

    #[test]
    fn the_preface_is_complete_after_the_first_frame_however_it_is_cut() {
        let bytes = opening(18);
        for cut in [1, 2, 5, 24, 25, 26, 27, 33, 50] {
            let mut p = Preface::default();
            let mut fed = 0;
            for chunk in bytes.chunks(cut) {
                assert!(
                    !p.complete(),
                    "complete after {fed} of {} bytes",
                    bytes.len()
                );
                p.feed(chunk);
                fed += chunk.len();
            }
            assert!(p.complete(), "cut {cut}");
        }
        // Half a preface, the preface alone, the frame header without its payload: not yet.
        for n in [12, 24, 27, 33, 50] {
            let mut p = Preface::default();
            p.feed(&bytes[..n]);
            assert!(!p.complete(), "{n} bytes");
        }
        // An empty SETTINGS frame completes with its header.
        let mut p = Preface::default();
        p.feed(&opening(0));
        assert!(p.complete());
    }

    fn admitted(state: &Arc<PeerState>) -> Slot {
        let table = Arc::new(Mutex::new(Table::default()));
        let caps = Caps {
            per_address: 1,
            total: 1,
            new_per_second: 0,
        };
        admission::admit(&table, &state.connections, caps, [10, 0, 0, 1].into()).unwrap()
    }

    #[tokio::test]
    async fn reads_fail_after_the_deadline_until_the_preface_is_in() {
        let state = Arc::new(PeerState::default());
        let (mut client, server) = tokio::io::duplex(1024);
        let timeout = Duration::from_millis(200);
        let mut server = PeerStream::new(server, admitted(&state), state.clone(), timeout);
        client.write_all(&CLIENT_PREFACE[..12]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 12);
        let started = tokio::time::Instant::now();
        let err = server.read(&mut buf).await.expect_err("a timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() + Duration::from_millis(10) >= timeout);
        assert_eq!(state.handshake_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(state.connections.open.load(Ordering::Relaxed), 1);
        drop(server);
        assert_eq!(state.connections.open.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_complete_preface_makes_it_a_pass_through() {
        let state = Arc::new(PeerState::default());
        let (mut client, server) = tokio::io::duplex(1024);
        let timeout = Duration::from_millis(100);
        let mut server = PeerStream::new(server, admitted(&state), state.clone(), timeout);
        let opening = opening(12);
        client.write_all(&opening).await.unwrap();
        let mut got = vec![0u8; opening.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, opening);
        // Long after the deadline, the connection still reads and writes.
        tokio::time::sleep(timeout * 3).await;
        client.write_all(b"later").await.unwrap();
        let mut later = [0u8; 5];
        server.read_exact(&mut later).await.unwrap();
        assert_eq!(&later, b"later");
        server.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
        assert_eq!(state.handshake_timeouts.load(Ordering::Relaxed), 0);
    }
}
