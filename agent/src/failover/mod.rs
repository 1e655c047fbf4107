//! CA failover: `--ca vault,embedded`. [`Failover`] is a [`CertificateAuthority`] made of the
//! listed backends, in order, so the secret manager keeps one CA and knows nothing of the
//! list.
//!
//! - **Who signs.** The first backend that is not *down*. A backend goes down when it has
//!   failed with a retryable error ([`CaError::is_retryable`]) continuously, without one
//!   success, for the failover threshold (`--ca-failover-after`; by default a quarter of the
//!   lifetime of the last certificate signed, or of the asked TTL before the first one). The
//!   sign call that finds its backend down goes on to the next one at once; a later backend is
//!   thus asked only when every one before it is down. A non-retryable error (denied,
//!   misconfigured, bad response) never fails over: it is returned, so the manager counts it
//!   and the alert for errors that need a person fires.
//! - **Coming back.** A down backend is not asked to sign. [`Failover::run`] probes it with
//!   jittered, capped exponential backoff (the secret manager's [`backoff`]) by reading its
//!   roots (`trust_bundle`); a backend whose roots come only with certificates
//!   ([`CertificateAuthority::roots_come_with_certificates`]) is probed instead by letting the
//!   next renewal that falls after its probe time try it first. Once a probe succeeds the
//!   backend is asked first again from the next renewal (the certificate in service is not
//!   replaced early); if that sign still fails retryably, the call fails over at once, since
//!   the backend has not signed since its failures began.
//! - **Trust.** Certificates of any backend must verify everywhere, so the trust bundle is
//!   the union of every backend's roots, primary first. A backend that cannot be read keeps
//!   the roots it gave last; one whose roots come only with certificates contributes those.
//!   The union is logged at start-up and whenever it changes, with each root's subject and
//!   SHA-256 fingerprint (docs/trust.md: this is the operator's decision).
//!
//! [`CertificateAuthority::name`] is the backend that gave the last sign answer (before any,
//! the primary), so what the manager records after a call (the `backend` of a certificate, of
//! a CA error) names the backend that really answered. Errors that a failover swallowed (the
//! primary's, when the next backend then signed) are counted here, in the same
//! `ca_errors_total` and `ca_requests_total` series, under the backend that failed.
//!
//! Nothing here signs, validates or schedules by itself: it only routes calls and keeps
//! score. Private keys never pass through it (only CSRs do).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use sds_backends::{CaError, CertificateAuthority, IssuedChain, SignRequest, TrustBundle};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::{BackendLabel, CaErrorLabels, CaRequestLabels, Metrics};
use crate::secrets::{Policy, backoff};

/// How often the fallback gauge is brought up to date while on a fallback.
const GAUGE_EVERY: Duration = Duration::from_secs(1);

/// An ordered list of CA backends that fails over from one to the next.
pub struct Failover {
    backends: Vec<Arc<dyn CertificateAuthority>>,
    /// Limit of one call to each backend.
    timeouts: Vec<Duration>,
    /// `--ca-failover-after`, if given.
    after: Option<Duration>,
    /// The manager's backoff settings, for the probes.
    policy: Policy,
    state: Mutex<State>,
    /// Wakes [`Failover::run`]: a backend went down.
    wake: Notify,
    metrics: Arc<Metrics>,
}

/// What the failover knows, under one lock.
#[derive(Debug)]
struct State {
    backends: Vec<BackendState>,
    /// The backend that gave the last sign answer.
    last_answer: usize,
    /// The backend that signed the last certificate.
    signer: usize,
    /// Since when certificates come from a fallback; `None` while the primary signs.
    fallback_since: Option<Instant>,
    /// Usable lifetime of the last certificate signed.
    lifetime: Option<Duration>,
    /// TTL of the last request, for the threshold before the first certificate.
    asked_ttl: Option<Duration>,
    /// The union last logged.
    logged_union: Vec<CertificateDer<'static>>,
}

