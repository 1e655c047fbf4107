//! Staged root rotation through the secret manager's public API, with tokio's clock paused:
//! the embedded CA moved by the agent (`sds-agent ca rotate`), and a CA that announces its
//! own roots and signs under a new one before every proxy trusts it.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use sds_agent::config::RenewAt;
use sds_agent::metrics::Metrics;
use sds_agent::secrets::roots::Phase;
use sds_agent::secrets::{Policy, SecretManager, ServedBundle, ServedCert};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::embedded::rotating::{NextSource, RotatingCa};
use sds_backends::{
    CaError, CertificateAuthority, IssuedChain, KeyType, SignRequest, SpiffeId, TrustBundle,
    TrustDomain,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const OVERLAP: Duration = Duration::from_secs(600);

fn id() -> SpiffeId {
    "spiffe://example.org/ns/default/sa/web".parse().unwrap()
}

fn td() -> TrustDomain {
    "example.org".parse().unwrap()
}

fn policy() -> Policy {
    Policy {
        ttl: Duration::from_secs(3600),
        renew_at: RenewAt::new(0.5).unwrap(),
        key_type: KeyType::EcdsaP256,
        ca_timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        bundle_refresh: Duration::from_secs(60),
        ca_concurrency: 8,
        idle_timeout: Duration::from_secs(3600),
        root_overlap: OVERLAP,
    }
}

struct Harness {
    manager: Arc<SecretManager>,
    metrics: Arc<Metrics>,
    certs: watch::Receiver<Option<Arc<ServedCert>>>,
    bundles: watch::Receiver<Option<Arc<ServedBundle>>>,
    shutdown: CancellationToken,
}

impl Harness {
    fn start(ca: Arc<dyn CertificateAuthority>) -> Self {
        Self::start_with(ca, policy())
    }

    fn start_with(ca: Arc<dyn CertificateAuthority>, policy: Policy) -> Self {
        let metrics = Arc::new(Metrics::new());
        let manager = SecretManager::new(id(), policy, ca, metrics.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(manager.clone().run(shutdown.clone()));
        Self {
            certs: manager.subscribe_cert(&id()),
            bundles: manager.subscribe_bundle(),
            manager,
            metrics,
            shutdown,
        }
    }

    /// Waits (virtual time, bounded) until `f` holds of the manager.
    async fn until(&self, what: &str, limit: Duration, f: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {limit:?}; {:?}",
                self.manager.trust_status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cert(&self) -> Option<Arc<ServedCert>> {
        self.certs.borrow().clone()
    }

    fn roots(&self) -> Vec<String> {
        self.manager
            .trust_status()
            .roots
            .into_iter()
            .map(|r| r.serial)
            .collect()
    }

    fn bundle_version(&self) -> u64 {
        self.bundles.borrow().as_ref().map_or(0, |b| b.version)
    }

    fn phase(&self) -> Phase {
        self.manager.trust_status().rotation.phase
    }

    /// The serial of the root the served certificate's chain ends in: the root whose subject
    /// key identifier the top of the chain names as its authority key identifier (ephemeral
    /// roots all have the same subject).
    fn cert_root(&self, roots: &[(String, CertificateDer<'static>)]) -> Option<String> {
        use x509_parser::extensions::ParsedExtension;
        let cert = self.cert()?;
        let chain = sds_backends::pem::decode_certificates(cert.chain_pem.as_bytes()).unwrap();
        let (_, top) = x509_parser::parse_x509_certificate(chain.last()?).unwrap();
        let aki = top
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })?;
        roots.iter().find_map(|(serial, der)| {
            let (_, root) = x509_parser::parse_x509_certificate(der).unwrap();
            let ski = root
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                });
            (ski.as_deref() == Some(aki.as_slice())).then(|| serial.clone())
        })
    }

    fn metric(&self, needle: &str) -> Option<f64> {
        self.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn serial(der: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}

fn history(h: &Harness) -> Vec<Phase> {
    h.manager
        .trust_status()
        .rotation
        .history
        .iter()
        .map(|c| c.phase)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_embedded_ca_rotates_its_root_in_four_phases_waiting_for_the_proxies_acks() {
    let ca = Arc::new(RotatingCa::new(
        EmbeddedCa::generate(&td()).unwrap().local_requests_only(),
        NextSource::Generate(td()),
    ));
    let h = Harness::start(ca.clone());
    h.until("a first certificate", Duration::from_secs(5), |h| {
        h.cert().is_some() && h.bundle_version() > 0
    })
    .await;
    let old_root = ca.trust_bundle().await.unwrap().roots()[0].clone();
    let old = serial(&old_root);
    assert_eq!(h.roots(), std::slice::from_ref(&old));
    assert_eq!(h.phase(), Phase::None);
    // A proxy subscribed to the bundle, which has ACKed the current one.
    h.manager.bundle_subscription(7, true);
    h.manager.bundle_acked(7, h.bundle_version());

    // 1. The new root is announced next to the old; certificates still come from the old.
    let new = h.manager.begin_root_rotation().unwrap();
    assert_ne!(new, old);
    let new_root = sds_backends::RootControl::next_root(&*ca).unwrap();
    assert_eq!(serial(&new_root), new);
    let again = h.manager.begin_root_rotation().unwrap_err();
    assert!(again.contains("in progress"), "{again}");
    h.until("the new root announced", Duration::from_secs(5), |h| {
        h.roots() == [old.clone(), new.clone()]
    })
    .await;
    assert_eq!(h.phase(), Phase::Announced);
    let announced = h.bundle_version();
    let first = h.cert().unwrap();
    // The proxy has not ACKed the bundle with the new root: nothing moves, short of the
    // overlap.
    tokio::time::sleep(OVERLAP / 2).await;
    assert_eq!(h.phase(), Phase::Announced);
    let waiting = h.manager.trust_status().rotation.waiting_for.unwrap();
    assert!(waiting.contains("1 of 1 proxies to ACK"), "{waiting}");
    assert_eq!(h.cert().unwrap().leaf.serial, first.leaf.serial);
    assert_eq!(h.metric("sds_agent_root_rotation_phase "), Some(1.0));

    // 2. It ACKs: the CA signs under the new root and the certificate is renewed under it;
    // 3. nothing chains to the old root, which stays for the overlap;
    let roots = [(old.clone(), old_root.clone()), (new.clone(), new_root)];
    assert_eq!(h.cert_root(&roots), Some(old.clone()));
    h.manager.bundle_acked(7, announced);
    h.until(
        "a certificate under the new root",
        Duration::from_secs(10),
        |h| h.cert_root(&roots).as_deref() == Some(new.as_str()),
    )
    .await;
    h.until("phase 3", Duration::from_secs(5), |h| {
        h.phase() == Phase::Retiring
    })
    .await;
    assert_eq!(
        h.roots(),
        [new.clone(), old.clone()],
        "the old root is still served"
    );
    // 4. After the overlap it is removed.
    h.until("phase 4", OVERLAP + Duration::from_secs(5), |h| {
        h.phase() == Phase::Removed
    })
    .await;
    assert_eq!(h.roots(), std::slice::from_ref(&new));
    assert_eq!(
        history(&h),
        [
            Phase::Announced,
            Phase::Issuing,
            Phase::Retiring,
            Phase::Removed
        ]
    );
    assert_eq!(h.metric("sds_agent_root_rotation_phase "), Some(4.0));
    for phase in ["announced", "issuing", "retiring", "removed"] {
        assert_eq!(
            h.metric(&format!(
                "sds_agent_root_rotation_transitions_total{{phase=\"{phase}\"}}"
            )),
            Some(1.0),
            "{phase}"
        );
    }
    assert_eq!(h.metric("sds_agent_trust_bundle_roots "), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_proxy_that_never_acks_delays_the_new_root_only_for_the_overlap() {
    let ca = Arc::new(RotatingCa::new(
        EmbeddedCa::generate(&td()).unwrap().local_requests_only(),
        NextSource::Generate(td()),
    ));
    let h = Harness::start(ca.clone());
    h.until("a first certificate", Duration::from_secs(5), |h| {
        h.cert().is_some()
    })
    .await;
    h.manager.bundle_subscription(1, true);
    h.manager.bundle_acked(1, h.bundle_version());
    h.manager.bundle_subscription(2, true); // never ACKs anything
    h.manager.begin_root_rotation().unwrap();
    let started = tokio::time::Instant::now();
    h.until("phase 2", OVERLAP * 2, |h| h.phase() >= Phase::Issuing)
        .await;
    assert!(started.elapsed() >= OVERLAP, "{:?}", started.elapsed());
    // A proxy that goes away stops counting.
    h.manager.bundle_subscription(2, false);
    assert_eq!(h.manager.trust_status().proxies_subscribed, 1);
}

/// A CA that announces its own roots, as istiod does during its root rotation: steps 1 to 3
/// move it from root A to root B.
struct AnnouncingCa {
    a: EmbeddedCa,
    b: EmbeddedCa,
    /// 0: A only; 1: A and B announced, B signs; 2: B only.
    step: AtomicU8,
}

#[async_trait::async_trait]
impl CertificateAuthority for AnnouncingCa {
    fn name(&self) -> &'static str {
        "announcing"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let signer = if self.step.load(Ordering::SeqCst) == 0 {
            &self.a
        } else {
            &self.b
        };
        let mut chain = signer.sign(req).await?;
        chain.roots_hint = self.trust_bundle().await?.roots().to_vec();
        Ok(chain)
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        let root = |ca: &EmbeddedCa| {
            futures::executor::block_on(ca.trust_bundle())
                .unwrap()
                .roots()[0]
                .clone()
        };
        let roots = match self.step.load(Ordering::SeqCst) {
            0 => vec![root(&self.a)],
            1 => vec![root(&self.a), root(&self.b)],
            _ => vec![root(&self.b)],
        };
        Ok(TrustBundle::new(roots).unwrap())
    }
}

#[tokio::test(start_paused = true)]
async fn a_certificate_of_a_new_root_is_held_back_until_every_proxy_trusts_the_root() {
    let ca = Arc::new(AnnouncingCa {
        a: EmbeddedCa::generate(&td()).unwrap(),
        b: EmbeddedCa::generate(&td()).unwrap(),
        step: AtomicU8::new(0),
    });
    let h = Harness::start(ca.clone());
    h.until("a first certificate", Duration::from_secs(5), |h| {
        h.cert().is_some()
    })
    .await;
    let refused = h.manager.begin_root_rotation().unwrap_err();
    assert!(refused.contains("announces its own roots"), "{refused}");
    h.manager.bundle_subscription(3, true);
    h.manager.bundle_acked(3, h.bundle_version());
    let first = h.cert().unwrap();

    // The CA announces B and signs under it at once.
    ca.step.store(1, Ordering::SeqCst);
    h.manager.rotate_now();
    h.until("B announced", Duration::from_secs(5), |h| {
        h.roots().len() == 2
    })
    .await;
    assert_eq!(h.phase(), Phase::Announced);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        h.cert().unwrap().leaf.serial,
        first.leaf.serial,
        "a certificate of B must not be served before the proxy trusts B"
    );
    // The proxy ACKs: the held certificate is served.
    h.manager.bundle_acked(3, h.bundle_version());
    h.until("the held certificate", Duration::from_secs(5), |h| {
        h.cert().unwrap().leaf.serial != first.leaf.serial
    })
    .await;
    h.until("phase 3", Duration::from_secs(60), |h| {
        h.phase() == Phase::Retiring
    })
    .await;
    // After the overlap the old root stays while the CA still announces it ...
    tokio::time::sleep(OVERLAP + Duration::from_secs(1)).await;
    assert_eq!(h.phase(), Phase::Retiring);
    let waiting = h.manager.trust_status().rotation.waiting_for.unwrap();
    assert!(waiting.contains("stop announcing"), "{waiting}");
    // ... and leaves once it stops.
    ca.step.store(2, Ordering::SeqCst);
    h.until("phase 4", policy().bundle_refresh * 2, |h| {
        h.phase() == Phase::Removed
    })
    .await;
    assert_eq!(h.roots().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_held_certificate_is_served_before_the_current_one_expires_even_without_acks() {
    let ca = Arc::new(AnnouncingCa {
        a: EmbeddedCa::generate(&td()).unwrap(),
        b: EmbeddedCa::generate(&td()).unwrap(),
        step: AtomicU8::new(0),
    });
    // An overlap far longer than the certificates: the ACK never comes in time.
    let policy = Policy {
        root_overlap: Duration::from_secs(100 * 3600),
        ..policy()
    };
    let h = Harness::start_with(ca.clone(), policy);
    h.until("a first certificate", Duration::from_secs(5), |h| {
        h.cert().is_some()
    })
    .await;
    h.manager.bundle_subscription(3, true); // never ACKs
    let first = h.cert().unwrap();
    let issued = tokio::time::Instant::now();
    ca.step.store(1, Ordering::SeqCst);
    h.manager.rotate_now();
    h.until("B announced", Duration::from_secs(5), |h| {
        h.roots().len() == 2
    })
    .await;
    // Held ... until a tenth of the lifetime (the hold margin) before the first one expires.
    h.until("the held certificate", Duration::from_secs(3600), |h| {
        h.cert().unwrap().leaf.serial != first.leaf.serial
    })
    .await;
    let left = Duration::from_secs(3600).saturating_sub(issued.elapsed());
    assert!(
        left <= Duration::from_secs(361) && left >= Duration::from_secs(350),
        "published with {left:?} left on the old certificate"
    );
    assert_eq!(
        h.phase(),
        Phase::Announced,
        "phase 1 still waits for the ACK"
    );
}
