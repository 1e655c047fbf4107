//! A test Istio CA: a tonic server of `istio.v1.auth.IstioCertificateService` over TLS,
//! around a local CA, standing in for istiod (and cert-manager istio-csr), which cannot run
//! here.
//!
//! What it reproduces of istiod's CA server (`security/pkg/server/ca`):
//! - TLS on its gRPC port, with a serving certificate for `istiod.istio-system.svc`;
//! - authentication by the bearer token in `authorization`: an unknown or missing token is
//!   `Unauthenticated`; the token maps to the caller's identity (in istiod, through a
//!   TokenReview of the service-account JWT; here, through a fixture table);
//! - the `clusterid` metadata: a request naming a cluster other than the CA's is
//!   `Unauthenticated`, as istiod fails it when no authenticator knows that cluster;
//! - the identity comes from the caller, not the CSR: a CSR whose SAN is not the caller's
//!   identity is `Unauthenticated` (istiod: "the requested identity does not match the
//!   caller");
//! - `validity_duration` in seconds; zero or less means the default (24 h); more than the
//!   maximum workload TTL is `InvalidArgument` ("requested TTL ... is greater than the max
//!   allowed TTL"), as istiod does with its default `MAX_WORKLOAD_CERT_TTL` of 90 days;
//! - the answer `[leaf, intermediate chain, root bundle]`, leaf first and root last, the
//!   last element holding every current root: both during a root rotation (istiod's
//!   combined `root-cert.pem`);
//! - a plugged-in CA (`cacerts`): an intermediate signs, a root above it.
//!
//! - istiod's NodeAuthorizer (`node_auth.go`), for node agents such as ztunnel: a request
//!   whose `metadata` struct holds a non-empty string `ImpersonatedIdentity` is signed for
//!   that identity instead of the caller's, only if
//!   1. node authorization is on: at least one trusted node account, as istiod's
//!      `CA_TRUSTED_NODE_ACCOUNTS` ([`IstioTestCa::trust_node_accounts`]);
//!   2. the caller's namespace/service account is one of them;
//!   3. the identity is `spiffe://<td>/ns/<ns>/sa/<sa>` (istiod parses it and checks no
//!      trust domain);
//!   4. the caller's token is bound to a pod (istiod reads its name and UID from the
//!      TokenReview; here [`IstioTestCa::allow_node_agent`] binds it) that is still in the
//!      pod registry, with that UID and the token's service account;
//!   5. a pod of the requested namespace and service account is on that pod's node (istiod's
//!      pod informer, indexed by node and service account; here [`IstioTestCa::add_pod`]).
//!
//!   Every refusal is `Unauthenticated` "request impersonation authentication failure",
//!   istiod's one opaque answer; the reason istiod logs is kept in [`Call::refused_because`].
//!   A value that is not a string, or empty, counts as absent, as istiod's
//!   `GetStringValue` reads it. A request without it is signed for the caller.
//!
//! For fault-injection tests it can also misbehave on purpose ([`IstioTestCa::inject`]):
//! answer late, answer with a leaf that is not a certificate, or with a certificate for a key
//! other than the CSR's.
//!
//! What it does not reproduce: mTLS client authentication with an existing workload
//! certificate, JWT validation itself
//! (audience, expiry: a test removes a token to play an expired one), the multicluster
//! authenticators and the multicluster node authorizer (one cluster here), the lag of
//! istiod's pod informer (the registry changes at once), the `CertSigner` metadata, istiod's
//! own rate limits, and any signing but this module's (SANs,
//! key usages and validity as the embedded CA of sds-backends issues them).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, KeyType, SignRequest, SpiffeId};
use sds_proto::pb::istio_v1_auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use sds_proto::pb::istio_v1_auth::{IstioCertificateRequest, IstioCertificateResponse};
use sds_proto::prost_types::value::Kind;
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::mesh::{MeshCa, NAMESPACE, TRUST_DOMAIN};
use crate::pki::serial_of_pem;
use crate::{Error, Serial, free_port, io_error};

