//! The Istio CA API (`istio.v1.auth.IstioCertificateService/CreateCertificate`), as served
//! by istiod and by cert-manager istio-csr: the agent sends its CSR over TLS with the
//! workload's service-account token, and gets back the signed chain, leaf first and root
//! last. This is the call istio-agent makes, so sds-agent can take istio-agent's place in an
//! existing mesh, or reach any cert-manager issuer through istio-csr.
//!
//! What this backend decides, as istio-agent does:
//! - **Authentication.** `authorization: Bearer <token>`, the token read from its file at
//!   every call so a projected token that kubelet rotated is picked up; `clusterid` metadata
//!   when a cluster ID is set (istiod uses it to pick the cluster that validates the token);
//!   and any extra headers configured.
//! - **Lifetime.** `validity_duration` is the TTL asked for, in seconds. The CA may shorten
//!   it (or refuse a TTL above its maximum); rotation follows the certificate returned.
//! - **Trust bundle.** The last element of `cert_chain`, which may hold several roots while
//!   the CA rotates its root, unless the roots are pinned. The CA sends no bundle without a
//!   certificate, so the bundle is known from the first certificate on, and every later
//!   answer updates it. The channel to the CA is authenticated by TLS (`root_cert`), so
//!   these roots are as trustworthy as the CA itself; pin them for a stricter check.
//! - **Errors.** `Unavailable`, `DeadlineExceeded`, `ResourceExhausted`, `Aborted` and
//!   `Internal` are retried by the secret manager, and so are `Unknown` (what some transport
//!   failures surface as) and `Cancelled` (what tonic's own deadline gives). Each of them
//!   drops the channel, so the next call connects anew: a moved endpoint or a new TLS root
//!   file is picked up. `Unauthenticated` and
//!   `PermissionDenied` are not retryable, and say what to check (token audience, expiry,
//!   cluster ID, service account). `InvalidArgument` (a TTL above the CA's maximum, a CSR
//!   it refuses) and `Unimplemented` (not an Istio CA) are configuration errors.
//! - **Node mode.** One agent signs for every pod on its node, as ztunnel does: each call
//!   carries the agent's own token and, in the request's `metadata` struct,
//!   `ImpersonatedIdentity` set to the SPIFFE ID being signed for. istiod grants it only to a
//!   caller whose service account is in its `CA_TRUSTED_NODE_ACCOUNTS`, and only for a
//!   service account that has a pod on the caller's node. In pod mode the metadata is never
//!   sent: the token alone names the identity.

pub mod settings;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use sds_proto::pb::istio_v1_auth::IstioCertificateRequest;
use sds_proto::pb::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;
use sds_proto::prost_types::value::Kind;
use sds_proto::prost_types::{Struct, Value};
use tonic::Code;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info};
use zeroize::Zeroizing;

use crate::chain::{LearnedRoots, split_roots};
use crate::pem::decode_certificates;
use crate::{
    CaError, CertificateAuthority, IssuedChain, SignRequest, SpiffeId, TrustBundle, error_chain,
};

/// Where istio-agent finds istiod: its TLS gRPC port.
pub const DEFAULT_ADDR: &str = "istiod.istio-system.svc:15012";
/// Where istio-agent reads the projected service-account token, relative to the working
/// directory (the sidecar's is `/`).
pub const DEFAULT_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
/// Longest time one `CreateCertificate` call may take, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to open the TCP connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The key of the request metadata naming the identity a node agent signs for, as istiod
/// and ztunnel spell it.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Longest server message quoted in an error.
const MAX_QUOTED: usize = 300;

/// The address of the CA: `host:port`, optionally written `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaAddr {
    host: String,
    port: u16,
}

/// An address that cannot name a TLS gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadCaAddr(String);

impl FromStr for CaAddr {
    type Err = BadCaAddr;

