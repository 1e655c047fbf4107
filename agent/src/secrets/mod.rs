//! The secret manager: the certificates of a set of identities (one in per-pod mode, one per
//! attested pod in node mode), each with its last good certificate, its own backoff and its
//! `watch` channel; the trust bundle they share; and one scheduler that renews them all.
//!
//! The scheduler has ztunnel's shape: a queue of due renewals ([`queue`]) in which real-time
//! work (an identity someone waits for) goes ahead of background renewals, and at most
//! `--ca-concurrency` CA calls at once. An identity nobody has asked for in
//! `--identity-idle-timeout` is dropped, and its key with it.
//!
//! For every identity it keeps the rules of DESIGN.md:
//! 1. a new key, generated locally, for every issuance; keys never leave memory;
//! 2. every CA answer is validated ([`validate`]) before it is published;
//! 3. the renewal time comes from the certificate returned (`--renew-at` of its actual
//!    lifetime, less jitter), not from the TTL asked for;
//! 4. while the CA fails, the last good certificate is served until it expires; retries back
//!    off exponentially with jitter, capped, and the cap shrinks as expiry nears;
//! 5. streams only read the channels, so any number of them cause one CSR per rotation;
//!    an identity is queued at most once and has at most one CA call running.
//!
//! Readers never wait on the CA: they see the latest published value. Nothing here knows
//! about SDS or any particular backend.

mod queue;
pub mod roots;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use rustls_pki_types::CertificateDer;
use sds_backends::{
    CaError, CertificateAuthority, KeyType, SignRequest, SpiffeId, TrustBundle, TrustDomain,
};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use zeroize::Zeroizing;

use crate::config::RenewAt;
use crate::keys::{KeyError, PrivateKey};
use crate::metrics::{
    CaErrorLabels, CaOperationLabels, CaRequestLabels, IdentityLabel, KeyTypeLabel, Metrics,
    PhaseLabel, PriorityLabel, ReasonLabel, ResultLabel, SecretLabels,
};
use queue::{Priority, Queue};
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
    /// Most CA calls (issuances and bundle reads) running at once, over every identity.
    pub ca_concurrency: usize,
    /// How long an identity nobody asks for is kept (node mode; a pinned identity is kept).
    pub idle_timeout: Duration,
    /// Staged root rotation: phase 1's longest wait for ACKs, and phase 3's overlap.
    pub root_overlap: Duration,
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
    /// The root its chain verified to.
    pub(crate) anchor: CertificateDer<'static>,
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

/// Owns the rotation of a set of identities' certificates and the trust bundle they share.
///
/// Per-pod mode is a set of one identity, pinned for the life of the process
/// ([`SecretManager::new`]); node mode ([`SecretManager::for_node`]) adds an identity when an
/// attested caller first asks for it ([`SecretManager::subscribe_cert`]) and drops it, key and
/// all, once nobody has asked for it in [`Policy::idle_timeout`].
///
/// One scheduler ([`SecretManager::run`]) serves them all: a queue of due renewals in which
/// real-time work (someone waiting) goes ahead of background renewals, and at most
/// [`Policy::ca_concurrency`] CA calls at once. Each identity keeps its own backoff, expiry and
/// health.
pub struct SecretManager {
    trust_domain: TrustDomain,
    /// Per-pod mode: the workload's identity, served from start to stop.
    workload: Option<SpiffeId>,
    policy: Policy,
    ca: Arc<dyn CertificateAuthority>,
    bundle: watch::Sender<Option<Arc<ServedBundle>>>,
    state: Mutex<State>,
    /// Wakes the scheduler: new work queued, or a CA call finished.
    wake: Notify,
    /// One permit per CA call allowed at once (`--ca-concurrency`).
    permits: Arc<Semaphore>,
    /// Serializes trust bundle reads, so concurrent issuances that all find the bundle
    /// missing or stale cause one read.
    bundle_read: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Version of the last certificate built, across identities; never reused.
    cert_version: AtomicU64,
    /// notAfter of each identity's last certificate and of the earliest root, kept after an
    /// expiry so the metrics can say how long ago it was.
    expiries: Mutex<HashMap<SecretLabels, SystemTime>>,
    /// The served roots and the staged root rotation. Lock order: `state`, then `roots`.
    roots: Mutex<roots::Rotation>,
    /// For each SDS stream subscribed to the bundle, the bundle version it last ACKed.
    bundle_acks: Mutex<BTreeMap<u64, Option<u64>>>,
}

/// What the scheduler knows, under one lock.
#[derive(Debug, Default)]
struct State {
    identities: HashMap<SpiffeId, Tracked>,
    queue: Queue<SpiffeId>,
    /// When each served certificate expires, to withdraw it if it was not renewed in time.
    expiries: BTreeSet<(Instant, SpiffeId)>,
    /// When the trust bundle is read next, and reads failed in a row.
    bundle_due: Option<Instant>,
    bundle_failures: u32,
    /// Certificates of a new root held back during phase 1 of a root rotation, with when
    /// they are due for renewal; published when phase 2 begins.
    held: HashMap<SpiffeId, ServedCert>,
}