/// The name on the CA's serving certificate, as istiod's.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";
/// The cluster the CA belongs to.
pub const CLUSTER_ID: &str = "Kubernetes";
/// istiod's default lifetime for a request without one.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// istiod's default `MAX_WORKLOAD_CERT_TTL`.
const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The metadata key a node agent names the identity it signs for with.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// istiod's answer to every refused impersonation.
pub const IMPERSONATION_REFUSED: &str = "request impersonation authentication failure";

/// One call the CA answered, as it saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The bearer token, if any.
    pub token: Option<String>,
    /// The `clusterid` metadata, if any.
    pub cluster_id: Option<String>,
    /// `validity_duration`.
    pub validity: i64,
    /// The `ImpersonatedIdentity` metadata, if the request had a non-empty string one.
    pub impersonated: Option<String>,
    /// Whether the request had a `metadata` struct at all.
    pub had_metadata: bool,
    /// Why an impersonation was refused: what istiod logs, never what it answers.
    pub refused_because: Option<String>,
    /// `Ok` with the leaf's serial, or the status code and message.
    pub outcome: Result<Serial, String>,
    /// Which root the leaf chains to: 1 for the first, 2 for the one rotated in.
    pub root: Option<u8>,
}

/// A way for the CA to misbehave, from [`IstioTestCa::inject`] until the next call of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answers as istiod does.
    #[default]
    None,
    /// Waits this long before answering: a client whose deadline is shorter gives up first
    /// (and the call is then missing from [`IstioTestCa::calls`], which records answers).
    Delay(Duration),
    /// Signs, then answers with a leaf that is PEM armour around bytes that are not a
    /// certificate.
    NotACertificate,
    /// Answers with a good certificate for the caller's identity, but for a key other than
    /// the CSR's (signed for a fresh key of its own).
    WrongKey,
}

/// A root with an intermediate under it, as a plugged-in CA holds them.
struct Generation {
    number: u8,
    ca: EmbeddedCa,
    intermediate_pem: String,
    root_pem: String,
}

/// What the CA is doing with its roots.
struct Roots {
    current: Arc<Generation>,
    /// A root being rotated in: served alongside `current`.
    next: Option<Arc<Generation>>,
    /// Whether `next` signs already.
    signing_next: bool,
}

/// A pod as istiod's pod informer knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: String,
}

/// Who a token belongs to, as istiod learns it from the TokenReview.
#[derive(Debug, Clone)]
struct Caller {
    id: SpiffeId,
    namespace: String,
    service_account: String,
    /// The pod the token is bound to, name and UID: projected tokens carry it, others not.
    pod: Option<(String, String)>,
}

struct State {
    tokens: Mutex<HashMap<String, Caller>>,
    /// `CA_TRUSTED_NODE_ACCOUNTS`, as namespace/service account; empty: node
    /// authorization off.
    trusted_node_accounts: Mutex<HashSet<(String, String)>>,
    pods: Mutex<Vec<Pod>>,
    /// Source of pod UIDs.
    next_uid: std::sync::atomic::AtomicU64,
    roots: Mutex<Roots>,
    calls: Mutex<Vec<Call>>,
    fault: Mutex<Fault>,
    /// When each request arrived, answered or not, and whose token it carried.
    received: Mutex<Vec<(tokio::time::Instant, Option<SpiffeId>)>>,
}