    fn from_str(s: &str) -> Result<Self, BadCaAddr> {
        let rest = match s.split_once("://") {
            None => s,
            Some(("https", rest)) => rest,
            Some((scheme, _)) => {
                return Err(BadCaAddr(format!(
                    "scheme {scheme}:// is not supported: the CA is reached over TLS only \
                     (the token it is sent must not travel in the clear); give host:port"
                )));
            }
        };
        let url = url::Url::parse(&format!("https://{rest}"))
            .map_err(|e| BadCaAddr(format!("expected host:port, e.g. {DEFAULT_ADDR}: {e}")))?;
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(BadCaAddr(format!(
                "expected host:port without a path, query or user, e.g. {DEFAULT_ADDR}"
            )));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(BadCaAddr("the host is missing".into())),
        };
        // `Url` drops the port that is https's default; anything else must be explicit.
        let port = match url.port() {
            Some(p) => p,
            None if rest.ends_with(":443") => 443,
            None => {
                return Err(BadCaAddr(format!(
                    "the port is missing: istiod serves the CA on 15012, e.g. {DEFAULT_ADDR}"
                )));
            }
        };
        Ok(Self { host, port })
    }
}

impl CaAddr {
    /// The host name or IP address (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name the CA's certificate is checked against by default: the host, without
    /// brackets for IPv6.
    fn default_server_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for CaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// One extra header sent with every call, checked to be valid gRPC metadata and none of
/// the headers this backend or gRPC sets itself.
#[derive(Clone, PartialEq, Eq)]
pub struct ExtraHeader {
    key: AsciiMetadataKey,
    value: AsciiMetadataValue,
}

/// A `KEY=VALUE` that cannot be sent as an extra header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadHeader(String);

impl FromStr for ExtraHeader {
    type Err = BadHeader;

    /// Parses `KEY=VALUE`.
    fn from_str(s: &str) -> Result<Self, BadHeader> {
        let bad = |why: &str| BadHeader(why.to_owned());
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(bad("the header name is empty"));
        }
        if matches!(
            key.as_str(),
            "authorization" | "clusterid" | "te" | "content-type" | "user-agent" | "host"
        ) || key.starts_with("grpc-")
            || key.starts_with(':')
        {
            return Err(BadHeader(format!(
                "header {key} is set by sds-agent or gRPC itself (the token comes from \
                 --ca-token-file, the cluster ID from --cluster-id)"
            )));
        }
        if key.ends_with("-bin") {
            return Err(bad("binary (-bin) headers are not supported"));
        }
        let key = AsciiMetadataKey::from_str(&key).map_err(|_| {
            bad("the header name may hold only lowercase letters, digits, '-', '_' and '.'")
        })?;
        let value = ascii_value(value.trim())
            .ok_or_else(|| bad("the header value may hold only visible ASCII and spaces"))?;
        Ok(Self { key, value })
    }
}

impl ExtraHeader {
    /// The header name, lowercase.
    pub fn name(&self) -> &str {
        self.key.as_str()
    }
}

impl fmt::Debug for ExtraHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be credentials: never printed.
        write!(f, "{}=<redacted>", self.key.as_str())
    }
}

/// How to reach and authenticate to the Istio CA.
#[derive(Debug, Clone)]
pub struct IstiodConfig {
    /// The CA's address.
    pub addr: CaAddr,
    /// PEM roots to trust for the CA's TLS certificate, re-read whenever the channel is
    /// rebuilt; the system's roots when `None`.
    pub root_cert: Option<PathBuf>,
    /// The name the CA's TLS certificate must carry (and the SNI sent); the host of `addr`
    /// when `None`.
    pub server_name: Option<String>,
    /// The file holding the bearer token, read at every call.
    pub token_file: PathBuf,
    /// Sent as `clusterid` metadata.
    pub cluster_id: Option<String>,
    /// Extra headers sent with every call.
    pub headers: Vec<ExtraHeader>,
    /// Roots to trust for workload certificates instead of the chain's last element.
    pub trust_bundle: Option<TrustBundle>,
    /// Longest time one call may take.
    pub request_timeout: Duration,
    /// Node mode: every call names the identity it is for in `ImpersonatedIdentity`
    /// metadata, the token being the node agent's own.
    pub impersonate: bool,
}

