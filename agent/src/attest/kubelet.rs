//! Which pod a container belongs to, asked of the node's kubelet: the node-mode step after
//! the cgroup has named a pod UID and a container ID.
//!
//! [`KubeletClient::find`] answers with a [`PodIdentity`] (namespace, name, UID, service
//! account) only when the kubelet's `GET /pods` lists the container ID in one of the pod's
//! `containerStatuses`, `initContainerStatuses` or `ephemeralContainerStatuses` (the
//! runtime prefix such as `containerd://` stripped) **and** that pod's `metadata.uid` is the
//! UID the cgroup named. A container the kubelet places in another pod is refused
//! ([`KubeletError::PodUidMismatch`]); one it does not list yet is looked for again, a
//! bounded number of times, then answered [`KubeletError::PodNotFound`]. This module never
//! guesses an identity, and never logs the bearer token.
//!
//! Fetching is shared: the last list is cached (a pod's namespace, name and service account
//! never change, so a match in an old list is still right), a lookup that misses it joins
//! the one fetch in flight or starts the next, fetches start at least `poll_interval`
//! apart, and one lookup consumes at most `max_attempts` fetch results. The secure port is
//! reached over HTTPS with the cluster CA (rustls, aws-lc) and the service account token,
//! re-read at every fetch because projected tokens rotate; the read-only port over plain
//! HTTP. All waiting uses `tokio::time`, so tests pause time.
//!
//! The kubelet's own answers shape the errors: `401` (token not accepted) and `403` (the
//! service account lacks `nodes/proxy`) carry the kubelet's message and are not retried;
//! connection failures, timeouts and `5xx` are retried within the same bound.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, warn};
use url::Url;

/// The kubelet's authenticated HTTPS port.
pub const DEFAULT_SECURE_PORT: u16 = 10250;
/// The kubelet's unauthenticated read-only port, where it is still enabled.
pub const DEFAULT_READ_ONLY_PORT: u16 = 10255;
/// Default least time between the starts of two fetches.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default number of fetch results one lookup consumes before giving up.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default limit on one fetch, from connecting to the last byte of the list (SPIRE uses the
/// same ten seconds).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The service account the API server fills in when a pod names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Largest pod list read: a node at the default 110 pods lists a few MiB at most.
const MAX_BODY: usize = 32 << 20;
/// How much of an error body is kept in an error message.
const MAX_MESSAGE: usize = 300;

/// How to reach the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletEndpoint {
    /// The authenticated port (`https://<host>:<port>/pods`, 10250 by default), with a bearer
    /// token.
    Secure {
        /// The node's name or address as its serving certificate names it.
        host: String,
        /// Usually [`DEFAULT_SECURE_PORT`].
        port: u16,
        /// PEM roots the kubelet's serving certificate must chain to, its name checked
        /// against `host`. `None` skips verification: **dangerous** (anyone who can answer
        /// on the address can hand out identities), and logged as such at startup.
        ca: Option<PathBuf>,
        /// The service account token, re-read at every fetch.
        token_file: PathBuf,
    },
    /// The read-only port (`http://<host>:<port>/pods`, 10255 where enabled), no
    /// authentication.
    ReadOnly {
        /// The node's name or address.
        host: String,
        /// Usually [`DEFAULT_READ_ONLY_PORT`].
        port: u16,
    },
}

/// Everything the client needs; [`KubeletConfig::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletConfig {
    /// Where the kubelet is.
    pub endpoint: KubeletEndpoint,
    /// Least time between the starts of two fetches (default 500 ms).
    pub poll_interval: Duration,
    /// Fetch results one lookup consumes before it answers [`KubeletError::PodNotFound`]
    /// (default 10).
    pub max_attempts: u32,
    /// Limit on one fetch (default 10 s).
    pub request_timeout: Duration,
}