/// The test CA: its TLS material on disk, its fixture of tokens, and its roots. It serves
/// only between [`IstioTestCa::serve`] and [`IstioTestCa::stop`], always on the same port.
pub struct IstioTestCa {
    addr: SocketAddr,
    tls_root: PathBuf,
    tls_cert_pem: String,
    tls_key_pem: String,
    state: Arc<State>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for IstioTestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioTestCa")
            .field("addr", &self.addr)
            .field("serving", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl IstioTestCa {
    /// Generates the CA's TLS material (its root written to `dir/istiod-tls-root.pem`) and a
    /// first workload root with an intermediate, on a free loopback port. Not serving yet.
    pub fn new(dir: &Path) -> Result<Self, Error> {
        let (tls_root_pem, tls_cert_pem, tls_key_pem) = serving_pki()?;
        let tls_root = dir.join("istiod-tls-root.pem");
        std::fs::write(&tls_root, tls_root_pem)
            .map_err(io_error(format!("writing {}", tls_root.display())))?;
        Ok(Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            tls_root,
            tls_cert_pem,
            tls_key_pem,
            state: Arc::new(State {
                tokens: Mutex::new(HashMap::new()),
                trusted_node_accounts: Mutex::new(HashSet::new()),
                pods: Mutex::new(Vec::new()),
                next_uid: std::sync::atomic::AtomicU64::new(1),
                roots: Mutex::new(Roots {
                    current: Arc::new(Generation::new(1)?),
                    next: None,
                    signing_next: false,
                }),
                calls: Mutex::new(Vec::new()),
                fault: Mutex::new(Fault::None),
                received: Mutex::new(Vec::new()),
            }),
            running: None,
        })
    }

    /// [`IstioTestCa::new`], serving.
    pub async fn start(dir: &Path) -> Result<Self, Error> {
        let mut ca = Self::new(dir)?;
        ca.serve().await?;
        Ok(ca)
    }

    /// Starts serving on its port (again, after [`IstioTestCa::stop`]).
    pub async fn serve(&mut self) -> Result<(), Error> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(io_error(format!(
                "binding the test Istio CA on {}",
                self.addr
            )))?;
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.tls_cert_pem, &self.tls_key_pem));
        let router = Server::builder()
            .tls_config(tls)
            .map_err(|e| Error::Api {
                call: "test Istio CA TLS".into(),
                detail: e.to_string(),
            })?
            .add_service(IstioCertificateServiceServer::new(Service {
                state: self.state.clone(),
            }));
        // Answers go out at once, as from istiod's Go server (Go sets TCP_NODELAY), not after
        // Nagle's wait for the client's delayed ACK.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some((stop, task));
        Ok(())
    }

    /// Stops serving: open connections are closed, the port refuses new ones.
    pub async fn stop(&mut self) {
        if let Some((stop, mut task)) = self.running.take() {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Its address, for `--ca-addr`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root of its TLS certificate, for `--ca-root-cert`.
    pub fn tls_root(&self) -> &Path {
        &self.tls_root
    }

    /// Lets `token` in as the service account `sa` of namespace `ns` of `trust_domain`.
    pub async fn allow(&self, token: &str, trust_domain: &str, ns: &str, sa: &str) {
        let caller = Caller::new(trust_domain, ns, sa, None);
        self.state
            .tokens
            .lock()
            .await
            .insert(token.to_owned(), caller);
    }

    /// Lets `token` in as a node agent: the service account `sa` of namespace `ns`, its
    /// token bound to the pod `pod` running on `node`, which joins the pod registry. Returns
    /// that pod.
    pub async fn allow_node_agent(
        &self,
        token: &str,
        trust_domain: &str,
        ns: &str,
        sa: &str,
        pod: &str,
        node: &str,
    ) -> Pod {
        let pod = self.add_pod(node, ns, sa, pod).await;
        let caller = Caller::new(
            trust_domain,
            ns,
            sa,
            Some((pod.name.clone(), pod.uid.clone())),
        );
        self.state
            .tokens
            .lock()
            .await
            .insert(token.to_owned(), caller);
        pod
    }

    /// Sets the trusted node accounts, as `CA_TRUSTED_NODE_ACCOUNTS=ns/sa,...` does istiod's;
    /// none turns node authorization off, and every impersonation is refused.
    pub async fn trust_node_accounts(&self, accounts: &[(&str, &str)]) {
        *self.state.trusted_node_accounts.lock().await = accounts
            .iter()
            .map(|(ns, sa)| ((*ns).to_owned(), (*sa).to_owned()))
            .collect();
    }

    /// A pod of service account `sa` in namespace `ns`, named `name`, scheduled on `node`,
    /// with a fresh UID, as the pod informer would see it.
    pub async fn add_pod(&self, node: &str, ns: &str, sa: &str, name: &str) -> Pod {
        let n = self
            .state
            .next_uid
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pod = Pod {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            uid: format!("00000000-0000-4000-8000-{n:012x}"),
            service_account: sa.to_owned(),
            node: node.to_owned(),
        };
        let mut pods = self.state.pods.lock().await;
        pods.retain(|p| !(p.namespace == ns && p.name == name));
        pods.push(pod.clone());
        pod
    }

    /// Deletes the pod `name` of namespace `ns`, as the pod informer sees a deletion.
    pub async fn remove_pod(&self, ns: &str, name: &str) {
        self.state
            .pods
            .lock()
            .await
            .retain(|p| !(p.namespace == ns && p.name == name));
    }

    /// Stops accepting `token` (an expired or revoked one).
    pub async fn revoke(&self, token: &str) {
        self.state.tokens.lock().await.remove(token);
    }

    /// Every call so far.
    pub async fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().await.clone()
    }

    /// Misbehaves as `fault` says for every request from now on; [`Fault::None`] ends it.
    pub async fn inject(&self, fault: Fault) {
        *self.state.fault.lock().await = fault;
    }

    /// When each request from service account `sa` (by the token it carried) arrived,
    /// including those never answered (a [`Fault::Delay`] past the client's deadline), for
    /// checking the rhythm of one agent's retries.
    pub async fn received_from(&self, sa: &str) -> Vec<tokio::time::Instant> {
        let path = format!("/ns/{NAMESPACE}/sa/{sa}");
        self.state
            .received
            .lock()
            .await
            .iter()
            .filter(|(_, id)| id.as_ref().is_some_and(|id| id.path() == path))
            .map(|(at, _)| *at)
            .collect()
    }

    /// Serials of the roots it serves now, current first.
    pub async fn root_serials(&self) -> Result<Vec<Serial>, Error> {
        let roots = self.state.roots.lock().await;
        let mut serials = vec![serial_of_pem(&roots.current.root_pem)?];
        if let Some(next) = &roots.next {
            serials.push(serial_of_pem(&next.root_pem)?);
        }
        Ok(serials)
    }

    /// Root rotation, step 1: a new root joins the root bundle of every answer, while the
    /// old intermediate still signs.
    pub async fn add_next_root(&self) -> Result<(), Error> {
        let next = Arc::new(Generation::new(2)?);
        self.state.roots.lock().await.next = Some(next);
        Ok(())
    }

    /// Root rotation, step 2: the new root's intermediate signs; both roots are still sent.
    pub async fn sign_with_next_root(&self) {
        self.state.roots.lock().await.signing_next = true;
    }

    /// Root rotation, step 3: the old root leaves the root bundle of every answer, as when
    /// istiod's `root-cert.pem` is cut down to the new root. Does nothing before step 1.
    pub async fn drop_old_root(&self) {
        let mut roots = self.state.roots.lock().await;
        if let Some(next) = roots.next.take() {
            roots.current = next;
            roots.signing_next = false;
        }
    }
}

