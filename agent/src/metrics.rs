//! Prometheus metrics of the agent, registered once and shared by the secret manager, the
//! SDS server and the admin endpoint that exposes them (`/metrics`).
//!
//! Names follow Prometheus conventions with the `sds_agent_` prefix. Labels carry only
//! bounded values (reasons, kinds, resource names), never identities from requests.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// CA answers refused by validation, by reason.
    pub ca_responses_rejected: Family<ReasonLabel, Counter>,
    /// CA calls that failed, by error kind and retryability.
    pub ca_errors: Family<CaErrorLabels, Counter>,
    /// Issuance attempts, by result (success, failure).
    pub renewals: Family<ResultLabel, Counter>,
    /// notAfter of the certificate served as `default`, Unix seconds.
    pub cert_expiry_timestamp: Gauge<f64, AtomicU64>,
    /// When the next renewal is scheduled, Unix seconds.
    pub next_renewal_timestamp: Gauge<f64, AtomicU64>,
    /// SDS streams open, by API (sotw, delta).
    pub streams_open: Family<ApiLabel, Gauge>,
    /// Responses sent on SDS streams.
    pub pushes: Family<ApiLabel, Counter>,
    /// ACKs received.
    pub acks: Family<ApiLabel, Counter>,
    /// NACKs received.
    pub nacks: Family<ApiLabel, Counter>,
    /// Requests ignored because their nonce was not the latest one sent.
    pub stale_nonces: Family<ApiLabel, Counter>,
    /// Requests refused, by reason (unknown_resource, empty_resource_names, wildcard, ...).
    pub bad_requests: Family<ReasonLabel, Counter>,
}

/// `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
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

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sds_agent");
        let m = Self {
            ca_responses_rejected: Family::default(),
            ca_errors: Family::default(),
            renewals: Family::default(),
            cert_expiry_timestamp: Gauge::default(),
            next_renewal_timestamp: Gauge::default(),
            streams_open: Family::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            stale_nonces: Family::default(),
            bad_requests: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "ca_responses_rejected",
            "CA answers refused by validation before use, by reason",
            m.ca_responses_rejected.clone(),
        );
        r.register(
            "ca_errors",
            "CA calls that failed, by kind",
            m.ca_errors.clone(),
        );
        r.register(
            "renewals",
            "Certificate issuance attempts, by result",
            m.renewals.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the served workload certificate, Unix seconds",
            m.cert_expiry_timestamp.clone(),
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
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