/// One backend's standing.
#[derive(Debug, Default)]
struct BackendState {
    /// Start of the current run of retryable failures.
    failing_since: Option<Instant>,
    /// Failing for the threshold: skipped by `sign` until a probe succeeds.
    down: bool,
    /// Probes failed in a row.
    probe_failures: u32,
    /// When the next probe is due (down backends only).
    next_probe: Option<Instant>,
    /// The roots it gave last (its bundle, or for a CA whose roots come only with
    /// certificates, the roots its chains named).
    roots: Vec<CertificateDer<'static>>,
}

/// What a probe found.
enum Probe {
    Up,
    Down(CaError),
}

impl Failover {
    /// A failover over `backends` (primary first; at least two), each call to backend `i`
    /// limited to `timeouts[i]`. `after` is `--ca-failover-after`; `policy` gives the probes'
    /// backoff.
    pub fn new(
        backends: Vec<Arc<dyn CertificateAuthority>>,
        timeouts: Vec<Duration>,
        after: Option<Duration>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let states = backends.iter().map(|_| BackendState::default()).collect();
        let failover = Arc::new(Self {
            timeouts,
            after,
            policy,
            state: Mutex::new(State {
                backends: states,
                last_answer: 0,
                signer: 0,
                fallback_since: None,
                lifetime: None,
                asked_ttl: None,
                logged_union: Vec::new(),
            }),
            wake: Notify::new(),
            metrics,
            backends,
        });
        failover.prime();
        failover
    }