impl Drop for IstioTestCa {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}

impl Generation {
    fn new(number: u8) -> Result<Self, Error> {
        let root_key = KeyPair::generate().map_err(Error::Ca)?;
        let mut root = ca_params(&format!("test istio root {number}"), None);
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).map_err(Error::Ca)?;
        let root_issuer = Issuer::new(root, root_key);
        let int_key = KeyPair::generate().map_err(Error::Ca)?;
        let int = ca_params(
            &format!("test istio intermediate {number}"),
            Some(BasicConstraints::Constrained(0)),
        );
        let int_cert = int.signed_by(&int_key, &root_issuer).map_err(Error::Ca)?;
        let chain = format!("{}{}", int_cert.pem(), root_cert.pem());
        let ca = EmbeddedCa::from_pem(chain.as_bytes(), &int_key.serialize_pem()).map_err(|e| {
            Error::Api {
                call: "loading the test Istio CA".into(),
                detail: e.to_string(),
            }
        })?;
        Ok(Self {
            number,
            ca,
            intermediate_pem: int_cert.pem(),
            root_pem: root_cert.pem(),
        })
    }
}

fn ca_params(common_name: &str, constraint: Option<BasicConstraints>) -> CertificateParams {
    crate::pki::ca_params("sds-agent istiod test", common_name, constraint)
}

