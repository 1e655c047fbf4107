//! The SDS gRPC service as tonic serves it: the routing that `envoy-types` generates for
//! `SecretDiscoveryServiceServer`, with a codec sized for SDS.
//!
//! The generated server uses `ProstCodec::default()`, which gives every stream an 8 KiB
//! encode buffer and an 8 KiB decode buffer (`tonic::codec::BufferSettings`), kept for the
//! life of the stream. With thousands of long-lived, mostly idle streams those two buffers
//! were most of the agent's memory per stream (docs/benchmarks.md). SDS messages are small:
//! a request is a few hundred bytes (more only when Envoy sends its node), a response a
//! certificate chain and a key, 1-3 KiB. The buffers here start at that size; tonic grows
//! them for a larger message, as it would the default ones.
//!
//! Routing, compression (none), size limits and the answer for an unknown method are the
//! generated server's; only the codec differs, and the service trait is still the generated
//! [`SecretDiscoveryService`].

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SERVICE_NAME, SecretDiscoveryService,
};
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode buffer: one response with a P-256 chain and key fits.
const ENCODE_BUFFER: usize = 2048;
/// Initial size of a stream's decode buffer: one request without a node fits.
const DECODE_BUFFER: usize = 1024;
/// tonic's default: how much encoded data is gathered before it is handed to the transport.
const YIELD_THRESHOLD: usize = 32 * 1024;

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// `SecretDiscoveryService` for tonic's router, refusing requests over `max_decoding`.
#[derive(Debug)]
pub struct SdsServer<T> {
    inner: Arc<T>,
    max_decoding: usize,
}

impl<T> SdsServer<T> {
    /// Serves `inner`; a request message larger than `max_decoding` bytes ends its stream
    /// with `OutOfRange`.
    pub fn new(inner: T, max_decoding: usize) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding,
        }
    }
}

impl<T> Clone for SdsServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max_decoding: self.max_decoding,
        }
    }
}

impl<T> NamedService for SdsServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

/// A prost codec with SDS-sized buffers. The Workload API's messages (a chain, a key and a
/// bundle; an empty request) are the same size, so `crate::workload_api` uses it too.
pub(crate) struct SdsCodec<E, D>(PhantomData<fn(E) -> D>);

/// tonic's per-call gRPC handler with the SDS codec, refusing messages over `max_decoding`.
pub(crate) fn grpc<E, D>(max_decoding: usize) -> Grpc<SdsCodec<E, D>>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    Grpc::new(SdsCodec(PhantomData)).apply_max_message_size_config(Some(max_decoding), None)
}

impl<E, D> Codec for SdsCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD))
    }
}

struct StreamSecrets<T>(Arc<T>);

impl<T: SecretDiscoveryService> StreamingService<DiscoveryRequest> for StreamSecrets<T> {
    type Response = DiscoveryResponse;
    type ResponseStream = T::StreamSecretsStream;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream_secrets(request).await })
    }
}

struct DeltaSecrets<T>(Arc<T>);

impl<T: SecretDiscoveryService> StreamingService<DeltaDiscoveryRequest> for DeltaSecrets<T> {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = T::DeltaSecretsStream;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.delta_secrets(request).await })
    }
}

struct FetchSecrets<T>(Arc<T>);

impl<T: SecretDiscoveryService> UnaryService<DiscoveryRequest> for FetchSecrets<T> {
    type Response = DiscoveryResponse;
    type Future = BoxFuture<'static, Result<Response<DiscoveryResponse>, Status>>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.fetch_secrets(request).await })
    }
}

impl<T: SecretDiscoveryService> tower::Service<http::Request<Body>> for SdsServer<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let max = self.max_decoding;
        match req.uri().path() {
            STREAM_SECRETS => {
                Box::pin(async move { Ok(grpc(max).streaming(StreamSecrets(inner), req).await) })
            }
            DELTA_SECRETS => {
                Box::pin(async move { Ok(grpc(max).streaming(DeltaSecrets(inner), req).await) })
            }
            FETCH_SECRETS => {
                Box::pin(async move { Ok(grpc(max).unary(FetchSecrets(inner), req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}
