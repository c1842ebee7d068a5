//! Peer identity and request authentication.
//!
//! A node's identity is its wallet address. The handshake is a mutual challenge-response:
//! the caller fetches a single-use challenge (`Challenge`), signs it together with its own
//! info and a fresh challenge of its own (`Handshake`); the server checks that the signature
//! recovers to the claimed address and answers with its info and a signature over the
//! caller's challenge. Signatures are recoverable secp256k1 ECDSA over keccak-256 digests, so
//! "the key learned in the handshake" is the address the signature recovers to.
//!
//! Every later request carries `Signed { node_id, timestamp_ms, nonce, signature }` over
//! [`rpc_digest`]. The server accepts it when the node completed a handshake, the timestamp
//! is within [`AUTH_WINDOW_MS`] of its clock, the signature was not seen before (replay
//! cache spanning the window) and it recovers to `node_id`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuroshard_identity::Address;
use neuroshard_identity::encode::Encoder;
use neuroshard_identity::keys::{Hash32, Sig65, Wallet, keccak, recover_signer};
use neuroshard_proto::peer as pb;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Semaphore;

use super::error::NetworkError;

/// Requests dated further than this from the receiver's clock are refused.
pub const AUTH_WINDOW_MS: i64 = 30_000;
/// A handed-out challenge is valid this long, once.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(30);
/// Outstanding challenges kept at most (the oldest is forgotten first).
pub const MAX_CHALLENGES: usize = 1024;
/// Sessions kept at most (the least recently seen is forgotten first).
pub const MAX_SESSIONS: usize = 256;
/// Requests one peer may have in flight at once; more are refused as busy (back-pressure).
pub const MAX_INFLIGHT_PER_PEER: usize = 16;
/// Signatures remembered against replay at most.
const MAX_REPLAY_ENTRIES: usize = 200_000;

/// A request type that carries `Signed auth`.
pub trait Authed: neuroshard_proto::Message + Default {
    /// The RPC name, part of the signed digest (a signature is valid for one method only).
    const METHOD: &'static str;
    fn take_auth(&mut self) -> Option<pb::Signed>;
    fn set_auth(&mut self, auth: pb::Signed);
}

macro_rules! authed {
    ($ty:ty, $method:literal) => {
        impl Authed for $ty {
            const METHOD: &'static str = $method;
            fn take_auth(&mut self) -> Option<pb::Signed> {
                self.auth.take()
            }
            fn set_auth(&mut self, auth: pb::Signed) {
                self.auth = Some(auth);
            }
        }
    };
}
authed!(pb::PingRequest, "Ping");
authed!(pb::GetPeersRequest, "GetPeers");
authed!(pb::GossipRequest, "Gossip");
authed!(pb::SyncRequest, "SyncLedger");
authed!(pb::GetWeightsRequest, "GetWeights");
authed!(pb::GetRoundCheckpointRequest, "GetRoundCheckpoint");
authed!(pb::GetStageWeightsRequest, "GetStageWeights");
authed!(pb::GetStageLogRequest, "GetStageLog");
authed!(pb::GetInferenceEvidenceRequest, "GetInferenceEvidence");
authed!(pb::PipelineForwardRequest, "PipelineForward");
authed!(pb::PipelineBackwardRequest, "PipelineBackward");
authed!(pb::PipelineStepRequest, "PipelineStep");
authed!(pb::DeltaMessage, "PushDelta");
authed!(pb::InferForwardRequest, "InferForward");
authed!(pb::InferEndRequest, "InferEnd");

/// Digest of a request body with its `auth` unset.
pub fn body_digest<T: neuroshard_proto::Message>(body: &T) -> Hash32 {
    keccak(b"neuroshard-peer-body-v1", &body.encode_to_vec())
}

/// What a request's signature covers.
pub fn rpc_digest(
    method: &str,
    node_id: &str,
    timestamp_ms: i64,
    nonce: u64,
    body: &Hash32,
) -> Hash32 {
    let mut e = Encoder::new(b"neuroshard-peer-rpc-v1");
    e.str(method)
        .str(node_id)
        .i64(timestamp_ms)
        .u64(nonce)
        .bytes(&body.0);
    keccak(b"", e.finish())
}

