//! The secret manager: one rotation task per identity, the last good certificate, the trust
//! bundle, and the `watch` channels SDS streams subscribe to.
//!
//! It keeps the rules of DESIGN.md:
//! 1. a new key, generated locally, for every issuance; keys never leave memory;
//! 2. every CA answer is validated ([`validate`]) before it is published;
//! 3. the renewal time comes from the certificate returned (`--renew-at` of its actual
//!    lifetime, less jitter), not from the TTL asked for;
//! 4. while the CA fails, the last good certificate is served until it expires; retries back
//!    off exponentially with jitter, capped, and the cap shrinks as expiry nears;
//! 5. streams only read the channels, so any number of them cause one CSR per rotation.
//!
//! Readers never wait on the CA: they see the latest published value. Nothing here knows
//! about SDS or any particular backend.

pub mod validate;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use rustls_pki_types::CertificateDer;
use sds_backends::{CaError, CertificateAuthority, KeyType, SignRequest, SpiffeId, TrustBundle};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use crate::config::RenewAt;
use crate::keys::{KeyError, PrivateKey};
use crate::metrics::{
    CaErrorLabels, CaOperationLabels, CaRequestLabels, IdentityLabel, KeyTypeLabel, Metrics,
    ReasonLabel, ResultLabel, SecretLabels,
};
use validate::{LeafInfo, Rejection};

/// Most of the renewal interval that jitter may take off, so a fleet spreads out.
const JITTER_FRACTION: f64 = 0.1;
/// Backoff cap while no certificate has been issued yet.
const FIRST_ISSUE_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How the manager renews and retries.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Lifetime asked of the CA.
    pub ttl: Duration,
    /// Fraction of the actual lifetime after which to renew.
    pub renew_at: RenewAt,
    /// Key type of workload keys.
    pub key_type: KeyType,
    /// Longest a single CA call may take.
    pub ca_timeout: Duration,
    /// First retry delay.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often the trust bundle is re-read from the CA.
    pub bundle_refresh: Duration,
}

/// A validated workload certificate with its key, as served under `default`.
pub struct ServedCert {
    /// The identity it certifies.
    pub identity: SpiffeId,
    /// Increases with every new certificate.
    pub version: u64,
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// Leaf then intermediates, DER certificates concatenated (the Workload API's form).
    pub chain_der: Vec<u8>,
    key_pem: Zeroizing<String>,
    key_der: Zeroizing<Vec<u8>>,
    /// Serial and validity of the leaf.
    pub leaf: LeafInfo,
    /// When the manager plans to renew it.
    pub renew_at: SystemTime,
    /// The backend that signed it.
    pub backend: &'static str,
}

/// The trust bundle, as served under `ROOTCA`.
#[derive(Debug)]
pub struct ServedBundle {
    /// Increases with every change of the roots.
    pub version: u64,
    /// The roots, PEM.
    pub pem: String,
    /// The roots, DER certificates concatenated (the Workload API's form).
    pub der: Vec<u8>,
    roots: Vec<CertificateDer<'static>>,
    /// Serial and validity of each root.
    pub root_info: Vec<LeafInfo>,
}

/// What `/secrets` shows of one served secret.
#[derive(Debug, Clone, Serialize)]
pub struct SecretStatus {
    /// Resource name: `default` or `ROOTCA`.
    pub name: &'static str,
    /// The workload's SPIFFE ID (for `ROOTCA`, the trust domain's).
    pub spiffe_id: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339, for `default` only.
    pub next_renewal: Option<String>,
    /// Version served on SDS streams.
    pub version: u64,
    /// The CA backend that signed it (for `ROOTCA`, that serves the roots).
    pub backend: &'static str,
}

/// The manager's view of its own health, for `/readyz` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    /// CA attempts failed since the last success.
    pub consecutive_failures: u32,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Whether the last good certificate has expired (and is no longer served).
    pub expired: bool,
}

