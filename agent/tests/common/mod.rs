//! What more than one test binary needs. Not every binary uses every item.
#![allow(dead_code)]

use std::marker::PhantomData;
use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// One HTTP/2 connection to the Unix socket at `path`, with `endpoint`'s settings.
pub(crate) async fn uds_channel_with(path: &Path, endpoint: Endpoint) -> Channel {
    let path = path.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap()
}

/// One HTTP/2 connection to the Unix socket at `path`.
pub(crate) async fn uds_channel(path: &Path) -> Channel {
    uds_channel_with(path, Endpoint::from_static("http://localhost")).await
}

/// A gRPC codec that sends its request bytes as they are (for requests that are not valid
/// protobuf, or are too large) and decodes responses as `D`.
#[derive(Debug)]
pub(crate) struct RawCodec<D>(PhantomData<fn() -> D>);

impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

#[derive(Debug)]
pub(crate) struct RawEncoder;

#[derive(Debug)]
pub(crate) struct ProstDecoder<D>(PhantomData<fn() -> D>);

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl<D: prost::Message + Default> tonic::codec::Decoder for ProstDecoder<D> {
    type Item = D;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<D>, tonic::Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl<D: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<D> {
    type Encode = Vec<u8>;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<D>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder(PhantomData)
    }
}
