//! Prometheus metrics of the agent, registered once and shared by the secret manager, the
//! SDS server and the admin endpoint that exposes them (`/metrics`).
//!
//! Names follow Prometheus conventions with the `sds_agent_` prefix: `_total` counters,
//! `_seconds` units, `_timestamp_seconds` for points in time, one `_info` metric. Labels
//! carry only bounded values (resource names, reasons, kinds, the agent's own identity),
//! never anything a client sent.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use sds_backends::CaError;

/// A float gauge.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// CA answers refused by validation, by reason.
    pub ca_responses_rejected: Family<ReasonLabel, Counter>,
    /// CA calls that failed, by backend, error kind and retryability.
    pub ca_errors: Family<CaErrorLabels, Counter>,
    /// CA calls, by backend, operation and result.
    pub ca_requests: Family<CaRequestLabels, Counter>,
    /// CA call latency, by backend and operation.
    pub ca_request_duration: Family<CaOperationLabels, Histogram>,
    /// Issuance attempts, by result (success, failure).
    pub renewals: Family<ResultLabel, Counter>,
    /// Local key generation latency, by key type.
    pub key_generation_duration: Family<KeyTypeLabel, Histogram>,
    /// notAfter of each served secret, Unix seconds.
    pub cert_expiry_timestamp: Family<SecretLabels, FloatGauge>,
    /// notAfter - notBefore of each served secret, seconds.
    pub cert_lifetime_seconds: Family<SecretLabels, FloatGauge>,
    /// Seconds until each served secret expires (negative once expired); set at each scrape.
    pub cert_expiry_seconds: Family<SecretLabels, FloatGauge>,
    /// When the next renewal (or retry) is scheduled, Unix seconds.
    pub next_renewal_timestamp: Family<IdentityLabel, FloatGauge>,
    /// Streams open, by API (sotw, delta, and workload for the SPIFFE Workload API).
    pub streams_open: Family<ApiLabel, Gauge>,
    /// Responses sent on SDS and Workload API streams.
    pub pushes: Family<ApiLabel, Counter>,
    /// ACKs received.
    pub acks: Family<ApiLabel, Counter>,
    /// NACKs received.
    pub nacks: Family<ApiLabel, Counter>,
    /// Requests ignored because their nonce was not the latest one sent.
    pub stale_nonces: Family<ApiLabel, Counter>,
    /// Requests refused, by reason (unknown_resource, empty_resource_names, wildcard, ...).
    pub bad_requests: Family<ReasonLabel, Counter>,
    /// File output (`--output-dir`) writes, by result.
    pub file_writes: Family<ResultLabel, Counter>,
    /// SDS calls refused because the caller's uid and gid are not allowed.
    pub callers_denied: Counter,
    /// Workload API calls refused, by reason ([`WORKLOAD_API_BAD_REQUEST_REASONS`]).
    pub workload_bad_requests: Family<ReasonLabel, Counter>,
    /// Workload API calls refused because the caller's uid and gid are not allowed.
    pub workload_callers_denied: Counter,
    /// Times the SDS socket was found deleted or replaced and was bound again.
    pub socket_recreated: Counter,
    /// Identities served now (one in per-pod mode; one per pod asking in node mode).
    pub identities: Gauge,
    /// Identities dropped because nobody asked for them in `--identity-idle-timeout`.
    pub identities_dropped: Counter,
    /// CA calls running now (at most `--ca-concurrency`).
    pub ca_in_flight: Gauge,
    /// Renewals waiting for the CA, by priority (realtime, background).
    pub renewal_queue: Family<PriorityLabel, Gauge>,
    /// Node mode: connections refused because their caller failed attestation.
    pub attestations_refused: Counter,
    /// Federated bundles refused (the last good one kept), by trust domain and reason.
    pub federation_errors: Family<FederationErrorLabels, Counter>,
    /// Federated bundles replaced by a changed, good one, by trust domain.
    pub federation_updates: Family<FederationLabels, Counter>,
    /// The phase of the staged root rotation: 0 none, 1 announced, 2 issuing, 3 retiring,
    /// 4 removed (the last rotation is complete).
    pub root_rotation_phase: Gauge,
    /// When the phase began, Unix seconds (0 before any rotation).
    pub root_rotation_phase_started: FloatGauge,
    /// Phases entered, by phase.
    pub root_rotation_transitions: Family<PhaseLabel, Counter>,
    /// `--root-overlap`, seconds.
    pub root_overlap_seconds: FloatGauge,
    /// Roots in the served trust bundle (the agent's own trust domain).
    pub trust_bundle_roots: Gauge,
    /// Federated trust domains served now (each with a good bundle).
    pub federated_domains: Gauge,
    /// `--federation-dir` entries skipped, by reason ([`FEDERATION_DIR_SKIP_REASONS`]).
    pub federation_dir_skipped: Family<ReasonLabel, Counter>,
    /// `--ca` lists several backends: certificates signed, by the backend that signed them.
    pub ca_certificates_signed: Family<BackendLabel, Counter>,
    /// `--ca` lists several backends: 1 for the backend that signed the certificate in
    /// service, 0 for the others.
    pub ca_active_backend: Family<BackendLabel, Gauge>,
    /// `--ca` lists several backends: seconds since certificates started coming from a
    /// fallback; 0 while the primary signs.
    pub ca_fallback_seconds: FloatGauge,
    /// `--ca` lists several backends: failed probes of a backend that is down, by backend.
    pub ca_probe_failures: Family<BackendLabel, Counter>,
}

