//! `envoy.service.secret.v3.SecretDiscoveryService`: StreamSecrets (state of the world),
//! DeltaSecrets and FetchSecrets, over the secret manager's `watch` channels.
//!
//! Each stream has its own xDS state, driven by its response body (no task or channel of
//! its own; see [`serve_stream`]): the names it subscribed to, the
//! versions it was last sent, and the nonce of the last response. A response goes out when a
//! subscribed resource has a version the stream has not been sent; every response carries a
//! version and a fresh nonce. ACKs are recorded; a NACK is logged and counted and nothing is
//! re-sent until a new version exists, so a proxy that rejects a secret cannot start a push
//! loop. Requests with a stale nonce are ignored. Unknown names get a clear error (SotW and
//! Fetch: `NOT_FOUND`; Delta: the name in `removed_resources`, the delta protocol's "does not
//! exist"), never a hang.
//!
//! Trust bundles are served as the SPIRE agent serves them: `ROOTCA` (the agent's trust
//! domain), `ALL` (it and every federated domain) and `spiffe://<trust-domain>` (one of
//! those), each a `validation_context` whose `custom_validator_config` is Envoy's SPIFFE
//! certificate validator (`envoy.tls.cert_validator.spiffe`) listing each domain with its own
//! roots, so a root of one domain never vouches for an ID of another. With `--sds-plain-roots`,
//! or the node metadata `disable_spiffe_cert_validation: true` on a stream, they are a plain
//! `trusted_ca` instead (`ALL`: every domain's roots in one PEM). A bundle resource's version
//! changes only when its content does: `ROOTCA` with the agent's roots, `spiffe://<td>` with
//! that domain's, `ALL` with any. A `spiffe://<td>` the agent does not trust is unknown. When
//! a federated domain is removed, a Delta stream gets its name in `removed_resources`; a
//! state-of-the-world response leaves it out (Envoy keeps what it has until then).
//!
//! A stream that stops reading stalls only itself: the manager publishes into `watch`
//! channels and never waits for readers. This module never touches the CA.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TypedExtensionConfig, data_source::Specifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use parking_lot::Mutex;
use prost::Name;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use crate::attest::conn::ConnInfo;
use crate::attest::node::{NodeAttestor, Refusal};
use crate::config::{ResolvedCallers, SdsLimits};
use crate::federation::Bundles;
use crate::identity::{NameError, ResourceName, SpiffeId, TrustDomain, UnknownResource};
use crate::metrics::{ApiLabel, BAD_REQUEST_REASONS, Metrics, WORKLOAD_API};
use crate::secrets::{SecretManager, ServedBundle, ServedCert};

mod grpc;
pub use grpc::SdsServer;
pub(crate) use grpc::grpc;

/// How long FetchSecrets waits for a first certificate before answering UNAVAILABLE.
const FETCH_WAIT: Duration = Duration::from_secs(5);

type CertRx = watch::Receiver<Option<Arc<ServedCert>>>;
type BundleRx = watch::Receiver<Option<Arc<ServedBundle>>>;
type FederatedRx = watch::Receiver<Bundles>;
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The Envoy node metadata key that asks for plain `trusted_ca` bundles (the SPIRE agent's).
pub const DISABLE_SPIFFE_VALIDATION: &str = "disable_spiffe_cert_validation";

/// The SDS gRPC service.
#[derive(Debug, Clone)]
pub struct SdsService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    manager: Arc<SecretManager>,
    identify: Identify,
    metrics: Arc<Metrics>,
    callers: ResolvedCallers,
    limits: SdsLimits,
    shutdown: CancellationToken,
    next_stream: AtomicU64,
    /// SDS streams, by stream number.
    proxies: Mutex<BTreeMap<u64, ProxyState>>,
    /// Workload API streams (`crate::workload_api`), counted against `--max-streams` apart
    /// from the SDS ones.
    workload_clients: Mutex<BTreeMap<u64, ProxyState>>,
    /// The federated trust domains' bundles.
    federated: FederatedRx,
    /// Keeps `federated` open when the agent federates with nobody.
    _no_federation: Option<watch::Sender<Bundles>>,
    /// `--sds-plain-roots`: bundles are `trusted_ca`, not the SPIFFE validator.
    plain_roots: bool,
}

/// Where the trust bundles beyond the agent's own come from, and how they are served.
#[derive(Debug, Clone, Default)]
pub struct TrustOptions {
    /// The federated trust domains' bundles, if the agent federates.
    pub federated: Option<FederatedRx>,
    /// `--sds-plain-roots`: serve `trusted_ca` to every stream.
    pub plain_roots: bool,
}

/// Whose certificate a caller is served.
#[derive(Debug, Clone)]
pub enum Identify {
    /// Per-pod mode: every allowed caller is the workload, and is served its identity.
    Workload(SpiffeId),
    /// Node mode: each connection's caller is proven to be a pod's process, and served that
    /// pod's identity only.
    Node(Arc<NodeAttestor>),
}

/// An admitted caller and the identity it is served.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    /// Who connected.
    pub(crate) caller: Caller,
    /// The identity whose certificate it gets.
    pub(crate) identity: SpiffeId,
    /// Node mode: names other than `default`, the bundle names and the caller's own ID are
    /// refused as unauthorized rather than unknown.
    pub(crate) strict: bool,
}

/// Which API a call came in on: each has its own stream count, refusal counters and words
/// in the log, over the same caller rules and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Surface {
    /// Envoy's SDS.
    Sds,
    /// The SPIFFE Workload API.
    WorkloadApi,
}

/// What the agent knows of one connected proxy's stream, for `/proxies`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyState {
    /// Stream number, unique in this process.
    pub stream: u64,
    /// "sotw" or "delta".
    pub api: &'static str,
    /// The Envoy node ID, if the proxy sent one (empty on the Workload API).
    pub node_id: String,
    /// Who connected: the process's uid, gid and pid, from SO_PEERCRED.
    pub caller: Caller,
    /// The SPIFFE ID the stream is served.
    pub identity: String,
    /// Resource names subscribed.
    pub resources: Vec<String>,
    /// The version last sent (`default:3,ROOTCA:1`).
    pub sent_version: Option<String>,
    /// The version last ACKed.
    pub acked_version: Option<String>,
    /// The last NACK's message, cleared by the next ACK.
    pub nack: Option<String>,
    /// `acked` (the proxy has ACKed what was last sent), `nacked` (it rejected the last
    /// version), `pending` (a response awaits its ACK) or `waiting` (nothing sent yet).
    /// Workload API streams have no ACKs: `streaming` once something was sent.
    pub state: &'static str,
}