/// A TLS root, and a serving certificate it signed for [`SERVER_NAME`] and 127.0.0.1.
fn serving_pki() -> Result<(String, String, String), Error> {
    let (root_pem, cert, key) = crate::pki::serving_pki(
        "sds-agent istiod test",
        "test istiod TLS root",
        &[SERVER_NAME],
    )?;
    Ok((root_pem, cert.pem(), key.serialize_pem()))
}

struct Service {
    state: Arc<State>,
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let token = header("authorization").and_then(|v| {
            v.strip_prefix("Bearer ")
                .map(str::to_owned)
                .filter(|t| !t.is_empty())
        });
        let cluster_id = header("clusterid");
        let validity = request.get_ref().validity_duration;
        let at = tokio::time::Instant::now();
        let caller = match &token {
            Some(token) => self
                .state
                .tokens
                .lock()
                .await
                .get(token)
                .map(|c| c.id.clone()),
            None => None,
        };
        let had_metadata = request.get_ref().metadata.is_some();
        let impersonated = impersonated_identity(request.get_ref());
        self.state.received.lock().await.push((at, caller));
        let fault = *self.state.fault.lock().await;
        if let Fault::Delay(delay) = fault {
            tokio::time::sleep(delay).await;
        }
        let mut refused_because = None;
        let mut outcome = self
            .sign(
                token.as_deref(),
                cluster_id.as_deref(),
                request.get_ref(),
                fault,
                &mut refused_because,
            )
            .await;
        if let (Fault::NotACertificate, Ok((response, _, _))) = (fault, &mut outcome) {
            response.cert_chain[0] =
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
                    .to_owned();
        }
        self.state.calls.lock().await.push(Call {
            token,
            cluster_id,
            validity,
            impersonated,
            had_metadata,
            refused_because,
            outcome: match &outcome {
                Ok((_, serial, _)) => Ok(serial.clone()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            },
            root: outcome.as_ref().ok().map(|(_, _, root)| *root),
        });
        outcome.map(|(response, _, _)| Response::new(response))
    }
}

