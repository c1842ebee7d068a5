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

/// A gRPC call with an untyped body: for tools and tests that must send bytes a service's
/// types cannot express (an undecodable body, to check that a node refuses it cleanly).
pub mod raw {
    use prost::bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// Passes bodies through as bytes.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct RawCodec;

    #[derive(Debug, Clone, Copy, Default)]
    pub struct RawEncoder;

    #[derive(Debug, Clone, Copy, Default)]
    pub struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    /// Sends `body` as-is to the unary method `path` (e.g. `/neuroshard.peer.v1.Peer/Gossip`).
    pub async fn unary(
        channel: tonic::transport::Channel,
        path: &'static str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        grpc.unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(tonic::Response::into_inner)
    }
}
