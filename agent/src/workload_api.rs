//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, X.509-SVID profile) on its own Unix socket,
//! for workloads and proxies that do not speak SDS: linkerd2-proxy, spiffe-helper, and
//! programs built on go-spiffe, py-spiffe or java-spiffe.
//!
//! It follows the SPIFFE standards `SPIFFE_Workload_API.md` and `SPIFFE_Workload_Endpoint.md`:
//! - every call must carry the metadata `workload.spiffe.io: true`, or it is refused with
//!   `InvalidArgument` (the header proves the caller meant to reach a Workload API, so a
//!   browser or a confused client relayed to the socket gets nothing);
//! - `FetchX509SVID` streams the caller's X.509-SVID (the DER chain, leaf first), its PKCS#8
//!   key and the trust domain's bundle; the first message goes out as soon as a certificate
//!   exists (the stream waits until then, it does not fail), then a full message on every
//!   rotation or bundle change;
//! - `FetchX509Bundles` streams the bundles keyed by trust domain ID, and never sends the
//!   same bundles twice in a row;
//! - the JWT-SVID methods answer `Unimplemented`: this agent issues no JWT-SVIDs, and the
//!   standard tells clients not to retry that code.
//!
//! Callers are the SDS callers: the same SO_PEERCRED rules (`--allowed-uids`,
//! `--allowed-gids`; refused with `PermissionDenied`), the same `--max-streams` (counted
//! apart from the SDS streams), `--max-message-size`, and `--max-requests-per-second`
//! (here, new calls per second from one process, since a Workload API call sends one
//! request). Streams read the secret manager's `watch` channels exactly as SDS streams do,
//! so any number of them on both sockets cause one CSR per rotation. This module never
//! touches the CA and never logs key material.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use sds_proto::pb::spiffe_workload::spiffe_workload_api_server::{SERVICE_NAME, SpiffeWorkloadApi};
use sds_proto::pb::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info_span, warn};

use crate::attest::conn::ConnInfo;
use crate::federation::Bundles;
use crate::metrics::{ApiLabel, WORKLOAD_API};
use crate::sds::{Admitted, Caller, SdsService, StreamGuard, Surface, TokenBucket, grpc};
use crate::secrets::{ServedBundle, ServedCert};

/// The metadata key every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The callers whose call rate is tracked before idle ones are forgotten.
const RATE_TABLE_PRUNE_AT: usize = 4096;

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const FETCH_X509_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
const FETCH_JWT_SVID: &str = "/SpiffeWorkloadAPI/FetchJWTSVID";
const FETCH_JWT_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchJWTBundles";
const VALIDATE_JWT_SVID: &str = "/SpiffeWorkloadAPI/ValidateJWTSVID";

/// The answer to every JWT-SVID method.
const NO_JWT: &str = "this agent does not issue JWT-SVIDs; it serves X.509-SVIDs only \
                      (FetchX509SVID, FetchX509Bundles)";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type CertRx = watch::Receiver<Option<Arc<ServedCert>>>;
type BundleRx = watch::Receiver<Option<Arc<ServedBundle>>>;
type FederatedRx = watch::Receiver<Bundles>;

/// The Workload API service, over the same secret manager, caller rules, limits and stream
/// registry as the SDS service it is made from.
#[derive(Debug, Clone)]
pub struct WorkloadApiService {
    sds: SdsService,
    /// New calls per second, per calling process.
    rates: Arc<Mutex<HashMap<Caller, TokenBucket>>>,
    /// The federated trust domains' bundles (`--federate-with`), if any.
    federated: Option<FederatedRx>,
}

/// `SpiffeWorkloadAPI` for tonic's router, with the SDS codec and `--max-message-size`.
#[derive(Debug, Clone)]
pub struct WorkloadApiServer {
    inner: Arc<WorkloadApiService>,
}

impl WorkloadApiService {
    /// A service sharing `sds`'s manager, metrics, callers, limits and `/proxies`.
    pub fn new(sds: SdsService) -> Self {
        Self {
            sds,
            rates: Arc::new(Mutex::new(HashMap::new())),
            federated: None,
        }
    }