impl Service {
    async fn sign(
        &self,
        token: Option<&str>,
        cluster_id: Option<&str>,
        req: &IstioCertificateRequest,
        fault: Fault,
        refused_because: &mut Option<String>,
    ) -> Result<(IstioCertificateResponse, Serial, u8), Status> {
        // Authenticate.
        let token = token.ok_or_else(|| {
            Status::unauthenticated("authenticate failure: no bearer token in the request")
        })?;
        if let Some(id) = cluster_id.filter(|id| *id != CLUSTER_ID) {
            return Err(Status::unauthenticated(format!(
                "authenticate failure: client claims to be in cluster {id:?}, but the CA \
                 knows only {CLUSTER_ID:?}"
            )));
        }
        let caller = self
            .state
            .tokens
            .lock()
            .await
            .get(token)
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated(
                    "authenticate failure: the token was not accepted (unknown, expired or \
                     wrong audience)",
                )
            })?;

        // By default the caller's own identity; a node agent's impersonation replaces it
        // once the node authorizer agrees (istiod's `CreateCertificate`).
        let identity = match impersonated_identity(req) {
            None => caller.id.clone(),
            Some(requested) => match self.authorize_impersonation(&caller, &requested).await {
                Ok(id) => id,
                Err(reason) => {
                    *refused_because = Some(reason);
                    return Err(Status::unauthenticated(IMPERSONATION_REFUSED));
                }
            },
        };

        // The CSR, and the identity it asks for.
        let csr = CertificateSigningRequestDer::from_pem_slice(req.csr.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("CSR is not PEM: {e}")))?;
        let (_, parsed) = X509CertificationRequest::from_der(csr.as_ref())
            .map_err(|e| Status::invalid_argument(format!("CSR cannot be parsed: {e}")))?;
        let key_type = if parsed
            .certification_request_info
            .subject_pki
            .algorithm
            .algorithm
            == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
        {
            KeyType::Rsa2048
        } else {
            KeyType::default()
        };
        let wanted = identity.to_string();
        let asked: Vec<String> = parsed
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|ext| match ext {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => {
                    Some(san.general_names.iter().map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(uri) => format!("URI:{uri}"),
                        other => other.to_string(),
                    }))
                }
                _ => None,
            })
            .flatten()
            .collect();
        if asked != [format!("URI:{wanted}")] {
            return Err(Status::unauthenticated(format!(
                "the requested identity {asked:?} does not match the caller {wanted}"
            )));
        }

        // The lifetime.
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(0) | Err(_) => DEFAULT_TTL,
            Ok(s) => Duration::from_secs(s),
        };
        if ttl > MAX_TTL {
            return Err(Status::invalid_argument(format!(
                "requested TTL {}s is greater than the max allowed TTL {}s",
                ttl.as_secs(),
                MAX_TTL.as_secs()
            )));
        }

        let (signer, root_bundle) = {
            let roots = self.state.roots.lock().await;
            let signer = match &roots.next {
                Some(next) if roots.signing_next => next.clone(),
                _ => roots.current.clone(),
            };
            let mut bundle = roots.current.root_pem.clone();
            if let Some(next) = &roots.next {
                bundle.push_str(&next.root_pem);
            }
            (signer, bundle)
        };
        let csr_der = if fault == Fault::WrongKey {
            crate::bench::sign_request(&identity)
                .map_err(|e| Status::internal(format!("a CSR for another key: {e}")))?
                .csr_der
        } else {
            csr.as_ref().to_vec()
        };
        let issued = signer
            .ca
            .sign(&SignRequest {
                identity,
                csr_der,
                ttl,
                key_type,
            })
            .await
            .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
        let serial = x509_parser::parse_x509_certificate(issued.leaf.as_ref())
            .map(|(_, c)| Serial::from_bytes(c.raw_serial()))
            .map_err(|e| Status::internal(format!("reading the new certificate: {e}")))?;
        let leaf_pem = sds_backends::pem::encode_certificates([&issued.leaf]);
        Ok((
            IstioCertificateResponse {
                cert_chain: vec![leaf_pem, signer.intermediate_pem.clone(), root_bundle],
            },
            serial,
            signer.number,
        ))
    }
}

impl Service {
    /// istiod's NodeAuthorizer: whether `caller` may have a certificate for `requested`.
    /// The identity to sign for, or why not (what istiod logs).
    async fn authorize_impersonation(
        &self,
        caller: &Caller,
        requested: &str,
    ) -> Result<SpiffeId, String> {
        let trusted = self.state.trusted_node_accounts.lock().await;
        if trusted.is_empty() {
            return Err(
                "impersonation not allowed, as node authorizer (CA_TRUSTED_NODE_ACCOUNTS) is not \
                 configured"
                    .into(),
            );
        }
        let account = (caller.namespace.clone(), caller.service_account.clone());
        if !trusted.contains(&account) {
            return Err(format!(
                "caller {}/{} is not allowed to impersonate",
                account.0, account.1
            ));
        }
        drop(trusted);
        let invalid = || format!("failed to validate impersonated identity {requested}");
        let (ns, sa) = namespace_and_account(requested).ok_or_else(invalid)?;
        let identity: SpiffeId = requested.parse().map_err(|_| invalid())?;
        let pods = self.state.pods.lock().await;
        let (pod_name, pod_uid) = caller.pod.clone().unwrap_or_default();
        let caller_pod = pods
            .iter()
            .find(|p| p.namespace == caller.namespace && p.name == pod_name)
            .ok_or_else(|| {
                format!(
                    "failed to lookup pod: pod {:?} of namespace {} not found",
                    pod_name, caller.namespace
                )
            })?;
        if caller_pod.uid != pod_uid {
            return Err(format!(
                "pod found, but UID does not match: {} vs {pod_uid}",
                caller_pod.uid
            ));
        }
        if caller_pod.service_account != caller.service_account {
            return Err(format!(
                "pod found, but ServiceAccount does not match: {} vs {}",
                caller_pod.service_account, caller.service_account
            ));
        }
        let node = &caller_pod.node;
        if !pods
            .iter()
            .any(|p| p.node == *node && p.namespace == ns && p.service_account == sa)
        {
            return Err(format!(
                "no instances of \"{ns}/{sa}\" found on node \"{node}\""
            ));
        }
        Ok(identity)
    }
}

