//! Federated trust domains (`--federate-with TD=SOURCE`, `--federation-dir DIR`): the X.509
//! roots of other trust domains, served next to the agent's own bundle on the Workload API
//! (`federated_bundles` of `FetchX509SVID`, and every bundle of `FetchX509Bundles`) and over
//! SDS (`ALL`, `spiffe://<td>`: `crate::sds`). This module never touches the CA or a stream.
//!
//! A bundle is a SPIFFE bundle (the JWKS of the SPIFFE Trust Domain and Bundle specification:
//! the `x509-svid` keys' `x5c` certificates are the roots; `jwt-svid` keys are ignored) or PEM
//! certificates. Its source is
//! - a file, re-read when it changes (polled every `--federation-poll-interval`);
//! - an `https://` SPIFFE bundle endpoint (the `https_web` profile: the server is verified
//!   with the system's roots, or `--federation-endpoint-ca`), fetched at start and again at
//!   the bundle's `spiffe_refresh_hint` (5 minutes without one); after a failure, again in
//!   1 s, doubling up to 30 s. A fetch that fails, takes over 10 s or answers anything but
//!   200 is a failure.
//!
//! A bundle is accepted only if it holds at least one root, every root is a CA certificate
//! valid now, and no root names another trust domain in a SPIFFE URI SAN (SPIRE's roots carry
//! `spiffe://<td>`). A file that fails any check never replaces the last good bundle of its
//! trust domain: the failure is logged with the file and the reason, and counted in
//! `sds_agent_federation_errors_total{trust_domain, reason}`. At start-up every file must be
//! good (as CA files must), so a typo stops the agent (and `validate`) with exit 2; an
//! endpoint is not required at start-up (a partner's outage must not stop this agent), and
//! its domain is served once a first fetch succeeds.
//!
//! `--federation-dir DIR` is a directory of bundle files, one per domain, as a Kubernetes
//! ConfigMap of bundles is mounted: `DIR/<trust-domain>.json` (SPIFFE bundle) or
//! `DIR/<trust-domain>.pem`. It is listed at every poll: a new file adds its domain, a changed
//! one updates it (with every check above), and a removed one removes the domain. Dotfiles are
//! ignored and symlinks followed (the kubelet's `..data` layout). A file whose name is not a
//! trust domain, names the agent's own, or names a domain twice is skipped, logged and counted
//! once (`sds_agent_federation_dir_skipped_total{reason}`); a domain both in `--federate-with`
//! and the directory stops the agent at start-up.
//!
//! The bundles are published through one `watch` channel read by the Workload API and the SDS
//! server. Every change takes a new number from one counter: the changed domain's `version`
//! and the set's `generation` (bumped by removals too), so a reader tells what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use sds_backends::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::metrics::{FederationErrorLabels, FederationLabels, Metrics, ReasonLabel};

/// The largest bundle file read (a real one is a few KiB).
const MAX_BUNDLE_LEN: u64 = 1024 * 1024;

/// One `--federate-with`: a trust domain and where its bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FederationSource {
    /// The federated trust domain.
    #[serde(serialize_with = "crate::config::display")]
    pub trust_domain: TrustDomain,
    /// Where its bundle is.
    #[serde(flatten)]
    pub source: BundleSource,
}

/// Where a federated bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleSource {
    /// A file, polled for changes.
    File(PathBuf),
    /// An `https://` SPIFFE bundle endpoint.
    #[serde(serialize_with = "crate::config::display")]
    Endpoint(url::Url),
}

impl std::fmt::Display for BundleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Endpoint(u) => write!(f, "{u}"),
        }
    }
}

/// How long one endpoint fetch may take, unless set.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// When an endpoint's bundle gives no `spiffe_refresh_hint`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// The refresh hint is obeyed within these bounds.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// After a failed fetch, the next one comes after 1 s, doubling with each failure in a row up
/// to this (and never later than the last refresh hint).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The first retry after a failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The roots of one federated trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    /// The roots, DER certificates concatenated (the Workload API's form).
    pub der: Vec<u8>,
    /// The roots, PEM (SDS's form).
    pub pem: String,
    /// How many roots.
    pub roots: usize,
    /// Changes whenever the roots change (0 until served).
    pub version: u64,
}