impl KubeletConfig {
    /// `endpoint` with the default interval, attempts and timeout.
    pub fn new(endpoint: KubeletEndpoint) -> Self {
        Self {
            endpoint,
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Who a pod is, as the kubelet lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`, equal to the UID the cgroup named.
    pub uid: String,
    /// `spec.serviceAccountName`, [`DEFAULT_SERVICE_ACCOUNT`] when absent.
    pub service_account: String,
}

/// Why a lookup failed. [`KubeletError::is_retryable`] separates "not yet / not reachable
/// now" (answer `Unavailable`) from "wrong", which asking again will not fix.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    /// A setting cannot work (zero attempts, an empty host, ...).
    #[error("invalid kubelet settings: {0}")]
    Config(String),
    /// The CA file could not be read.
    #[error("reading the kubelet CA {}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The CA file holds no usable PEM certificate.
    #[error("the kubelet CA {} holds no PEM certificate{}", path.display(), detail_suffix(reason))]
    CaPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said, if anything.
        reason: String,
    },
    /// The HTTP client could not be built (a CA certificate rustls refuses, ...).
    #[error("building the kubelet client: {0}")]
    Client(String),
    /// The pod UID given to [`KubeletClient::find`] is not one.
    #[error(
        "invalid pod uid {0:?}: expected a lowercase UUID (8-4-4-4-12 hex digits) or, for a static pod, 32 hex digits"
    )]
    InvalidPodUid(String),
    /// The container ID given to [`KubeletClient::find`] is not one.
    #[error("invalid container id {0:?}: expected 64 lowercase hex digits")]
    InvalidContainerId(String),
    /// The token file could not be read.
    #[error("reading the kubelet token {}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The token file was read but holds no usable token (never printed).
    #[error("the kubelet token {} {reason}", path.display())]
    BadToken {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The kubelet's serving certificate does not chain to the CA given, or does not name
    /// the host: refused, and not retried (a CA that is wrong stays wrong).
    #[error("GET {url}: the kubelet's certificate is not trusted: {reason}")]
    Untrusted {
        /// The URL asked.
        url: String,
        /// The error and its causes.
        reason: String,
    },
    /// No answer: connection refused or reset, a TLS handshake that failed for another
    /// reason than the certificate, an answer cut short.
    #[error("GET {url}: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The error and its causes.
        reason: String,
    },
    /// The fetch took longer than `request_timeout`.
    #[error("GET {url}: no complete answer within {after:?}")]
    Timeout {
        /// The URL asked.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// `401`: the kubelet did not accept the token.
    #[error("GET {url}: 401 unauthorized: the kubelet did not accept the token: {message}")]
    Unauthorized {
        /// The URL asked.
        url: String,
        /// The kubelet's message.
        message: String,
    },
    /// `403`: the token's user may not read pods from the kubelet.
    #[error(
        "GET {url}: 403 forbidden: the agent's service account needs get on nodes/proxy: {message}"
    )]
    Forbidden {
        /// The URL asked.
        url: String,
        /// The kubelet's message (names the user, verb and resource).
        message: String,
    },
    /// Any other status than `200`.
    #[error("GET {url}: unexpected status {status}: {message}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        message: String,
    },
    /// The answer is not a PodList.
    #[error("GET {url}: the answer is not a PodList: {reason}")]
    BadResponse {
        /// The URL asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The kubelet did not list the container in the pod within the attempts allowed.
    #[error(
        "container {container_id} of pod {pod_uid} is not on the kubelet's pod list after {attempts} fetches"
    )]
    PodNotFound {
        /// The pod UID from the cgroup.
        pod_uid: String,
        /// The container ID from the cgroup.
        container_id: String,
        /// Fetch results consumed.
        attempts: u32,
    },
    /// The kubelet lists the container in another pod than the cgroup names: refused.
    #[error(
        "container {container_id} belongs to pod {found_uid} ({namespace}/{name}) on the kubelet, not to pod {pod_uid} as its cgroup says"
    )]
    PodUidMismatch {
        /// The pod UID from the cgroup.
        pod_uid: String,
        /// The container ID from the cgroup.
        container_id: String,
        /// The UID of the pod the kubelet lists the container in.
        found_uid: String,
        /// That pod's namespace.
        namespace: String,
        /// That pod's name.
        name: String,
    },
}

impl KubeletError {
    /// Whether asking again later may succeed: the pod not listed yet, the kubelet
    /// unreachable, slow, or answering `429`/`5xx`. These become gRPC `Unavailable`; the
    /// others are refusals or misconfiguration.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::PodNotFound { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

fn detail_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// Finds pods on the kubelet. Cheap to clone: clones share the cache and the fetches.
#[derive(Clone)]
pub struct KubeletClient {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    poll_interval: Duration,
    max_attempts: u32,
    request_timeout: Duration,
    /// The last list fetched successfully.
    latest: parking_lot::Mutex<Option<Arc<Snapshot>>>,
    /// Held while a fetch waits for its turn and runs: the single flight.
    gate: tokio::sync::Mutex<Gate>,
    /// Sequence number of the last fetch that finished (0: none yet).
    completed: AtomicU64,
    /// Fetches started.
    fetches: AtomicU64,
}

#[derive(Default)]
struct Gate {
    /// When the last fetch started.
    last_start: Option<Instant>,
    /// Fetches started, numbering them.
    started: u64,
    /// The outcome of the last fetch that finished, with its number.
    last: Option<(u64, Result<Arc<Snapshot>, KubeletError>)>,
}

/// Where pod lists come from.
enum Source {
    Http(HttpSource),
    /// A scripted kubelet for the unit tests, which pause time.
    #[cfg(test)]
    Scripted(tests::Script),
}

struct HttpSource {
    http: reqwest::Client,
    url: Url,
    /// The token file, on the secure port.
    token_file: Option<PathBuf>,
}

impl fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match &self.inner.source {
            Source::Http(http) => http.url.as_str(),
            #[cfg(test)]
            Source::Scripted(_) => "scripted",
        };
        f.debug_struct("KubeletClient")
            .field("url", &url)
            .field("poll_interval", &self.inner.poll_interval)
            .field("max_attempts", &self.inner.max_attempts)
            .field("fetches", &self.fetch_count())
            .finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// Checks `config`, loads the CA and checks the token file can be read; nothing is
    /// fetched until the first lookup.
    pub fn new(config: KubeletConfig) -> Result<Self, KubeletError> {
        check_timing(&config)?;
        let source = Source::Http(HttpSource::new(&config)?);
        Ok(Self::with_source(&config, source))
    }

    fn with_source(config: &KubeletConfig, source: Source) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                poll_interval: config.poll_interval,
                max_attempts: config.max_attempts,
                request_timeout: config.request_timeout,
                latest: parking_lot::Mutex::new(None),
                gate: tokio::sync::Mutex::new(Gate::default()),
                completed: AtomicU64::new(0),
                fetches: AtomicU64::new(0),
            }),
        }
    }

    /// The pod running container `container_id` (64 hex) of pod `pod_uid` (canonical, with
    /// `-`; 32 hex for a static pod), from the cached list or, if it is not there, from at
    /// most `max_attempts` fetches.
    pub async fn find(
        &self,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<PodIdentity, KubeletError> {
        check_pod_uid(pod_uid)?;
        check_container_id(container_id)?;
        let inner = &self.inner;
        let mut seen = 0;
        let cached = inner.latest.lock().clone();
        if let Some(snapshot) = cached {
            seen = snapshot.seq;
            if let Some(found) = snapshot.lookup(pod_uid, container_id)? {
                return Ok(found);
            }
        }
        let mut last_error = None;
        for attempt in 1..=inner.max_attempts {
            let (seq, result) = inner.next_list(seen).await;
            seen = seq;
            match result {
                Ok(snapshot) => {
                    last_error = None;
                    if let Some(found) = snapshot.lookup(pod_uid, container_id)? {
                        return Ok(found);
                    }
                    debug!(
                        pod_uid,
                        container_id,
                        attempt,
                        max_attempts = inner.max_attempts,
                        "container not on the kubelet's pod list yet"
                    );
                }
                Err(error) if error.is_retryable() => {
                    warn!(%error, attempt, max_attempts = inner.max_attempts, "kubelet fetch failed");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| KubeletError::PodNotFound {
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
            attempts: inner.max_attempts,
        }))
    }

    /// Fetches started so far (each is one `GET /pods`).
    pub fn fetch_count(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// A fetch result newer than both fetch `after` and any fetch finished before this
    /// call: the one in flight if there is one (single flight), else a new fetch, started
    /// no sooner than `poll_interval` after the last one started.
    async fn next_list(&self, after: u64) -> (u64, Result<Arc<Snapshot>, KubeletError>) {
        let floor = after.max(self.completed.load(Ordering::Acquire));
        let mut gate = self.gate.lock().await;
        if let Some((seq, result)) = &gate.last
            && *seq > floor
        {
            return (*seq, result.clone());
        }
        if let Some(last_start) = gate.last_start {
            tokio::time::sleep_until(last_start + self.poll_interval).await;
        }
        gate.last_start = Some(Instant::now());
        gate.started += 1;
        let seq = gate.started;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = match tokio::time::timeout(self.request_timeout, self.source.fetch()).await {
            Ok(Ok((url, body))) => {
                parse_pod_list(&url, &body).map(|pods| Arc::new(Snapshot::new(seq, pods)))
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(KubeletError::Timeout {
                url: self.source.url(),
                after: self.request_timeout,
            }),
        };
        match &result {
            Ok(snapshot) => {
                debug!(seq, pods = snapshot.pods.len(), "kubelet pod list fetched");
                *self.latest.lock() = Some(snapshot.clone());
            }
            Err(error) => debug!(seq, %error, "kubelet fetch failed"),
        }
        gate.last = Some((seq, result.clone()));
        self.completed.store(seq, Ordering::Release);
        (seq, result)
    }
}

impl Source {
    /// One `GET /pods`: the URL asked and the body of a `200`.
    async fn fetch(&self) -> Result<(String, Vec<u8>), KubeletError> {
        match self {
            Self::Http(http) => http.fetch().await,
            #[cfg(test)]
            Self::Scripted(script) => script.fetch().await,
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Http(http) => http.url.to_string(),
            #[cfg(test)]
            Self::Scripted(_) => tests::SCRIPT_URL.to_owned(),
        }
    }
}

impl HttpSource {
    fn new(config: &KubeletConfig) -> Result<Self, KubeletError> {
        // No proxy (the kubelet is on this node), no redirects (the token goes to the
        // kubelet only), and no platform roots: only the CA given is trusted.
        let builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        let (builder, url, token_file) = match &config.endpoint {
            KubeletEndpoint::Secure {
                host,
                port,
                ca,
                token_file,
            } => {
                let url = pods_url("https", host, *port)?;
                read_token(token_file)?;
                let builder = match ca {
                    Some(path) => builder.tls_certs_only(load_ca(path)?),
                    None => {
                        warn!(
                            url = %url,
                            "kubelet certificate verification is off: whoever answers on this address decides every pod's identity"
                        );
                        builder
                            .tls_certs_only(std::iter::empty())
                            .tls_danger_accept_invalid_certs(true)
                    }
                };
                (builder, url, Some(token_file.clone()))
            }
            KubeletEndpoint::ReadOnly { host, port } => {
                let url = pods_url("http", host, *port)?;
                (builder.tls_certs_only(std::iter::empty()), url, None)
            }
        };
        let http = builder
            .build()
            .map_err(|e| KubeletError::Client(sds_backends::error_chain(&e)))?;
        Ok(Self {
            http,
            url,
            token_file,
        })
    }

    async fn fetch(&self) -> Result<(String, Vec<u8>), KubeletError> {
        let url = self.url.to_string();
        let mut request = self.http.get(self.url.clone());
        if let Some(path) = &self.token_file {
            let token = read_token(path)?;
            let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                KubeletError::BadToken {
                    path: path.clone(),
                    reason: "holds characters not allowed in an HTTP header",
                }
            })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let unreachable = |e: reqwest::Error| {
            let reason = sds_backends::error_chain(&e);
            if rejected_certificate(&e) {
                KubeletError::Untrusted {
                    url: url.clone(),
                    reason,
                }
            } else {
                KubeletError::Unreachable {
                    url: url.clone(),
                    reason,
                }
            }
        };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(KubeletError::BadResponse {
                    url,
                    reason: format!("longer than {MAX_BODY} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if status == 200 {
            return Ok((url, body));
        }
        let message = excerpt(&body);
        Err(match status {
            401 => KubeletError::Unauthorized { url, message },
            403 => KubeletError::Forbidden { url, message },
            _ => KubeletError::Status {
                url,
                status,
                message,
            },
        })
    }
}

/// Whether rustls refused the peer's certificate somewhere in `error`'s causes. An
/// `io::Error` hides the error it wraps from `source()`, so it is looked into.
fn rejected_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && rejected_certificate(inner)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

fn check_timing(config: &KubeletConfig) -> Result<(), KubeletError> {
    if config.max_attempts == 0 {
        return Err(KubeletError::Config(
            "max attempts must be at least 1".to_owned(),
        ));
    }
    if config.poll_interval.is_zero() {
        return Err(KubeletError::Config(
            "the poll interval must be longer than zero".to_owned(),
        ));
    }
    if config.request_timeout.is_zero() {
        return Err(KubeletError::Config(
            "the request timeout must be longer than zero".to_owned(),
        ));
    }
    Ok(())
}

/// `<scheme>://<host>:<port>/pods`, an IPv6 address put in brackets.
fn pods_url(scheme: &str, host: &str, port: u16) -> Result<Url, KubeletError> {
    let host = host.trim();
    if host.is_empty() {
        return Err(KubeletError::Config("the kubelet host is empty".to_owned()));
    }
    if port == 0 {
        return Err(KubeletError::Config("the kubelet port is 0".to_owned()));
    }
    let authority = if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let url = Url::parse(&format!("{scheme}://{authority}/pods"))
        .map_err(|e| KubeletError::Config(format!("kubelet host {host:?}: {e}")))?;
    // A host with a path, user or query in it parses into something else than asked.
    if url.port() != Some(port)
        || url.path() != "/pods"
        || url.query().is_some()
        || !url.username().is_empty()
    {
        return Err(KubeletError::Config(format!(
            "kubelet host {host:?} is not a host name or address"
        )));
    }
    Ok(url)
}

fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, KubeletError> {
    let pem = std::fs::read(path).map_err(|e| KubeletError::CaFile {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    let ders = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KubeletError::CaPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if ders.is_empty() {
        return Err(KubeletError::CaPem {
            path: path.to_owned(),
            reason: String::new(),
        });
    }
    ders.iter()
        .map(|der| {
            reqwest::Certificate::from_der(der).map_err(|e| KubeletError::CaPem {
                path: path.to_owned(),
                reason: sds_backends::error_chain(&e),
            })
        })
        .collect()
}

/// The token in `path`, whitespace trimmed. Never logged.
fn read_token(path: &Path) -> Result<String, KubeletError> {
    let text = std::fs::read_to_string(path).map_err(|e| KubeletError::TokenFile {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(KubeletError::BadToken {
            path: path.to_owned(),
            reason: "is empty",
        });
    }
    Ok(token.to_owned())
}

/// The start of an error body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None if line.is_empty() => "(empty body)".to_owned(),
        None => line,
    }
}

fn check_pod_uid(uid: &str) -> Result<(), KubeletError> {
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let groups: Vec<&str> = uid.split('-').collect();
    let canonical =
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g));
    // Static pods (from manifest files) get an MD5 hex digest as their UID, no dashes.
    let static_pod = uid.len() == 32 && hex(uid);
    if canonical || static_pod {
        Ok(())
    } else {
        Err(KubeletError::InvalidPodUid(uid.to_owned()))
    }
}

fn check_container_id(id: &str) -> Result<(), KubeletError> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(KubeletError::InvalidContainerId(id.to_owned()))
    }
}