impl IstiodConfig {
    /// The defaults for this address: system roots, the host as server name, istio-agent's
    /// token file, no cluster ID, the roots from the chain.
    pub fn new(addr: CaAddr) -> Self {
        Self {
            addr,
            root_cert: None,
            server_name: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            cluster_id: None,
            headers: Vec::new(),
            trust_bundle: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            impersonate: false,
        }
    }
}

/// A client of the Istio CA API.
pub struct IstiodCa {
    config: IstiodConfig,
    cluster_id: Option<AsciiMetadataValue>,
    /// The channel in use; `None` after a retryable failure, so the next call connects anew.
    channel: Mutex<Option<Channel>>,
    /// The roots of the last chain the CA sent.
    roots: LearnedRoots,
}

impl IstiodCa {
    /// A client for `config`. Nothing is read or connected until the first call, so a CA
    /// (or a token) that is not there yet at start-up is retried like any outage.
    pub fn new(config: IstiodConfig) -> Result<Self, CaError> {
        let cluster_id = config
            .cluster_id
            .as_deref()
            .map(|id| {
                ascii_value(id).ok_or_else(|| {
                    CaError::Misconfigured(format!(
                        "cluster ID {id:?} may hold only visible ASCII characters"
                    ))
                })
            })
            .transpose()?;
        if config.request_timeout.is_zero() {
            return Err(CaError::Misconfigured(
                "the CA request timeout must be above zero".into(),
            ));
        }
        Ok(Self {
            config,
            cluster_id,
            channel: Mutex::new(None),
            roots: LearnedRoots::default(),
        })
    }