/// Every federated trust domain's last good bundle, and the number of the last change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederatedBundles {
    /// Increases with every change: a domain added, updated or removed.
    pub generation: u64,
    /// The domains and their bundles.
    pub domains: BTreeMap<TrustDomain, FederatedBundle>,
}

/// Readers mostly want the map: let them index and iterate it directly.
impl std::ops::Deref for FederatedBundles {
    type Target = BTreeMap<TrustDomain, FederatedBundle>;

    fn deref(&self) -> &Self::Target {
        &self.domains
    }
}

/// The federated bundles as published.
pub type Bundles = Arc<FederatedBundles>;

/// Why a bundle was not accepted. The reasons are also the metric's `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The file could not be read.
    #[error("cannot read it: {0}")]
    Unreadable(String),
    /// Neither a SPIFFE bundle (JSON) nor PEM certificates.
    #[error("not a SPIFFE bundle or PEM certificates: {0}")]
    Malformed(String),
    /// A SPIFFE bundle with no `x509-svid` key, or PEM with no certificate.
    #[error("it holds no X.509 root (a SPIFFE bundle needs a key with \"use\": \"x509-svid\")")]
    Empty,
    /// A root that is not a CA certificate, or cannot be parsed.
    #[error("root {index} is not a CA certificate: {reason}")]
    NotCa {
        /// Its position in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A root outside its validity period.
    #[error("root {index} is not valid now (valid {not_before} to {not_after})")]
    Expired {
        /// Its position.
        index: usize,
        /// Its notBefore (RFC 2822).
        not_before: String,
        /// Its notAfter (RFC 2822).
        not_after: String,
    },
    /// An endpoint could not be fetched: connection, TLS, timeout, or a status but 200.
    #[error("fetching it failed: {0}")]
    FetchFailed(String),
    /// A root that names another trust domain.
    #[error("root {index} belongs to {found}, not {expected}")]
    WrongTrustDomain {
        /// Its position.
        index: usize,
        /// The trust domain its SPIFFE URI SAN names.
        found: String,
        /// The trust domain the bundle was given for.
        expected: String,
    },
}

impl BundleError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreadable(_) => "unreadable",
            Self::Malformed(_) => "malformed",
            Self::Empty => "empty",
            Self::NotCa { .. } => "not_ca",
            Self::Expired { .. } => "expired",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::FetchFailed(_) => "fetch_failed",
        }
    }
}

/// A SPIFFE bundle document: only what the X.509 roots and the refresh need.
#[derive(serde::Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

/// The `spiffe_refresh_hint` of a SPIFFE bundle (seconds), if it has one.
pub fn refresh_hint(text: &[u8]) -> Option<Duration> {
    serde_json::from_slice::<Jwks>(text)
        .ok()?
        .spiffe_refresh_hint
        .map(Duration::from_secs)
}