impl ProxyState {
    fn with_state(mut self) -> Self {
        self.state = if self.api == WORKLOAD_API {
            if self.sent_version.is_some() {
                "streaming"
            } else {
                "waiting"
            }
        } else if self.nack.is_some() {
            "nacked"
        } else if self.sent_version.is_none() {
            "waiting"
        } else if self.acked_version == self.sent_version {
            "acked"
        } else {
            "pending"
        };
        self
    }
}

/// The process at the other end of a connection, as the kernel recorded it at connect time
/// (SO_PEERCRED): not something the caller can claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Caller {
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
    /// Process ID; absent if the caller is in another PID namespace.
    pub pid: Option<i32>,
}

/// Why a request was refused. Becomes a `tonic::Status` in [`SdsError::into_status`] only.
#[derive(Debug, thiserror::Error)]
enum SdsError {
    #[error(transparent)]
    Unknown(#[from] UnknownResource),
    #[error(
        "the first request must name the secrets it wants (\"default\", \"ROOTCA\"); wildcard subscriptions are not served"
    )]
    Wildcard,
    #[error("type_url {0:?} is not served here; this is SDS ({SECRET_TYPE})")]
    WrongType(String),
    #[error("no certificate has been issued yet; retry shortly")]
    NotReady,
    #[error("{0}")]
    NotAuthorized(String),
}

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// State of the world on one stream.
#[derive(Debug, Default)]
struct SotwState {
    names: Option<BTreeSet<ResourceName>>,
    sent: BTreeMap<ResourceName, u64>,
    nonce: u64,
    last_nonce: Option<String>,
    /// The version of the agent's own roots last sent (in `ROOTCA`, `ALL` or
    /// `spiffe://<own>`), which an ACK confirms to the root rotation.
    sent_bundle: Option<u64>,
}

/// Incremental state on one delta stream.
#[derive(Debug, Default)]
struct DeltaState {
    subscribed: BTreeSet<ResourceName>,
    sent: BTreeMap<ResourceName, String>,
    removed: Vec<String>,
    nonce: u64,
    last_nonce: Option<String>,
    started: bool,
    /// As [`SotwState::sent_bundle`].
    sent_bundle: Option<u64>,
}

/// Removes a stream's traces when its task ends, however it ends.
pub(crate) struct StreamGuard {
    inner: Arc<Inner>,
    id: u64,
    api: &'static str,
    identity: SpiffeId,
    strict: bool,
    /// The proxy's node metadata asked for plain `trusted_ca` bundles.
    plain: std::sync::atomic::AtomicBool,
}

impl SdsService {
    /// A service over `manager`'s channels for the `callers` allowed, within `limits`; its
    /// streams end when `shutdown` fires. Bundles are served as `trust` says.
    pub fn new(
        manager: Arc<SecretManager>,
        identify: Identify,
        metrics: Arc<Metrics>,
        callers: ResolvedCallers,
        limits: SdsLimits,
        shutdown: CancellationToken,
        trust: TrustOptions,
    ) -> Self {
        let (federated, no_federation) = match trust.federated {
            Some(rx) => (rx, None),
            None => {
                let tx = watch::Sender::new(Bundles::default());
                (tx.subscribe(), Some(tx))
            }
        };
        Self {
            inner: Arc::new(Inner {
                manager,
                identify,
                metrics,
                callers,
                limits,
                shutdown,
                next_stream: AtomicU64::new(1),
                proxies: Mutex::new(BTreeMap::new()),
                workload_clients: Mutex::new(BTreeMap::new()),
                federated,
                _no_federation: no_federation,
                plain_roots: trust.plain_roots,
            }),
        }
    }

    /// The tonic server wrapper, refusing requests over `--max-message-size`.
    pub fn into_server(self) -> SdsServer<Self> {
        let max = self.inner.limits.max_message_size;
        SdsServer::new(self, max)
    }

    /// The streams connected now, SDS and Workload API, in the order they were opened.
    pub fn proxies(&self) -> Vec<ProxyState> {
        let mut all: Vec<ProxyState> = self
            .inner
            .proxies
            .lock()
            .values()
            .chain(self.inner.workload_clients.lock().values())
            .map(|p| p.clone().with_state())
            .collect();
        all.sort_by_key(|p| p.stream);
        all
    }

    /// The secret manager the streams read.
    pub(crate) fn manager(&self) -> &Arc<SecretManager> {
        &self.inner.manager
    }

    /// The metrics the streams count in.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The limits every stream is held to.
    pub(crate) fn limits(&self) -> SdsLimits {
        self.inner.limits
    }

