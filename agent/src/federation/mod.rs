//! Federated trust domains (`--federate-with TD=FILE`): the X.509 roots of other trust domains,
//! read from files and served next to the agent's own bundle on the Workload API
//! (`federated_bundles` of `FetchX509SVID`, and every bundle of `FetchX509Bundles`).
//!
//! A file is a SPIFFE bundle (the JWKS of the SPIFFE Trust Domain and Bundle specification:
//! the `x509-svid` keys' `x5c` certificates are the roots; `jwt-svid` keys are ignored) or PEM
//! certificates. It is re-read when it changes (polled every `--federation-poll-interval`).
//!
//! A bundle is accepted only if it holds at least one root, every root is a CA certificate
//! valid now, and no root names another trust domain in a SPIFFE URI SAN (SPIRE's roots carry
//! `spiffe://<td>`). A file that fails any check never replaces the last good bundle of its
//! trust domain: the failure is logged with the file and the reason, and counted in
//! `sds_agent_federation_errors_total{trust_domain, reason}`. At start-up every file must be
//! good (as CA files must), so a typo stops the agent (and `validate`) with exit 2.
//!
//! Not here yet (issue 19): `https://` bundle endpoints, serving the bundles over SDS (`ALL`,
//! `spiffe://<td>`, the SPIFFE certificate validator), and removing a domain at run time.

use std::collections::BTreeMap;
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

use crate::metrics::{FederationErrorLabels, FederationLabels, Metrics};

/// The largest bundle file read (a real one is a few KiB).
const MAX_BUNDLE_LEN: u64 = 1024 * 1024;

/// One `--federate-with`: a trust domain and where its bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FederationSource {
    /// The federated trust domain.
    #[serde(serialize_with = "crate::config::display")]
    pub trust_domain: TrustDomain,
    /// The bundle file.
    pub path: PathBuf,
}

/// The roots of one federated trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    /// The roots, DER certificates concatenated (the Workload API's form).
    pub der: Vec<u8>,
    /// How many roots.
    pub roots: usize,
}

/// Every federated trust domain's last good bundle.
pub type Bundles = Arc<BTreeMap<TrustDomain, FederatedBundle>>;

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
        /// Its notBefore, RFC 3339.
        not_before: String,
        /// Its notAfter, RFC 3339.
        not_after: String,
    },
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
        }
    }
}

/// A SPIFFE bundle document: only what the X.509 roots need.
#[derive(serde::Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
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
        roots: roots.len(),
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
        let rfc3339 = |t: x509_parser::time::ASN1Time| {
            t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
        };
        return Err(BundleError::Expired {
            index,
            not_before: rfc3339(validity.not_before),
            not_after: rfc3339(validity.not_after),
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
}

/// A source that failed at start-up.
#[derive(Debug, thiserror::Error)]
#[error("--federate-with {trust_domain}={}: {error}", path.display())]
pub struct StartError {
    trust_domain: TrustDomain,
    path: PathBuf,
    error: BundleError,
}

impl Federation {
    /// Reads every source once; any that fails is an error (the agent does not start).
    pub fn start(
        sources: Vec<FederationSource>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let mut bundles = BTreeMap::new();
        for s in &sources {
            let bundle = read_bundle(&s.path, &s.trust_domain).map_err(|error| StartError {
                trust_domain: s.trust_domain.clone(),
                path: s.path.clone(),
                error,
            })?;
            info!(trust_domain = %s.trust_domain, file = %s.path.display(), roots = bundle.roots, "federated bundle read");
            bundles.insert(s.trust_domain.clone(), bundle);
        }
        for s in &sources {
            metrics.prime_federation(s.trust_domain.as_str());
        }
        Ok(Self {
            sources,
            bundles: watch::Sender::new(Arc::new(bundles)),
            metrics,
        })
    }

    /// The bundles, updated in place whenever one changes.
    pub fn subscribe(&self) -> watch::Receiver<Bundles> {
        self.bundles.subscribe()
    }

    /// Re-reads every source every `every` until `shutdown`; a file that changed and passes
    /// the checks replaces its trust domain's bundle, one that fails leaves it as it was.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.refresh(),
            }
        }
    }

    /// One pass over the sources.
    pub fn refresh(&self) {
        for s in &self.sources {
            let current = self.bundles.borrow().get(&s.trust_domain).cloned();
            match read_bundle(&s.path, &s.trust_domain) {
                Ok(bundle) if Some(&bundle) == current.as_ref() => {}
                Ok(bundle) => {
                    info!(trust_domain = %s.trust_domain, file = %s.path.display(), roots = bundle.roots, "federated bundle changed");
                    self.bundles.send_modify(|all| {
                        Arc::make_mut(all).insert(s.trust_domain.clone(), bundle);
                    });
                    self.metrics
                        .federation_updates
                        .get_or_create(&FederationLabels::new(s.trust_domain.as_str()))
                        .inc();
                }
                Err(e) => {
                    warn!(trust_domain = %s.trust_domain, file = %s.path.display(), reason = e.reason(), error = %e, "federated bundle refused; keeping the last good one");
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
}

#[cfg(test)]
mod tests;