    /// The metrics it writes to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The backends' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    /// The backend that signed the last certificate (before any, the primary).
    pub fn active(&self) -> &'static str {
        self.backends[self.state.lock().signer].name()
    }

    /// How long certificates have come from a fallback; zero while the primary signs.
    pub fn on_fallback_for(&self) -> Duration {
        self.state
            .lock()
            .fallback_since
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Whether backend `name` is down (skipped until a probe succeeds).
    pub fn is_down(&self, name: &str) -> bool {
        let st = self.state.lock();
        self.backends
            .iter()
            .zip(&st.backends)
            .any(|(b, s)| b.name() == name && s.down)
    }

    /// Creates every series of every backend at zero (or, for the active backend gauge, at
    /// its value), so alerts and `increase()` see them before anything happens.
    fn prime(&self) {
        for (i, b) in self.backends.iter().enumerate() {
            let backend = b.name();
            self.metrics.prime_ca_backend(backend);
            drop(
                self.metrics
                    .ca_certificates_signed
                    .get_or_create(&BackendLabel { backend }),
            );
            drop(
                self.metrics
                    .ca_probe_failures
                    .get_or_create(&BackendLabel { backend }),
            );
            self.metrics
                .ca_active_backend
                .get_or_create(&BackendLabel { backend })
                .set(i64::from(i == 0));
        }
        self.metrics.ca_fallback_seconds.set(0.0);
    }

    /// The failover threshold now: `--ca-failover-after`, else a quarter of the last
    /// certificate's lifetime, else of the asked TTL.
    fn threshold(&self, st: &State) -> Duration {
        self.after.unwrap_or_else(|| {
            st.lifetime
                .or(st.asked_ttl)
                .unwrap_or(self.policy.ttl)
                .div_f64(4.0)
        })
    }

    /// The probe delay after `failures` failed probes: the manager's backoff, capped by an
    /// eighth of the certificate lifetime (as its retries are) and by its maximum.
    fn probe_delay(&self, st: &State, failures: u32) -> Duration {
        let lifetime = st.lifetime.or(st.asked_ttl).unwrap_or(self.policy.ttl);
        backoff(failures.max(1), Some(lifetime), &self.policy)
    }

    /// One call to backend `i`, limited to its timeout.
    async fn call<T>(
        &self,
        i: usize,
        call: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        tokio::time::timeout(self.timeouts[i], call)
            .await
            .unwrap_or(Err(CaError::Timeout(self.timeouts[i])))
    }

    /// Records a sign error of backend `i`. Returns whether the call should go on to the
    /// next backend: the error is retryable, the backend has failed for the threshold, and
    /// there is a next one.
    fn sign_failed(&self, i: usize, error: &CaError) -> bool {
        let now = Instant::now();
        let name = self.backends[i].name();
        let mut st = self.state.lock();
        st.last_answer = i;
        let threshold = self.threshold(&st);
        let probe_delay = self.probe_delay(&st, st.backends[i].probe_failures + 1);
        let b = &mut st.backends[i];
        if !error.is_retryable() {
            // The CA answered: it is reachable, and a person must act. No failover, and no
            // longer down: it is asked first again, and refuses again, until fixed.
            b.failing_since = None;
            b.down = false;
            b.next_probe = None;
            drop(st);
            error!(%error, backend = name, kind = error.kind(), "the CA refused with an error that retrying will not fix; not failing over");
            return false;
        }
        let since = *b.failing_since.get_or_insert(now);
        if b.down {
            // A probe by signing (roots only with certificates) that failed.
            b.probe_failures = b.probe_failures.saturating_add(1);
            b.next_probe = Some(now + probe_delay);
            self.metrics
                .ca_probe_failures
                .get_or_create(&BackendLabel { backend: name })
                .inc();
        }
        let failing_for = now.saturating_duration_since(since);
        let last = i + 1 == self.backends.len();
        if last || failing_for < threshold {
            return false;
        }
        if !b.down {
            b.down = true;
            b.probe_failures = 0;
            b.next_probe = Some(now + probe_delay);
            let next = self.backends[i + 1].name();
            drop(st);
            warn!(
                %error, backend = name, next,
                failing_for_s = failing_for.as_secs(),
                failover_after_s = threshold.as_secs(),
                "CA failing for longer than the failover threshold; the next backend signs until it answers again"
            );
            self.wake.notify_one();
        }
        // The manager will not see this error: count it where it would have.
        self.count_swallowed(name, error);
        true
    }

    /// Counts an error the caller never sees, as the secret manager counts the ones it sees.
    fn count_swallowed(&self, backend: &'static str, error: &CaError) {
        self.metrics
            .ca_errors
            .get_or_create(&CaErrorLabels {
                backend,
                kind: error.kind(),
                retryable: if error.is_retryable() {
                    "true"
                } else {
                    "false"
                },
            })
            .inc();
        self.metrics
            .ca_requests
            .get_or_create(&CaRequestLabels {
                backend,
                operation: "sign",
                result: error.kind(),
            })
            .inc();
    }

    /// Records a certificate signed by backend `i`.
    fn signed(&self, i: usize, chain: &IssuedChain) {
        let now = Instant::now();
        let name = self.backends[i].name();
        let lifetime = usable_lifetime(&chain.leaf);
        let mut st = self.state.lock();
        st.last_answer = i;
        if lifetime.is_some() {
            st.lifetime = lifetime;
        }
        let b = &mut st.backends[i];
        let was_down = b.down;
        *b = BackendState {
            roots: std::mem::take(&mut b.roots),
            ..BackendState::default()
        };
        if self.backends[i].roots_come_with_certificates() {
            for root in &chain.roots_hint {
                if !b.roots.contains(root) {
                    b.roots.push(root.clone());
                }
            }
        }
        let previous = std::mem::replace(&mut st.signer, i);
        match (i, st.fallback_since) {
            (0, _) => st.fallback_since = None,
            (_, None) => st.fallback_since = Some(now),
            _ => {}
        }
        let on_fallback_s = st.fallback_since.map(|s| now.saturating_duration_since(s));
        drop(st);
        self.metrics
            .ca_certificates_signed
            .get_or_create(&BackendLabel { backend: name })
            .inc();
        self.set_gauges(i, on_fallback_s.unwrap_or_default());
        if previous != i {
            if i == 0 {
                info!(
                    backend = name,
                    previous = self.backends[previous].name(),
                    "the primary CA signs again"
                );
            } else {
                warn!(
                    backend = name,
                    previous = self.backends[previous].name(),
                    "certificates now come from a fallback CA"
                );
            }
        } else if was_down {
            info!(backend = name, "CA answers again");
        }
    }

    fn set_gauges(&self, signer: usize, on_fallback: Duration) {
        for (j, b) in self.backends.iter().enumerate() {
            self.metrics
                .ca_active_backend
                .get_or_create(&BackendLabel { backend: b.name() })
                .set(i64::from(j == signer));
        }
        self.metrics
            .ca_fallback_seconds
            .set(on_fallback.as_secs_f64());
    }

    /// Probes every down backend whose probe is due (those whose roots come with
    /// certificates are probed by `sign`); when the next probe is due.
    async fn probe_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let probed_here = |i: usize| !self.backends[i].roots_come_with_certificates();
        let due: Vec<usize> = {
            let st = self.state.lock();
            (0..self.backends.len())
                .filter(|&i| {
                    let b = &st.backends[i];
                    b.down && probed_here(i) && b.next_probe.is_some_and(|t| t <= now)
                })
                .collect()
        };
        for i in due {
            let probe = match self.call(i, self.backends[i].trust_bundle()).await {
                Ok(bundle) => {
                    self.state.lock().backends[i].roots = bundle.roots().to_vec();
                    Probe::Up
                }
                Err(e) => Probe::Down(e),
            };
            self.probed(i, probe);
        }
        let st = self.state.lock();
        (0..self.backends.len())
            .filter(|&i| st.backends[i].down && probed_here(i))
            .filter_map(|i| st.backends[i].next_probe)
            .min()
    }

    fn probed(&self, i: usize, probe: Probe) {
        let name = self.backends[i].name();
        let mut st = self.state.lock();
        let failures = st.backends[i].probe_failures.saturating_add(1);
        let delay = self.probe_delay(&st, failures);
        let b = &mut st.backends[i];
        match probe {
            Probe::Up => {
                // Half open: it is asked first again, but its failure clock keeps running
                // until it signs, so a sign that still fails (a root call that answers from a
                // pinned bundle, a CA that flaps) fails over at once, not after another
                // threshold.
                b.down = false;
                b.probe_failures = 0;
                b.next_probe = None;
                drop(st);
                info!(
                    backend = name,
                    "CA probe succeeded; it signs again from the next renewal"
                );
            }
            Probe::Down(error) => {
                b.probe_failures = failures;
                b.next_probe = Some(Instant::now() + delay);
                drop(st);
                self.metrics
                    .ca_probe_failures
                    .get_or_create(&BackendLabel { backend: name })
                    .inc();
                warn!(%error, backend = name, failures, retry_in_ms = delay.as_millis() as u64, "CA probe failed; still on the fallback");
            }
        }
    }

    /// Reads the union of every backend's roots and logs it, then probes down backends and
    /// keeps the fallback gauge current, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = self.trust_bundle() => if let Err(error) = result {
                warn!(%error, "no CA gave its roots at start-up; the trust bundle is read again at the first certificate");
            },
        }
        loop {
            let next_probe = self.probe_due().await;
            let (signer, on_fallback) = {
                let st = self.state.lock();
                (
                    st.signer,
                    st.fallback_since.map(|s| s.elapsed()).unwrap_or_default(),
                )
            };
            self.set_gauges(signer, on_fallback);
            let tick = (signer != 0).then(|| Instant::now() + GAUGE_EVERY);
            let next = [next_probe, tick].into_iter().flatten().min();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = sleep_opt(next) => {}
            }
        }
    }

    /// Logs the union and where each root came from, if it changed since last logged.
    fn log_union(&self, union: &[CertificateDer<'static>]) {
        let per_backend: Vec<(&'static str, Vec<CertificateDer<'static>>)> = {
            let mut st = self.state.lock();
            if st.logged_union == union {
                return;
            }
            st.logged_union = union.to_vec();
            self.backends
                .iter()
                .zip(&st.backends)
                .map(|(b, s)| (b.name(), s.roots.clone()))
                .collect()
        };
        info!(
            roots = union.len(),
            backends = ?self.names(),
            "trust bundle: the union of every listed CA's roots; any of these CAs can sign identities every peer trusts"
        );
        for (backend, roots) in per_backend {
            if roots.is_empty() {
                warn!(
                    backend,
                    "this CA has given no roots yet; its certificates are trusted once it does"
                );
            }
            for root in roots {
                let (subject, sha256) = describe(&root);
                info!(backend, %subject, %sha256, "trusted root");
            }
        }
    }
}