    /// Also serves the federated trust domains' bundles from `federated`: in
    /// `federated_bundles` of every X.509-SVID response and among the bundles of
    /// `FetchX509Bundles`, pushed again whenever one changes.
    #[must_use]
    pub fn with_federation(mut self, federated: FederatedRx) -> Self {
        self.federated = Some(federated);
        self
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> WorkloadApiServer {
        WorkloadApiServer {
            inner: Arc::new(self),
        }
    }

    /// The checks every call gets, in the standard's order: the security header, then who
    /// the caller is, then how fast it calls.
    fn admit<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let metrics = self.sds.metrics();
        let header = request.metadata().get(SECURITY_HEADER);
        if header.is_none_or(|v| v.as_bytes() != b"true") {
            metrics.workload_bad_request("missing_security_header");
            warn!("refusing Workload API call: no \"workload.spiffe.io: true\" metadata");
            return Err(Status::invalid_argument(
                "security header missing from request: the Workload API needs the metadata \"workload.spiffe.io: true\"",
            ));
        }
        let caller = self.sds.authorize(request, Surface::WorkloadApi)?;
        let rate = self.sds.limits().max_requests_per_second;
        let now = tokio::time::Instant::now();
        let mut rates = self.rates.lock();
        if rates.len() >= RATE_TABLE_PRUNE_AT {
            // Forget callers whose bucket has refilled: they are idle, and a fresh bucket
            // is what they would have anyway.
            rates.retain(|_, bucket| !bucket.is_full(now));
        }
        let allowed = rates
            .entry(caller)
            .or_insert_with(|| TokenBucket::new(rate))
            .take(now);
        drop(rates);
        if !allowed {
            metrics.workload_bad_request("rate_limited");
            warn!(
                uid = caller.uid,
                pid = caller.pid,
                max = rate,
                "refusing Workload API call: more calls per second than --max-requests-per-second"
            );
            return Err(Status::resource_exhausted(format!(
                "more than {rate} Workload API calls per second from one process"
            )));
        }
        Ok(caller)
    }

    /// Admits a JWT-SVID call only to tell it that none are issued.
    fn no_jwt<T>(&self, request: &Request<T>) -> Status {
        if let Err(status) = self.admit(request) {
            return status;
        }
        self.sds.metrics().workload_bad_request("jwt_not_issued");
        debug!("JWT-SVID method called; answering Unimplemented");
        Status::unimplemented(NO_JWT)
    }

    /// Opens a stream: registers it (within `--max-streams`) and drives `driver` until the
    /// client leaves or the agent shuts down.
    fn stream<D: Driver>(
        &self,
        admitted: Admitted,
        make: impl FnOnce(StreamGuard, CertRx, BundleRx) -> D,
    ) -> Result<ResponseStream<D::Message>, Status> {
        let guard = self.sds.start_stream(WORKLOAD_API, admitted)?;
        guard.update(|p| p.resources = vec![D::RESOURCE.into()]);
        let span = info_span!(
            "workload_api_stream",
            method = D::RESOURCE,
            stream = guard.id()
        );
        let manager = self.sds.manager();
        let cert_rx = manager.subscribe_cert(guard.identity());
        let state = StreamState {
            trust_domain_id: format!("spiffe://{}", manager.trust_domain()),
            driver: make(guard, cert_rx, manager.subscribe_bundle()),
            service: self.clone(),
            federated: self.federated.clone(),
        };
        Ok(Box::pin(futures::stream::unfold(state, move |mut st| {
            async move {
                let message = st.next().await?;
                Some((Ok(message), st))
            }
            .instrument(span.clone())
        })))
    }
}

/// What one kind of stream sends: the message owed now, if any.
trait Driver: Send + 'static {
    type Message: Send + 'static;
    /// What `/proxies` lists the stream as subscribed to.
    const RESOURCE: &'static str;

    /// The channels to wait on.
    fn channels(&mut self) -> (&mut CertRx, &mut BundleRx);

    /// The message owed to the client now, marking it sent; `federated` are the federated
    /// trust domains' bundles now.
    fn owed(&mut self, trust_domain_id: &str, federated: &Bundles) -> Option<Self::Message>;
}

/// The federated bundles as the Workload API keys them: `spiffe://<td>` to DER roots.
fn federated_map(federated: &Bundles) -> HashMap<String, Vec<u8>> {
    federated
        .iter()
        .map(|(td, b)| (format!("spiffe://{td}"), b.der.clone()))
        .collect()
}

/// One open stream.
struct StreamState<D> {
    driver: D,
    service: WorkloadApiService,
    /// `spiffe://<trust-domain>`, the key of the bundles.
    trust_domain_id: String,
    /// The federated bundles, while their source lives.
    federated: Option<FederatedRx>,
}