    /// Fires when the agent shuts down.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The caller of `request`, if it may fetch secrets; `PermissionDenied` otherwise, logged
    /// and counted (per `surface`). Connections that did not come over a Unix socket carry
    /// no credentials and are refused too.
    pub(crate) fn authorize<T>(
        &self,
        request: &Request<T>,
        surface: Surface,
    ) -> Result<Caller, Status> {
        let denied = || match surface {
            Surface::Sds => self.inner.metrics.callers_denied.inc(),
            Surface::WorkloadApi => self.inner.metrics.workload_callers_denied.inc(),
        };
        let cred = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            denied();
            warn!(
                api = surface.name(),
                "refusing caller: no peer credentials on the connection"
            );
            return Err(Status::permission_denied(
                "the caller's credentials are unknown; only local Unix socket callers are served",
            ));
        };
        let caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        };
        if self.inner.callers.allows(caller.uid, caller.gid) {
            return Ok(caller);
        }
        denied();
        warn!(
            api = surface.name(),
            uid = caller.uid,
            gid = caller.gid,
            pid = caller.pid,
            "refusing {} caller: its uid and gid are not allowed (--allowed-uids, --allowed-gids)",
            surface.name()
        );
        Err(Status::permission_denied(format!(
            "uid {} gid {} may not fetch secrets from this agent",
            caller.uid, caller.gid
        )))
    }

    /// The identity `caller` on connection `conn` is served: per-pod mode's, or (node mode)
    /// the one proven for the connection. A caller that fails attestation is answered
    /// `UNAUTHENTICATED` and its connection closed; one whose pod the kubelet does not list
    /// (yet) is answered `UNAVAILABLE`. Both are counted and logged.
    pub(crate) async fn identify(
        &self,
        conn: Option<ConnInfo>,
        caller: Caller,
        surface: Surface,
    ) -> Result<Admitted, Status> {
        let attestor = match &self.inner.identify {
            Identify::Workload(id) => {
                return Ok(Admitted {
                    caller,
                    identity: id.clone(),
                    strict: false,
                });
            }
            Identify::Node(attestor) => attestor,
        };
        let count = |reason: &'static str| match surface {
            Surface::Sds => self.inner.metrics.bad_request(reason),
            Surface::WorkloadApi => self.inner.metrics.workload_bad_request(reason),
        };
        let Some(conn) = conn else {
            count(BAD_REQUEST_REASONS[8]);
            return Err(Status::unauthenticated(
                "the caller's connection is unknown; only local Unix socket callers are served",
            ));
        };
        match attestor.identify(&conn).await {
            Ok(identity) => Ok(Admitted {
                caller,
                identity,
                strict: true,
            }),
            Err(refusal @ Refusal::Unauthenticated(_)) => {
                count(BAD_REQUEST_REASONS[8]);
                self.inner.metrics.attestations_refused.inc();
                conn.close_soon();
                Err(Status::unauthenticated(refusal.to_string()))
            }
            Err(refusal) => {
                count(BAD_REQUEST_REASONS[10]);
                Err(Status::unavailable(refusal.to_string()))
            }
        }
    }

    /// Registers a new stream, unless `--max-streams` of its API are open already.
    pub(crate) fn start_stream(
        &self,
        api: &'static str,
        admitted: Admitted,
    ) -> Result<StreamGuard, Status> {
        let Admitted {
            caller,
            identity,
            strict,
        } = admitted;
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let surface = Surface::of(api);
        let mut proxies = self.inner.registry(api).lock();
        if proxies.len() >= self.inner.limits.max_streams {
            drop(proxies);
            match surface {
                Surface::Sds => self.inner.metrics.bad_request(BAD_REQUEST_REASONS[4]),
                Surface::WorkloadApi => self.inner.metrics.workload_bad_request("too_many_streams"),
            }
            warn!(
                api = surface.name(),
                uid = caller.uid,
                pid = caller.pid,
                max = self.inner.limits.max_streams,
                "refusing {} stream: --max-streams are open",
                surface.name()
            );
            return Err(Status::resource_exhausted(format!(
                "this agent serves at most {} streams at once",
                self.inner.limits.max_streams
            )));
        }
        self.inner
            .metrics
            .streams_open
            .get_or_create(&ApiLabel { api })
            .inc();
        proxies.insert(
            id,
            ProxyState {
                stream: id,
                api,
                // Filled in from the first request that names its node.
                node_id: String::new(),
                caller,
                identity: identity.to_string(),
                resources: vec![],
                sent_version: None,
                acked_version: None,
                nack: None,
                state: "waiting",
            },
        );
        drop(proxies);
        Ok(StreamGuard {
            inner: self.inner.clone(),
            id,
            api,
            identity,
            strict,
            plain: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = self.authorize(&request, Surface::Sds)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let admitted = self.identify(conn, caller, Surface::Sds).await?;
        let guard = self.start_stream(SotwState::API, admitted)?;
        let span = info_span!("sds_stream", api = "sotw", stream = guard.id);
        Ok(Response::new(serve_stream::<SotwState>(
            guard,
            request.into_inner(),
            span,
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let caller = self.authorize(&request, Surface::Sds)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let admitted = self.identify(conn, caller, Surface::Sds).await?;
        let guard = self.start_stream(DeltaState::API, admitted)?;
        let span = info_span!("sds_stream", api = "delta", stream = guard.id);
        Ok(Response::new(serve_stream::<DeltaState>(
            guard,
            request.into_inner(),
            span,
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = self.authorize(&request, Surface::Sds)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let admitted = self.identify(conn, caller, Surface::Sds).await?;
        let inner = &self.inner;
        let req = request.into_inner();
        let result = async {
            check_type(&req.type_url)?;
            if req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*") {
                return Err(SdsError::Wildcard);
            }
            let names = parse_names(&req.resource_names, &admitted)?;
            let plain = inner.plain_roots || req.node.as_ref().is_some_and(disables_validator);
            let federated = inner.federated.borrow().clone();
            let own = inner.manager.trust_domain();
            if let Some(unknown) = names.iter().find(|n| !trusted(n, own, &federated)) {
                return Err(SdsError::Unknown(UnknownResource::of(&unknown.as_str())));
            }
            let mut cert_rx = inner.manager.subscribe_cert(&admitted.identity);
            let mut bundle_rx = inner.manager.subscribe_bundle();
            let deadline = tokio::time::Instant::now() + FETCH_WAIT;
            loop {
                let view = View {
                    cert: cert_rx.borrow().clone(),
                    bundle: bundle_rx.borrow().clone(),
                    federated: federated.clone(),
                    own,
                    plain,
                };
                if names.iter().all(|n| view.version(n).is_some()) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return Err(SdsError::NotReady),
                    r = cert_rx.changed() => if r.is_err() { return Err(SdsError::NotReady) },
                    r = bundle_rx.changed() => if r.is_err() { return Err(SdsError::NotReady) },
                }
            }
            let view = View {
                cert: cert_rx.borrow().clone(),
                bundle: bundle_rx.borrow().clone(),
                federated,
                own,
                plain,
            };
            let (versions, resources) = view.encode_all(&names);
            Ok(DiscoveryResponse {
                version_info: version_info(&versions),
                resources,
                type_url: SECRET_TYPE.into(),
                nonce: format!(
                    "fetch-{}",
                    inner.next_stream.fetch_add(1, Ordering::Relaxed)
                ),
                ..Default::default()
            })
        }
        .await;
        match result {
            Ok(resp) => {
                inner
                    .metrics
                    .pushes
                    .get_or_create(&ApiLabel { api: "fetch" })
                    .inc();
                Ok(Response::new(resp))
            }
            Err(e) => Err(e.into_status(&inner.metrics)),
        }
    }
}

impl Inner {
    /// The map the streams of `api` are registered in.
    fn registry(&self, api: &str) -> &Mutex<BTreeMap<u64, ProxyState>> {
        match Surface::of(api) {
            Surface::Sds => &self.proxies,
            Surface::WorkloadApi => &self.workload_clients,
        }
    }
}

impl Surface {
    fn of(api: &str) -> Self {
        if api == WORKLOAD_API {
            Surface::WorkloadApi
        } else {
            Surface::Sds
        }
    }

    /// How logs name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Surface::Sds => "SDS",
            Surface::WorkloadApi => "Workload API",
        }
    }
}

/// A token bucket: `rate` requests per second, bursts of up to `rate`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes a token at `now`, if one is left.
    pub(crate) fn take(&mut self, now: tokio::time::Instant) -> bool {
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely by `now`.
    pub(crate) fn is_full(&self, now: tokio::time::Instant) -> bool {
        self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate >= self.rate
    }
}

/// One stream's xDS state machine: what a request changes, and what response is owed.
/// [`serve_stream`] drives it the same way for both flavours of the protocol.
trait XdsState: Default + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    /// The `api` metric label.
    const API: &'static str;

    fn on_request(&mut self, g: &StreamGuard, req: Self::Request) -> Result<(), SdsError>;

    fn pending(&mut self, stream: u64, view: &View<'_>) -> Option<Self::Response>;

    /// The versions the client was last sent, as its ACK will name them.
    fn sent_version(&self) -> String;
}

/// One stream, as the stream of its responses: push what is owed, then wait for a request,
/// a new secret, or shutdown.
///
/// The stream is polled by the HTTP/2 stream's own task when the client has window for more,
/// so there is no task, channel or buffered response per stream beyond this state. A client
/// that stops reading stops only its own stream being polled.
fn serve_stream<S: XdsState>(
    guard: StreamGuard,
    inbound: Streaming<S::Request>,
    span: tracing::Span,
) -> ResponseStream<S::Response> {
    let inner = guard.inner.clone();
    let driver = StreamDriver::<S> {
        cert_rx: inner.manager.subscribe_cert(&guard.identity),
        bundle_rx: inner.manager.subscribe_bundle(),
        federated_rx: Some(inner.federated.clone()),
        bucket: TokenBucket::new(inner.limits.max_requests_per_second),
        st: S::default(),
        guard,
        inbound,
        ended: false,
    };
    Box::pin(futures::stream::unfold(driver, move |mut d| {
        async move {
            let item = d.next().await?;
            Some((item, d))
        }
        .instrument(span.clone())
    }))
}

/// The state of one stream between two of its responses.
struct StreamDriver<S: XdsState> {
    guard: StreamGuard,
    inbound: Streaming<S::Request>,
    cert_rx: CertRx,
    bundle_rx: BundleRx,
    /// The federated bundles, while their source lives.
    federated_rx: Option<FederatedRx>,
    st: S,
    bucket: TokenBucket,
    /// An error status was returned; the stream is over.
    ended: bool,
}

impl<S: XdsState> StreamDriver<S> {
    /// The next message for the client: a response, or the status that ends the stream.
    /// `None` ends it with OK (client gone, half-closed, or agent shutting down).
    async fn next(&mut self) -> Option<Result<S::Response, Status>> {
        if self.ended {
            return None;
        }
        let inner = self.guard.inner.clone();
        let api = ApiLabel { api: S::API };
        loop {
            let view = View {
                cert: self.cert_rx.borrow_and_update().clone(),
                bundle: self.bundle_rx.borrow_and_update().clone(),
                federated: self
                    .federated_rx
                    .as_mut()
                    .map(|rx| rx.borrow_and_update().clone())
                    .unwrap_or_default(),
                own: inner.manager.trust_domain(),
                plain: inner.plain_roots
                    || self.guard.plain.load(std::sync::atomic::Ordering::Relaxed),
            };
            let pending = self.st.pending(self.guard.id, &view);
            drop(view);
            if let Some(resp) = pending {
                inner.metrics.pushes.get_or_create(&api).inc();
                let sent = self.st.sent_version();
                self.guard.update(|p| p.sent_version = Some(sent));
                return Some(Ok(resp));
            }
            tokio::select! {
                _ = inner.shutdown.cancelled() => return None,
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if !self.bucket.take(tokio::time::Instant::now()) {
                            inner.metrics.bad_request(BAD_REQUEST_REASONS[5]);
                            warn!(
                                max = inner.limits.max_requests_per_second,
                                "ending SDS stream: more requests per second than --max-requests-per-second"
                            );
                            return self.end(Status::resource_exhausted(format!(
                                "more than {} requests per second on one stream",
                                inner.limits.max_requests_per_second
                            )));
                        }
                        if let Err(e) = self.st.on_request(&self.guard, req) {
                            warn!(error = %e, "refusing SDS request");
                            return self.end(e.into_status(&inner.metrics));
                        }
                    }
                    Ok(None) => return None,
                    Err(status) => {
                        // tonic reports what it could not decode as the stream's error;
                        // anything else is the client going away.
                        let reason = match status.code() {
                            tonic::Code::OutOfRange => Some(BAD_REQUEST_REASONS[6]),
                            tonic::Code::Internal if status.message().contains("decode") => {
                                Some(BAD_REQUEST_REASONS[7])
                            }
                            _ => None,
                        };
                        match reason {
                            Some(reason) => {
                                inner.metrics.bad_request(reason);
                                warn!(reason, message = status.message(), "ending SDS stream: bad request");
                                return self.end(status);
                            }
                            None => {
                                debug!(%status, "stream ended by the client");
                                return None;
                            }
                        }
                    }
                },
                r = self.cert_rx.changed() => if r.is_err() { return None },
                r = self.bundle_rx.changed() => if r.is_err() { return None },
                open = federation_changed(&mut self.federated_rx) => {
                    // The source is gone (the agent is stopping): serve what was last seen.
                    if !open {
                        self.federated_rx = None;
                    }
                }
            }
        }
    }

    /// Ends the stream with `status`.
    fn end(&mut self, status: Status) -> Option<Result<S::Response, Status>> {
        self.ended = true;
        Some(Err(status))
    }
}

impl XdsState for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const API: &'static str = "sotw";

    fn on_request(&mut self, g: &StreamGuard, req: DiscoveryRequest) -> Result<(), SdsError> {
        match g.admit(
            Self::API,
            &req.type_url,
            req.node.as_ref(),
            &req.response_nonce,
            self.last_nonce.as_deref(),
        )? {
            Admit::Stale => return Ok(()),
            Admit::Reply => {
                g.ack_or_nack(Self::API, &req.version_info, req.error_detail.as_ref());
                if req.error_detail.is_none()
                    && let Some(v) = self.sent_bundle
                {
                    g.bundle_acked(v);
                }
            }
            Admit::Fresh => {}
        }
        if self.names.is_none() && (req.resource_names.is_empty())
            || req.resource_names.iter().any(|n| n == "*")
        {
            return Err(SdsError::Wildcard);
        }
        let names = parse_names(&req.resource_names, g)?;
        // A trust domain must exist when it is first asked for; one removed later is left
        // out of responses, not refused again in every ACK.
        let federated = g.inner.federated.borrow().clone();
        let own = g.inner.manager.trust_domain();
        let known = self.names.as_ref();
        if let Some(unknown) = names
            .iter()
            .filter(|n| known.is_none_or(|k| !k.contains(*n)))
            .find(|n| !trusted(n, own, &federated))
        {
            return Err(SdsError::Unknown(UnknownResource::of(&unknown.as_str())));
        }
        self.sent.retain(|n, _| names.contains(n));
        g.update(|p| {
            p.resources = names
                .iter()
                .map(|n| n.wire_name(&g.identity).into())
                .collect()
        });
        g.bundle_subscription(names.iter().any(|n| carries_own_roots(n, own)));
        self.names = Some(names);
        Ok(())
    }

    /// The response owed to the client, if a subscribed resource has a version it has not
    /// been sent. SotW responses carry every subscribed resource that exists.
    fn pending(&mut self, stream: u64, view: &View<'_>) -> Option<DiscoveryResponse> {
        let names = self.names.as_ref()?;
        // Compare versions first: most wake-ups (ACKs, the other resource changing) owe
        // nothing, and encoding is the expensive part.
        let owed = names.iter().any(|n| {
            view.version(n)
                .is_some_and(|v| self.sent.get(n) != Some(&v))
        });
        if !owed {
            return None;
        }
        let (versions, resources) = view.encode_all(names);
        if versions.iter().any(|(n, _)| carries_own_roots(n, view.own)) {
            self.sent_bundle = view.bundle.as_ref().map(|b| b.version);
        }
        self.sent = versions.iter().cloned().collect();
        self.nonce += 1;
        let nonce = format!("{stream}-{}", self.nonce);
        self.last_nonce = Some(nonce.clone());
        debug!(%nonce, ?versions, "pushing");
        Some(DiscoveryResponse {
            version_info: version_info(&versions),
            resources,
            type_url: SECRET_TYPE.into(),
            nonce,
            ..Default::default()
        })
    }

    fn sent_version(&self) -> String {
        let sent: Vec<_> = self.sent.iter().map(|(n, v)| (n.clone(), *v)).collect();
        version_info(&sent)
    }
}