/// The fields of the kubelet's `/pods` answer (a core/v1 PodList) this module reads; serde
/// ignores the rest.
#[derive(Deserialize)]
struct PodList {
    kind: Option<String>,
    /// `null` when the node runs no pod (Go marshals an empty slice that way).
    items: Option<Vec<Pod>>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    name: String,
    namespace: String,
    uid: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Spec {
    service_account_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Status {
    container_statuses: Option<Vec<ContainerStatus>>,
    init_container_statuses: Option<Vec<ContainerStatus>>,
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContainerStatus {
    /// `<runtime>://<id>`; absent until the runtime has created the container.
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

fn parse_pod_list(url: &str, body: &[u8]) -> Result<Vec<Pod>, KubeletError> {
    let bad = |reason: String| KubeletError::BadResponse {
        url: url.to_owned(),
        reason,
    };
    let list: PodList = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    match list.kind.as_deref() {
        Some("PodList") => Ok(list.items.unwrap_or_default()),
        Some(other) => Err(bad(format!("kind is {other:?}, not \"PodList\""))),
        None => Err(bad("no kind".to_owned())),
    }
}

/// The container ID in a status's `containerID`, without the runtime's `<name>://` prefix
/// (`containerd://`, `cri-o://`, `docker://`, ...).
fn strip_runtime(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id)
}

/// One fetched list, indexed by container ID.
struct Snapshot {
    seq: u64,
    pods: Vec<PodIdentity>,
    /// Container ID -> indexes into `pods` (normally one).
    by_container: HashMap<String, Vec<usize>>,
}

impl Snapshot {
    fn new(seq: u64, items: Vec<Pod>) -> Self {
        let mut pods = Vec::with_capacity(items.len());
        let mut by_container: HashMap<String, Vec<usize>> = HashMap::new();
        for pod in items {
            let Metadata {
                name,
                namespace,
                uid,
            } = pod.metadata;
            // Without these the pod cannot be named; the kubelet always sets them.
            if name.is_empty() || namespace.is_empty() || uid.is_empty() {
                continue;
            }
            let index = pods.len();
            let status = pod.status;
            let ids = [
                status.container_statuses,
                status.init_container_statuses,
                status.ephemeral_container_statuses,
            ]
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|s| s.container_id)
            .map(|id| strip_runtime(&id).to_owned())
            .filter(|id| !id.is_empty());
            for id in ids {
                let entry = by_container.entry(id).or_default();
                if !entry.contains(&index) {
                    entry.push(index);
                }
            }
            let service_account = pod
                .spec
                .service_account_name
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
            pods.push(PodIdentity {
                namespace,
                name,
                uid,
                service_account,
            });
        }
        Self {
            seq,
            pods,
            by_container,
        }
    }

    /// The pod listing `container_id` whose UID is `pod_uid`; `None` if no pod lists the
    /// container; an error if only other pods do.
    fn lookup(
        &self,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<Option<PodIdentity>, KubeletError> {
        let Some(indexes) = self.by_container.get(container_id) else {
            return Ok(None);
        };
        let mut others = indexes.iter().filter_map(|i| self.pods.get(*i));
        if let Some(pod) = others.clone().find(|p| p.uid == pod_uid) {
            return Ok(Some(pod.clone()));
        }
        match others.next() {
            Some(other) => Err(KubeletError::PodUidMismatch {
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.to_owned(),
                found_uid: other.uid.clone(),
                namespace: other.namespace.clone(),
                name: other.name.clone(),
            }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SCRIPT_URL: &str = "https://kubelet.test:10250/pods";

    type Answer = (Duration, Result<String, KubeletError>);

    /// A kubelet whose answer to fetch `n` (from 1) is `answer(n)`: a delay, then a body or
    /// an error. Records when each fetch started.
    pub(super) struct Script {
        answer: Box<dyn Fn(u64) -> Answer + Send + Sync>,
        starts: parking_lot::Mutex<Vec<Instant>>,
    }

    impl Script {
        pub(super) async fn fetch(&self) -> Result<(String, Vec<u8>), KubeletError> {
            let n = {
                let mut starts = self.starts.lock();
                starts.push(Instant::now());
                starts.len() as u64
            };
            let (delay, answer) = (self.answer)(n);
            tokio::time::sleep(delay).await;
            answer.map(|body| (SCRIPT_URL.to_owned(), body.into_bytes()))
        }
    }

    const POD_A: &str = "2c1f6a3e-4b7d-4e59-9a0c-d1b2e3f40516";
    const POD_B: &str = "7e8d9c0b-1a2f-4e3d-8c5b-6a7f8e9d0c1b";
    const STATIC_POD: &str = "0f3c5a7e9b1d2c4e6a8f0b2d4c6e8a0b";

    fn cid(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn config() -> KubeletConfig {
        let mut config = KubeletConfig::new(KubeletEndpoint::ReadOnly {
            host: "127.0.0.1".into(),
            port: DEFAULT_READ_ONLY_PORT,
        });
        config.max_attempts = 4;
        config
    }

    fn scripted(
        config: &KubeletConfig,
        answer: impl Fn(u64) -> Answer + Send + Sync + 'static,
    ) -> (KubeletClient, Arc<Inner>) {
        let client = KubeletClient::with_source(
            config,
            Source::Scripted(Script {
                answer: Box::new(answer),
                starts: parking_lot::Mutex::new(Vec::new()),
            }),
        );
        let inner = client.inner.clone();
        (client, inner)
    }

    fn starts(inner: &Inner) -> Vec<Instant> {
        match &inner.source {
            Source::Scripted(script) => script.starts.lock().clone(),
            Source::Http(_) => unreachable!(),
        }
    }

    /// A pod as the kubelet lists it: an app container and an Envoy sidecar running, a
    /// finished init container, and the fields this module ignores around them.
    fn pod(
        uid: &str,
        namespace: &str,
        name: &str,
        sa: Option<&str>,
        running: &str,
        init: &str,
    ) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "nodeName": "node-1",
            "containers": [{"name": "app", "image": "registry.test/app:1"}],
            "initContainers": [{"name": "setup", "image": "registry.test/setup:1"}],
        });
        if let Some(sa) = sa {
            spec["serviceAccountName"] = sa.into();
            spec["serviceAccount"] = sa.into();
        }
        serde_json::json!({
            "metadata": {
                "name": name, "namespace": namespace, "uid": uid,
                "resourceVersion": "4711", "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"app": name},
            },
            "spec": spec,
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.7",
                "initContainerStatuses": [{
                    "name": "setup", "ready": true, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                    "image": "registry.test/setup:1",
                    "containerID": format!("containerd://{init}"),
                }],
                "containerStatuses": [
                    {"name": "app", "ready": true, "restartCount": 0, "started": true,
                     "state": {"running": {"startedAt": "2025-01-01T00:00:05Z"}},
                     "containerID": format!("containerd://{running}")},
                    {"name": "envoy", "ready": false, "restartCount": 0,
                     "state": {"waiting": {"reason": "ContainerCreating"}}},
                ],
            },
        })
    }

    fn list(pods: Vec<serde_json::Value>) -> String {
        serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods})
            .to_string()
    }

    fn two_pods() -> String {
        list(vec![
            pod(POD_A, "shop", "web-0", Some("web"), &cid('a'), &cid('1')),
            pod(POD_B, "shop", "db-0", None, &cid('b'), &cid('2')),
        ])
    }

    fn snapshot(body: &str) -> Snapshot {
        Snapshot::new(1, parse_pod_list(SCRIPT_URL, body.as_bytes()).unwrap())
    }

    #[test]
    fn a_running_or_init_container_names_its_pod() {
        let snap = snapshot(&two_pods());
        let web = snap.lookup(POD_A, &cid('a')).unwrap().unwrap();
        assert_eq!(
            web,
            PodIdentity {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: POD_A.into(),
                service_account: "web".into()
            }
        );
        assert_eq!(snap.lookup(POD_A, &cid('1')).unwrap().unwrap(), web);
        // No serviceAccountName: the API server's default.
        assert_eq!(
            snap.lookup(POD_B, &cid('b'))
                .unwrap()
                .unwrap()
                .service_account,
            "default"
        );
        // A container with no ID yet matches nothing.
        assert!(snap.lookup(POD_A, &cid('c')).unwrap().is_none());
    }

    #[test]
    fn every_runtime_prefix_and_ephemeral_containers_are_matched() {
        let mut web = pod(
            STATIC_POD,
            "kube-system",
            "etcd-node-1",
            Some("etcd"),
            &cid('a'),
            &cid('1'),
        );
        web["status"]["containerStatuses"][1]["containerID"] =
            format!("cri-o://{}", cid('d')).into();
        web["status"]["ephemeralContainerStatuses"] = serde_json::json!([{"name": "debugger", "containerID": format!("docker://{}", cid('e'))}]);
        let snap = snapshot(&list(vec![web]));
        for c in ['a', '1', 'd', 'e'] {
            let found = snap.lookup(STATIC_POD, &cid(c)).unwrap().unwrap();
            assert_eq!(found.name, "etcd-node-1", "container {c}");
        }
        assert_eq!(strip_runtime("containerd://abc"), "abc");
        assert_eq!(strip_runtime("abc"), "abc");
    }

    #[test]
    fn a_container_listed_in_another_pod_is_refused() {
        let snap = snapshot(&two_pods());
        let err = snap.lookup(POD_B, &cid('a')).unwrap_err();
        assert!(
            matches!(err, KubeletError::PodUidMismatch { ref found_uid, .. } if found_uid == POD_A),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("shop/web-0"), "{err}");
    }

    #[test]
    fn a_container_id_listed_twice_counts_only_for_the_pod_with_the_right_uid() {
        // Both list container 'a' (a runtime reporting one ID twice): only the pod whose UID
        // the cgroup named gives the identity.
        let snap = snapshot(&list(vec![
            pod(POD_B, "other", "decoy", Some("admin"), &cid('a'), &cid('2')),
            pod(POD_A, "shop", "web-0", Some("web"), &cid('a'), &cid('1')),
        ]));
        assert_eq!(
            snap.lookup(POD_A, &cid('a'))
                .unwrap()
                .unwrap()
                .service_account,
            "web"
        );
        assert_eq!(
            snap.lookup(POD_B, &cid('a'))
                .unwrap()
                .unwrap()
                .service_account,
            "admin"
        );
    }

    #[test]
    fn pods_without_name_namespace_or_uid_are_skipped() {
        let mut nameless = pod(POD_A, "shop", "web-0", None, &cid('a'), &cid('1'));
        nameless["metadata"]["name"] = "".into();
        let snap = snapshot(&list(vec![nameless]));
        assert!(snap.lookup(POD_A, &cid('a')).unwrap().is_none());
        assert!(snap.pods.is_empty());
    }

    #[test]
    fn answers_that_are_not_a_pod_list_are_refused() {
        for (body, expect) in [
            ("<html>hello</html>", "expected value"),
            ("{\"kind\":\"Status\",\"items\":[]}", "kind is \"Status\""),
            ("{\"items\":[]}", "no kind"),
            ("{\"kind\":\"PodList\",\"items\":{}}", "invalid type"),
            (
                "{\"kind\":\"PodList\",\"items\":[{\"metadata\":{\"uid\":7}}]}",
                "invalid type",
            ),
        ] {
            let err = parse_pod_list(SCRIPT_URL, body.as_bytes()).err().unwrap();
            assert!(
                matches!(err, KubeletError::BadResponse { .. }),
                "{body}: {err}"
            );
            assert!(err.to_string().contains(expect), "{body}: {err}");
            assert!(!err.is_retryable());
        }
        // An empty node: items null, as Go marshals it.
        let empty = parse_pod_list(
            SCRIPT_URL,
            b"{\"kind\":\"PodList\",\"apiVersion\":\"v1\",\"items\":null}",
        )
        .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn pod_uids_and_container_ids_are_checked() {
        for good in [POD_A, STATIC_POD] {
            check_pod_uid(good).unwrap();
        }
        for bad in [
            "",
            "2c1f6a3e_4b7d_4e59_9a0c_d1b2e3f40516",
            "2C1F6A3E-4B7D-4E59-9A0C-D1B2E3F40516",
            "2c1f6a3e-4b7d-4e59-9a0c-d1b2e3f4051",
            "2c1f6a3e4b7d-4e59-9a0c-d1b2e3f405160",
            "2c1f6a3e-4b7d-4e59-9a0c-d1b2e3f4051g",
            "0f3c5a7e9b1d2c4e6a8f0b2d4c6e8a0",
        ] {
            let err = check_pod_uid(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid pod uid"),
                "{bad}: {err}"
            );
        }
        check_container_id(&cid('f')).unwrap();
        for bad in [
            String::new(),
            cid('A'),
            cid('g'),
            cid('a')[..63].to_owned(),
            format!("containerd://{}", cid('a')),
        ] {
            let err = check_container_id(&bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid container id"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unusable_settings_are_refused() {
        let mut c = config();
        c.max_attempts = 0;
        assert!(
            KubeletClient::new(c)
                .unwrap_err()
                .to_string()
                .contains("max attempts must be at least 1")
        );
        let mut c = config();
        c.poll_interval = Duration::ZERO;
        assert!(
            KubeletClient::new(c)
                .unwrap_err()
                .to_string()
                .contains("poll interval")
        );
        let mut c = config();
        c.request_timeout = Duration::ZERO;
        assert!(
            KubeletClient::new(c)
                .unwrap_err()
                .to_string()
                .contains("request timeout")
        );
        for (host, port, expect) in [
            ("", 10255, "host is empty"),
            ("node-1", 0, "port is 0"),
            ("node-1/x", 10255, "not a host name"),
            ("user@node-1", 10255, "not a host name"),
            ("node 1", 10255, "kubelet host"),
        ] {
            let c = KubeletConfig::new(KubeletEndpoint::ReadOnly {
                host: host.into(),
                port,
            });
            let err = KubeletClient::new(c).unwrap_err();
            assert!(err.to_string().contains(expect), "{host}: {err}");
        }
        assert_eq!(
            pods_url("https", "fd00::1", 10250).unwrap().as_str(),
            "https://[fd00::1]:10250/pods"
        );
        assert_eq!(
            pods_url("http", "node-1", 10255).unwrap().as_str(),
            "http://node-1:10255/pods"
        );
    }

    #[test]
    fn a_missing_ca_or_token_is_refused_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let ca = dir.path().join("ca.pem");
        let secure = |ca: Option<PathBuf>| {
            KubeletClient::new(KubeletConfig::new(KubeletEndpoint::Secure {
                host: "127.0.0.1".into(),
                port: DEFAULT_SECURE_PORT,
                ca,
                token_file: token.clone(),
            }))
        };
        let err = secure(None).unwrap_err();
        assert!(matches!(err, KubeletError::TokenFile { .. }), "{err}");
        std::fs::write(&token, " \n").unwrap();
        let err = secure(None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the kubelet token {} is empty", token.display())
        );
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let err = secure(Some(ca.clone())).unwrap_err();
        assert!(matches!(err, KubeletError::CaFile { .. }), "{err}");
        std::fs::write(&ca, "not a certificate").unwrap();
        let err = secure(Some(ca.clone())).unwrap_err();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = secure(Some(ca.clone())).unwrap_err();
        assert!(matches!(err, KubeletError::CaPem { .. }), "{err}");
        // Skipping verification works, and the client's Debug never shows the token.
        let client = secure(None).unwrap();
        assert!(!format!("{client:?}").contains("s3cret"));
    }

    #[test]
    fn a_token_that_is_not_a_header_value_is_refused_without_printing_it() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\u{1}def").unwrap();
        let source = HttpSource::new(&KubeletConfig::new(KubeletEndpoint::Secure {
            host: "127.0.0.1".into(),
            port: 1,
            ca: None,
            token_file: token,
        }))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(source.fetch()).unwrap_err();
        assert!(
            err.to_string().contains("not allowed in an HTTP header"),
            "{err}"
        );
        assert!(!err.to_string().contains("abc"), "{err}");
    }

    #[test]
    fn a_refused_certificate_is_found_behind_io_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error")]
        struct Wrapper(#[source] std::io::Error);
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = Wrapper(std::io::Error::other(refused));
        assert!(rejected_certificate(&wrapped));
        let other = Wrapper(std::io::Error::other(rustls::Error::DecryptError));
        assert!(!rejected_certificate(&other));
        let refused_conn = Wrapper(std::io::ErrorKind::ConnectionRefused.into());
        assert!(!rejected_certificate(&refused_conn));
    }

    #[test]
    fn error_bodies_are_shortened_to_one_line() {
        assert_eq!(excerpt(b"Unauthorized\n"), "Unauthorized");
        assert_eq!(excerpt(b""), "(empty body)");
        let long = excerpt("x ".repeat(1000).as_bytes());
        assert!(
            long.ends_with("...") && long.len() == MAX_MESSAGE + 3,
            "{long}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_concurrent_lookups_share_one_fetch() {
        let (client, inner) = scripted(&config(), |_| (Duration::from_millis(300), Ok(two_pods())));
        let lookups = (0..50).map(|i| {
            let client = client.clone();
            async move {
                let (uid, c) = if i % 2 == 0 {
                    (POD_A, 'a')
                } else {
                    (POD_B, 'b')
                };
                client.find(uid, &cid(c)).await
            }
        });
        let results = futures::future::join_all(lookups).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(client.fetch_count(), 1);
        assert_eq!(starts(&inner).len(), 1);
        // Later lookups of listed containers are answered from the cache.
        client.find(POD_A, &cid('1')).await.unwrap();
        assert_eq!(client.fetch_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_appears_after_two_polls_is_found_on_the_third() {
        let (client, inner) = scripted(&config(), |n| {
            let body = if n <= 2 {
                list(vec![pod(POD_B, "shop", "db-0", None, &cid('b'), &cid('2'))])
            } else {
                two_pods()
            };
            (Duration::from_millis(5), Ok(body))
        });
        let t0 = Instant::now();
        let found = client.find(POD_A, &cid('a')).await.unwrap();
        assert_eq!(found.name, "web-0");
        assert_eq!(client.fetch_count(), 3);
        let starts = starts(&inner);
        assert_eq!(starts[0], t0);
        for pair in starts.windows(2) {
            assert_eq!(pair[1] - pair[0], DEFAULT_POLL_INTERVAL);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_never_appears_is_not_found_after_exactly_max_attempts() {
        let (client, inner) = scripted(&config(), |_| (Duration::ZERO, Ok(two_pods())));
        let err = client.find(POD_A, &cid('c')).await.unwrap_err();
        assert!(
            matches!(err, KubeletError::PodNotFound { attempts: 4, .. }),
            "{err}"
        );
        assert!(err.is_retryable());
        assert_eq!(client.fetch_count(), 4);
        let starts = starts(&inner);
        assert!(
            starts
                .windows(2)
                .all(|p| p[1] - p[0] >= DEFAULT_POLL_INTERVAL)
        );
        // A second lookup makes its own four fetches, still spaced.
        client.find(POD_A, &cid('c')).await.unwrap_err();
        assert_eq!(client.fetch_count(), 8);
        let starts = self::starts(&inner);
        assert!(
            starts
                .windows(2)
                .all(|p| p[1] - p[0] >= DEFAULT_POLL_INTERVAL)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_within_the_bound() {
        let (client, _) = scripted(&config(), |n| match n {
            1 => (
                Duration::ZERO,
                Err(KubeletError::Unreachable {
                    url: SCRIPT_URL.into(),
                    reason: "connection refused".into(),
                }),
            ),
            2 => (
                Duration::ZERO,
                Err(KubeletError::Status {
                    url: SCRIPT_URL.into(),
                    status: 503,
                    message: "busy".into(),
                }),
            ),
            // Slower than the request timeout.
            3 => (Duration::from_secs(60), Ok(two_pods())),
            _ => (Duration::ZERO, Ok(two_pods())),
        });
        let found = client.find(POD_B, &cid('b')).await.unwrap();
        assert_eq!(found.name, "db-0");
        assert_eq!(client.fetch_count(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_fetch_fails_the_last_error_is_answered() {
        let mut c = config();
        c.request_timeout = Duration::from_secs(1);
        let (client, _) = scripted(&c, |_| (Duration::from_secs(5), Ok(two_pods())));
        let err = client.find(POD_A, &cid('a')).await.unwrap_err();
        assert!(
            matches!(err, KubeletError::Timeout { after, .. } if after == Duration::from_secs(1)),
            "{err}"
        );
        assert!(err.is_retryable());
        assert_eq!(client.fetch_count(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_answered_at_once() {
        for (error, expect) in [
            (
                KubeletError::Unauthorized {
                    url: SCRIPT_URL.into(),
                    message: "Unauthorized".into(),
                },
                "401 unauthorized",
            ),
            (
                KubeletError::Forbidden {
                    url: SCRIPT_URL.into(),
                    message: "Forbidden (user=x)".into(),
                },
                "nodes/proxy",
            ),
            (
                KubeletError::Status {
                    url: SCRIPT_URL.into(),
                    status: 404,
                    message: "404 page not found".into(),
                },
                "status 404",
            ),
        ] {
            let answer = error.clone();
            let (client, _) = scripted(&config(), move |_| (Duration::ZERO, Err(answer.clone())));
            let err = client.find(POD_A, &cid('a')).await.unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
            assert!(!err.is_retryable());
            assert_eq!(client.fetch_count(), 1);
        }
        let (client, _) = scripted(&config(), |_| (Duration::ZERO, Ok("garbage".into())));
        let err = client.find(POD_A, &cid('a')).await.unwrap_err();
        assert!(matches!(err, KubeletError::BadResponse { .. }), "{err}");
        assert_eq!(client.fetch_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_fetch_is_not_shared_with_a_later_lookup() {
        // Fetch 1 fails; a lookup arriving afterwards must not be handed that old error as
        // an attempt, but fetch again (after the interval).
        let (client, inner) = scripted(&config(), |n| match n {
            1 => (
                Duration::ZERO,
                Err(KubeletError::Forbidden {
                    url: SCRIPT_URL.into(),
                    message: "no".into(),
                }),
            ),
            _ => (Duration::ZERO, Ok(two_pods())),
        });
        client.find(POD_A, &cid('a')).await.unwrap_err();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let found = client.find(POD_A, &cid('a')).await.unwrap();
        assert_eq!(found.service_account, "web");
        assert_eq!(starts(&inner).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_mismatch_is_refused_without_more_fetches() {
        let (client, _) = scripted(&config(), |_| (Duration::ZERO, Ok(two_pods())));
        let err = client.find(POD_B, &cid('a')).await.unwrap_err();
        assert!(matches!(err, KubeletError::PodUidMismatch { .. }), "{err}");
        assert_eq!(client.fetch_count(), 1);
        // From the cache too.
        let err = client.find(POD_B, &cid('a')).await.unwrap_err();
        assert!(matches!(err, KubeletError::PodUidMismatch { .. }), "{err}");
        assert_eq!(client.fetch_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_arguments_fetch_nothing() {
        let (client, _) = scripted(&config(), |_| (Duration::ZERO, Ok(two_pods())));
        assert!(matches!(
            client.find("nope", &cid('a')).await,
            Err(KubeletError::InvalidPodUid(_))
        ));
        assert!(matches!(
            client.find(POD_A, "nope").await,
            Err(KubeletError::InvalidContainerId(_))
        ));
        assert_eq!(client.fetch_count(), 0);
    }
}