/// One failed issuance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CA call failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The CA answered, but the answer failed validation.
    #[error("ca answer rejected: {0}")]
    Rejected(#[from] Rejection),
    /// Local key generation failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Owns the rotation of one identity's certificate and the trust bundle.
pub struct SecretManager {
    identity: SpiffeId,
    policy: Policy,
    ca: Arc<dyn CertificateAuthority>,
    cert: watch::Sender<Option<Arc<ServedCert>>>,
    bundle: watch::Sender<Option<Arc<ServedBundle>>>,
    /// Bumped by [`SecretManager::rotate_now`]; requests made during an issuance are
    /// satisfied by it, so a burst of them causes one CSR.
    rotate: watch::Sender<u64>,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
    /// Version of the last certificate built; never reused, even after an expiry.
    cert_version: AtomicU64,
    /// notAfter of the last certificate and the earliest root, kept after an expiry so the
    /// metrics can say how long ago it was.
    expiries: Mutex<Vec<(SecretLabels, SystemTime)>>,
}

impl SecretManager {
    /// A manager for `identity`; nothing happens until [`SecretManager::run`] is spawned.
    pub fn new(
        identity: SpiffeId,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity,
            policy,
            ca,
            cert: watch::Sender::new(None),
            bundle: watch::Sender::new(None),
            rotate: watch::Sender::new(0),
            health: Mutex::new(Health::default()),
            metrics,
            cert_version: AtomicU64::new(0),
            expiries: Mutex::new(Vec::new()),
        })
    }

    /// The identity this manager serves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The latest certificate, if one is valid now.
    pub fn subscribe_cert(&self) -> watch::Receiver<Option<Arc<ServedCert>>> {
        self.cert.subscribe()
    }

    /// The latest trust bundle.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Option<Arc<ServedBundle>>> {
        self.bundle.subscribe()
    }

    /// Asks for a renewal now, whatever the schedule says.
    pub fn rotate_now(&self) {
        self.rotate.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether a valid certificate and a trust bundle are being served.
    pub fn is_ready(&self) -> bool {
        self.cert.borrow().is_some() && self.bundle.borrow().is_some()
    }

    /// The manager's health.
    pub fn health(&self) -> Health {
        self.health.lock().clone()
    }

    /// What is served now, for `/secrets`.
    pub fn status(&self) -> Vec<SecretStatus> {
        let mut out = Vec::new();
        if let Some(c) = self.cert.borrow().as_ref() {
            out.push(SecretStatus {
                name: crate::identity::DEFAULT_RESOURCE,
                spiffe_id: c.identity.to_string(),
                serial: c.leaf.serial.clone(),
                not_before: rfc3339(c.leaf.not_before),
                not_after: rfc3339(c.leaf.not_after),
                next_renewal: Some(rfc3339(c.renew_at)),
                version: c.version,
                backend: c.backend,
            });
        }
        if let Some(b) = self.bundle.borrow().as_ref() {
            for root in &b.root_info {
                out.push(SecretStatus {
                    name: crate::identity::ROOTCA_RESOURCE,
                    spiffe_id: format!("spiffe://{}", self.identity.trust_domain()),
                    serial: root.serial.clone(),
                    not_before: rfc3339(root.not_before),
                    not_after: rfc3339(root.not_after),
                    next_renewal: None,
                    version: b.version,
                    backend: self.ca.name(),
                });
            }
        }
        out
    }

    /// Sets the seconds-to-expiry gauges from the wall clock; the admin endpoint calls this
    /// at each scrape, so they are exact whenever read.
    pub fn refresh_expiry_metrics(&self) {
        let now = SystemTime::now();
        for (labels, not_after) in self.expiries.lock().iter() {
            self.metrics
                .cert_expiry_seconds
                .get_or_create(labels)
                .set(seconds_between(now, *not_after));
        }
    }

    /// Records the notAfter of a served secret for the expiry gauges.
    fn record_expiry(&self, resource: &'static str, identity: String, validity: &LeafInfo) {
        let labels = SecretLabels { resource, identity };
        let not_after = validity.not_after;
        self.metrics
            .cert_expiry_timestamp
            .get_or_create(&labels)
            .set(unix_f64(not_after));
        self.metrics
            .cert_lifetime_seconds
            .get_or_create(&labels)
            .set(seconds_between(validity.not_before, not_after));
        let mut expiries = self.expiries.lock();
        match expiries.iter_mut().find(|(l, _)| *l == labels) {
            Some(entry) => entry.1 = not_after,
            None => expiries.push((labels, not_after)),
        }
        drop(expiries);
        self.refresh_expiry_metrics();
    }

    fn set_next_renewal(&self, at: SystemTime) {
        self.metrics
            .next_renewal_timestamp
            .get_or_create(&IdentityLabel {
                identity: self.identity.to_string(),
            })
            .set(unix_f64(at));
    }

    /// One call to the CA, limited to the policy's timeout, timed and counted by backend,
    /// operation and result; a failure is also counted by kind in `ca_errors_total`.
    async fn ca_call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        let backend = self.ca.name();
        let started = Instant::now();
        let result = tokio::time::timeout(self.policy.ca_timeout, call)
            .await
            .unwrap_or(Err(CaError::Timeout(self.policy.ca_timeout)));
        self.metrics
            .ca_request_duration
            .get_or_create(&CaOperationLabels { backend, operation })
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => {
                self.metrics
                    .ca_errors
                    .get_or_create(&CaErrorLabels {
                        backend,
                        kind: e.kind(),
                        retryable: if e.is_retryable() { "true" } else { "false" },
                    })
                    .inc();
                e.kind()
            }
        };
        self.metrics
            .ca_requests
            .get_or_create(&CaRequestLabels {
                backend,
                operation,
                result: outcome,
            })
            .inc();
        result
    }

    /// The rotation loop: issue, publish, sleep until the renewal point (or a retry, a
    /// forced rotation, a bundle refresh, or expiry), until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_issue = Instant::now();
        let mut next_bundle = Instant::now() + self.policy.bundle_refresh;
        let mut expires: Option<Instant> = None;
        let mut withdrawn = false;
        let mut failures: u32 = 0;
        let mut rotate = self.rotate.subscribe();
        loop {
            let expiry = async {
                match expires {
                    Some(t) if !withdrawn => sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(next_issue) => {}
                r = rotate.changed() => {
                    if r.is_err() {
                        return;
                    }
                    info!("rotation requested");
                }
                _ = sleep_until(next_bundle) => {
                    if let Err(error) = self.refresh_bundle().await {
                        warn!(%error, backend = self.ca.name(), "trust bundle refresh failed; keeping the last one");
                    }
                    next_bundle = Instant::now() + self.policy.bundle_refresh;
                    continue;
                }
                _ = expiry => {
                    error!(id = %self.identity, "certificate expired before it could be renewed; it is no longer served");
                    self.cert.send_replace(None);
                    self.health.lock().expired = true;
                    withdrawn = true;
                    continue;
                }
            }

            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.issue_once() => r,
            };
            // Rotation requests made while this attempt ran are answered by it.
            rotate.borrow_and_update();
            match result {
                Ok(cert) => {
                    failures = 0;
                    let now = SystemTime::now();
                    let delay = cert.renew_at.duration_since(now).unwrap_or_default();
                    next_issue = Instant::now() + delay;
                    expires = Some(
                        Instant::now()
                            + cert.leaf.not_after.duration_since(now).unwrap_or_default(),
                    );
                    info!(
                        id = %self.identity,
                        serial = %cert.leaf.serial,
                        not_after = %rfc3339(cert.leaf.not_after),
                        next_renewal = %rfc3339(cert.renew_at),
                        backend = self.ca.name(),
                        duration_ms = started.elapsed().as_millis() as u64,
                        "certificate issued"
                    );
                    self.metrics
                        .renewals
                        .get_or_create(&ResultLabel { result: "success" })
                        .inc();
                    self.record_expiry(
                        crate::identity::DEFAULT_RESOURCE,
                        self.identity.to_string(),
                        &cert.leaf,
                    );
                    self.set_next_renewal(cert.renew_at);
                    *self.health.lock() = Health::default();
                    self.cert.send_replace(Some(Arc::new(cert)));
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    // Zero once expired: retry at the most urgent pace.
                    let remaining = expires.map(|t| t.saturating_duration_since(Instant::now()));
                    let delay = backoff(failures, remaining, &self.policy);
                    next_issue = Instant::now() + delay;
                    self.metrics
                        .renewals
                        .get_or_create(&ResultLabel { result: "failure" })
                        .inc();
                    self.set_next_renewal(SystemTime::now() + delay);
                    self.record_failure(&error, failures, remaining, delay);
                }
            }
        }
    }

    fn record_failure(
        &self,
        error: &IssueError,
        failures: u32,
        remaining: Option<Duration>,
        retry_in: Duration,
    ) {
        // CA errors were counted by kind where the call was made (`ca_call`).
        let retryable = match error {
            IssueError::Ca(e) => e.is_retryable(),
            IssueError::Rejected(r) => {
                self.metrics
                    .ca_responses_rejected
                    .get_or_create(&ReasonLabel { reason: r.reason() })
                    .inc();
                false
            }
            IssueError::Key(_) => false,
        };
        {
            let mut h = self.health.lock();
            h.consecutive_failures = failures;
            h.last_error = Some(error.to_string());
        }
        let remaining_s = remaining.map(|r| r.as_secs());
        // Loud when a person must act, or when the served certificate is in its last
        // quarter of the time left before renewal was due.
        let urgent = !retryable
            || match remaining {
                None => failures > 3,
                Some(r) => {
                    r < self
                        .policy
                        .ttl
                        .mul_f64((1.0 - self.policy.renew_at.get()) / 2.0)
                }
            };
        if urgent {
            error!(
                %error, id = %self.identity, backend = self.ca.name(), failures,
                retryable, remaining_validity_s = remaining_s, retry_in_ms = retry_in.as_millis() as u64,
                "certificate renewal failing"
            );
        } else {
            warn!(
                %error, id = %self.identity, backend = self.ca.name(), failures,
                retryable, remaining_validity_s = remaining_s, retry_in_ms = retry_in.as_millis() as u64,
                "certificate renewal failed; will retry"
            );
        }
    }

    /// One issuance: key, CSR, sign, bundle, validate. Publishes the trust bundle if it had
    /// to be read, and nothing else; [`SecretManager::run`] serves what it returns. Public
    /// for the issuance benchmark.
    pub async fn issue_once(&self) -> Result<ServedCert, IssueError> {
        let key_type = self.policy.key_type;
        let started = Instant::now();
        // An RSA key takes 50-300 ms of prime search, so it is made on a blocking thread
        // where it holds up no SDS stream. An EC key takes tens of microseconds, less than
        // the signature checks below, and less than handing it to another thread and back.
        let key = if key_type.is_rsa() {
            tokio::task::spawn_blocking(move || PrivateKey::generate(key_type))
                .await
                .map_err(|e| CaError::Misconfigured(format!("key generation task failed: {e}")))??
        } else {
            PrivateKey::generate(key_type)?
        };
        self.metrics
            .key_generation_duration
            .get_or_create(&KeyTypeLabel {
                key_type: key_type.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        let csr_der = key.csr(&self.identity)?;
        let req = SignRequest {
            identity: self.identity.clone(),
            csr_der,
            ttl: self.policy.ttl,
            key_type,
        };
        let chain = self.ca_call("sign", self.ca.sign(&req)).await?;
        // The bundle is read after signing: some CAs (istiod) only send their roots with a
        // certificate. A chain naming a root the bundle lacks means the CA has a new root,
        // so the bundle is re-read before the chain is checked against it.
        let cached = self.bundle.borrow().clone();
        let (bundle, refreshed) = match cached {
            Some(b) if chain.roots_hint.iter().all(|hint| b.roots.contains(hint)) => (b, false),
            cached => {
                if cached.is_some() {
                    debug!("the CA's chain names a root not in the bundle; re-reading it");
                }
                (self.refresh_bundle().await?, true)
            }
        };
        let now = SystemTime::now();
        let leaf = match validate::validate(
            &chain,
            key.public_key_raw(),
            &self.identity,
            &bundle.roots,
            now,
        ) {
            Err(Rejection::Chain { .. }) if !refreshed => {
                // The CA may have moved to a new root: re-read the bundle once and re-check.
                debug!("chain does not verify to the cached bundle; re-reading it");
                let fresh = self.refresh_bundle().await?;
                validate::validate(
                    &chain,
                    key.public_key_raw(),
                    &self.identity,
                    &fresh.roots,
                    now,
                )?
            }
            other => other?,
        };
        let lifetime = leaf
            .not_after
            .duration_since(leaf.not_before)
            .unwrap_or_default();
        if lifetime > self.policy.ttl * 2 {
            warn!(
                id = %self.identity, backend = self.ca.name(),
                lifetime_s = lifetime.as_secs(), cert_ttl_s = self.policy.ttl.as_secs(),
                "the CA issued a certificate living far longer than --cert-ttl; using it, and renewing from its real lifetime"
            );
        }
        let renew_at = renewal_time(&leaf, self.policy.renew_at, now);
        let mut pem_chain = vec![&chain.leaf];
        pem_chain.extend(chain.intermediates.iter());
        Ok(ServedCert {
            identity: self.identity.clone(),
            version: self.cert_version.fetch_add(1, Ordering::Relaxed) + 1,
            chain_der: pem_chain.iter().flat_map(|c| c.iter().copied()).collect(),
            chain_pem: sds_backends::pem::encode_certificates(pem_chain),
            key_pem: key.pkcs8_pem(),
            key_der: key.pkcs8_der(),
            leaf,
            renew_at,
            backend: self.ca.name(),
        })
    }

    /// Re-reads the trust bundle and publishes it if it changed.
    async fn refresh_bundle(&self) -> Result<Arc<ServedBundle>, IssueError> {
        let bundle: TrustBundle = self.ca_call("trust_bundle", self.ca.trust_bundle()).await?;
        let current = self.bundle.borrow().clone();
        if let Some(cur) = current.filter(|c| c.roots == bundle.roots()) {
            return Ok(cur);
        }
        let root_info = bundle
            .roots()
            .iter()
            .map(root_info)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::BadResponse(format!("trust bundle: {e}")))?;
        let version = self.bundle.borrow().as_ref().map_or(1, |b| b.version + 1);
        let served = Arc::new(ServedBundle {
            version,
            pem: sds_backends::pem::encode_certificates(bundle.roots()),
            der: bundle
                .roots()
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect(),
            roots: bundle.roots().to_vec(),
            root_info,
        });
        info!(
            roots = served.roots.len(),
            version,
            backend = self.ca.name(),
            "trust bundle updated"
        );
        if let Some(earliest) = served.root_info.iter().min_by_key(|r| r.not_after) {
            self.record_expiry(
                crate::identity::ROOTCA_RESOURCE,
                format!("spiffe://{}", self.identity.trust_domain()),
                earliest,
            );
        }
        self.bundle.send_replace(Some(served.clone()));
        Ok(served)
    }
}