impl XdsState for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const API: &'static str = "delta";

    fn on_request(&mut self, g: &StreamGuard, req: DeltaDiscoveryRequest) -> Result<(), SdsError> {
        match g.admit(
            Self::API,
            &req.type_url,
            req.node.as_ref(),
            &req.response_nonce,
            self.last_nonce.as_deref(),
        )? {
            Admit::Stale => return Ok(()),
            Admit::Reply => {
                let acked = self.sent_version();
                g.ack_or_nack(Self::API, &acked, req.error_detail.as_ref());
                if req.error_detail.is_none()
                    && let Some(v) = self.sent_bundle
                {
                    g.bundle_acked(v);
                }
            }
            Admit::Fresh => {}
        }
        if !self.started {
            self.started = true;
            if req.resource_names_subscribe.is_empty() {
                return Err(SdsError::Wildcard);
            }
            // Versions the client already holds (after a reconnect): do not resend them.
            for (name, version) in &req.initial_resource_versions {
                if let Ok(n) = g.name(name) {
                    self.sent.insert(n, version.clone());
                }
            }
        }
        let federated = g.inner.federated.borrow().clone();
        let own = g.inner.manager.trust_domain();
        for name in &req.resource_names_subscribe {
            if name == "*" {
                return Err(SdsError::Wildcard);
            }
            match g.name(name) {
                Ok(n) if !trusted(&n, own, &federated) => {
                    // Stays subscribed: it is sent if the domain is federated later.
                    g.inner.metrics.bad_request(BAD_REQUEST_REASONS[0]);
                    warn!(name = %n, "subscription to a trust domain this agent does not trust; answering that it does not exist");
                    self.removed.push(n.as_str().into_owned());
                    self.subscribed.insert(n);
                }
                Ok(n) => {
                    self.subscribed.insert(n);
                }
                Err(NameError::Unknown(e)) => {
                    g.inner.metrics.bad_request(BAD_REQUEST_REASONS[0]);
                    warn!(error = %e, "subscription to an unknown secret; answering that it does not exist");
                    self.removed.push(e.0);
                }
                Err(e) => return Err(e.into()),
            }
        }
        for name in &req.resource_names_unsubscribe {
            if let Ok(n) = g.name(name) {
                self.subscribed.remove(&n);
                self.sent.remove(&n);
            }
        }
        g.bundle_subscription(self.subscribed.iter().any(|n| carries_own_roots(n, own)));
        g.update(|p| {
            p.resources = self
                .subscribed
                .iter()
                .map(|n| n.wire_name(&g.identity).into())
                .collect();
        });
        Ok(())
    }

    fn pending(&mut self, stream: u64, view: &View<'_>) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        for n in &self.subscribed {
            match view.version(n) {
                Some(v) if self.sent.get(n) != Some(&v.to_string()) => {
                    if let Some((v, any)) = view.resource(n) {
                        let v = v.to_string();
                        self.sent.insert(n.clone(), v.clone());
                        if carries_own_roots(n, view.own) {
                            self.sent_bundle = view.bundle.as_ref().map(|b| b.version);
                        }
                        resources.push(Resource {
                            name: view.wire_name(n).into_owned(),
                            version: v,
                            resource: Some(any),
                            ..Default::default()
                        });
                    }
                }
                Some(_) => {}
                // A trust domain sent before and no longer trusted: it is removed.
                None if matches!(n, ResourceName::TrustDomain(_))
                    && self.sent.remove(n).is_some() =>
                {
                    self.removed.push(n.as_str().into_owned());
                }
                None => {}
            }
        }
        if resources.is_empty() && self.removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        let nonce = format!("{stream}-{}", self.nonce);
        self.last_nonce = Some(nonce.clone());
        debug!(%nonce, resources = resources.len(), removed = self.removed.len(), "pushing");
        Some(DeltaDiscoveryResponse {
            system_version_info: version_info(
                &self
                    .sent
                    .iter()
                    .filter_map(|(n, v)| v.parse().ok().map(|v| (n.clone(), v)))
                    .collect::<Vec<_>>(),
            ),
            resources,
            type_url: SECRET_TYPE.into(),
            removed_resources: std::mem::take(&mut self.removed),
            nonce,
            ..Default::default()
        })
    }

    fn sent_version(&self) -> String {
        self.sent
            .iter()
            .map(|(n, v)| format!("{n}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What the nonce of a request says about it.
enum Admit {
    /// No nonce: a first request, or one that changes subscriptions out of turn.
    Fresh,
    /// The nonce of the last response: an ACK or a NACK of it.
    Reply,
    /// An older nonce: the request is superseded and ignored.
    Stale,
}

impl StreamGuard {
    /// The checks every request gets, SotW or delta: its type, its node, its nonce.
    fn admit(
        &self,
        api: &'static str,
        type_url: &str,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        nonce: &str,
        last_nonce: Option<&str>,
    ) -> Result<Admit, SdsError> {
        check_type(type_url)?;
        if let Some(node) = node {
            self.update(|p| p.node_id.clone_from(&node.id));
            self.plain.store(
                disables_validator(node),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if nonce.is_empty() {
            return Ok(Admit::Fresh);
        }
        if last_nonce != Some(nonce) {
            self.inner
                .metrics
                .stale_nonces
                .get_or_create(&ApiLabel { api })
                .inc();
            debug!(nonce, "ignoring request with a stale nonce");
            return Ok(Admit::Stale);
        }
        Ok(Admit::Reply)
    }

    /// Tells the secret manager whether this stream is subscribed to the trust bundle: a
    /// root rotation waits for every subscribed proxy to ACK a new root.
    fn bundle_subscription(&self, subscribed: bool) {
        if self.api != WORKLOAD_API {
            self.inner.manager.bundle_subscription(self.id, subscribed);
        }
    }

    /// The proxy ACKed a response that carried bundle `version`.
    fn bundle_acked(&self, version: u64) {
        self.inner.manager.bundle_acked(self.id, version);
    }

    /// The stream's number.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The identity the stream is served.
    pub(crate) fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// A resource name as this stream's caller may ask for it.
    fn name(&self, name: &str) -> Result<ResourceName, NameError> {
        ResourceName::for_caller(name, &self.identity, self.strict)
    }

    /// Changes what `/proxies` shows of the stream.
    pub(crate) fn update(&self, f: impl FnOnce(&mut ProxyState)) {
        if let Some(p) = self.inner.registry(self.api).lock().get_mut(&self.id) {
            f(p);
        }
    }

    fn ack_or_nack(
        &self,
        api: &'static str,
        version: &str,
        error: Option<&envoy_types::pb::google::rpc::Status>,
    ) {
        let label = ApiLabel { api };
        match error {
            Some(status) => {
                self.inner.metrics.nacks.get_or_create(&label).inc();
                let node = self
                    .inner
                    .proxies
                    .lock()
                    .get(&self.id)
                    .map(|p| p.node_id.clone())
                    .unwrap_or_default();
                warn!(node, version, code = status.code, message = %status.message, "proxy rejected the secret (NACK); not re-sending until it changes");
                let message = status.message.chars().take(512).collect::<String>();
                self.update(|p| p.nack = Some(message));
            }
            None => {
                self.inner.metrics.acks.get_or_create(&label).inc();
                debug!(version, "ACK");
                self.update(|p| {
                    p.acked_version = Some(version.to_owned());
                    p.nack = None;
                });
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.inner
            .metrics
            .streams_open
            .get_or_create(&ApiLabel { api: self.api })
            .dec();
        self.inner.registry(self.api).lock().remove(&self.id);
        self.bundle_subscription(false);
    }
}

impl SdsError {
    /// The `reason` label of each error, in [`BAD_REQUEST_REASONS`]' order.
    fn reason(&self) -> &'static str {
        match self {
            SdsError::Unknown(_) => BAD_REQUEST_REASONS[0],
            SdsError::Wildcard => BAD_REQUEST_REASONS[1],
            SdsError::WrongType(_) => BAD_REQUEST_REASONS[2],
            SdsError::NotReady => BAD_REQUEST_REASONS[3],
            SdsError::NotAuthorized(_) => BAD_REQUEST_REASONS[9],
        }
    }

    /// The one place SDS errors become gRPC statuses (and are counted).
    fn into_status(self, metrics: &Metrics) -> Status {
        let reason = self.reason();
        let status = match &self {
            SdsError::Unknown(_) => Status::not_found(self.to_string()),
            SdsError::Wildcard | SdsError::WrongType(_) | SdsError::NotAuthorized(_) => {
                Status::invalid_argument(self.to_string())
            }
            SdsError::NotReady => Status::unavailable(self.to_string()),
        };
        metrics.bad_request(reason);
        status
    }
}

fn check_type(type_url: &str) -> Result<(), SdsError> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(SdsError::WrongType(type_url.chars().take(256).collect()))
    }
}

/// The names of a SotW or Fetch request, as `caller` may ask for them.
fn parse_names(
    names: &[String],
    caller: &impl AsCaller,
) -> Result<BTreeSet<ResourceName>, SdsError> {
    let (own, strict) = caller.own();
    names
        .iter()
        .map(|n| ResourceName::for_caller(n, own, strict).map_err(SdsError::from))
        .collect()
}

/// Whose names a request's resource names are read as: a stream's or a Fetch caller's.
trait AsCaller {
    fn own(&self) -> (&SpiffeId, bool);
}

impl AsCaller for StreamGuard {
    fn own(&self) -> (&SpiffeId, bool) {
        (&self.identity, self.strict)
    }
}

impl AsCaller for Admitted {
    fn own(&self) -> (&SpiffeId, bool) {
        (&self.identity, self.strict)
    }
}

impl From<NameError> for SdsError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::Unknown(u) => SdsError::Unknown(u),
            NameError::NotAuthorized(n) => {
                SdsError::NotAuthorized(NameError::NotAuthorized(n).to_string())
            }
        }
    }
}

/// Whether the stream's proxy asked for plain `trusted_ca` bundles: node metadata
/// `disable_spiffe_cert_validation` true (a boolean, or the string `"true"` as metadata set
/// from the command line carries it).
fn disables_validator(node: &envoy_types::pb::envoy::config::core::v3::Node) -> bool {
    use envoy_types::pb::google::protobuf::value::Kind;
    node.metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION))
        .and_then(|v| v.kind.as_ref())
        .is_some_and(|k| match k {
            Kind::BoolValue(b) => *b,
            Kind::StringValue(s) => s.eq_ignore_ascii_case("true"),
            _ => false,
        })
}

