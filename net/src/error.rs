//! The one error type of the peer network, and how each error reaches a peer as a gRPC status.

use tonic::{Code, Status};

/// Every way a peer interaction can fail. Messages are lowercase, without a trailing period.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("peer address {addr:?} is not host:port")]
    BadAddress { addr: String },
    #[error("connecting to peer {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A dial was refused (nothing listens at the peer port) or its host is unreachable.
    #[error("peer {addr} is down: {reason}")]
    PeerDown { addr: String, reason: String },
    /// The peer-to-peer transport could not start, dial or open a stream.
    #[error("peer-to-peer transport: {0}")]
    Transport(String),
    #[error("{method} to peer {addr}: {source}")]
    Rpc {
        addr: String,
        method: &'static str,
        #[source]
        source: Status,
    },
    #[error("handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("{addr} is this node itself")]
    SelfConnection { addr: String },
    #[error("{method} request carries no signed auth")]
    MissingAuth { method: &'static str },
    #[error("{node_id} has not completed a handshake with this node")]
    UnknownPeer { node_id: String },
    #[error("bad signature from {node_id}: {reason}")]
    BadSignature { node_id: String, reason: String },
    #[error(
        "request timestamp {timestamp_ms} from {node_id} is outside the {window_ms} ms window around {now_ms}"
    )]
    StaleTimestamp {
        node_id: String,
        timestamp_ms: i64,
        now_ms: i64,
        window_ms: i64,
    },
    #[error("replayed request from {node_id}")]
    Replay { node_id: String },
    #[error("{who} is banned for {seconds_left} s more after misbehaving")]
    Banned { who: String, seconds_left: u64 },
    #[error("{node_id} has {limit} requests in flight already; retry later")]
    Busy { node_id: String, limit: usize },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} is {size} bytes, at most {max} allowed")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("too many {what}: {count}, at most {max} allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{what} is not served by this node version")]
    NotServed { what: &'static str },
    /// A fault of this node (a task that failed), not of the peer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl NetworkError {
    /// The gRPC code a peer receives for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::MissingAuth { .. }
            | Self::UnknownPeer { .. }
            | Self::BadSignature { .. }
            | Self::StaleTimestamp { .. }
            | Self::Replay { .. }
            | Self::Handshake { .. } => Code::Unauthenticated,
            Self::Banned { .. } => Code::PermissionDenied,
            Self::Busy { .. }
            | Self::Connect { .. }
            | Self::Transport(_)
            | Self::PeerDown { .. } => Code::Unavailable,
            Self::BadAddress { .. }
            | Self::Malformed { .. }
            | Self::TooLarge { .. }
            | Self::TooMany { .. } => Code::InvalidArgument,
            Self::SelfConnection { .. } => Code::AlreadyExists,
            Self::Rpc { source, .. } => source.code(),
            Self::NotServed { .. } => Code::Unimplemented,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<NetworkError> for Status {
    fn from(e: NetworkError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_say_what_went_wrong() {
        let s: Status = NetworkError::MissingAuth { method: "Gossip" }.into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "Gossip request carries no signed auth");
        let s: Status = NetworkError::Banned {
            who: "connection 1.2.3.4:5".into(),
            seconds_left: 3,
        }
        .into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status = NetworkError::TooLarge {
            what: "ledger message",
            size: 10,
            max: 5,
        }
        .into();
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