    /// The channel to the CA, built on first use and after a retryable failure.
    fn channel(&self) -> Result<Channel, CaError> {
        if let Some(channel) = self.channel.lock().clone() {
            return Ok(channel);
        }
        let addr = &self.config.addr;
        let server_name = self
            .config
            .server_name
            .as_deref()
            .unwrap_or_else(|| addr.default_server_name());
        let mut tls = ClientTlsConfig::new().domain_name(server_name);
        tls = match &self.config.root_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    CaError::Misconfigured(format!(
                        "cannot read --ca-root-cert {}: {e}",
                        path.display()
                    ))
                })?;
                // Parsed here so a bad file is named, not reported as a failed handshake.
                decode_certificates(&pem).map_err(|e| {
                    CaError::Misconfigured(format!("--ca-root-cert {}: {e}", path.display()))
                })?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| CaError::Misconfigured(format!("CA address {addr}: {e}")))?
            .tls_config(tls)
            .map_err(|e| CaError::Misconfigured(format!("TLS to the CA at {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT.min(self.config.request_timeout))
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        debug!(%addr, server_name, "istiod: new channel to the CA");
        *self.channel.lock() = Some(channel.clone());
        Ok(channel)
    }

    /// Drops the channel, so the next call resolves and connects anew.
    fn forget_channel(&self) {
        *self.channel.lock() = None;
    }

    /// The bearer token, read now.
    async fn token(&self) -> Result<AsciiMetadataValue, CaError> {
        let path = &self.config.token_file;
        let raw = Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
            CaError::Misconfigured(format!(
                "cannot read the CA token --ca-token-file {}: {e} (mount a projected \
                 service-account token there, with the audience the CA expects: istio-ca for \
                 istiod and istio-csr)",
                path.display()
            ))
        })?);
        let token = raw.trim();
        if token.is_empty() {
            return Err(CaError::Misconfigured(format!(
                "the CA token file --ca-token-file {} is empty",
                path.display()
            )));
        }
        let header = Zeroizing::new(format!("Bearer {token}"));
        ascii_value(&header).ok_or_else(|| {
            CaError::Misconfigured(format!(
                "the token in --ca-token-file {} holds characters a header cannot carry",
                path.display()
            ))
        })
    }

    /// Sorts a failed call into the trait's error kinds, with what to check.
    fn classify(&self, status: &tonic::Status) -> CaError {
        let addr = &self.config.addr;
        let said = quote(status.message());
        let cause = match std::error::Error::source(status) {
            Some(source) => format!(" ({})", error_chain(source)),
            None => String::new(),
        };
        let detail = format!("{:?} from the CA at {addr}: {said}{cause}", status.code());
        match status.code() {
            Code::Unavailable | Code::Aborted | Code::Internal | Code::Unknown => {
                CaError::Unavailable(detail)
            }
            // tonic ends a call past its deadline locally as `Cancelled`, "Timeout expired".
            Code::DeadlineExceeded | Code::Cancelled => {
                CaError::Timeout(self.config.request_timeout)
            }
            Code::ResourceExhausted => CaError::Throttled(detail),
            Code::Unauthenticated if self.config.impersonate => CaError::Denied(format!(
                "{detail}; the CA did not let this node agent sign for the identity: istiod \
                 allows impersonation only to a caller whose namespace/service account is in \
                 its CA_TRUSTED_NODE_ACCOUNTS, with a token bound to a pod that still exists \
                 (a projected token, audience istio-ca by default), and only for an identity \
                 that has a pod of its service account on the caller's node; check the token \
                 in --ca-token-file {} and --cluster-id ({})",
                self.config.token_file.display(),
                self.config.cluster_id.as_deref().unwrap_or("not set"),
            )),
            Code::Unauthenticated => CaError::Denied(format!(
                "{detail}; the CA did not accept the caller: check that the token in \
                 --ca-token-file {} has the audience the CA expects (istio-ca by default), \
                 has not expired, belongs to the service account of this identity, and that \
                 --cluster-id ({}) names the cluster the CA validates it against",
                self.config.token_file.display(),
                self.config.cluster_id.as_deref().unwrap_or("not set"),
            )),
            Code::PermissionDenied => CaError::Denied(format!(
                "{detail}; the CA refused this identity for this caller: the token's service \
                 account and namespace must be those of --namespace and --service-account, \
                 and the trust domain the CA's"
            )),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                CaError::Misconfigured(format!(
                    "{detail}; the CA refused the request: if it names the TTL, lower \
                     --cert-ttl below the CA's maximum (istiod: MAX_WORKLOAD_CERT_TTL)"
                ))
            }
            Code::Unimplemented | Code::NotFound => CaError::Misconfigured(format!(
                "{detail}; {addr} does not serve istio.v1.auth.IstioCertificateService: check \
                 --ca-addr"
            )),
            Code::Ok | Code::AlreadyExists | Code::DataLoss => CaError::Other {
                error: std::sync::Arc::new(std::io::Error::other(detail)),
                retryable: true,
            },
        }
    }
}