/// The label of a series about one CA backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BackendLabel {
    /// The backend's `--ca` name.
    pub backend: &'static str,
}

/// The `phase` label of `sds_agent_root_rotation_transitions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `announced`, `issuing`, `retiring` or `removed`.
    pub phase: &'static str,
}

/// The `reason` label values of `sds_agent_federation_dir_skipped_total`.
pub const FEDERATION_DIR_SKIP_REASONS: [&str; 4] = [
    "bad_name",
    "own_trust_domain",
    "duplicate",
    "unreadable_dir",
];

/// The `reason` label values of `sds_agent_federation_errors_total`.
pub const FEDERATION_ERROR_REASONS: [&str; 7] = [
    "fetch_failed",
    "unreadable",
    "malformed",
    "empty",
    "not_ca",
    "expired",
    "wrong_trust_domain",
];

/// Labels of a federated trust domain's refused bundles.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FederationErrorLabels {
    /// The federated trust domain.
    pub trust_domain: String,
    /// Why its bundle was refused ([`FEDERATION_ERROR_REASONS`]).
    pub reason: &'static str,
}

/// Labels of a federated trust domain's series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FederationLabels {
    /// The federated trust domain.
    pub trust_domain: String,
}

impl FederationErrorLabels {
    /// An error's labels.
    pub fn new(trust_domain: &str, reason: &'static str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            reason,
        }
    }
}

impl FederationLabels {
    /// The labels of `trust_domain`'s series.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
        }
    }
}

/// The `reason` label values of `sds_agent_sds_bad_requests_total`, in the order the SDS
/// server indexes them.
pub const BAD_REQUEST_REASONS: [&str; 11] = [
    "unknown_resource",
    "wildcard",
    "type_url",
    "not_ready",
    "too_many_streams",
    "rate_limited",
    "too_large",
    "malformed",
    "unauthenticated",
    "not_authorized",
    "pod_unknown",
];

/// The `api` label values of the SDS stream metrics.
pub const APIS: [&str; 3] = ["sotw", "delta", "fetch"];

/// The `api` label value (and `/proxies` value) of SPIFFE Workload API streams.
pub const WORKLOAD_API: &str = "workload";

/// The `reason` label values of `sds_agent_ca_responses_rejected_total`: why a CA answer
/// was refused by validation (`secrets::validate::Rejection::reason`).
pub const REJECTION_REASONS: [&str; 7] = [
    "unparseable",
    "wrong_key",
    "wrong_san",
    "not_yet_valid",
    "expired",
    "is_ca",
    "chain",
];

/// The `reason` label values of `sds_agent_workload_api_bad_requests_total`:
/// - `missing_security_header`: no `workload.spiffe.io: true` metadata (`InvalidArgument`);
/// - `too_many_streams`: `--max-streams` Workload API streams are open;
/// - `rate_limited`: a caller opened calls faster than `--max-requests-per-second`;
/// - `too_large`: a request over `--max-message-size`;
/// - `malformed`: a request that does not decode;
/// - `jwt_not_issued`: a JWT-SVID method, which this agent does not serve (`Unimplemented`);
/// - `unauthenticated`: node mode, a caller whose process or pod could not be proven;
/// - `pod_unknown`: node mode, a proven process whose pod the kubelet does not list (yet).
pub const WORKLOAD_API_BAD_REQUEST_REASONS: [&str; 8] = [
    "missing_security_header",
    "too_many_streams",
    "rate_limited",
    "too_large",
    "malformed",
    "jwt_not_issued",
    "unauthenticated",
    "pod_unknown",
];

/// `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// `priority` label of the renewal queue: `realtime` (someone waits) or `background`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PriorityLabel {
    /// realtime or background.
    pub priority: &'static str,
}

