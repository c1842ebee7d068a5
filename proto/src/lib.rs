//! Generated gRPC types. Only this crate knows prost: the other crates convert to their own
//! types at the RPC edge.

/// The local command service between control and engine (Unix socket).
pub mod engine {
    tonic::include_proto!("neuroshard.engine.v1");
}

/// The node-to-node service (TCP, HTTP port + 1000).
pub mod peer {
    tonic::include_proto!("neuroshard.peer.v1");
}

/// Message sizes for traffic accounting, without the caller depending on prost itself.
pub use prost::Message;