/// Whether `name` names something the agent serves now: every name but a trust domain it
/// does not trust.
fn trusted(name: &ResourceName, own: &TrustDomain, federated: &Bundles) -> bool {
    match name {
        ResourceName::TrustDomain(td) => td == own || federated.contains_key(td),
        _ => true,
    }
}

/// Waits until the federated bundles change; `false` once their source is gone. Never
/// returns without one.
async fn federation_changed(rx: &mut Option<FederatedRx>) -> bool {
    match rx.as_mut() {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// `default:3,ROOTCA:1`: the versions of the resources in a response.
fn version_info(versions: &[(ResourceName, u64)]) -> String {
    versions
        .iter()
        .map(|(n, v)| format!("{n}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `name` lists the agent's own roots, so that a proxy's ACK of it tells the root
/// rotation that the proxy trusts them.
fn carries_own_roots(name: &ResourceName, own: &TrustDomain) -> bool {
    match name {
        ResourceName::RootCa | ResourceName::All => true,
        ResourceName::TrustDomain(td) => td == own,
        ResourceName::Default | ResourceName::OwnId => false,
    }
}

/// What responses are built from, read at one moment.
#[derive(Debug)]
struct View<'a> {
    cert: Option<Arc<ServedCert>>,
    bundle: Option<Arc<ServedBundle>>,
    federated: Bundles,
    /// The agent's trust domain.
    own: &'a TrustDomain,
    /// Bundles as plain `trusted_ca`, not the SPIFFE validator.
    plain: bool,
}

impl View<'_> {
    /// The version of `name` now, if it exists. A bundle's changes only when its content
    /// does: `ALL` adds the federated set's generation to the agent's roots' version (both
    /// only grow, so the sum changes whenever either does).
    fn version(&self, name: &ResourceName) -> Option<u64> {
        match name {
            ResourceName::Default | ResourceName::OwnId => self.cert.as_ref().map(|c| c.version),
            ResourceName::RootCa => self.bundle.as_ref().map(|b| b.version),
            ResourceName::All => self
                .bundle
                .as_ref()
                .map(|b| b.version.saturating_add(self.federated.generation)),
            ResourceName::TrustDomain(td) if td == self.own => {
                self.bundle.as_ref().map(|b| b.version)
            }
            ResourceName::TrustDomain(td) => self.federated.get(td).map(|b| b.version),
        }
    }

    /// The versions and encodings of those of `names` that exist now.
    fn encode_all(&self, names: &BTreeSet<ResourceName>) -> (Vec<(ResourceName, u64)>, Vec<Any>) {
        names
            .iter()
            .filter_map(|n| self.resource(n).map(|(v, any)| ((n.clone(), v), any)))
            .unzip()
    }

    /// The name a resource goes by on the wire: the caller's own ID is the certificate's.
    fn wire_name(&self, name: &ResourceName) -> std::borrow::Cow<'static, str> {
        match &self.cert {
            Some(c) => name.wire_name(&c.identity),
            None => name.as_str(),
        }
    }

    /// The trust domains `name` lists, each with its roots (PEM), the agent's first.
    fn domains(&self, name: &ResourceName) -> Option<Vec<(&TrustDomain, &str)>> {
        let own = || self.bundle.as_ref().map(|b| (self.own, b.pem.as_str()));
        match name {
            ResourceName::Default | ResourceName::OwnId => None,
            ResourceName::RootCa => Some(vec![own()?]),
            ResourceName::All => {
                let mut all = vec![own()?];
                all.extend(self.federated.iter().map(|(td, b)| (td, b.pem.as_str())));
                Some(all)
            }
            ResourceName::TrustDomain(td) if td == self.own => Some(vec![own()?]),
            ResourceName::TrustDomain(td) => {
                let (td, b) = self.federated.get_key_value(td)?;
                Some(vec![(td, b.pem.as_str())])
            }
        }
    }

    /// The resource's version and its encoding, if it exists now.
    fn resource(&self, name: &ResourceName) -> Option<(u64, Any)> {
        let v = self.version(name)?;
        let ty = match name {
            ResourceName::Default | ResourceName::OwnId => {
                let c = self.cert.as_ref()?;
                let tls = TlsCertificate {
                    certificate_chain: inline(c.chain_pem.as_bytes()),
                    private_key: inline(c.key_pem().as_bytes()),
                    ..Default::default()
                };
                secret::Type::TlsCertificate(tls)
            }
            bundle_name => {
                let domains = self.domains(bundle_name)?;
                secret::Type::ValidationContext(validation_context(&domains, self.plain))
            }
        };
        let secret = Secret {
            name: self.wire_name(name).into_owned(),
            r#type: Some(ty),
        };
        Some((
            v,
            Any {
                type_url: Secret::type_url(),
                value: prost::Message::encode_to_vec(&secret),
            },
        ))
    }
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

/// The `validation_context` of `domains`: Envoy's SPIFFE validator with one trust domain
/// (its name without `spiffe://`, as Envoy wants it) and roots each, or, `plain`, every
/// domain's roots as one `trusted_ca`.
fn validation_context(
    domains: &[(&TrustDomain, &str)],
    plain: bool,
) -> CertificateValidationContext {
    if plain {
        let pem: String = domains.iter().map(|(_, pem)| *pem).collect();
        return CertificateValidationContext {
            trusted_ca: inline(pem.as_bytes()),
            ..Default::default()
        };
    }
    let config = SpiffeCertValidatorConfig {
        trust_domains: domains
            .iter()
            .map(|(td, pem)| spiffe_cert_validator_config::TrustDomain {
                name: td.to_string(),
                trust_bundle: inline(pem.as_bytes()),
                ..Default::default()
            })
            .collect(),
        trust_bundles: None,
    };
    CertificateValidationContext {
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.into(),
            typed_config: Some(Any {
                type_url: SpiffeCertValidatorConfig::type_url(),
                value: prost::Message::encode_to_vec(&config),
            }),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    // Test code: a panic is the failure report.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message as _;

    use super::*;
    use crate::federation::{FederatedBundle, FederatedBundles};

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    fn bundle(pem: &str, version: u64) -> FederatedBundle {
        FederatedBundle {
            der: pem.as_bytes().to_vec(),
            pem: pem.into(),
            roots: 1,
            version,
        }
    }

    fn federated(generation: u64, domains: &[(&str, &str, u64)]) -> Bundles {
        Arc::new(FederatedBundles {
            generation,
            domains: domains
                .iter()
                .map(|(name, pem, v)| (td(name), bundle(pem, *v)))
                .collect::<BTreeMap<_, _>>(),
        })
    }

    /// The validator's (name, PEM) pairs, or `None` for a plain `trusted_ca`.
    fn listed(vc: &CertificateValidationContext) -> Option<Vec<(String, String)>> {
        let custom = vc.custom_validator_config.as_ref()?;
        assert_eq!(custom.name, SPIFFE_VALIDATOR);
        assert!(vc.trusted_ca.is_none());
        let any = custom.typed_config.as_ref().unwrap();
        assert_eq!(any.type_url, SpiffeCertValidatorConfig::type_url());
        let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
        Some(
            config
                .trust_domains
                .into_iter()
                .map(|d| {
                    let Some(Specifier::InlineBytes(pem)) =
                        d.trust_bundle.and_then(|b| b.specifier)
                    else {
                        panic!("not inline")
                    };
                    (d.name, String::from_utf8(pem).unwrap())
                })
                .collect(),
        )
    }

    #[test]
    fn a_validation_context_lists_each_domain_by_bare_name_or_is_plain_roots() {
        let (a, b) = (td("a.test"), td("b.test"));
        let domains = [(&a, "A\n"), (&b, "B\n")];
        let vc = validation_context(&domains, false);
        assert_eq!(
            listed(&vc),
            Some(vec![
                ("a.test".to_string(), "A\n".to_string()),
                ("b.test".to_string(), "B\n".to_string())
            ])
        );
        let plain = validation_context(&domains, true);
        assert!(plain.custom_validator_config.is_none());
        assert_eq!(
            plain.trusted_ca.and_then(|d| d.specifier),
            Some(Specifier::InlineBytes(b"A\nB\n".to_vec()))
        );
    }

    #[test]
    fn only_true_node_metadata_disables_the_validator() {
        let node = |kind: Option<Kind>| Node {
            metadata: kind.map(|k| Struct {
                fields: [(
                    DISABLE_SPIFFE_VALIDATION.to_string(),
                    Value { kind: Some(k) },
                )]
                .into(),
            }),
            ..Default::default()
        };
        assert!(disables_validator(&node(Some(Kind::BoolValue(true)))));
        assert!(disables_validator(&node(Some(Kind::StringValue(
            "TRUE".into()
        )))));
        for no in [
            None,
            Some(Kind::BoolValue(false)),
            Some(Kind::StringValue("yes".into())),
            Some(Kind::NumberValue(1.0)),
        ] {
            assert!(!disables_validator(&node(no.clone())), "{no:?}");
        }
    }

    #[test]
    fn a_federated_domain_has_its_own_version_and_others_do_not_move() {
        let own = td("own.test");
        let view = |f: Bundles| View {
            cert: None,
            bundle: None,
            federated: f,
            own: &own,
            plain: false,
        };
        let before = view(federated(2, &[("a.test", "A", 1), ("b.test", "B", 2)]));
        // a.test changed: a new version for it and a new generation; b.test keeps its own.
        let after = view(federated(3, &[("a.test", "A2", 3), ("b.test", "B", 2)]));
        let (a, b) = (
            ResourceName::TrustDomain(td("a.test")),
            ResourceName::TrustDomain(td("b.test")),
        );
        assert_ne!(before.version(&a), after.version(&a));
        assert_eq!(before.version(&b), after.version(&b));
        let (v, any) = after.resource(&a).unwrap();
        assert_eq!(Some(v), after.version(&a));
        let secret = Secret::decode(any.value.as_slice()).unwrap();
        assert_eq!(secret.name, "spiffe://a.test");
        let Some(secret::Type::ValidationContext(vc)) = secret.r#type else {
            panic!("not a validation context");
        };
        assert_eq!(listed(&vc), Some(vec![("a.test".into(), "A2".into())]));
        // Gone, and unknown: no version, so nothing is sent.
        let removed = view(federated(4, &[("b.test", "B", 2)]));
        assert_eq!(removed.version(&a), None);
        assert!(!trusted(&a, &own, &removed.federated));
        assert!(trusted(
            &ResourceName::TrustDomain(own.clone()),
            &own,
            &removed.federated
        ));
        // Without the agent's own roots (not issued yet), ALL and ROOTCA do not exist.
        assert_eq!(removed.version(&ResourceName::All), None);
        assert_eq!(removed.version(&ResourceName::RootCa), None);
    }
}