#[derive(serde::Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: String,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Parses `text` as the bundle of `trust_domain`, checked as the module says, at `now`.
pub fn parse_bundle(
    text: &[u8],
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<FederatedBundle, BundleError> {
    let roots = if text.trim_ascii_start().starts_with(b"{") {
        roots_of_jwks(text)?
    } else {
        match sds_backends::pem::decode_certificates(text) {
            Ok(certs) => certs,
            Err(sds_backends::pem::PemError::NoCertificates) => return Err(BundleError::Empty),
            Err(e) => return Err(BundleError::Malformed(e.to_string())),
        }
    };
    if roots.is_empty() {
        return Err(BundleError::Empty);
    }
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut der = Vec::new();
    for (index, root) in roots.iter().enumerate() {
        check_root(index, root, trust_domain, now_secs)?;
        der.extend_from_slice(root);
    }
    Ok(FederatedBundle {
        der,
        pem: sds_backends::pem::encode_certificates(&roots),
        roots: roots.len(),
        version: 0,
    })
}

/// The `x5c` certificates of the `x509-svid` keys. The specification requires exactly one
/// certificate per key.
fn roots_of_jwks(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let jwks: Jwks =
        serde_json::from_slice(text).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let mut roots = Vec::new();
    for (i, key) in jwks.keys.iter().enumerate() {
        if key.use_ != "x509-svid" {
            continue;
        }
        let [cert] = key.x5c.as_slice() else {
            return Err(BundleError::Malformed(format!(
                "key {i}: an x509-svid key must have exactly one x5c certificate, not {}",
                key.x5c.len()
            )));
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(cert)
            .map_err(|e| BundleError::Malformed(format!("key {i}: x5c is not base64: {e}")))?;
        roots.push(CertificateDer::from(der));
    }
    Ok(roots)
}

fn check_root(
    index: usize,
    der: &[u8],
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<(), BundleError> {
    let not_ca = |reason: String| BundleError::NotCa { index, reason };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| not_ca(e.to_string()))?;
    if !cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(not_ca("basicConstraints does not say CA".into()));
    }
    let validity = cert.validity();
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        let date = |t: x509_parser::time::ASN1Time| {
            t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
        };
        return Err(BundleError::Expired {
            index,
            not_before: date(validity.not_before),
            not_after: date(validity.not_after),
        });
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            let Some(rest) = uri.strip_prefix("spiffe://") else {
                continue;
            };
            let found = rest.split('/').next().unwrap_or_default();
            if found != trust_domain.as_str() {
                return Err(BundleError::WrongTrustDomain {
                    index,
                    found: found.to_owned(),
                    expected: trust_domain.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Reads and checks `path` as the bundle of `trust_domain`.
pub fn read_bundle(
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<FederatedBundle, BundleError> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BUNDLE_LEN + 1).read_to_end(&mut text))
        .map_err(|e| BundleError::Unreadable(e.to_string()))?;
    if text.len() as u64 > MAX_BUNDLE_LEN {
        return Err(BundleError::Unreadable(format!(
            "larger than {MAX_BUNDLE_LEN} bytes"
        )));
    }
    parse_bundle(&text, trust_domain, SystemTime::now())
}

/// The federated bundles: read at start, then kept up to date by [`Federation::run`].
#[derive(Debug)]
pub struct Federation {
    sources: Vec<FederationSource>,
    bundles: watch::Sender<Bundles>,
    metrics: Arc<Metrics>,
    /// The client of the endpoints, if there are any.
    http: Option<reqwest::Client>,
    fetch_timeout: Duration,
    /// The longest wait before retrying a failed endpoint.
    max_retry: Duration,
    /// When each endpoint is fetched next, and its failures in a row.
    due: parking_lot::Mutex<BTreeMap<TrustDomain, (tokio::time::Instant, u32)>>,
    /// `--federation-dir`, if given, and what was found in it.
    dir: Option<FederationDir>,
    /// The last number handed out to a change (versions and generations).
    changes: std::sync::atomic::AtomicU64,
}

/// `--federation-dir`: where it is, and what its last listing found.
#[derive(Debug)]
struct FederationDir {
    path: PathBuf,
    /// The agent's own trust domain, which no file may name.
    own: TrustDomain,
    /// The trust domains of `--federate-with`, which no file may name either.
    flagged: BTreeSet<TrustDomain>,
    state: parking_lot::Mutex<DirState>,
}

#[derive(Debug, Default)]
struct DirState {
    /// The domains the directory's files gave, and each one's file.
    domains: BTreeMap<TrustDomain, PathBuf>,
    /// The entries skipped, so that each is logged and counted once while it stays.
    skipped: BTreeSet<std::ffi::OsString>,
}

/// One listing of `--federation-dir`.
#[derive(Debug, Default)]
struct Listing {
    /// Each domain's file.
    files: BTreeMap<TrustDomain, PathBuf>,
    /// Entries skipped: the name, the reason label and what is wrong.
    skipped: Vec<(std::ffi::OsString, &'static str, String)>,
    /// Domains given by two files: left as they are, neither updated nor removed.
    held: BTreeSet<TrustDomain>,
}

/// A source that failed at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A `--federate-with` bundle is missing or bad.
    #[error("--federate-with {trust_domain}={source_}: {error}")]
    Source {
        /// Its trust domain.
        trust_domain: TrustDomain,
        /// Its file or endpoint.
        source_: BundleSource,
        /// What is wrong.
        error: BundleError,
    },
    /// `--federation-dir` cannot be listed, or names a domain `--federate-with` gives too.
    #[error("--federation-dir {}: {reason}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Federation {
    /// Reads every file source once; any that fails is an error (the agent does not start).
    /// Endpoints are fetched by [`Federation::run`], first at once; their TLS roots are
    /// `endpoint_ca` (PEM) if given, else the system's.
    pub fn start(
        sources: Vec<FederationSource>,
        endpoint_ca: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Box<StartError>> {
        let mut bundles = BTreeMap::new();
        let mut due = BTreeMap::new();
        let mut version = 0;
        for s in &sources {
            match &s.source {
                BundleSource::File(path) => {
                    let mut bundle = read_bundle(path, &s.trust_domain).map_err(|error| {
                        Box::new(StartError::Source {
                            trust_domain: s.trust_domain.clone(),
                            source_: s.source.clone(),
                            error,
                        })
                    })?;
                    info!(trust_domain = %s.trust_domain, file = %path.display(), roots = bundle.roots, "federated bundle read");
                    version += 1;
                    bundle.version = version;
                    bundles.insert(s.trust_domain.clone(), bundle);
                }
                BundleSource::Endpoint(_) => {
                    due.insert(s.trust_domain.clone(), (tokio::time::Instant::now(), 0));
                }
            }
        }
        let first_endpoint = sources
            .iter()
            .find(|s| matches!(s.source, BundleSource::Endpoint(_)));
        let http = match first_endpoint {
            None => None,
            Some(ep) => Some(endpoint_client(endpoint_ca).map_err(|error| {
                Box::new(StartError::Source {
                    trust_domain: ep.trust_domain.clone(),
                    source_: ep.source.clone(),
                    error,
                })
            })?),
        };
        for s in &sources {
            metrics.prime_federation(s.trust_domain.as_str());
        }
        metrics.federated_domains.set(gauge(bundles.len()));
        Ok(Self {
            sources,
            bundles: watch::Sender::new(Arc::new(FederatedBundles {
                generation: version,
                domains: bundles,
            })),
            metrics,
            http,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            max_retry: RETRY_AFTER_FAILURE,
            due: parking_lot::Mutex::new(due),
            dir: None,
            changes: std::sync::atomic::AtomicU64::new(version),
        })
    }

    /// Also serves the domains of the bundle files in `dir` (`--federation-dir`), read once
    /// now and again at every poll. The directory must be listable, and no file in it may
    /// name a `--federate-with` domain; a file that fails its checks is logged and counted,
    /// and its domain is served once it passes. `own` is the agent's trust domain, which no
    /// file may name.
    pub fn with_dir(mut self, dir: &Path, own: &TrustDomain) -> Result<Self, Box<StartError>> {
        let listing = list_dir(dir).map_err(|reason| {
            Box::new(StartError::Dir {
                dir: dir.to_owned(),
                reason,
            })
        })?;
        let flagged: BTreeSet<TrustDomain> = self
            .sources
            .iter()
            .map(|s| s.trust_domain.clone())
            .collect();
        if let Some(td) = listing.files.keys().find(|td| flagged.contains(*td)) {
            return Err(Box::new(StartError::Dir {
                dir: dir.to_owned(),
                reason: format!(
                    "{td} is also given by --federate-with; a trust domain must have one source"
                ),
            }));
        }
        self.metrics.prime_federation_dir();
        self.dir = Some(FederationDir {
            path: dir.to_owned(),
            own: own.clone(),
            flagged,
            state: parking_lot::Mutex::new(DirState::default()),
        });
        info!(dir = %dir.display(), files = listing.files.len(), "reading federated bundles from a directory");
        self.refresh_dir_with(Ok(listing));
        Ok(self)
    }

    /// Sets how long one endpoint fetch may take.
    #[must_use]
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Sets the longest wait before a failed endpoint is tried again (30 s unless set).
    #[must_use]
    pub fn with_max_retry(mut self, max: Duration) -> Self {
        self.max_retry = max;
        self
    }

    /// The bundles, updated in place whenever one changes.
    pub fn subscribe(&self) -> watch::Receiver<Bundles> {
        self.bundles.subscribe()
    }

    /// Re-reads every file and lists `--federation-dir` every `every`, and fetches each
    /// endpoint when it is due, until `shutdown`; a bundle that changed and passes the checks
    /// replaces its trust domain's, one that fails leaves it as it was, and a domain whose
    /// file left the directory is removed.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.refresh();
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.refresh_endpoints() => {}
                    }
                }
            }
        }
    }

    /// One pass over the file sources and `--federation-dir`.
    pub fn refresh(&self) {
        for s in &self.sources {
            if let BundleSource::File(path) = &s.source {
                self.apply(s, read_bundle(path, &s.trust_domain));
            }
        }
        if let Some(dir) = &self.dir {
            self.refresh_dir_with(list_dir(&dir.path));
        }
    }

    /// Applies one listing of `--federation-dir`: reads every file, adds and updates their
    /// domains, and removes the domains whose file is gone. A listing that failed changes
    /// nothing.
    fn refresh_dir_with(&self, listing: Result<Listing, String>) {
        let Some(dir) = &self.dir else {
            return;
        };
        let mut listing = match listing {
            Ok(listing) => listing,
            Err(reason) => {
                warn!(dir = %dir.path.display(), %reason, "cannot list --federation-dir; keeping its domains as they are");
                self.count_skip("unreadable_dir");
                return;
            }
        };
        // Names the directory may not give, known only here.
        let refused: Vec<TrustDomain> = listing
            .files
            .keys()
            .filter(|td| **td == dir.own || dir.flagged.contains(*td))
            .cloned()
            .collect();
        for td in refused {
            if let Some(path) = listing.files.remove(&td) {
                let (reason, why) = if td == dir.own {
                    (
                        "own_trust_domain",
                        "it names the agent's own trust domain, whose roots come from its CA",
                    )
                } else {
                    (
                        "duplicate",
                        "its trust domain is given by --federate-with too",
                    )
                };
                let name = path.file_name().map(ToOwned::to_owned).unwrap_or_default();
                listing.skipped.push((name, reason, why.to_owned()));
            }
        }
        let mut state = dir.state.lock();
        let mut still_skipped = BTreeSet::new();
        for (name, reason, why) in listing.skipped {
            if !state.skipped.contains(&name) {
                warn!(dir = %dir.path.display(), file = ?name, reason, why, "skipping a --federation-dir entry");
                self.count_skip(reason);
            }
            still_skipped.insert(name);
        }
        state.skipped = still_skipped;
        let gone: Vec<TrustDomain> = state
            .domains
            .keys()
            .filter(|td| !listing.files.contains_key(*td) && !listing.held.contains(*td))
            .cloned()
            .collect();
        for td in gone {
            state.domains.remove(&td);
            self.remove(&td, &dir.path);
        }
        for (td, path) in listing.files {
            if !state.domains.contains_key(&td) {
                self.metrics.prime_federation(td.as_str());
            }
            let source = FederationSource {
                trust_domain: td.clone(),
                source: BundleSource::File(path.clone()),
            };
            self.apply(&source, read_bundle(&path, &td));
            state.domains.insert(td, path);
        }
    }

    /// Stops serving `td`, whose file left `dir`.
    fn remove(&self, td: &TrustDomain, dir: &Path) {
        let mut removed = false;
        let generation = self.next_change();
        self.bundles.send_if_modified(|all| {
            if !all.domains.contains_key(td) {
                return false;
            }
            let all = Arc::make_mut(all);
            all.domains.remove(td);
            all.generation = generation;
            removed = true;
            true
        });
        if removed {
            info!(trust_domain = %td, dir = %dir.display(), "federated trust domain removed: its file is gone");
            self.metrics
                .federated_domains
                .set(gauge(self.bundles.borrow().len()));
        }
    }

    fn count_skip(&self, reason: &'static str) {
        self.metrics
            .federation_dir_skipped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A new number for a change.
    fn next_change(&self) -> u64 {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1)
    }

    /// Fetches every endpoint that is due (all at once, each within the fetch timeout).
    pub async fn refresh_endpoints(&self) {
        let Some(http) = &self.http else {
            return;
        };
        let now = tokio::time::Instant::now();
        let due: Vec<&FederationSource> = {
            let next = self.due.lock();
            self.sources
                .iter()
                .filter(|s| next.get(&s.trust_domain).is_some_and(|(at, _)| *at <= now))
                .collect()
        };
        let fetches = due.into_iter().map(|s| async move {
            let BundleSource::Endpoint(url) = &s.source else {
                return;
            };
            let (result, hint) = self.fetch(http, url, &s.trust_domain).await;
            {
                let mut due = self.due.lock();
                let failures = due.get(&s.trust_domain).map_or(0, |(_, f)| *f);
                let (wait, failures) = match (&result, hint) {
                    (Ok(_), Some(hint)) => (hint.clamp(MIN_REFRESH, MAX_REFRESH), 0),
                    (Ok(_), None) => (DEFAULT_REFRESH, 0),
                    (Err(_), _) => {
                        let backoff = FIRST_RETRY.saturating_mul(1 << failures.min(16));
                        (backoff.min(self.max_retry), failures.saturating_add(1))
                    }
                };
                due.insert(
                    s.trust_domain.clone(),
                    (tokio::time::Instant::now() + wait, failures),
                );
            }
            self.apply(s, result);
        });
        futures::future::join_all(fetches).await;
    }

    /// One fetch of `url`: the bundle, and the refresh hint of what was fetched.
    async fn fetch(
        &self,
        http: &reqwest::Client,
        url: &url::Url,
        trust_domain: &TrustDomain,
    ) -> (Result<FederatedBundle, BundleError>, Option<Duration>) {
        let fetched = tokio::time::timeout(self.fetch_timeout, async {
            let resp = http
                .get(url.clone())
                .send()
                .await
                .map_err(|e| sds_backends::error_chain(&e))?;
            let status = resp.status();
            if status != reqwest::StatusCode::OK {
                return Err(format!("GET {url}: {status}"));
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| sds_backends::error_chain(&e))?;
            if body.len() as u64 > MAX_BUNDLE_LEN {
                return Err(format!("GET {url}: larger than {MAX_BUNDLE_LEN} bytes"));
            }
            Ok(body)
        })
        .await;
        let body = match fetched {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => return (Err(BundleError::FetchFailed(e)), None),
            Err(_) => {
                return (
                    Err(BundleError::FetchFailed(format!(
                        "GET {url}: no complete answer within {}",
                        humantime::format_duration(self.fetch_timeout)
                    ))),
                    None,
                );
            }
        };
        (
            parse_bundle(&body, trust_domain, SystemTime::now()),
            refresh_hint(&body),
        )
    }

    /// Replaces `s`'s bundle with `result` if it is good and different; logs and counts.
    fn apply(&self, s: &FederationSource, result: Result<FederatedBundle, BundleError>) {
        let current = self
            .bundles
            .borrow()
            .get(&s.trust_domain)
            .map(|b| b.der.clone());
        match result {
            Ok(bundle) if Some(&bundle.der) == current.as_ref() => {}
            Ok(mut bundle) => {
                let change = if current.is_some() {
                    "changed"
                } else {
                    "added"
                };
                info!(trust_domain = %s.trust_domain, source = %s.source, roots = bundle.roots, change, "federated bundle changed");
                let version = self.next_change();
                bundle.version = version;
                self.bundles.send_modify(|all| {
                    let all = Arc::make_mut(all);
                    all.domains.insert(s.trust_domain.clone(), bundle);
                    all.generation = version;
                });
                self.metrics
                    .federated_domains
                    .set(gauge(self.bundles.borrow().len()));
                self.metrics
                    .federation_updates
                    .get_or_create(&FederationLabels::new(s.trust_domain.as_str()))
                    .inc();
            }
            Err(e) => {
                warn!(trust_domain = %s.trust_domain, source = %s.source, reason = e.reason(), error = %e, "federated bundle refused; keeping the last good one");
                self.metrics
                    .federation_errors
                    .get_or_create(&FederationErrorLabels::new(
                        s.trust_domain.as_str(),
                        e.reason(),
                    ))
                    .inc();
            }
        }
    }
}

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Lists `dir`: each `<trust-domain>.json` or `.pem` (following symlinks) and the entries
/// skipped. Dotfiles and subdirectories are ignored silently (the kubelet's `..data` layout).
fn list_dir(dir: &Path) -> Result<Listing, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    let mut listing = Listing::default();
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        let Some(text) = name.to_str() else {
            listing
                .skipped
                .push((name, "bad_name", "the file name is not UTF-8".into()));
            continue;
        };
        if text.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a ConfigMap's files are links into `..data`.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let stem = text
            .strip_suffix(".json")
            .or_else(|| text.strip_suffix(".pem"));
        let Some(stem) = stem else {
            listing.skipped.push((
                name,
                "bad_name",
                "expected <trust-domain>.json or <trust-domain>.pem".into(),
            ));
            continue;
        };
        let td = match stem.parse::<TrustDomain>() {
            Ok(td) => td,
            Err(e) => {
                let why = format!("{stem:?} is not a trust domain: {e}");
                listing.skipped.push((name, "bad_name", why));
                continue;
            }
        };
        if listing.files.contains_key(&td) || listing.held.contains(&td) {
            listing.held.insert(td.clone());
            if let Some(first) = listing.files.remove(&td) {
                let first_name = first.file_name().map(ToOwned::to_owned).unwrap_or_default();
                listing.skipped.push((
                    first_name,
                    "duplicate",
                    format!("{td} has both a .json and a .pem file"),
                ));
            }
            listing.skipped.push((
                name,
                "duplicate",
                format!("{td} has both a .json and a .pem file"),
            ));
            continue;
        }
        listing.files.insert(td, path);
    }
    Ok(listing)
}

/// The client of the bundle endpoints: TLS verified with `ca` (PEM) or the system's roots, and
/// no redirects (the `https_web` profile fetches the URL given). The environment's proxy
/// settings (`HTTPS_PROXY`, `NO_PROXY`) apply.
fn endpoint_client(ca: Option<&Path>) -> Result<reqwest::Client, BundleError> {
    let builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let builder = match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                BundleError::Unreadable(format!("--federation-endpoint-ca {}: {e}", path.display()))
            })?;
            let certs = sds_backends::pem::decode_certificates(&pem).map_err(|e| {
                BundleError::Malformed(format!("--federation-endpoint-ca {}: {e}", path.display()))
            })?;
            let roots = certs
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    BundleError::Malformed(format!(
                        "--federation-endpoint-ca {}: {}",
                        path.display(),
                        sds_backends::error_chain(&e)
                    ))
                })?;
            builder.tls_certs_only(roots)
        }
        None => builder,
    };
    builder
        .build()
        .map_err(|e| BundleError::FetchFailed(sds_backends::error_chain(&e)))
}

#[cfg(test)]
mod tests;