/// What the caller signs in a handshake: the server's challenge, its own, and its info.
pub fn client_handshake_digest(
    server_challenge: &[u8],
    client_challenge: &[u8],
    node: &pb::NodeInfo,
) -> Hash32 {
    let mut e = Encoder::new(b"neuroshard-peer-handshake-client-v1");
    e.bytes(server_challenge)
        .bytes(client_challenge)
        .str(&node.node_id)
        .str(&node.address)
        .u64(node.http_port);
    keccak(b"", e.finish())
}

/// What the server signs in its handshake reply: the caller's challenge and its own info.
pub fn server_handshake_digest(client_challenge: &[u8], node: &pb::NodeInfo) -> Hash32 {
    let mut e = Encoder::new(b"neuroshard-peer-handshake-server-v1");
    e.bytes(client_challenge)
        .str(&node.node_id)
        .str(&node.address)
        .u64(node.http_port);
    keccak(b"", e.finish())
}

/// Parses a 65-byte signature.
pub fn sig65(bytes: &[u8], node_id: &str) -> Result<Sig65, NetworkError> {
    let arr: [u8; 65] = bytes.try_into().map_err(|_| NetworkError::BadSignature {
        node_id: node_id.to_string(),
        reason: format!("signature is {} bytes, 65 expected", bytes.len()),
    })?;
    Ok(Sig65(arr))
}

/// Checks that `sig` over `digest` was made by `claimed` (an address string).
pub fn verify_signer(digest: &Hash32, sig: &[u8], claimed: &str) -> Result<Address, NetworkError> {
    let bad = |reason: String| NetworkError::BadSignature {
        node_id: claimed.chars().take(64).collect(),
        reason,
    };
    let claimed_addr = Address::parse(claimed).map_err(|e| bad(format!("node id: {e}")))?;
    let sig = sig65(sig, claimed)?;
    let signer = recover_signer(digest, &sig, "peer request").map_err(|e| bad(e.to_string()))?;
    if signer != claimed_addr {
        return Err(bad(format!("signed by {signer}, not by the claimed node")));
    }
    Ok(signer)
}

/// Signs `body` for `T::METHOD` as `wallet` at `now_ms`.
pub fn sign_request<T: Authed>(wallet: &Wallet, mut body: T, now_ms: i64) -> T {
    let node_id = wallet.address().to_string();
    let nonce: u64 = rand::random();
    let digest = rpc_digest(T::METHOD, &node_id, now_ms, nonce, &body_digest(&body));
    body.set_auth(pb::Signed {
        node_id,
        timestamp_ms: now_ms,
        signature: wallet.sign_digest(&digest).0.to_vec(),
        nonce,
    });
    body
}

/// One peer that completed a handshake with this node's server.
#[derive(Debug, Clone)]
pub struct Session {
    pub ip: Option<IpAddr>,
    pub info: pb::NodeInfo,
    pub established: Instant,
    pub last_seen: Instant,
    /// Bounds the requests this peer may have in flight.
    pub inflight: Arc<Semaphore>,
}

/// Server-side authentication state: challenges handed out, sessions, recent signatures.
#[derive(Debug, Default)]
pub struct Authenticator {
    inner: Mutex<AuthInner>,
}

#[derive(Debug, Default)]
struct AuthInner {
    challenges: HashMap<[u8; 32], Instant>,
    challenge_order: VecDeque<[u8; 32]>,
    sessions: HashMap<Address, Session>,
    seen: HashSet<[u8; 65]>,
    seen_order: VecDeque<(i64, [u8; 65])>,
}