/// One identity's rotation state.
#[derive(Debug)]
struct Tracked {
    entry: Arc<IdentityEntry>,
    /// Served until the process stops (per-pod mode's identity).
    pinned: bool,
    /// A CA call for it is running.
    in_flight: bool,
    /// Issuances failed since the last success.
    failures: u32,
    /// When the served certificate expires.
    expires: Option<Instant>,
    /// The last time a caller asked for it or a stream was reading it.
    last_used: Instant,
}

/// One identity's served certificate and health.
struct IdentityEntry {
    id: SpiffeId,
    cert: watch::Sender<Option<Arc<ServedCert>>>,
    health: Mutex<Health>,
}

impl SecretManager {
    /// A manager for one workload `identity` (per-pod mode); nothing happens until
    /// [`SecretManager::run`] is spawned.
    pub fn new(
        identity: SpiffeId,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let manager = Self::build(
            identity.trust_domain().clone(),
            Some(identity.clone()),
            policy,
            ca,
            metrics,
        );
        manager.track(&identity, true);
        manager
    }

    /// A manager for the identities of a node's pods in `trust_domain`, none yet (node
    /// mode). The trust bundle is read as soon as [`SecretManager::run`] starts, so the agent
    /// is ready before the first pod asks.
    pub fn for_node(
        trust_domain: TrustDomain,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let manager = Self::build(trust_domain, None, policy, ca, metrics);
        manager.state.lock().bundle_due = Some(Instant::now());
        manager
    }

    fn build(
        trust_domain: TrustDomain,
        workload: Option<SpiffeId>,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let overlap = policy.root_overlap;
        metrics.root_overlap_seconds.set(overlap.as_secs_f64());
        Arc::new(Self {
            trust_domain,
            workload,
            permits: Arc::new(Semaphore::new(policy.ca_concurrency.max(1))),
            policy,
            ca,
            bundle: watch::Sender::new(None),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            bundle_read: tokio::sync::Mutex::new(()),
            metrics,
            cert_version: AtomicU64::new(0),
            expiries: Mutex::new(HashMap::new()),
            roots: Mutex::new(roots::Rotation::new(overlap)),
            bundle_acks: Mutex::new(BTreeMap::new()),
        })
    }

    /// The trust domain of every identity served.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Per-pod mode's workload identity; `None` in node mode.
    pub fn workload_identity(&self) -> Option<&SpiffeId> {
        self.workload.as_ref()
    }

    /// The identities served now, in order.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self.state.lock().identities.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The latest certificate of `identity`, if one is valid now. Asking for an identity not
    /// served yet adds it and queues its first issuance ahead of every renewal; each call
    /// counts as use for [`Policy::idle_timeout`], as does holding the receiver.
    pub fn subscribe_cert(&self, identity: &SpiffeId) -> watch::Receiver<Option<Arc<ServedCert>>> {
        self.track(identity, false)
    }