/// Sorts the `cert_chain` of an answer into leaf, intermediates and roots. Each element may
/// hold several PEM certificates (istiod sends its intermediates as one element, and while
/// it rotates its root, the old and the new root as the last).
pub fn parse_cert_chain(elements: &[String]) -> Result<IssuedChain, CaError> {
    let bad = |what: String| CaError::BadResponse(format!("istiod cert_chain: {what}"));
    let mut parsed = Vec::with_capacity(elements.len());
    for (i, element) in elements.iter().enumerate() {
        let certs = decode_certificates(element.as_bytes())
            .map_err(|e| bad(format!("element {i}: {e}")))?;
        parsed.push(certs);
    }
    let mut parsed = parsed.into_iter();
    let mut first = parsed
        .next()
        .ok_or_else(|| bad("empty: no certificate".into()))?
        .into_iter();
    let leaf = first
        .next()
        .ok_or_else(|| bad("element 0 holds no certificate".into()))?;
    let rest: Vec<Vec<CertificateDer<'static>>> = parsed.collect();
    let (intermediates, roots_hint) = match rest.split_last() {
        // Leaf first, root last: the last element is the root bundle, whatever it holds.
        Some((roots, middle)) => {
            let mut intermediates: Vec<CertificateDer<'static>> = first.collect();
            intermediates.extend(middle.iter().flatten().cloned());
            (intermediates, roots.clone())
        }
        // One element: whatever follows the leaf in it, roots being the self-issued ones.
        None => split_roots(first),
    };
    Ok(IssuedChain {
        leaf,
        intermediates,
        roots_hint,
    })
}

/// The request metadata of a node agent signing for `identity`: `ImpersonatedIdentity`, its
/// SPIFFE ID as a string.
fn impersonation(identity: &SpiffeId) -> Struct {
    let value = Value {
        kind: Some(Kind::StringValue(identity.to_string())),
    };
    Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), value)]),
    }
}

/// `s` as a header value, if it is visible ASCII and spaces only. (`http` would also take
/// bytes above 0x7f, which gRPC servers reject or mangle.)
fn ascii_value(s: &str) -> Option<AsciiMetadataValue> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        AsciiMetadataValue::try_from(s).ok()
    } else {
        None
    }
}

fn quote(message: &str) -> String {
    crate::quote(message, MAX_QUOTED)
}

#[async_trait::async_trait]
impl CertificateAuthority for IstiodCa {
    fn name(&self) -> &'static str {
        "istiod"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let authorization = self.token().await?;
        let csr = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone()));
        let validity = i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: validity,
            metadata: self
                .config
                .impersonate
                .then(|| impersonation(&req.identity)),
        });
        request.set_timeout(self.config.request_timeout);
        let md = request.metadata_mut();
        md.insert("authorization", authorization);
        if let Some(id) = &self.cluster_id {
            md.insert("clusterid", id.clone());
        }
        for h in &self.config.headers {
            md.insert(h.key.clone(), h.value.clone());
        }
        let mut client = IstioCertificateServiceClient::new(self.channel()?);
        let answer = tokio::time::timeout(
            self.config.request_timeout,
            client.create_certificate(request),
        )
        .await;
        let response = match answer {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let error = self.classify(&status);
                if error.is_retryable() {
                    self.forget_channel();
                }
                return Err(error);
            }
            Err(_) => {
                self.forget_channel();
                return Err(CaError::Timeout(self.config.request_timeout));
            }
        };
        let chain = parse_cert_chain(&response.cert_chain)?;
        if chain.roots_hint.is_empty() && self.config.trust_bundle.is_none() {
            return Err(CaError::BadResponse(format!(
                "the CA at {} sent no root with the certificate (a one-element cert_chain); \
                 pin the roots with --ca-trust-bundle",
                self.config.addr
            )));
        }
        // An empty hint leaves the roots kept as they are.
        if self.roots.learn(&chain.roots_hint) {
            info!(
                roots = chain.roots_hint.len(),
                "istiod: the CA sent a different set of roots"
            );
        }
        Ok(chain)
    }

    fn roots_come_with_certificates(&self) -> bool {
        self.config.trust_bundle.is_none()
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        if let Some(pinned) = &self.config.trust_bundle {
            return Ok(pinned.clone());
        }
        self.roots
            .get("the CA's roots are not known yet: istiod sends them with the first certificate")
    }
}

impl fmt::Debug for IstiodCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstiodCa")
            .field("addr", &self.config.addr)
            .field("token_file", &self.config.token_file)
            .field("cluster_id", &self.config.cluster_id)
            .field("headers", &self.config.headers)
            .field("impersonate", &self.config.impersonate)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