/// What a verified request gives its handler.
pub struct Verified {
    pub peer: Address,
    /// Held for the duration of the request.
    pub _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Authenticator {
    /// A fresh single-use challenge.
    pub fn issue_challenge(&self, now: Instant) -> [u8; 32] {
        let c: [u8; 32] = rand::random();
        let mut g = self.lock();
        while g.challenge_order.len() >= MAX_CHALLENGES {
            if let Some(old) = g.challenge_order.pop_front() {
                g.challenges.remove(&old);
            }
        }
        g.challenges.insert(c, now);
        g.challenge_order.push_back(c);
        c
    }

    /// Consumes a challenge; false when it was never issued, already used or expired.
    pub fn take_challenge(&self, challenge: &[u8], now: Instant) -> bool {
        let Ok(c) = <[u8; 32]>::try_from(challenge) else {
            return false;
        };
        let mut g = self.lock();
        match g.challenges.remove(&c) {
            Some(at) => {
                g.challenge_order.retain(|x| *x != c);
                now.duration_since(at) <= CHALLENGE_TTL
            }
            None => false,
        }
    }

    /// Records a completed handshake (replacing an older session of the same node).
    pub fn open_session(
        &self,
        peer: Address,
        ip: Option<IpAddr>,
        info: pb::NodeInfo,
        now: Instant,
    ) {
        let mut g = self.lock();
        if !g.sessions.contains_key(&peer)
            && g.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = g
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(a, _)| *a)
        {
            g.sessions.remove(&oldest);
        }
        g.sessions.insert(
            peer,
            Session {
                ip,
                info,
                established: now,
                last_seen: now,
                inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_PER_PEER)),
            },
        );
    }

    pub fn session(&self, peer: &Address) -> Option<Session> {
        self.lock().sessions.get(peer).cloned()
    }

    pub fn close_session(&self, peer: &Address) {
        self.lock().sessions.remove(peer);
    }

    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Verifies a signed request and takes an in-flight permit for its peer. Returns the body
    /// with `auth` removed.
    pub fn verify<T: Authed>(
        &self,
        mut body: T,
        now_ms: i64,
        now: Instant,
    ) -> Result<(T, Verified), NetworkError> {
        let auth = body
            .take_auth()
            .ok_or(NetworkError::MissingAuth { method: T::METHOD })?;
        let node_id: String = auth.node_id.chars().take(64).collect();
        if (auth.timestamp_ms - now_ms).abs() > AUTH_WINDOW_MS {
            return Err(NetworkError::StaleTimestamp {
                node_id,
                timestamp_ms: auth.timestamp_ms,
                now_ms,
                window_ms: AUTH_WINDOW_MS,
            });
        }
        let digest = rpc_digest(
            T::METHOD,
            &auth.node_id,
            auth.timestamp_ms,
            auth.nonce,
            &body_digest(&body),
        );
        let peer = verify_signer(&digest, &auth.signature, &auth.node_id)?;
        let sig = sig65(&auth.signature, &node_id)?.0;
        let mut g = self.lock();
        let Some(session) = g.sessions.get_mut(&peer) else {
            return Err(NetworkError::UnknownPeer { node_id });
        };
        let permit =
            session
                .inflight
                .clone()
                .try_acquire_owned()
                .map_err(|_| NetworkError::Busy {
                    node_id: node_id.clone(),
                    limit: MAX_INFLIGHT_PER_PEER,
                })?;
        session.last_seen = now;
        // Replay cache: forget signatures that left the window, then insist on a new one.
        while let Some((ts, old)) = g.seen_order.front().copied() {
            if ts < now_ms - 2 * AUTH_WINDOW_MS || g.seen_order.len() >= MAX_REPLAY_ENTRIES {
                g.seen_order.pop_front();
                g.seen.remove(&old);
            } else {
                break;
            }
        }
        if !g.seen.insert(sig) {
            return Err(NetworkError::Replay { node_id });
        }
        g.seen_order.push_back((now_ms, sig));
        Ok((
            body,
            Verified {
                peer,
                _permit: permit,
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, AuthInner> {
        self.inner.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(w: &Wallet) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: w.address().to_string(),
            address: "0.0.0.0:9000".into(),
            ..Default::default()
        }
    }

    fn gossip() -> pb::GossipRequest {
        pb::GossipRequest {
            kind: "ledger".into(),
            messages: vec![b"x".to_vec()],
            ..Default::default()
        }
    }

    #[test]
    fn signed_request_verifies_once() {
        let (w, t0) = (Wallet::from_seed(1), Instant::now());
        let a = Authenticator::default();
        let req = sign_request(&w, gossip(), 1_000_000);
        let e = a.verify(req.clone(), 1_000_000, t0).err().unwrap();
        assert!(matches!(e, NetworkError::UnknownPeer { .. }), "{e}");
        a.open_session(w.address(), None, info(&w), t0);
        let (body, v) = a.verify(req.clone(), 1_000_100, t0).unwrap();
        assert_eq!(v.peer, w.address());
        assert!(body.auth.is_none());
        drop(v);
        let e = a.verify(req, 1_000_200, t0).err().unwrap();
        assert!(matches!(e, NetworkError::Replay { .. }), "{e}");
    }

    #[test]
    fn tampered_stale_and_foreign_requests_are_refused() {
        let (w, t0) = (Wallet::from_seed(2), Instant::now());
        let a = Authenticator::default();
        a.open_session(w.address(), None, info(&w), t0);
        let mut req = sign_request(&w, gossip(), 5_000_000);
        req.messages.push(b"extra".to_vec());
        let e = a.verify(req, 5_000_000, t0).err().unwrap();
        assert!(matches!(e, NetworkError::BadSignature { .. }), "{e}");
        let req = sign_request(&w, gossip(), 5_000_000);
        let e = a
            .verify(req, 5_000_000 + AUTH_WINDOW_MS + 1, t0)
            .err()
            .unwrap();
        assert!(matches!(e, NetworkError::StaleTimestamp { .. }), "{e}");
        // Signed by another key but claiming w's id.
        let other = Wallet::from_seed(3);
        let mut req = sign_request(&other, gossip(), 5_000_000);
        if let Some(auth) = req.auth.as_mut() {
            auth.node_id = w.address().to_string();
        }
        let e = a.verify(req, 5_000_000, t0).err().unwrap();
        assert!(matches!(e, NetworkError::BadSignature { .. }), "{e}");
        // A signature for another method does not carry over.
        let ping = sign_request(&w, pb::PingRequest::default(), 5_000_000);
        let moved = pb::GetPeersRequest { auth: ping.auth };
        let e = a.verify(moved, 5_000_000, t0).err().unwrap();
        assert!(matches!(e, NetworkError::BadSignature { .. }), "{e}");
        let e = a.verify(gossip(), 5_000_000, t0).err().unwrap();
        assert!(matches!(e, NetworkError::MissingAuth { .. }), "{e}");
    }

    #[test]
    fn in_flight_requests_are_bounded_per_peer() {
        let (w, t0) = (Wallet::from_seed(4), Instant::now());
        let a = Authenticator::default();
        a.open_session(w.address(), None, info(&w), t0);
        let mut held = Vec::new();
        for i in 0..MAX_INFLIGHT_PER_PEER as i64 {
            held.push(
                a.verify(sign_request(&w, gossip(), 7_000_000 + i), 7_000_000, t0)
                    .unwrap(),
            );
        }
        let e = a
            .verify(sign_request(&w, gossip(), 7_000_000), 7_000_000, t0)
            .err()
            .unwrap();
        assert!(matches!(e, NetworkError::Busy { .. }), "{e}");
        held.pop();
        assert!(
            a.verify(sign_request(&w, gossip(), 7_000_001), 7_000_000, t0)
                .is_ok()
        );
    }

    #[test]
    fn challenges_are_single_use_and_expire() {
        let a = Authenticator::default();
        let t0 = Instant::now();
        let c = a.issue_challenge(t0);
        assert!(a.take_challenge(&c, t0));
        assert!(!a.take_challenge(&c, t0));
        let c = a.issue_challenge(t0);
        assert!(!a.take_challenge(&c, t0 + CHALLENGE_TTL + Duration::from_secs(1)));
        assert!(!a.take_challenge(b"short", t0));
    }

    #[test]
    fn handshake_digests_bind_the_signer() {
        let w = Wallet::from_seed(5);
        let node = info(&w);
        let d = client_handshake_digest(&[1; 32], &[2; 32], &node);
        let sig = w.sign_digest(&d);
        assert_eq!(
            verify_signer(&d, &sig.0, &node.node_id).unwrap(),
            w.address()
        );
        let other = Wallet::from_seed(6);
        assert!(verify_signer(&d, &sig.0, &other.address().to_string()).is_err());
        assert!(verify_signer(&d, &sig.0[..10], &node.node_id).is_err());
        assert!(verify_signer(&d, &sig.0, "not-an-address").is_err());
        assert_ne!(d, server_handshake_digest(&[2; 32], &node));
    }
}
