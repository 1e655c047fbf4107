//! The secret manager's rules (DESIGN.md), driven through its public API against the scripted
//! CA, with tokio's clock paused so renewals, backoff and expiry happen in virtual time.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sds_agent::config::RenewAt;
use sds_agent::metrics::Metrics;
use sds_agent::secrets::{Policy, SecretManager, ServedCert};
use sds_backends::testing::{Fault, ScriptedCa};
use sds_backends::{CaError, KeyType, SpiffeId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

fn id() -> SpiffeId {
    "spiffe://example.org/ns/default/sa/web".parse().unwrap()
}

fn policy() -> Policy {
    Policy {
        ttl: Duration::from_secs(24 * 3600),
        renew_at: RenewAt::new(0.5).unwrap(),
        key_type: KeyType::EcdsaP256,
        ca_timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        bundle_refresh: Duration::from_secs(3600),
        ca_concurrency: 8,
        idle_timeout: Duration::from_secs(3600),
        root_overlap: Duration::from_secs(3600),
    }
}

struct Harness {
    ca: Arc<ScriptedCa>,
    manager: Arc<SecretManager>,
    metrics: Arc<Metrics>,
    certs: watch::Receiver<Option<Arc<ServedCert>>>,
    shutdown: CancellationToken,
}

impl Harness {
    fn start(ca: Arc<ScriptedCa>, policy: Policy) -> Self {
        let metrics = Arc::new(Metrics::new());
        let manager = SecretManager::new(id(), policy, ca.clone(), metrics.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(manager.clone().run(shutdown.clone()));
        let certs = manager.subscribe_cert(&id());
        Self {
            ca,
            manager,
            metrics,
            certs,
            shutdown,
        }
    }

    /// Waits (virtual time, bounded) for a certificate other than `previous`.
    async fn next_cert(&mut self, previous: Option<&str>, limit: Duration) -> Arc<ServedCert> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(c) = self.certs.borrow_and_update().clone()
                    && Some(c.leaf.serial.as_str()) != previous
                {
                    return c;
                }
                self.certs.changed().await.unwrap();
            }
        })
        .await
        .expect("no new certificate in time")
    }

    fn metric(&self, needle: &str) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap() as u64)
            .unwrap_or(0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn leaf_key(cert: &ServedCert) -> Vec<u8> {
    let der = sds_backends::pem::decode_certificates(cert.chain_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    leaf.public_key().raw.to_vec()
}

#[tokio::test(start_paused = true)]
async fn every_issuance_uses_a_new_key() {
    let mut h = Harness::start(ScriptedCa::new(), policy());
    let first = h.next_cert(None, Duration::from_secs(5)).await;
    h.manager.rotate_now();
    let second = h
        .next_cert(Some(&first.leaf.serial), Duration::from_secs(5))
        .await;
    h.manager.rotate_now();
    let third = h
        .next_cert(Some(&second.leaf.serial), Duration::from_secs(5))
        .await;
    let keys = [leaf_key(&first), leaf_key(&second), leaf_key(&third)];
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
    assert_ne!(keys[0], keys[2]);
    assert!(first.version < second.version && second.version < third.version);
    assert!(
        !format!("{first:?}").contains("PRIVATE KEY"),
        "Debug must redact the key"
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_time_comes_from_the_certificate_returned() {
    // The CA ignores the 24 h asked for and issues 100 s certificates.
    let ca = ScriptedCa::new();
    ca.set_lifetime(Some(Duration::from_secs(100)));
    let mut h = Harness::start(ca, policy());
    let first = h.next_cert(None, Duration::from_secs(5)).await;
    let lifetime = first
        .leaf
        .not_after
        .duration_since(first.leaf.not_before)
        .unwrap();
    assert_eq!(lifetime, Duration::from_secs(100));
    let planned = first
        .renew_at
        .duration_since(first.leaf.not_before)
        .unwrap();
    // Half the real lifetime, less at most 10 % jitter. The plan counts from the moment of
    // issue; notBefore holds whole seconds, so it can be up to 1 s earlier than that.
    assert!(
        planned <= Duration::from_secs(51) && planned >= Duration::from_secs(45),
        "{planned:?}"
    );

    tokio::time::sleep(Duration::from_secs(44)).await;
    assert_eq!(h.ca.sign_calls(), 1, "renewed before the renewal point");
    let second = h
        .next_cert(Some(&first.leaf.serial), Duration::from_secs(8))
        .await;
    assert_eq!(h.ca.sign_calls(), 2);
    assert_ne!(second.leaf.serial, first.leaf.serial);
}

#[tokio::test(start_paused = true)]
async fn outage_keeps_the_last_good_certificate_with_capped_backoff_then_recovers() {
    let ca = ScriptedCa::new();
    ca.set_lifetime(Some(Duration::from_secs(400)));
    let mut h = Harness::start(ca, policy());
    let good = h.next_cert(None, Duration::from_secs(5)).await;

    h.ca.set_outage(Some(CaError::Unavailable("connection refused".into())));
    // Renewal is due at ~180-200 s; go to 300 s, 100 s of validity left.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let served = h.certs.borrow().clone().unwrap();
    assert_eq!(
        served.leaf.serial, good.leaf.serial,
        "the last good certificate stays served"
    );
    assert!(h.manager.is_ready());
    let calls = h.ca.sign_calls() - 1;
    // Exponential from 1 s with equal jitter and a cap of validity-left/8 (at most 27 s here):
    // over ~100-120 s of outage that is a handful of attempts, not a busy loop.
    assert!(
        (4..=20).contains(&calls),
        "{calls} attempts during the outage"
    );
    assert_eq!(
        h.metric("sds_agent_renewals_total{result=\"failure\"}"),
        calls as u64
    );
    let health = h.manager.health();
    assert_eq!(health.consecutive_failures as usize, calls);
    assert!(health.last_error.unwrap().contains("connection refused"));

    // Near expiry the cap is an eighth of what is left: retries become more frequent.
    let before = h.ca.sign_calls();
    tokio::time::sleep(Duration::from_secs(60)).await; // 40 s left at most
    let late = h.ca.sign_calls() - before;
    assert!(
        late >= 6,
        "only {late} retries in the last minute before expiry"
    );

    // The CA returns: renewed within one backoff cap (≤ 40 s / 8 = 5 s).
    h.ca.set_outage(None);
    let renewed = h
        .next_cert(Some(&good.leaf.serial), Duration::from_secs(6))
        .await;
    assert_ne!(renewed.leaf.serial, good.leaf.serial);
    assert_eq!(h.manager.health().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn an_expired_certificate_is_withdrawn() {
    let ca = ScriptedCa::new();
    ca.set_lifetime(Some(Duration::from_secs(60)));
    let mut h = Harness::start(ca, policy());
    h.next_cert(None, Duration::from_secs(5)).await;
    h.ca.set_outage(Some(CaError::Unavailable("down".into())));
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(
        h.certs.borrow().is_none(),
        "an expired certificate must not be served"
    );
    assert!(!h.manager.is_ready());
    assert!(h.manager.health().expired);
    // Still retrying, at the shortest interval.
    let before = h.ca.sign_calls();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.ca.sign_calls() - before >= 5);
    h.ca.set_outage(None);
    h.next_cert(None, Duration::from_secs(3)).await;
    assert!(h.manager.is_ready());
}

#[tokio::test(start_paused = true)]
async fn bad_answers_are_rejected_counted_and_retried() {
    let ca = ScriptedCa::new();
    ca.push_fault(Fault::WrongKey);
    ca.push_fault(Fault::WrongSan(
        "spiffe://example.org/ns/default/sa/other".parse().unwrap(),
    ));
    ca.push_fault(Fault::Expired);
    ca.push_fault(Fault::UnrelatedChain);
    let mut h = Harness::start(ca, policy());
    // The four bad answers are retried with backoff (1 + 2 + 4 + 8 s at most).
    let cert = h.next_cert(None, Duration::from_secs(20)).await;
    assert_eq!(h.ca.sign_calls(), 5);
    assert_eq!(cert.version, 1, "no rejected answer was ever published");
    for reason in ["wrong_key", "wrong_san", "expired", "chain"] {
        let line = format!("sds_agent_ca_responses_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(h.metric(&line), 1, "{reason}");
    }
    let der = sds_backends::pem::decode_certificates(cert.chain_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        "[URI(\"spiffe://example.org/ns/default/sa/web\")]"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_ca_times_out_and_is_retried() {
    let ca = ScriptedCa::new();
    ca.push_fault(Fault::Delay(Duration::from_secs(3600)));
    let mut p = policy();
    p.ca_timeout = Duration::from_secs(2);
    let mut h = Harness::start(ca, p);
    h.next_cert(None, Duration::from_secs(10)).await;
    assert_eq!(h.ca.sign_calls(), 2);
    assert_eq!(
        h.metric(
            "sds_agent_ca_errors_total{backend=\"scripted\",kind=\"timeout\",retryable=\"true\"}"
        ),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_rotation_requests_causes_one_csr() {
    let mut h = Harness::start(ScriptedCa::new(), policy());
    let first = h.next_cert(None, Duration::from_secs(5)).await;
    // A slow CA, and many callers asking at once.
    h.ca.push_fault(Fault::Delay(Duration::from_millis(500)));
    for _ in 0..100 {
        h.manager.rotate_now();
    }
    let second = h
        .next_cert(Some(&first.leaf.serial), Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.ca.sign_calls(), 2, "100 requests, one renewal");
    assert_eq!(
        h.certs.borrow().as_ref().unwrap().leaf.serial,
        second.leaf.serial
    );
}

#[tokio::test(start_paused = true)]
async fn first_issuance_retries_until_the_ca_answers() {
    let ca = ScriptedCa::new();
    ca.set_outage(Some(CaError::Denied(
        "role does not allow this URI SAN".into(),
    )));
    let h = Harness::start(ca, policy());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!h.manager.is_ready());
    let calls = h.ca.sign_calls();
    // Capped at 30 s before any certificate exists: 1+2+4+8+16+30+30+30 ≈ 8 attempts.
    assert!((5..=12).contains(&calls), "{calls}");
    assert_eq!(
        h.metric(
            "sds_agent_ca_errors_total{backend=\"scripted\",kind=\"denied\",retryable=\"false\"}"
        ),
        calls as u64
    );
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_sends_its_roots_only_with_a_certificate_is_served_at_its_first_answer() {
    // istiod's shape: no bundle can be read before a certificate has been signed.
    let ca = ScriptedCa::new();
    ca.set_bundle_needs_a_certificate(true);
    let mut h = Harness::start(ca, policy());
    h.next_cert(None, Duration::from_secs(5)).await;
    assert_eq!(h.ca.sign_calls(), 1);
    assert_eq!(h.ca.bundle_calls(), 1);
    assert!(h.manager.is_ready());
    assert_eq!(h.metric("sds_agent_renewals_total{result=\"failure\"}"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_root_the_ca_names_reaches_the_bundle_with_the_next_certificate() {
    let mut h = Harness::start(ScriptedCa::new(), policy());
    let first = h.next_cert(None, Duration::from_secs(5)).await;
    let bundles = h.manager.subscribe_bundle();
    let bundle = |b: &watch::Receiver<Option<Arc<sds_agent::secrets::ServedBundle>>>| {
        let b = b.borrow();
        let b = b.as_ref().unwrap();
        (b.version, b.root_info.len())
    };
    assert_eq!(bundle(&bundles), (1, 1));
    let calls = h.ca.bundle_calls();

    // The CA announces a second root in its chains while it still signs under the first: the
    // bundle is re-read at once, not at the hourly refresh, and serves both roots.
    h.ca.start_root_rotation();
    h.manager.rotate_now();
    let second = h
        .next_cert(Some(&first.leaf.serial), Duration::from_secs(5))
        .await;
    assert_eq!(bundle(&bundles), (2, 2));
    assert_eq!(h.ca.bundle_calls(), calls + 1);

    // Then it signs under the new root, which the bundle already holds: no re-read, nothing
    // rejected.
    h.ca.sign_with_new_root();
    h.manager.rotate_now();
    h.next_cert(Some(&second.leaf.serial), Duration::from_secs(5))
        .await;
    assert_eq!(bundle(&bundles), (2, 2));
    assert_eq!(h.ca.bundle_calls(), calls + 1);
    assert_eq!(
        h.metric("sds_agent_ca_responses_rejected_total{reason=\"chain\"}"),
        0
    );
}

// ---- Many identities (node mode): one scheduler, per-identity state, bounded CA calls ----

fn pod_id(n: usize) -> SpiffeId {
    format!("spiffe://example.org/ns/team-{n}/sa/app")
        .parse()
        .unwrap()
}

fn node_manager(
    ca: Arc<ScriptedCa>,
    policy: Policy,
) -> (Arc<SecretManager>, Arc<Metrics>, CancellationToken) {
    let metrics = Arc::new(Metrics::new());
    let manager =
        SecretManager::for_node("example.org".parse().unwrap(), policy, ca, metrics.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(manager.clone().run(shutdown.clone()));
    (manager, metrics, shutdown)
}

/// Waits (virtual time, bounded) until `rx` holds a certificate other than `previous`.
async fn cert_of(
    rx: &mut watch::Receiver<Option<Arc<ServedCert>>>,
    previous: Option<&str>,
    limit: Duration,
) -> Arc<ServedCert> {
    tokio::time::timeout(limit, async {
        loop {
            if let Some(c) = rx.borrow_and_update().clone()
                && Some(c.leaf.serial.as_str()) != previous
            {
                return c;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("no certificate in time")
}

fn uri_san(cert: &ServedCert) -> String {
    let der = sds_backends::pem::decode_certificates(cert.chain_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .unwrap()
}

fn metric_value(metrics: &Metrics, needle: &str) -> Option<f64> {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap())
}

#[tokio::test(start_paused = true)]
async fn each_identity_gets_its_own_certificate_and_idle_ones_are_dropped_with_their_key() {
    let ca = ScriptedCa::new();
    let (manager, metrics, _shutdown) = node_manager(
        ca.clone(),
        Policy {
            idle_timeout: Duration::from_secs(60),
            root_overlap: Duration::from_secs(3600),
            ..policy()
        },
    );
    // The bundle is read before any pod asks: a node agent is ready with no pods.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !manager.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready without identities");
    assert!(manager.identities().is_empty());

    let mut rxs: Vec<_> = (0..3).map(|n| manager.subscribe_cert(&pod_id(n))).collect();
    let mut certs = Vec::new();
    for (n, rx) in rxs.iter_mut().enumerate() {
        let cert = cert_of(rx, None, Duration::from_secs(5)).await;
        assert_eq!(cert.identity, pod_id(n));
        assert_eq!(
            uri_san(&cert),
            pod_id(n).to_string(),
            "the SAN is the pod's"
        );
        certs.push(cert);
    }
    assert_eq!(ca.sign_calls(), 3, "one CSR per identity");
    let keys: std::collections::HashSet<_> = certs.iter().map(|c| leaf_key(c)).collect();
    assert_eq!(keys.len(), 3, "a key per identity");
    // Asking again (another stream of the same pod) causes no CSR.
    let again = manager.subscribe_cert(&pod_id(1));
    assert_eq!(
        again.borrow().as_ref().unwrap().leaf.serial,
        certs[1].leaf.serial
    );
    drop(again);
    assert_eq!(ca.sign_calls(), 3);
    assert_eq!(metric_value(&metrics, "sds_agent_identities "), Some(3.0));

    // Pod 0's streams close; pods 1 and 2 keep reading.
    let dropped = rxs.remove(0);
    drop(dropped);
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        manager.identities().len(),
        3,
        "dropped before the idle timeout"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(manager.identities(), vec![pod_id(1), pod_id(2)]);
    assert_eq!(metric_value(&metrics, "sds_agent_identities "), Some(2.0));
    assert_eq!(
        metric_value(&metrics, "sds_agent_identities_dropped_total "),
        Some(1.0)
    );
    assert!(
        !metrics.encode().contains("ns/team-0/"),
        "the dropped identity's series are gone"
    );
    assert!(
        !manager
            .status()
            .iter()
            .any(|s| s.spiffe_id == pod_id(0).to_string()),
        "the dropped identity is no longer served"
    );

    // Held for hours, the others stay.
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(manager.identities(), vec![pod_id(1), pod_id(2)]);

    // Pod 0 comes back: a new issuance, with a new key.
    let mut back = manager.subscribe_cert(&pod_id(0));
    let fresh = cert_of(&mut back, None, Duration::from_secs(5)).await;
    assert_ne!(fresh.leaf.serial, certs[0].leaf.serial);
    assert_ne!(leaf_key(&fresh), leaf_key(&certs[0]));
}

#[tokio::test(start_paused = true)]
async fn ca_calls_stay_within_the_concurrency_and_a_new_pod_goes_ahead_of_queued_renewals() {
    const PODS: usize = 40;
    const CONCURRENCY: usize = 4;
    let ca = ScriptedCa::new();
    ca.set_lifetime(Some(Duration::from_secs(100)));
    ca.set_latency(Some(Duration::from_secs(1)));
    let (manager, metrics, _shutdown) = node_manager(
        ca.clone(),
        Policy {
            ca_concurrency: CONCURRENCY,
            ..policy()
        },
    );
    let started = tokio::time::Instant::now();
    let mut rxs: Vec<_> = (0..PODS)
        .map(|n| manager.subscribe_cert(&pod_id(n)))
        .collect();
    for rx in &mut rxs {
        cert_of(rx, None, Duration::from_secs(60)).await;
    }
    // 40 first certificates, 4 at a time, 1 s each (the bundle read takes a permit too).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(10) && elapsed <= Duration::from_secs(12),
        "{elapsed:?}"
    );
    assert_eq!(ca.max_concurrent_signs(), CONCURRENCY);

    // All 40 renew at 45-50 s after issue (half of 100 s less jitter); at 60 s most of them
    // wait in the background lane, 4 at a time at the CA.
    tokio::time::sleep_until(started + Duration::from_secs(60)).await;
    let queued =
        metric_value(&metrics, "sds_agent_renewal_queue{priority=\"background\"}").unwrap();
    assert!(queued >= 20.0, "{queued} renewals queued");
    let newcomer = pod_id(PODS);
    let signs_before = ca.sign_calls();
    let arrived = tokio::time::Instant::now();
    let mut rx = manager.subscribe_cert(&newcomer);
    cert_of(&mut rx, None, Duration::from_secs(10)).await;
    let waited = arrived.elapsed();
    let order = ca.sign_order();
    let position = order.iter().position(|id| *id == newcomer).unwrap();
    assert_eq!(
        position, signs_before,
        "the new pod's CSR is the next one sent, ahead of {queued} queued renewals"
    );
    // At most the 1 s a running call needs to free a permit, plus its own 1 s.
    assert!(waited <= Duration::from_secs(2), "{waited:?}");
    for rx in &mut rxs {
        cert_of(rx, None, Duration::from_secs(0)).await;
    }
    assert_eq!(
        ca.max_concurrent_signs(),
        CONCURRENCY,
        "never more CA calls at once"
    );
    assert!(metric_value(&metrics, "sds_agent_ca_in_flight ").unwrap() <= CONCURRENCY as f64);
}

#[tokio::test(start_paused = true)]
async fn an_identity_the_ca_refuses_backs_off_alone() {
    let ca = ScriptedCa::new();
    ca.deny(pod_id(0));
    let (manager, _metrics, _shutdown) = node_manager(ca.clone(), policy());
    let mut refused = manager.subscribe_cert(&pod_id(0));
    let mut served = manager.subscribe_cert(&pod_id(1));
    cert_of(&mut served, None, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(refused.borrow_and_update().is_none());
    let attempts = ca
        .sign_order()
        .iter()
        .filter(|id| **id == pod_id(0))
        .count();
    // 1, 2, 4, 8, 16 then 30 s (the cap before a first certificate), with equal jitter:
    // a handful in two minutes, not a loop.
    assert!((4..=12).contains(&attempts), "{attempts} attempts");
    let health = manager.health();
    assert_eq!(health.consecutive_failures as usize, attempts);
    assert!(health.last_error.unwrap().contains("not allowed"));
    // The other pod was issued once and is served throughout.
    assert_eq!(
        ca.sign_order()
            .iter()
            .filter(|id| **id == pod_id(1))
            .count(),
        1
    );
    assert!(served.borrow().is_some());
}

/// A node agent on a CA that sends its roots only with a certificate (istiod, cert-manager
/// without a pinned bundle) cannot read its bundle before a pod asks, and is ready anyway:
/// otherwise a node where no pod uses it would never be ready (and a startup probe would
/// restart it). The first pod's certificate brings the roots. On a CA that can be asked for
/// its roots, a bundle that cannot be read keeps the node agent not ready.
#[tokio::test(start_paused = true)]
async fn a_node_agent_on_a_ca_that_sends_roots_with_certificates_is_ready_before_any_pod() {
    let ca = ScriptedCa::new();
    ca.set_bundle_needs_a_certificate(true);
    let (manager, _metrics, _shutdown) = node_manager(ca.clone(), policy());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(ca.bundle_calls() >= 1, "the bundle was asked for");
    assert!(
        manager.subscribe_bundle().borrow().is_none(),
        "no roots yet"
    );
    assert!(manager.is_ready(), "ready with no pods and no roots");

    let mut rx = manager.subscribe_cert(&pod_id(0));
    cert_of(&mut rx, None, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut bundle = manager.subscribe_bundle();
        while bundle.borrow_and_update().is_none() {
            bundle.changed().await.unwrap();
        }
    })
    .await
    .expect("the roots came with the first certificate");
    assert!(manager.is_ready());

    // The same outage on a CA that can be asked for its roots: not ready.
    let ca = ScriptedCa::new();
    ca.set_outage(Some(CaError::Unavailable("down".into())));
    let (manager, _metrics, _shutdown) = node_manager(ca.clone(), policy());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(ca.bundle_calls() >= 1);
    assert!(!manager.is_ready());
}
