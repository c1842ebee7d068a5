//! A tower layer in front of the peer port's services. It sees every request, including those tonic
//! refuses before any handler runs (undecodable or oversized bodies): it counts the call,
//! refuses connections that are banned without decoding anything, and charges every refused
//! request to its connection's score according to the gRPC status of the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;

use crate::p2p::io::PeerConnectInfo;

use super::Network;
use super::error::NetworkError;
use super::score::{Offence, conn_key};

/// Which refusals are the caller's fault, and what they cost.
pub fn offence_for(code: Code) -> Option<Offence> {
    match code {
        // Undecodable bodies (tonic answers Internal), malformed fields, oversized bodies.
        Code::Internal | Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => {
            Some(Offence::Malformed)
        }
        Code::Unauthenticated => Some(Offence::Unauthenticated),
        // Busy (Unavailable), unknown methods of a newer peer (Unimplemented), a node talking
        // to itself (AlreadyExists), a banned node (PermissionDenied): not charged again.
        _ => None,
    }
}

#[derive(Clone)]
pub struct GuardLayer {
    net: Arc<Network>,
}

impl GuardLayer {
    pub fn new(net: Arc<Network>) -> Self {
        GuardLayer { net }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            net: self.net.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    net: Arc<Network>,
}

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // A stream's peer and address (crate::p2p::io) as handlers read them.
        if let Some(tcp) = req.extensions().get::<PeerConnectInfo>().map(|i| i.tcp()) {
            req.extensions_mut().insert(tcp);
        }
        let remote = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr());
        let key = conn_key(remote);
        let net = self.net.clone();
        net.state.rpc_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(seconds_left) = net.scores.banned(&key, Instant::now()) {
            net.state.refused_requests.fetch_add(1, Ordering::Relaxed);
            let status: tonic::Status = NetworkError::Banned {
                who: format!("connection {}", key.trim_start_matches("conn ")),
                seconds_left,
            }
            .into();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let path = req.uri().path().to_string();
        // The service was polled ready; hand that instance the call and keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(req).await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from_i32);
            match code {
                Some(Code::Ok) | None => net.scores.reward(&key, Instant::now()),
                Some(code) => {
                    net.state.refused_requests.fetch_add(1, Ordering::Relaxed);
                    if let Some(offence) = offence_for(code)
                        && net.scores.penalize(&key, offence, 1, Instant::now())
                    {
                        tracing::warn!(connection = %key, %path, "peer connection banned after repeated bad requests");
                    }
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_callers_faults_are_charged() {
        assert_eq!(offence_for(Code::Internal), Some(Offence::Malformed));
        assert_eq!(offence_for(Code::OutOfRange), Some(Offence::Malformed));
        assert_eq!(
            offence_for(Code::Unauthenticated),
            Some(Offence::Unauthenticated)
        );
        assert_eq!(offence_for(Code::Unavailable), None);
        assert_eq!(offence_for(Code::Unimplemented), None);
        assert_eq!(offence_for(Code::Ok), None);
    }
}