/// `result` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabel {
    /// success or failure.
    pub result: &'static str,
}

/// `api` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ApiLabel {
    /// sotw, delta or fetch.
    pub api: &'static str,
}

/// `key_type` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KeyTypeLabel {
    /// ecdsa-p256, rsa-2048, ...
    pub key_type: &'static str,
}

/// `identity` label: the SPIFFE ID the agent serves (its own configuration, so bounded).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabel {
    /// The SPIFFE ID.
    pub identity: String,
}

/// Labels of a served secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SecretLabels {
    /// The SDS resource name: `default` or `ROOTCA`.
    pub resource: &'static str,
    /// The SPIFFE ID (for `ROOTCA`, the trust domain's `spiffe://<td>`).
    pub identity: String,
}

/// Labels of CA errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CaErrorLabels {
    /// The backend's name.
    pub backend: &'static str,
    /// The error kind (unavailable, denied, ...).
    pub kind: &'static str,
    /// "true" or "false".
    pub retryable: &'static str,
}

/// Labels of one kind of CA call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CaOperationLabels {
    /// The backend's name.
    pub backend: &'static str,
    /// sign or trust_bundle.
    pub operation: &'static str,
}

/// Labels of a finished CA call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CaRequestLabels {
    /// The backend's name.
    pub backend: &'static str,
    /// sign or trust_bundle.
    pub operation: &'static str,
    /// success, or the error kind (unavailable, timeout, denied, ...).
    pub result: &'static str,
}

/// Labels of `sds_agent_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backends: String,
}

/// CA calls take from well under a millisecond (embedded) to a minute (cert-manager waiting
/// for an approver): 0.5 ms to about 65 s.
fn ca_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 18,
    ))
}