impl ServedCert {
    /// The private key, PKCS#8 PEM. Only the SDS encoder reads it.
    pub(crate) fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key, PKCS#8 DER. Only the Workload API encoder reads it.
    pub(crate) fn key_der(&self) -> &[u8] {
        &self.key_der
    }
}

impl fmt::Debug for ServedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedCert")
            .field("identity", &self.identity)
            .field("version", &self.version)
            .field("serial", &self.leaf.serial)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretManager")
            .field("identity", &self.identity)
            .field("backend", &self.ca.name())
            .finish()
    }
}

/// When to renew a certificate received at `now`: `renew_at` of its usable lifetime, less up
/// to 10 % of that as jitter, but never sooner than a second from now (or half the time
/// left, if that is less), so a CA that hands out near-dead certificates cannot spin us.
///
/// The usable lifetime runs from notBefore or `now`, whichever is later, to notAfter. CAs
/// backdate notBefore to absorb clock skew (Vault by 30 s, the embedded CA by up to a
/// minute); counting from it would renew a short-lived certificate almost at once.
pub fn renewal_time(leaf: &LeafInfo, renew_at: RenewAt, now: SystemTime) -> SystemTime {
    let start = leaf.not_before.max(now).min(leaf.not_after);
    let lifetime = leaf.not_after.duration_since(start).unwrap_or_default();
    let planned = lifetime.mul_f64(renew_at.get());
    let jitter = planned.mul_f64(JITTER_FRACTION * rand::rng().random::<f64>());
    let target = start + planned - jitter;
    let remaining = leaf.not_after.duration_since(now).unwrap_or_default();
    let floor = now + Duration::from_secs(1).min(remaining / 2);
    target.max(floor)
}