#[tonic::async_trait]
impl CertificateAuthority for Failover {
    /// The backend that gave the last sign answer; the primary before any.
    fn name(&self) -> &'static str {
        self.backends[self.state.lock().last_answer].name()
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.state.lock().asked_ttl = Some(req.ttl);
        let n = self.backends.len();
        let mut last_error = None;
        for i in 0..n {
            let skip = {
                let st = self.state.lock();
                let b = &st.backends[i];
                let probe_by_signing = self.backends[i].roots_come_with_certificates()
                    && b.next_probe.is_none_or(|t| t <= Instant::now());
                b.down && i + 1 < n && !probe_by_signing
            };
            if skip {
                continue;
            }
            match self.call(i, self.backends[i].sign(req)).await {
                Ok(chain) => {
                    self.signed(i, &chain);
                    return Ok(chain);
                }
                Err(error) => {
                    if !self.sign_failed(i, &error) {
                        return Err(error);
                    }
                    last_error = Some(error);
                }
            }
        }
        // Only reached when the last backend was skipped, which `skip` never does.
        Err(last_error.unwrap_or_else(|| CaError::Unavailable("no CA backend to ask".into())))
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        let mut first_error = None;
        for i in 0..self.backends.len() {
            if self.state.lock().backends[i].down {
                // Being probed: keep what it gave last rather than wait on it.
                continue;
            }
            match self.call(i, self.backends[i].trust_bundle()).await {
                Ok(bundle) => self.state.lock().backends[i].roots = bundle.roots().to_vec(),
                Err(error) => {
                    if !self.backends[i].roots_come_with_certificates() {
                        warn!(%error, backend = self.backends[i].name(), "cannot read this CA's roots; keeping the ones it gave last");
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        let union = {
            let st = self.state.lock();
            let mut union: Vec<CertificateDer<'static>> = Vec::new();
            for root in st.backends.iter().flat_map(|b| &b.roots) {
                if !union.contains(root) {
                    union.push(root.clone());
                }
            }
            union
        };
        self.log_union(&union);
        TrustBundle::new(union).map_err(|_| {
            first_error
                .unwrap_or_else(|| CaError::Unavailable("no CA backend has given roots".into()))
        })
    }

    fn roots_come_with_certificates(&self) -> bool {
        // Ready without a bundle only if no backend has a root call.
        self.backends
            .iter()
            .all(|b| b.roots_come_with_certificates())
    }

    /// The listed embedded CA's, if there is one: `sds-agent ca rotate` rotates its root,
    /// through the same phases, while the other backends' roots stay in the union.
    fn root_control(&self) -> Option<&dyn sds_backends::RootControl> {
        self.backends.iter().find_map(|b| b.root_control())
    }
}

impl fmt::Debug for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("backends", &self.names())
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A leaf's usable lifetime: from now (or its notBefore, if later) to its notAfter. CAs
/// backdate notBefore, which would otherwise lengthen the threshold.
fn usable_lifetime(der: &CertificateDer<'_>) -> Option<Duration> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let at = |s: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).ok()?));
    let not_before = at(cert.validity().not_before.timestamp())?;
    let not_after = at(cert.validity().not_after.timestamp())?;
    let start = not_before.max(SystemTime::now());
    not_after.duration_since(start).ok()
}

/// A root's subject and SHA-256 fingerprint (uppercase hex, colon-separated, as `openssl x509
/// -fingerprint -sha256` prints it).
pub fn describe(der: &CertificateDer<'_>) -> (String, String) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let subject = X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|e| format!("<unparseable: {e}>"));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let sha256 = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    (subject, sha256)
}

#[cfg(test)]
mod tests;