/// An ECDSA key takes tens of microseconds, an RSA-4096 key up to seconds: 20 µs to about 5 s.
fn keygen_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00002, 2.0, 18,
    ))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sds_agent");
        let m = Self {
            ca_responses_rejected: Family::default(),
            ca_errors: Family::default(),
            ca_requests: Family::default(),
            ca_request_duration: Family::new_with_constructor(ca_buckets),
            renewals: Family::default(),
            key_generation_duration: Family::new_with_constructor(keygen_buckets),
            cert_expiry_timestamp: Family::default(),
            cert_expiry_seconds: Family::default(),
            cert_lifetime_seconds: Family::default(),
            next_renewal_timestamp: Family::default(),
            streams_open: Family::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            stale_nonces: Family::default(),
            bad_requests: Family::default(),
            file_writes: Family::default(),
            callers_denied: Counter::default(),
            workload_bad_requests: Family::default(),
            workload_callers_denied: Counter::default(),
            socket_recreated: Counter::default(),
            identities: Gauge::default(),
            identities_dropped: Counter::default(),
            ca_in_flight: Gauge::default(),
            renewal_queue: Family::default(),
            attestations_refused: Counter::default(),
            federation_errors: Family::default(),
            federation_updates: Family::default(),
            root_rotation_phase: Gauge::default(),
            root_rotation_phase_started: FloatGauge::default(),
            root_rotation_transitions: Family::default(),
            root_overlap_seconds: FloatGauge::default(),
            trust_bundle_roots: Gauge::default(),
            federated_domains: Gauge::default(),
            federation_dir_skipped: Family::default(),
            ca_certificates_signed: Family::default(),
            ca_active_backend: Family::default(),
            ca_fallback_seconds: FloatGauge::default(),
            ca_probe_failures: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "build",
            "The agent's version and the CA backends built in",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                backends: crate::BACKENDS.join(","),
            }),
        );
        r.register(
            "ca_responses_rejected",
            "CA answers refused by validation before use, by reason",
            m.ca_responses_rejected.clone(),
        );
        r.register(
            "ca_errors",
            "CA calls that failed, by backend, kind and retryability",
            m.ca_errors.clone(),
        );
        r.register(
            "ca_requests",
            "CA calls, by backend, operation and result (success or the error kind)",
            m.ca_requests.clone(),
        );
        r.register_with_unit(
            "ca_request_duration",
            "Latency of CA calls, by backend and operation",
            prometheus_client::registry::Unit::Seconds,
            m.ca_request_duration.clone(),
        );
        r.register(
            "renewals",
            "Certificate issuance attempts, by result",
            m.renewals.clone(),
        );
        r.register_with_unit(
            "key_generation_duration",
            "Latency of local private key generation, by key type",
            prometheus_client::registry::Unit::Seconds,
            m.key_generation_duration.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of each served secret, Unix seconds",
            m.cert_expiry_timestamp.clone(),
        );
        r.register_with_unit(
            "certificate_lifetime",
            "Full validity (notAfter - notBefore) of each served secret",
            prometheus_client::registry::Unit::Seconds,
            m.cert_lifetime_seconds.clone(),
        );
        r.register_with_unit(
            "certificate_expiry",
            "Seconds until each served secret expires, negative once expired",
            prometheus_client::registry::Unit::Seconds,
            m.cert_expiry_seconds.clone(),
        );
        r.register(
            "next_renewal_timestamp_seconds",
            "When the next renewal attempt is scheduled, Unix seconds",
            m.next_renewal_timestamp.clone(),
        );
        r.register(
            "sds_streams_open",
            "Open SDS streams",
            m.streams_open.clone(),
        );
        r.register(
            "sds_pushes",
            "Responses sent on SDS streams",
            m.pushes.clone(),
        );
        r.register("sds_acks", "ACKs received from proxies", m.acks.clone());
        r.register("sds_nacks", "NACKs received from proxies", m.nacks.clone());
        r.register(
            "sds_stale_nonces",
            "SDS requests ignored because their nonce was stale",
            m.stale_nonces.clone(),
        );
        r.register(
            "sds_bad_requests",
            "SDS requests refused, by reason",
            m.bad_requests.clone(),
        );
        r.register(
            "file_writes",
            "Writes of --output-dir, by result",
            m.file_writes.clone(),
        );
        r.register(
            "sds_callers_denied",
            "SDS calls refused because the caller's uid and gid are not allowed",
            m.callers_denied.clone(),
        );
        r.register(
            "workload_api_bad_requests",
            "SPIFFE Workload API calls refused, by reason",
            m.workload_bad_requests.clone(),
        );
        r.register(
            "workload_api_callers_denied",
            "SPIFFE Workload API calls refused because the caller's uid and gid are not allowed",
            m.workload_callers_denied.clone(),
        );
        r.register(
            "socket_recreated",
            "Times a socket (SDS or Workload API) was found deleted or replaced and was created again",
            m.socket_recreated.clone(),
        );
        r.register(
            "identities",
            "Identities whose certificates the agent serves now",
            m.identities.clone(),
        );
        r.register(
            "identities_dropped",
            "Identities dropped, key and all, because nobody asked for them in --identity-idle-timeout",
            m.identities_dropped.clone(),
        );
        r.register(
            "ca_in_flight",
            "CA calls running now, at most --ca-concurrency",
            m.ca_in_flight.clone(),
        );
        r.register(
            "renewal_queue",
            "Issuances waiting for the CA, by priority (realtime: someone waits; background: renewals)",
            m.renewal_queue.clone(),
        );
        r.register(
            "attestations_refused",
            "Node mode: connections refused and closed because the caller's process or pod could not be proven",
            m.attestations_refused.clone(),
        );
        r.register(
            "federation_errors",
            "Federated bundles refused, the last good one kept, by trust domain and reason",
            m.federation_errors.clone(),
        );
        r.register(
            "federation_updates",
            "Federated bundles replaced by a changed, good one, by trust domain",
            m.federation_updates.clone(),
        );
        r.register(
            "root_rotation_phase",
            "Staged root rotation phase: 0 none, 1 new root announced, 2 issuing under it, 3 old root retiring, 4 old root removed",
            m.root_rotation_phase.clone(),
        );
        r.register(
            "root_rotation_phase_started_timestamp_seconds",
            "When the root rotation phase began, Unix seconds",
            m.root_rotation_phase_started.clone(),
        );
        r.register(
            "root_rotation_transitions",
            "Root rotation phases entered, by phase",
            m.root_rotation_transitions.clone(),
        );
        r.register(
            "root_overlap_seconds",
            "--root-overlap: how long phase 1 waits at most for ACKs, and the old root is kept after nothing chains to it",
            m.root_overlap_seconds.clone(),
        );
        r.register(
            "trust_bundle_roots",
            "Roots in the trust bundle served for the agent's own trust domain",
            m.trust_bundle_roots.clone(),
        );
        r.register(
            "federated_domains",
            "Federated trust domains served now, each with a good bundle",
            m.federated_domains.clone(),
        );
        r.register(
            "federation_dir_skipped",
            "--federation-dir entries skipped (counted once per file), by reason",
            m.federation_dir_skipped.clone(),
        );
        r.register(
            "ca_certificates_signed",
            "--ca with several backends: certificates signed, by the backend that signed them",
            m.ca_certificates_signed.clone(),
        );
        r.register(
            "ca_active_backend",
            "--ca with several backends: 1 for the backend that signed the certificate in service, 0 for the others",
            m.ca_active_backend.clone(),
        );
        r.register_with_unit(
            "ca_fallback",
            "--ca with several backends: seconds since certificates started coming from a fallback CA, 0 while the primary signs",
            prometheus_client::registry::Unit::Seconds,
            m.ca_fallback_seconds.clone(),
        );
        r.register(
            "ca_probe_failures",
            "--ca with several backends: failed probes of a backend that is down (failed over), by backend",
            m.ca_probe_failures.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Creates, at zero, the `--federation-dir` series.
    pub fn prime_federation_dir(&self) {
        for reason in FEDERATION_DIR_SKIP_REASONS {
            drop(
                self.federation_dir_skipped
                    .get_or_create(&ReasonLabel { reason }),
            );
        }
    }

    /// Creates, at zero, the series of federated trust domain `trust_domain`.
    pub fn prime_federation(&self, trust_domain: &str) {
        for reason in FEDERATION_ERROR_REASONS {
            drop(
                self.federation_errors
                    .get_or_create(&FederationErrorLabels::new(trust_domain, reason)),
            );
        }
        drop(
            self.federation_updates
                .get_or_create(&FederationLabels::new(trust_domain)),
        );
    }

    /// Creates, at zero, every series whose label values are known before anything happens:
    /// renewals and file writes by result, CA calls and errors of `backend` by kind, rejected
    /// answers by reason, and the SDS counters by API and reason. A counter that first
    /// appears at 1 is invisible to `increase()` and `rate()`, which need two samples; so an
    /// alert on the first NACK or the first CA error would otherwise never fire.
    /// With `workload_api`, the Workload API's series too.
    pub fn prime(&self, backend: &'static str, file_output: bool, workload_api: bool) {
        for result in ["success", "failure"] {
            drop(self.renewals.get_or_create(&ResultLabel { result }));
            if file_output {
                drop(self.file_writes.get_or_create(&ResultLabel { result }));
            }
        }
        self.prime_ca_backend(backend);
        for reason in REJECTION_REASONS {
            drop(
                self.ca_responses_rejected
                    .get_or_create(&ReasonLabel { reason }),
            );
        }
        for priority in ["realtime", "background"] {
            drop(
                self.renewal_queue
                    .get_or_create(&PriorityLabel { priority }),
            );
        }
        for reason in BAD_REQUEST_REASONS {
            drop(self.bad_requests.get_or_create(&ReasonLabel { reason }));
        }
        for api in APIS {
            let label = ApiLabel { api };
            drop(self.pushes.get_or_create(&label));
            // FetchSecrets is one call, not a stream: it has no ACKs, NACKs or nonces.
            if api != "fetch" {
                drop(self.streams_open.get_or_create(&label));
                drop(self.acks.get_or_create(&label));
                drop(self.nacks.get_or_create(&label));
                drop(self.stale_nonces.get_or_create(&label));
            }
        }
        if workload_api {
            let label = ApiLabel { api: WORKLOAD_API };
            drop(self.streams_open.get_or_create(&label));
            drop(self.pushes.get_or_create(&label));
            for reason in WORKLOAD_API_BAD_REQUEST_REASONS {
                drop(
                    self.workload_bad_requests
                        .get_or_create(&ReasonLabel { reason }),
                );
            }
        }
    }

    /// Creates, at zero, the CA call and error series of `backend`: every backend of a
    /// `--ca` list has its own.
    pub fn prime_ca_backend(&self, backend: &'static str) {
        for operation in ["sign", "trust_bundle"] {
            drop(
                self.ca_request_duration
                    .get_or_create(&CaOperationLabels { backend, operation }),
            );
            for result in std::iter::once("success").chain(CaError::KINDS.map(|(k, _)| k)) {
                drop(self.ca_requests.get_or_create(&CaRequestLabels {
                    backend,
                    operation,
                    result,
                }));
            }
        }
        for (kind, retryable) in CaError::KINDS {
            drop(self.ca_errors.get_or_create(&CaErrorLabels {
                backend,
                kind,
                retryable: if retryable { "true" } else { "false" },
            }));
        }
    }

    /// Counts a refused Workload API call; `reason` is one of
    /// [`WORKLOAD_API_BAD_REQUEST_REASONS`].
    pub fn workload_bad_request(&self, reason: &'static str) {
        self.workload_bad_requests
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a refused SDS request.
    pub fn bad_request(&self, reason: &'static str) {
        self.bad_requests
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