/// The delay before retry number `failures` (1-based): exponential from the initial delay,
/// capped by the policy's maximum and by an eighth of the validity left (at least the initial
/// delay), so retries grow more urgent toward expiry; then "equal jitter" (half fixed, half
/// random) so a fleet does not retry in step.
pub fn backoff(failures: u32, remaining: Option<Duration>, policy: &Policy) -> Duration {
    let exp = policy
        .backoff_initial
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let cap = match remaining {
        Some(r) => policy.backoff_max.min((r / 8).max(policy.backoff_initial)),
        None => policy.backoff_max.min(FIRST_ISSUE_BACKOFF_CAP),
    };
    let d = exp.min(cap);
    d / 2 + d.mul_f64(0.5 * rand::rng().random::<f64>())
}

fn root_info(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let t = |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
    Ok(LeafInfo {
        serial: c.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
        not_before: t(c.validity().not_before.timestamp()),
        not_after: t(c.validity().not_after.timestamp()),
    })
}

/// RFC 3339 with seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `to - from` in seconds, negative when `to` is earlier.
fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn unix_f64(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ttl: Duration::from_secs(3600),
            renew_at: RenewAt::default(),
            key_type: KeyType::EcdsaP256,
            ca_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            bundle_refresh: Duration::from_secs(300),
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_tightens_near_expiry() {
        let p = policy();
        let plenty = Some(Duration::from_secs(86400));
        for _ in 0..100 {
            let d1 = backoff(1, plenty, &p);
            assert!(d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1));
            let d4 = backoff(4, plenty, &p);
            assert!(d4 >= Duration::from_secs(4) && d4 <= Duration::from_secs(8));
            assert!(backoff(30, plenty, &p) <= Duration::from_secs(300));
            assert!(backoff(30, plenty, &p) >= Duration::from_secs(150));
            // An eighth of what is left: 80 s left → at most 10 s.
            assert!(backoff(30, Some(Duration::from_secs(80)), &p) <= Duration::from_secs(10));
            // Expired: the initial delay.
            assert!(backoff(30, Some(Duration::ZERO), &p) <= Duration::from_secs(1));
            // Before the first certificate: 30 s.
            assert!(backoff(30, None, &p) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn renewal_is_at_the_fraction_less_jitter_and_never_in_the_past() {
        let now = SystemTime::now();
        let leaf = LeafInfo {
            serial: "01".into(),
            not_before: now,
            not_after: now + Duration::from_secs(1000),
        };
        for _ in 0..100 {
            let t = renewal_time(&leaf, RenewAt::new(0.5).unwrap_or_default(), now);
            let after = t.duration_since(now).unwrap_or_default();
            assert!(
                after <= Duration::from_secs(500) && after >= Duration::from_secs(450),
                "{after:?}"
            );
        }
        // Backdated (Vault backdates by 30 s): the usable lifetime counts from receipt, so a
        // 20 s certificate is renewed after about 10 s, not at once.
        let backdated = LeafInfo {
            serial: "02".into(),
            not_before: now - Duration::from_secs(30),
            not_after: now + Duration::from_secs(20),
        };
        for _ in 0..100 {
            let after = renewal_time(&backdated, RenewAt::default(), now)
                .duration_since(now)
                .unwrap_or_default();
            assert!(
                after <= Duration::from_secs(10) && after >= Duration::from_secs(9),
                "{after:?}"
            );
        }
        // Nearly dead on arrival: renew soon, but not in a busy loop.
        let dying = LeafInfo {
            serial: "03".into(),
            not_before: now - Duration::from_secs(990),
            not_after: now + Duration::from_millis(1500),
        };
        let t = renewal_time(&dying, RenewAt::default(), now);
        assert_eq!(
            t.duration_since(now).unwrap_or_default(),
            Duration::from_millis(750),
            "half the time left"
        );
    }
}