impl Caller {
    fn new(trust_domain: &str, ns: &str, sa: &str, pod: Option<(String, String)>) -> Self {
        let id = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
        let id = id
            .parse()
            .unwrap_or_else(|e| panic!("test identity {id}: {e}"));
        Self {
            id,
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            pod,
        }
    }
}

/// The request's `ImpersonatedIdentity`, when it is a non-empty string.
fn impersonated_identity(req: &IstioCertificateRequest) -> Option<String> {
    let value = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match &value.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The namespace and service account of `spiffe://<td>/ns/<ns>/sa/<sa>`, the only form
/// istiod's `spiffe.ParseIdentity` takes.
fn namespace_and_account(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    match rest.split('/').collect::<Vec<_>>()[..] {
        [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
            Some((ns, sa))
        }
        _ => None,
    }
}

// Agents of the test CA: tokens and flags.

/// Where [`token_for`] writes the token of a service account.
pub fn token_file(dir: &Path, service_account: &str) -> PathBuf {
    dir.join(format!("token-{service_account}"))
}

/// Writes the token as kubelet does: a new file renamed over the old one.
pub fn write_token(path: &Path, token: &str) -> Result<(), Error> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token).map_err(io_error(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_error(format!("renaming {}", tmp.display())))
}

/// The `run` flags for the test CA at `addr` whose TLS root is `tls_root`.
pub fn args_for(
    addr: SocketAddr,
    tls_root: &Path,
    token_file: &Path,
    cluster_id: Option<&str>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--ca".into(),
        "istiod".into(),
        "--ca-addr".into(),
        addr.to_string().into(),
        "--ca-root-cert".into(),
        tls_root.into(),
        "--ca-server-name".into(),
        SERVER_NAME.into(),
        "--ca-token-file".into(),
        token_file.into(),
    ];
    if let Some(id) = cluster_id {
        args.extend(["--cluster-id".into(), id.into()]);
    }
    args
}

/// The mesh's agents on the test CA, each with a token of its service account, known to the
/// CA and in its own file.
pub async fn mesh_ca(
    ca: &IstioTestCa,
    dir: &Path,
    cluster_id: Option<&'static str>,
    roots: Vec<Serial>,
) -> Result<MeshCa, Error> {
    for sa in ["frontend", "backend"] {
        token_for(ca, dir, sa).await?;
    }
    let (addr, tls_root, dir) = (ca.addr(), ca.tls_root().to_owned(), dir.to_owned());
    Ok(MeshCa {
        agent_args: Box::new(move |sa| {
            args_for(addr, &tls_root, &token_file(&dir, sa), cluster_id)
        }),
        roots,
        agent_env: Vec::new(),
    })
}

/// A token for the service account, known to the CA and written where its agent reads it.
pub async fn token_for(
    ca: &IstioTestCa,
    dir: &Path,
    service_account: &str,
) -> Result<PathBuf, Error> {
    let token = format!("projected-token-{service_account}-1");
    ca.allow(&token, TRUST_DOMAIN, NAMESPACE, service_account)
        .await;
    let path = token_file(dir, service_account);
    write_token(&path, &token)?;
    Ok(path)
}