impl<D: Driver> StreamState<D> {
    /// The next message, or `None` once the client is gone or the agent shuts down.
    async fn next(&mut self) -> Option<D::Message> {
        let sds = &self.service.sds;
        loop {
            let federated = self
                .federated
                .as_mut()
                .map(|rx| rx.borrow_and_update().clone())
                .unwrap_or_default();
            if let Some(message) = self.driver.owed(&self.trust_domain_id, &federated) {
                sds.metrics()
                    .pushes
                    .get_or_create(&ApiLabel { api: WORKLOAD_API })
                    .inc();
                return Some(message);
            }
            let shutdown = sds.shutdown_token().clone();
            let (cert_rx, bundle_rx) = self.driver.channels();
            let federated_open = self.federated.is_some();
            let federation_changed = async {
                match self.federated.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return None,
                r = cert_rx.changed() => if r.is_err() { return None },
                r = bundle_rx.changed() => if r.is_err() { return None },
                open = federation_changed, if federated_open => {
                    // The source is gone (the agent is stopping): serve what was last seen.
                    if !open {
                        self.federated = None;
                    }
                }
            }
        }
    }
}

/// `FetchX509SVID`: the SVID, its key and the bundle, again whenever either changes.
struct SvidStream {
    guard: StreamGuard,
    cert_rx: CertRx,
    bundle_rx: BundleRx,
    /// The certificate and bundle versions last sent.
    sent: Option<(u64, u64)>,
    /// The federated bundles last sent.
    sent_federated: Option<Bundles>,
}

impl Driver for SvidStream {
    type Message = X509svidResponse;
    const RESOURCE: &'static str = "x509-svid";

    fn channels(&mut self) -> (&mut CertRx, &mut BundleRx) {
        (&mut self.cert_rx, &mut self.bundle_rx)
    }

    fn owed(&mut self, _trust_domain_id: &str, federated: &Bundles) -> Option<X509svidResponse> {
        let cert = self.cert_rx.borrow_and_update().clone()?;
        let bundle = self.bundle_rx.borrow_and_update().clone()?;
        let versions = (cert.version, bundle.version);
        let federation_sent = self
            .sent_federated
            .as_ref()
            .is_some_and(|sent| **sent == **federated);
        if self.sent == Some(versions) && federation_sent {
            return None;
        }
        self.sent = Some(versions);
        self.sent_federated = Some(federated.clone());
        let sent = format!("default:{},ROOTCA:{}", versions.0, versions.1);
        debug!(version = %sent, serial = %cert.leaf.serial, "sending X.509-SVID");
        self.guard.update(|p| p.sent_version = Some(sent));
        Some(X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: cert.identity.to_string(),
                x509_svid: cert.chain_der.clone(),
                x509_svid_key: cert.key_der().to_vec(),
                bundle: bundle.der.clone(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: federated_map(federated),
        })
    }
}

/// `FetchX509Bundles`: the bundles, again whenever their content changes.
struct BundlesStream {
    guard: StreamGuard,
    cert_rx: CertRx,
    bundle_rx: BundleRx,
    /// The bundles last sent, by trust domain ID.
    sent: Option<HashMap<String, Vec<u8>>>,
}

impl Driver for BundlesStream {
    type Message = X509BundlesResponse;
    const RESOURCE: &'static str = "x509-bundles";

    fn channels(&mut self) -> (&mut CertRx, &mut BundleRx) {
        (&mut self.cert_rx, &mut self.bundle_rx)
    }

    fn owed(&mut self, trust_domain_id: &str, federated: &Bundles) -> Option<X509BundlesResponse> {
        // Certificates do not go into this stream: mark them seen so that a rotation
        // does not wake it.
        self.cert_rx.borrow_and_update();
        let bundle = self.bundle_rx.borrow_and_update().clone()?;
        let mut bundles = federated_map(federated);
        bundles.insert(trust_domain_id.to_owned(), bundle.der.clone());
        if self.sent.as_ref() == Some(&bundles) {
            return None;
        }
        let sent = format!("ROOTCA:{},federated:{}", bundle.version, federated.len());
        debug!(version = %sent, "sending X.509 bundles");
        self.guard.update(|p| p.sent_version = Some(sent));
        let message = X509BundlesResponse {
            crl: Vec::new(),
            bundles: bundles.clone(),
        };
        self.sent = Some(bundles);
        Some(message)
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&request)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let admitted = self
            .sds
            .identify(conn, caller, Surface::WorkloadApi)
            .await?;
        let stream = self.stream(admitted, |guard, cert_rx, bundle_rx| SvidStream {
            guard,
            cert_rx,
            bundle_rx,
            sent: None,
            sent_federated: None,
        })?;
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.admit(&request)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let admitted = self
            .sds
            .identify(conn, caller, Surface::WorkloadApi)
            .await?;
        let stream = self.stream(admitted, |guard, cert_rx, bundle_rx| BundlesStream {
            guard,
            cert_rx,
            bundle_rx,
            sent: None,
        })?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(self.no_jwt(&request))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(self.no_jwt(&request))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(self.no_jwt(&request))
    }
}

