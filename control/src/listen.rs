//! Accepting HTTP connections from clients that may be hostile: the server under the REST API
//! and the tracker. `axum::serve` sets no timeout and no connection limit, so one address could
//! hold every descriptor of the process with connections that never finish a request. Here:
//!
//! * **At accept**, a connection is refused (closed at once, counted) when its address already
//!   holds `per_address` connections, or when `total` connections from other machines are
//!   open. Loopback clients (the local CLI, the dashboard on the same machine) are not counted
//!   against `total`: their own room is bounded only by the per-address cap, so a flood from
//!   outside never locks the operator out. The table is net's (`neuroshard_net::admission`),
//!   which admits the peer port's connections the same way.
//! * **HTTP/1**: hyper's header-read timer runs from the moment a connection waits for a
//!   request head until the head is complete, so it bounds both a slowly sent request line
//!   (slowloris) and an idle keep-alive connection: a connection that sends no complete head
//!   within `header_timeout` is closed.
//! * **Request bodies** must arrive whole within `body_timeout` of the first read
//!   ([`DeadlineBody`]); later the request fails and the connection closes.
//! * **HTTP/2**: a ping every `header_timeout`; a peer that does not answer is dropped.
//! * Responses are never timed: a streamed answer (SSE) lasts as long as it has tokens.
//! * **TLS** (beyond loopback, `crate::tls`): the handshake runs on the admitted connection,
//!   inside its admission slot, and must finish within `header_timeout`, or the connection is
//!   closed; a client that never finishes it holds its place no longer than a slow head.
//!
//! [`raise_nofile_limit`] lifts the soft descriptor limit to the hard one at start-up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use neuroshard_net::admission::{self, Caps, ConnStats};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Longest a graceful shutdown waits for open connections (a streaming answer would
/// otherwise hold the node up for as long as it generates).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After an accept error for want of descriptors, the loop waits this long before the next
/// accept (instead of spinning on the same error).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits of one listening socket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most connections open at once from one client address.
    pub per_address: usize,
    /// Most connections open at once from addresses other than loopback.
    pub total: usize,
    /// HTTP/1: longest wait for a complete request head, idle keep-alive included.
    pub header_timeout: Duration,
    /// Longest time a request body may take to arrive.
    pub body_timeout: Duration,
    /// New connections one address may open per second (admission's rate; 0: unrated).
    pub new_per_second: u32,
}

impl Limits {
    /// The caps admission applies at accept.
    pub fn caps(&self) -> Caps {
        Caps {
            per_address: self.per_address,
            total: self.total,
            new_per_second: self.new_per_second,
        }
    }
}

/// Serves `app` on `listener` with `limits` until `shutdown` resolves; then stops accepting
/// and gives open connections [`SHUTDOWN_GRACE`] to finish. Handlers see the client's
/// address as `ConnectInfo<SocketAddr>`, as with axum's own server. With `tls`, every
/// connection is HTTPS.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stats: Arc<ConnStats>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let table = Arc::new(parking_lot::Mutex::new(admission::Table::default()));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept:
                    // neither ends the server.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Refused: closed at once (`admit` counted it).
        let Ok(slot) = admission::admit(&table, &stats, limits.caps(), remote.ip()) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body_timeout = limits.body_timeout;
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(remote));
                hyper::Request::from_parts(parts, Body::new(DeadlineBody::new(body, body_timeout)))
            });
        let service = TowerToHyperService::new(service);
        let Some(tls) = tls.clone() else {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = conn.await {
                    tracing::trace!(error = %e, peer = %remote, "connection ended");
                }
            });
            continue;
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, peer = %remote, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::trace!(error = %e, peer = %remote, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open at shutdown were cut");
    }
    Ok(())
}

/// The request body must arrive whole within its deadline, counted from the first read.
pub struct DeadlineBody<B> {
    inner: B,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        DeadlineBody {
            inner,
            timeout,
            deadline: None,
        }
    }
}

/// A request body that did not arrive within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft limit on open descriptors to the hard limit; returns (soft, hard) after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_that_never_ends_fails_at_its_deadline() {
        use http_body_util::BodyExt;
        // A body whose next frame never comes.
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >());
        let started = tokio::time::Instant::now();
        let body = DeadlineBody::new(body, Duration::from_millis(200));
        let err = body.collect().await.expect_err("a timeout");
        assert!(err.to_string().contains("did not arrive"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