    /// The latest trust bundle.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Option<Arc<ServedBundle>>> {
        self.bundle.subscribe()
    }

    /// Asks for a renewal of every identity now, whatever the schedule says. An identity
    /// whose CA call is running is answered by that call.
    pub fn rotate_now(&self) {
        self.queue_all(Priority::RealTime);
    }

    /// Queues a renewal of every identity, due now, in the background lane, as if all their
    /// certificates had fallen due at the same instant. Unlike [`SecretManager::rotate_now`],
    /// this leaves real-time work (a new pod, a forced rotation) ahead of it: an identity
    /// already waiting in the real-time lane stays there, and one whose CA call is running
    /// is answered by that call. For benches and operators who want to see the scheduler
    /// under a full renewal load; the agent itself never calls it.
    pub fn renew_all_in_background(&self) {
        self.queue_all(Priority::Background);
    }

    /// Queues every identity without a running CA call in `priority`'s lane, due now.
    fn queue_all(&self, priority: Priority) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let State {
            identities, queue, ..
        } = &mut *st;
        for (id, t) in identities.iter() {
            if !t.in_flight {
                queue.push(id.clone(), priority, now);
            }
        }
        self.set_queue_gauges(queue);
        drop(st);
        self.wake.notify_one();
    }

    /// Whether the trust bundle and a valid certificate for every pinned identity are
    /// being served. In node mode, the bundle alone (pods come and go), and not even that on
    /// a CA whose roots come only with a certificate
    /// ([`CertificateAuthority::roots_come_with_certificates`]).
    pub fn is_ready(&self) -> bool {
        if self.bundle.borrow().is_none() {
            // A node agent on a CA that sends its roots only with a certificate learns them
            // from the first pod's: until then it is ready to take that pod.
            return self.workload.is_none() && self.ca.roots_come_with_certificates();
        }
        let st = self.state.lock();
        st.identities
            .values()
            .filter(|t| t.pinned)
            .all(|t| t.entry.cert.borrow().is_some())
    }

    /// The manager's health: the identity failing longest, and whether any pinned identity's
    /// certificate has expired. When nothing fails, the default.
    pub fn health(&self) -> Health {
        let st = self.state.lock();
        let mut worst = Health::default();
        for t in st.identities.values() {
            let h = t.entry.health.lock();
            if h.consecutive_failures > worst.consecutive_failures {
                worst.consecutive_failures = h.consecutive_failures;
                worst.last_error.clone_from(&h.last_error);
            }
            worst.expired |= h.expired && t.pinned;
        }
        if self.bundle.borrow().is_none() && worst.last_error.is_none() {
            worst.last_error = st
                .bundle_failures
                .gt(&0)
                .then(|| "the trust bundle could not be read".to_owned());
        }
        worst
    }

    /// What is served now, for `/secrets`: each identity's `default` (per-pod mode's first),
    /// then the roots.
    pub fn status(&self) -> Vec<SecretStatus> {
        let mut entries: Vec<Arc<IdentityEntry>> = self
            .state
            .lock()
            .identities
            .values()
            .map(|t| t.entry.clone())
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let mut out = Vec::new();
        for entry in entries {
            if let Some(c) = entry.cert.borrow().as_ref() {
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
        }
        if let Some(b) = self.bundle.borrow().as_ref() {
            for root in &b.root_info {
                out.push(SecretStatus {
                    name: crate::identity::ROOTCA_RESOURCE,
                    spiffe_id: format!("spiffe://{}", self.trust_domain),
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

    /// The identity's entry, added (and its first issuance queued) if it is new.
    fn track(&self, identity: &SpiffeId, pinned: bool) -> watch::Receiver<Option<Arc<ServedCert>>> {
        let now = Instant::now();
        let mut st = self.state.lock();
        let State {
            identities, queue, ..
        } = &mut *st;
        let t = identities.entry(identity.clone()).or_insert_with(|| {
            self.metrics.identities.inc();
            info!(id = %identity, "identity added");
            Tracked {
                entry: Arc::new(IdentityEntry {
                    id: identity.clone(),
                    cert: watch::Sender::new(None),
                    health: Mutex::new(Health::default()),
                }),
                pinned,
                in_flight: false,
                failures: 0,
                expires: None,
                last_used: now,
            }
        });
        t.last_used = now;
        let rx = t.entry.cert.subscribe();
        // No certificate, none on the way, and no retry waiting out its backoff: someone
        // waits for this one, so it goes ahead of every renewal.
        let idle = rx.borrow().is_none() && !t.in_flight && queue.priority_of(identity).is_none();
        if idle {
            queue.push(identity.clone(), Priority::RealTime, now);
            self.set_queue_gauges(queue);
            drop(st);
            self.wake.notify_one();
        }
        rx
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
        self.metrics
            .cert_expiry_seconds
            .get_or_create(&labels)
            .set(seconds_between(SystemTime::now(), not_after));
        self.expiries.lock().insert(labels, not_after);
    }

    fn set_next_renewal(&self, identity: &SpiffeId, at: SystemTime) {
        self.metrics
            .next_renewal_timestamp
            .get_or_create(&IdentityLabel {
                identity: identity.to_string(),
            })
            .set(unix_f64(at));
    }

    fn set_queue_gauges(&self, queue: &Queue<SpiffeId>) {
        for priority in [Priority::RealTime, Priority::Background] {
            self.metrics
                .renewal_queue
                .get_or_create(&PriorityLabel {
                    priority: priority.as_str(),
                })
                .set(i64::try_from(queue.len(priority)).unwrap_or(i64::MAX));
        }
    }

    /// One call to the CA, limited to the policy's timeout, timed and counted by backend,
    /// operation and result; a failure is also counted by kind in `ca_errors_total`.
    async fn ca_call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.policy.ca_timeout, call)
            .await
            .unwrap_or(Err(CaError::Timeout(self.policy.ca_timeout)));
        // Read after the call: a failover (`--ca a,b`) names the backend that answered.
        let backend = self.ca.name();
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

    /// The scheduler, until `shutdown`: takes due work off the queue while CA permits are
    /// free (real-time first), withdraws certificates that expired before they could be
    /// renewed, re-reads the trust bundle, and drops idle identities. CA calls run as tasks
    /// of their own, so a slow CA holds up only its permit.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut calls = JoinSet::new();
        let sweep_every =
            (self.policy.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_sweep = Instant::now() + sweep_every;
        {
            let mut st = self.state.lock();
            if st.bundle_due.is_none() {
                st.bundle_due = Some(Instant::now() + self.policy.bundle_refresh);
            }
        }
        loop {
            while calls.try_join_next().is_some() {}
            let now = Instant::now();
            self.withdraw_expired(now);
            self.advance_roots(now);
            if now >= next_sweep {
                self.drop_idle(now);
                next_sweep = now + sweep_every;
            }
            let next = self.dispatch(now, &mut calls);
            let next = next.map_or(next_sweep, |t| t.min(next_sweep));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = sleep_until(next) => {}
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
    }

    /// Starts every due CA call there is a permit for; when the scheduler must look again
    /// (the earliest of the queue, the bundle read and the expiries).
    fn dispatch(self: &Arc<Self>, now: Instant, calls: &mut JoinSet<()>) -> Option<Instant> {
        let mut st = self.state.lock();
        if st.bundle_due.is_some_and(|t| t <= now)
            && let Ok(permit) = self.permits.clone().try_acquire_owned()
        {
            st.bundle_due = None;
            calls.spawn(
                self.clone()
                    .scheduled_bundle_read(permit)
                    .instrument(info_span!("trust_bundle")),
            );
        }
        loop {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let Some((id, priority)) = st.queue.pop_due(now) else {
                break;
            };
            let Some(t) = st.identities.get_mut(&id) else {
                continue;
            };
            t.in_flight = true;
            let span = info_span!("issue", id = %id, priority = priority.as_str());
            calls.spawn(self.clone().issue(id, permit).instrument(span));
        }
        self.set_queue_gauges(&st.queue);
        // Work that is due already is waiting for a permit: a finished call wakes the
        // scheduler for it, so only future times count here (else it would spin).
        let rotation_due = self.roots.lock().deadline();
        let margin = self.hold_margin();
        let held_due = st
            .held
            .keys()
            .map(|id| held_due(&st, id, margin, now))
            .min();
        [
            st.queue.next_due(),
            st.bundle_due,
            st.expiries.first().map(|(t, _)| *t),
            rotation_due,
            held_due,
        ]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min()
    }

    /// One issuance for `id`, holding a CA permit, and what follows from its result.
    async fn issue(self: Arc<Self>, id: SpiffeId, permit: OwnedSemaphorePermit) {
        self.metrics.ca_in_flight.inc();
        let started = Instant::now();
        let result = self.issue_once(&id).await;
        self.metrics.ca_in_flight.dec();
        drop(permit);
        match result {
            Ok(cert) => self.issued(&id, cert, started),
            Err(error) => self.failed(&id, &error),
        }
        self.wake.notify_one();
    }

    /// Publishes a new certificate for `id` (or holds it back during phase 1 of a root
    /// rotation) and plans its renewal.
    fn issued(&self, id: &SpiffeId, cert: ServedCert, started: Instant) {
        let now = SystemTime::now();
        let delay = cert.renew_at.duration_since(now).unwrap_or_default();
        info!(
            id = %id,
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
            id.to_string(),
            &cert.leaf,
        );
        self.set_next_renewal(id, cert.renew_at);
        let mut st = self.state.lock();
        let State {
            identities,
            queue,
            expiries,
            held,
            ..
        } = &mut *st;
        let Some(t) = identities.get_mut(id) else {
            return;
        };
        t.in_flight = false;
        t.failures = 0;
        // A rotation asked for while this call ran is answered by it.
        queue.remove(id);
        queue.push(id.clone(), Priority::Background, Instant::now() + delay);
        self.set_queue_gauges(queue);
        *t.entry.health.lock() = Health::default();
        let (hold, stale) = {
            let roots = self.roots.lock();
            // Held while the certificate served now has more than the margin left; it is
            // published when phase 2 begins, or at the margin before that one expires.
            let margin = self.hold_margin();
            let outlives = t.expires.is_some_and(|e| e > Instant::now() + margin)
                && t.entry.cert.borrow().is_some();
            let hold = roots.holds(&cert.anchor) && outlives;
            if roots.holds(&cert.anchor) && !hold {
                warn!(id = %id, "root rotation: serving a certificate of the new root before every proxy ACKed it; the certificate served now is about to expire");
            }
            (hold, roots.is_stale(&cert.anchor))
        };
        if hold {
            info!(id = %id, serial = %cert.leaf.serial, "root rotation: certificate of the new root held back until every proxy trusts it");
            held.insert(id.clone(), cert);
            return;
        }
        if stale {
            // Signed under the old root just before the CA was switched: move it at once.
            queue.remove(id);
            queue.push(id.clone(), Priority::Background, Instant::now());
        }
        held.remove(id);
        Self::publish(t, expiries, id, cert);
    }

    /// How long before the served certificate expires a certificate held back during phase 1
    /// is published anyway: an expired certificate is worse than an early root.
    fn hold_margin(&self) -> Duration {
        self.policy.ttl.mul_f64(0.1).max(Duration::from_secs(1))
    }

    /// Publishes the held certificates whose served one expires within the hold margin, or
    /// every held one (`all`).
    fn release_held(&self, all: bool) {
        let now = Instant::now();
        let margin = self.hold_margin();
        let mut st = self.state.lock();
        let release: Vec<SpiffeId> = st
            .held
            .keys()
            .filter(|id| all || held_due(&st, id, margin, now) <= now)
            .cloned()
            .collect();
        let State {
            identities,
            expiries,
            held,
            ..
        } = &mut *st;
        for id in release {
            let (Some(cert), Some(t)) = (held.remove(&id), identities.get_mut(&id)) else {
                continue;
            };
            if all {
                info!(id = %id, serial = %cert.leaf.serial, "root rotation: publishing the certificate held back");
            } else {
                warn!(id = %id, serial = %cert.leaf.serial, "root rotation: publishing a certificate of the new root before every proxy ACKed it; the one served now is about to expire");
            }
            Self::publish(t, expiries, &id, cert);
        }
    }

    /// Drops the certificates held back for a rotation that was abandoned (the CA withdrew
    /// the new root they chain to), and renews those identities at once.
    fn discard_held(&self) {
        let mut st = self.state.lock();
        if st.held.is_empty() {
            return;
        }
        let State { held, queue, .. } = &mut *st;
        for (id, _) in held.drain() {
            warn!(id = %id, "root rotation abandoned: dropping the certificate held back for it, renewing");
            queue.remove(&id);
            queue.push(id, Priority::Background, Instant::now());
        }
        self.set_queue_gauges(queue);
    }

    /// Serves `cert` as `id`'s certificate, and watches for its expiry.
    fn publish(
        t: &mut Tracked,
        expiries: &mut BTreeSet<(Instant, SpiffeId)>,
        id: &SpiffeId,
        cert: ServedCert,
    ) {
        let expires = Instant::now()
            + cert
                .leaf
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
        if let Some(old) = t.expires.replace(expires) {
            expiries.remove(&(old, id.clone()));
        }
        expiries.insert((expires, id.clone()));
        t.entry.cert.send_replace(Some(Arc::new(cert)));
    }

    /// Counts and logs a failed issuance for `id` and queues its retry after its backoff:
    /// real-time while it has no valid certificate, in the background while it has one.
    fn failed(&self, id: &SpiffeId, error: &IssueError) {
        let mut st = self.state.lock();
        let State {
            identities, queue, ..
        } = &mut *st;
        let Some(t) = identities.get_mut(id) else {
            return;
        };
        t.in_flight = false;
        t.failures = t.failures.saturating_add(1);
        // Zero once expired: retry at the most urgent pace.
        let remaining = t
            .expires
            .map(|e| e.saturating_duration_since(Instant::now()));
        let delay = backoff(t.failures, remaining, &self.policy);
        let priority = if t.entry.cert.borrow().is_some() {
            Priority::Background
        } else {
            Priority::RealTime
        };
        queue.remove(id);
        queue.push(id.clone(), priority, Instant::now() + delay);
        self.set_queue_gauges(queue);
        let failures = t.failures;
        {
            let mut h = t.entry.health.lock();
            h.consecutive_failures = failures;
            h.last_error = Some(error.to_string());
        }
        drop(st);
        self.metrics
            .renewals
            .get_or_create(&ResultLabel { result: "failure" })
            .inc();
        self.set_next_renewal(id, SystemTime::now() + delay);
        self.record_failure(id, error, failures, remaining, delay);
    }

    /// Stops serving every certificate that expired before it could be renewed; its retry
    /// moves to the real-time lane.
    fn withdraw_expired(&self, now: Instant) {
        let mut st = self.state.lock();
        let State {
            identities,
            queue,
            expiries,
            ..
        } = &mut *st;
        while let Some((at, id)) = expiries.first().cloned() {
            if at > now {
                break;
            }
            expiries.pop_first();
            let Some(t) = identities.get_mut(&id) else {
                continue;
            };
            if t.expires != Some(at) {
                continue;
            }
            error!(id = %id, "certificate expired before it could be renewed; it is no longer served");
            t.entry.cert.send_replace(None);
            t.entry.health.lock().expired = true;
            if queue.priority_of(&id) == Some(Priority::Background) {
                queue.promote(&id);
            }
        }
        self.set_queue_gauges(queue);
    }

    /// Drops every identity (and its key) nobody has asked for in the idle timeout; an
    /// identity a stream still reads counts as asked for now.
    fn drop_idle(&self, now: Instant) {
        let mut dropped = Vec::new();
        {
            let mut st = self.state.lock();
            let State {
                identities,
                queue,
                expiries,
                held,
                ..
            } = &mut *st;
            identities.retain(|id, t| {
                if t.pinned || t.in_flight {
                    return true;
                }
                if t.entry.cert.receiver_count() > 0 {
                    t.last_used = now;
                    return true;
                }
                if now.saturating_duration_since(t.last_used) < self.policy.idle_timeout {
                    return true;
                }
                queue.remove(id);
                held.remove(id);
                if let Some(at) = t.expires {
                    expiries.remove(&(at, id.clone()));
                }
                dropped.push(id.clone());
                false
            });
            self.set_queue_gauges(queue);
        }
        for id in dropped {
            info!(id = %id, idle_timeout_s = self.policy.idle_timeout.as_secs(), "identity dropped: nobody asked for it");
            self.metrics.identities.dec();
            self.metrics.identities_dropped.inc();
            let identity = id.to_string();
            let labels = SecretLabels {
                resource: crate::identity::DEFAULT_RESOURCE,
                identity: identity.clone(),
            };
            self.expiries.lock().remove(&labels);
            self.metrics.cert_expiry_timestamp.remove(&labels);
            self.metrics.cert_lifetime_seconds.remove(&labels);
            self.metrics.cert_expiry_seconds.remove(&labels);
            self.metrics
                .next_renewal_timestamp
                .remove(&IdentityLabel { identity });
        }
    }

    /// A scheduled trust bundle read, holding a CA permit; the next one is planned from its
    /// result.
    async fn scheduled_bundle_read(self: Arc<Self>, permit: OwnedSemaphorePermit) {
        let seen = self.bundle.borrow().as_ref().map(|b| b.version);
        let result = self.refresh_bundle(seen).await;
        drop(permit);
        let mut st = self.state.lock();
        let delay = match result {
            Ok(_) => {
                st.bundle_failures = 0;
                self.policy.bundle_refresh
            }
            Err(error) => {
                st.bundle_failures = st.bundle_failures.saturating_add(1);
                warn!(%error, backend = self.ca.name(), failures = st.bundle_failures, "trust bundle read failed; keeping the last one");
                backoff(st.bundle_failures, None, &self.policy).min(self.policy.bundle_refresh)
            }
        };
        st.bundle_due = Some(Instant::now() + delay);
        drop(st);
        self.wake.notify_one();
    }

    fn record_failure(
        &self,
        id: &SpiffeId,
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
                %error, id = %id, backend = self.ca.name(), failures,
                retryable, remaining_validity_s = remaining_s, retry_in_ms = retry_in.as_millis() as u64,
                "certificate renewal failing"
            );
        } else {
            warn!(
                %error, id = %id, backend = self.ca.name(), failures,
                retryable, remaining_validity_s = remaining_s, retry_in_ms = retry_in.as_millis() as u64,
                "certificate renewal failed; will retry"
            );
        }
    }

    /// One issuance for `identity`: key, CSR, sign, bundle, validate. Publishes the trust
    /// bundle if it had to be read, and nothing else; the scheduler serves what it returns.
    /// Public for the issuance benchmark.
    pub async fn issue_once(&self, identity: &SpiffeId) -> Result<ServedCert, IssueError> {
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
        let csr_der = key.csr(identity)?;
        let req = SignRequest {
            identity: identity.clone(),
            csr_der,
            ttl: self.policy.ttl,
            key_type,
        };
        let chain = self.ca_call("sign", self.ca.sign(&req)).await?;
        // The bundle is read after signing: some CAs (istiod) only send their roots with a
        // certificate. A chain naming a root the bundle lacks means the CA has a new root,
        // so the bundle is re-read before the chain is checked against it.
        // A CA whose roots come only with its certificates also says, with each one, which
        // roots it has dropped: that is learned at once too (its bundle read is local).
        let cached = self.bundle.borrow().clone();
        let dropped = self.ca.roots_come_with_certificates()
            && !chain.roots_hint.is_empty()
            && self.roots.lock().ca_roots() != chain.roots_hint.as_slice();
        let (bundle, refreshed) = match cached {
            Some(b) if !dropped && chain.roots_hint.iter().all(|hint| b.roots.contains(hint)) => {
                (b, false)
            }
            cached => {
                if cached.is_some() {
                    debug!("the CA's chain names a root not in the bundle; re-reading it");
                }
                let seen = cached.as_ref().map(|b| b.version);
                (self.refresh_bundle(seen).await?, true)
            }
        };
        let now = SystemTime::now();
        let check = |roots: &[CertificateDer<'static>]| {
            validate::validate_anchored(&chain, key.public_key_raw(), identity, roots, now)
                .map(|(leaf, i)| (leaf, roots[i].clone()))
        };
        let (leaf, anchor) = match check(&bundle.roots) {
            Err(Rejection::Chain { .. }) if !refreshed => {
                // The CA may have moved to a new root: re-read the bundle once and re-check.
                debug!("chain does not verify to the cached bundle; re-reading it");
                let fresh = self.refresh_bundle(Some(bundle.version)).await?;
                check(&fresh.roots)?
            }
            other => other?,
        };
        let lifetime = leaf
            .not_after
            .duration_since(leaf.not_before)
            .unwrap_or_default();
        if lifetime > self.policy.ttl * 2 {
            warn!(
                id = %identity, backend = self.ca.name(),
                lifetime_s = lifetime.as_secs(), cert_ttl_s = self.policy.ttl.as_secs(),
                "the CA issued a certificate living far longer than --cert-ttl; using it, and renewing from its real lifetime"
            );
        }
        let renew_at = renewal_time(&leaf, self.policy.renew_at, now);
        let mut pem_chain = vec![&chain.leaf];
        pem_chain.extend(chain.intermediates.iter());
        Ok(ServedCert {
            identity: identity.clone(),
            version: self.cert_version.fetch_add(1, Ordering::Relaxed) + 1,
            chain_der: pem_chain.iter().flat_map(|c| c.iter().copied()).collect(),
            chain_pem: sds_backends::pem::encode_certificates(pem_chain),
            key_pem: key.pkcs8_pem(),
            key_der: key.pkcs8_der(),
            leaf,
            renew_at,
            backend: self.ca.name(),
            anchor,
        })
    }

    /// Re-reads the trust bundle and publishes it if it changed. `seen` is the version the
    /// caller found wanting: if another task published a newer one while this one waited
    /// for its turn, that one is returned without another read.
    async fn refresh_bundle(&self, seen: Option<u64>) -> Result<Arc<ServedBundle>, IssueError> {
        let _turn = self.bundle_read.lock().await;
        if let Some(current) = self.bundle.borrow().clone()
            && seen.is_none_or(|v| current.version > v)
        {
            return Ok(current);
        }
        let bundle: TrustBundle = self.ca_call("trust_bundle", self.ca.trust_bundle()).await?;
        let next = self.ca.root_control().and_then(|c| c.next_root());
        let acks = self.acks();
        let served = {
            let mut rotation = self.roots.lock();
            let obs = roots::Observed {
                now: Instant::now(),
                wall: SystemTime::now(),
                acks: &acks,
                anchors: &[],
            };
            if rotation.on_ca_roots(bundle.roots(), next.as_ref(), &obs) {
                self.wake.notify_one();
            }
            self.publish_roots(&mut rotation)?
        };
        self.record_rotation_metrics();
        Ok(served)
    }

    /// Publishes the roots `rotation` serves as the trust bundle if they differ from the
    /// served ones; the bundle served after. Called under the `roots` lock, so that bundles
    /// are published in the order the rotation decided them.
    fn publish_roots(
        &self,
        rotation: &mut roots::Rotation,
    ) -> Result<Arc<ServedBundle>, IssueError> {
        let roots = rotation.served_roots();
        let current = self.bundle.borrow().clone();
        if let Some(cur) = current.filter(|c| c.roots == roots) {
            return Ok(cur);
        }
        let root_info = roots
            .iter()
            .map(root_info)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::BadResponse(format!("trust bundle: {e}")))?;
        let version = self.bundle.borrow().as_ref().map_or(1, |b| b.version + 1);
        let served = Arc::new(ServedBundle {
            version,
            pem: sds_backends::pem::encode_certificates(&roots),
            der: roots.iter().flat_map(|c| c.iter().copied()).collect(),
            roots,
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
                format!("spiffe://{}", self.trust_domain),
                earliest,
            );
        }
        self.metrics
            .trust_bundle_roots
            .set(i64::try_from(served.roots.len()).unwrap_or(i64::MAX));
        rotation.published(version, &served.roots);
        self.bundle.send_replace(Some(served.clone()));
        self.wake.notify_one();
        Ok(served)
    }

    /// The roots among `old` that served and held certificates chain to, one entry per
    /// certificate. Only these matter to the rotation, and there are none once it has moved
    /// on, so nothing is copied for the others.
    fn anchors_among(&self, old: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
        if old.is_empty() {
            return Vec::new();
        }
        let st = self.state.lock();
        let served = st
            .identities
            .values()
            .filter_map(|t| t.entry.cert.borrow().as_ref().map(|c| c.anchor.clone()));
        let held = st.held.values().map(|c| c.anchor.clone());
        served.chain(held).filter(|a| old.contains(a)).collect()
    }

    /// The bundle version each subscribed SDS stream last ACKed.
    fn acks(&self) -> Vec<Option<u64>> {
        self.bundle_acks.lock().values().copied().collect()
    }

    /// Moves the root rotation through the phases whose end has come, and does what each
    /// asks.
    fn advance_roots(self: &Arc<Self>, now: Instant) {
        let Some(old) = self.roots.lock().old_roots() else {
            self.discard_held();
            return;
        };
        self.release_held(false);
        let anchors = self.anchors_among(&old);
        let acks = self.acks();
        let actions = {
            let mut rotation = self.roots.lock();
            rotation.advance(&roots::Observed {
                now,
                wall: SystemTime::now(),
                acks: &acks,
                anchors: &anchors,
            })
        };
        if actions.is_empty() {
            return;
        }
        for action in actions {
            match action {
                roots::Action::Activate => {
                    if let Some(control) = self.ca.root_control()
                        && control.activate_next()
                    {
                        info!(
                            backend = self.ca.name(),
                            "root rotation: the CA signs under the new root from now on"
                        );
                        // Read the CA's bundle now: the old root leaves it, and the rotation
                        // keeps serving it.
                        self.state.lock().bundle_due = Some(now);
                    }
                }
                roots::Action::PublishHeld => {
                    self.release_held(true);
                }
                roots::Action::RenewAll => self.queue_all(Priority::Background),
                roots::Action::Republish => {
                    if let Err(error) = self.publish_roots(&mut self.roots.lock()) {
                        error!(%error, "root rotation: cannot publish the bundle without the old root");
                    }
                }
            }
        }
        self.record_rotation_metrics();
        self.wake.notify_one();
    }

    fn record_rotation_metrics(&self) {
        let status = self.roots.lock().status(|_| String::new());
        let m = &self.metrics;
        let previous = m.root_rotation_phase.get();
        if previous != status.phase_number {
            m.root_rotation_phase.set(status.phase_number);
            m.root_rotation_phase_started
                .set(unix_f64(SystemTime::now()));
        }
        for phase in self.roots.lock().take_entered() {
            m.root_rotation_transitions
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .inc();
        }
    }

    /// An SDS stream's subscription to the trust bundle began (`true`) or ended.
    pub fn bundle_subscription(&self, stream: u64, subscribed: bool) {
        let mut acks = self.bundle_acks.lock();
        if subscribed {
            acks.entry(stream).or_insert(None);
        } else if acks.remove(&stream).is_some() {
            drop(acks);
            self.wake.notify_one();
        }
    }

    /// An SDS stream ACKed a response that carried bundle `version`.
    pub fn bundle_acked(&self, stream: u64, version: u64) {
        if let Some(v) = self.bundle_acks.lock().get_mut(&stream) {
            *v = Some(version);
        }
        self.wake.notify_one();
    }

    /// Begins a staged root rotation of a CA the agent moves itself (`sds-agent ca rotate`).
    /// Returns the new root's serial, or why it cannot.
    pub fn begin_root_rotation(&self) -> Result<String, String> {
        let control = self.ca.root_control().ok_or_else(|| {
            format!(
                "the {} CA announces its own roots: rotate the root at the CA, and the agent \
                 follows it through the same phases",
                self.ca.name()
            )
        })?;
        let root = control.prepare_next()?;
        let serial = root_info(&root).map(|i| i.serial).unwrap_or_default();
        info!(serial, "root rotation asked for: a new root is prepared");
        self.state.lock().bundle_due = Some(Instant::now());
        self.wake.notify_one();
        Ok(serial)
    }

    /// The staged root rotation's phase and history, and the roots served.
    pub fn trust_status(&self) -> TrustStatus {
        let serial = |r: &CertificateDer<'_>| root_info(r).map(|i| i.serial).unwrap_or_default();
        let rotation = self.roots.lock().status(serial);
        let bundle = self.bundle.borrow().clone();
        TrustStatus {
            trust_domain: self.trust_domain.to_string(),
            bundle_version: bundle.as_ref().map(|b| b.version),
            roots: bundle
                .map(|b| {
                    b.root_info
                        .iter()
                        .map(|r| RootStatus {
                            serial: r.serial.clone(),
                            not_after: rfc3339(r.not_after),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            proxies_subscribed: self.bundle_acks.lock().len(),
            rotation,
        }
    }
}

/// When the certificate held back for `id` must be published anyway: the hold margin before
/// the one served now expires (now, if none is served).
fn held_due(st: &State, id: &SpiffeId, margin: Duration, now: Instant) -> Instant {
    st.identities
        .get(id)
        .and_then(|t| t.expires)
        .map_or(now, |e| e.checked_sub(margin).unwrap_or(now))
}

/// What `/trust` shows: the served roots and the staged root rotation.
#[derive(Debug, Clone, Serialize)]
pub struct TrustStatus {
    /// The agent's trust domain.
    pub trust_domain: String,
    /// The served bundle's version.
    pub bundle_version: Option<u64>,
    /// The served roots.
    pub roots: Vec<RootStatus>,
    /// SDS streams subscribed to the bundle, whose ACKs phase 1 waits for.
    pub proxies_subscribed: usize,
    /// The rotation.
    pub rotation: roots::RotationStatus,
}

/// One served root.
#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    /// Serial, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
}

impl fmt::Debug for IdentityEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityEntry")
            .field("id", &self.id)
            .field(
                "serial",
                &self.cert.borrow().as_ref().map(|c| c.leaf.serial.clone()),
            )
            .finish()
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
            .field("trust_domain", &self.trust_domain)
            .field("workload", &self.workload)
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
            ca_concurrency: 8,
            idle_timeout: Duration::from_secs(3600),
            root_overlap: Duration::from_secs(3600),
        }
    }

    /// Background lane depth, real-time lane depth, from the queue gauges.
    fn queue_depths(metrics: &Metrics) -> (i64, i64) {
        let depth = |priority| {
            metrics
                .renewal_queue
                .get_or_create(&PriorityLabel { priority })
                .get()
        };
        (depth("background"), depth("realtime"))
    }

    #[tokio::test(start_paused = true)]
    async fn renew_all_in_background_queues_every_identity_behind_real_time_work() {
        use sds_backends::testing::ScriptedCa;

        let td: TrustDomain = "example.org".parse().unwrap();
        let pod = |n: usize| -> SpiffeId {
            format!("spiffe://example.org/ns/ns-{n}/sa/sa-{n}")
                .parse()
                .unwrap()
        };
        let ca = ScriptedCa::new();
        ca.set_latency(Some(Duration::from_secs(1)));
        let metrics = Arc::new(Metrics::new());
        let manager = SecretManager::for_node(
            td,
            Policy {
                ca_concurrency: 1,
                ..policy()
            },
            ca.clone(),
            metrics.clone(),
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(manager.clone().run(shutdown.clone()));
        let mut rxs: Vec<_> = (0..3).map(|n| manager.subscribe_cert(&pod(n))).collect();
        let mut serials = Vec::new();
        for rx in &mut rxs {
            let cert = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
                .await
                .expect("first certificate in time")
                .unwrap()
                .clone()
                .unwrap();
            serials.push(cert.leaf.serial.clone());
        }
        assert_eq!(ca.sign_calls(), 3);
        assert_eq!(queue_depths(&metrics), (3, 0), "renewals planned in a day");

        // A new pod arrives, then every renewal falls due at once: the new pod keeps its
        // real-time place and the three renewals wait behind it, due now.
        let mut newcomer = manager.subscribe_cert(&pod(3));
        manager.renew_all_in_background();
        assert_eq!(queue_depths(&metrics), (3, 1));
        tokio::time::timeout(Duration::from_secs(10), newcomer.wait_for(Option::is_some))
            .await
            .expect("the newcomer is served")
            .unwrap();
        assert_eq!(ca.sign_order()[3], pod(3), "the newcomer's CSR went first");
        // The renewals follow within seconds, not a day, one CA call at a time.
        for (rx, old) in rxs.iter_mut().zip(&serials) {
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|c| c.as_ref().is_some_and(|c| c.leaf.serial != *old)),
            )
            .await
            .expect("renewed in time")
            .unwrap();
        }
        assert_eq!(ca.sign_calls(), 7);
        assert_eq!(ca.max_concurrent_signs(), 1);
        assert_eq!(
            queue_depths(&metrics),
            (4, 0),
            "each renewed and planned again"
        );
        shutdown.cancel();
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