impl NamedService for WorkloadApiServer {
    const NAME: &'static str = SERVICE_NAME;
}

/// The adapters from tonic's per-method handler traits to the generated service trait, one
/// per method, of the shape tonic's generated server uses.
struct FetchX509Svid(Arc<WorkloadApiService>);
struct FetchX509Bundles(Arc<WorkloadApiService>);
struct FetchJwtBundles(Arc<WorkloadApiService>);
struct FetchJwtSvid(Arc<WorkloadApiService>);
struct ValidateJwtSvid(Arc<WorkloadApiService>);

impl ServerStreamingService<X509svidRequest> for FetchX509Svid {
    type Response = X509svidResponse;
    type ResponseStream = ResponseStream<X509svidResponse>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<X509svidRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.fetch_x509svid(request).await })
    }
}

impl ServerStreamingService<X509BundlesRequest> for FetchX509Bundles {
    type Response = X509BundlesResponse;
    type ResponseStream = ResponseStream<X509BundlesResponse>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<X509BundlesRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.fetch_x509_bundles(request).await })
    }
}

impl ServerStreamingService<JwtBundlesRequest> for FetchJwtBundles {
    type Response = JwtBundlesResponse;
    type ResponseStream = ResponseStream<JwtBundlesResponse>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<JwtBundlesRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.fetch_jwt_bundles(request).await })
    }
}

impl UnaryService<JwtsvidRequest> for FetchJwtSvid {
    type Response = JwtsvidResponse;
    type Future = BoxFuture<'static, Result<Response<JwtsvidResponse>, Status>>;

    fn call(&mut self, request: Request<JwtsvidRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.fetch_jwtsvid(request).await })
    }
}

impl UnaryService<ValidateJwtsvidRequest> for ValidateJwtSvid {
    type Response = ValidateJwtsvidResponse;
    type Future = BoxFuture<'static, Result<Response<ValidateJwtsvidResponse>, Status>>;

    fn call(&mut self, request: Request<ValidateJwtsvidRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.validate_jwtsvid(request).await })
    }
}

impl tower::Service<http::Request<Body>> for WorkloadApiServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let svc = self.inner.clone();
        let max = svc.sds.limits().max_message_size;
        let metrics = svc.sds.metrics().clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            let response = match path.as_str() {
                FETCH_X509_SVID => grpc(max).server_streaming(FetchX509Svid(svc), req).await,
                FETCH_X509_BUNDLES => grpc(max).server_streaming(FetchX509Bundles(svc), req).await,
                FETCH_JWT_BUNDLES => grpc(max).server_streaming(FetchJwtBundles(svc), req).await,
                FETCH_JWT_SVID => grpc(max).unary(FetchJwtSvid(svc), req).await,
                VALIDATE_JWT_SVID => grpc(max).unary(ValidateJwtSvid(svc), req).await,
                _ => Status::unimplemented("").into_http(),
            };
            count_decode_failure(&response, &metrics);
            Ok(response)
        })
    }
}

/// Counts a request tonic refused before the service saw it. tonic answers a request over
/// `--max-message-size` with `OutOfRange` and one that does not decode with `Internal`,
/// both as trailers-only responses; the service itself answers neither code.
fn count_decode_failure(response: &http::Response<Body>, metrics: &crate::metrics::Metrics) {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32);
    let reason = match code {
        Some(tonic::Code::OutOfRange) => "too_large",
        Some(tonic::Code::Internal) => "malformed",
        _ => return,
    };
    metrics.workload_bad_request(reason);
    warn!(reason, "refusing Workload API call: bad request message");
}
