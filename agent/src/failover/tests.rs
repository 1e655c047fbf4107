//! The failover through the [`CertificateAuthority`] trait, on scripted backends, in paused
//! tokio time: the threshold, retryable versus not, the order of the list, the probe and
//! the primary's return, the union bundle; and the whole of it under the secret manager.

use std::sync::Arc;
use std::time::Duration;

use sds_backends::testing::{Fault, ScriptedCa};
use sds_backends::{
    CaError, CertificateAuthority, IssuedChain, KeyType, SignRequest, SpiffeId, TrustBundle,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Failover;
use crate::config::RenewAt;
use crate::keys::PrivateKey;
use crate::metrics::{BackendLabel, CaErrorLabels, Metrics};
use crate::secrets::{Policy, SecretManager};

/// A scripted CA under a name of its own, as each listed backend has.
struct Named {
    name: &'static str,
    ca: Arc<ScriptedCa>,
}

#[tonic::async_trait]
impl CertificateAuthority for Named {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.ca.sign(req).await
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        self.ca.trust_bundle().await
    }

    fn roots_come_with_certificates(&self) -> bool {
        self.ca.roots_come_with_certificates()
    }
}

fn policy(ttl: Duration) -> Policy {
    Policy {
        ttl,
        renew_at: RenewAt::default(),
        key_type: KeyType::EcdsaP256,
        ca_timeout: Duration::from_secs(15),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        bundle_refresh: Duration::from_secs(300),
        ca_concurrency: 8,
        idle_timeout: Duration::from_secs(3600),
        root_overlap: ttl,
    }
}

fn id() -> SpiffeId {
    "spiffe://example.org/ns/default/sa/web".parse().unwrap()
}

fn request(ttl: Duration) -> SignRequest {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    SignRequest {
        identity: id(),
        csr_der: key.csr(&id()).unwrap(),
        ttl,
        key_type: KeyType::EcdsaP256,
    }
}

fn down() -> CaError {
    CaError::Unavailable("connection refused".into())
}

fn failover(
    list: &[(&'static str, &Arc<ScriptedCa>)],
    after: Option<Duration>,
    ttl: Duration,
) -> Arc<Failover> {
    let backends: Vec<Arc<dyn CertificateAuthority>> = list
        .iter()
        .map(|(name, ca)| {
            Arc::new(Named {
                name,
                ca: Arc::clone(ca),
            }) as Arc<dyn CertificateAuthority>
        })
        .collect();
    let timeouts = vec![Duration::from_secs(5); backends.len()];
    Failover::new(
        backends,
        timeouts,
        after,
        policy(ttl),
        Arc::new(Metrics::new()),
    )
}

fn signed(f: &Failover, backend: &'static str) -> u64 {
    f.metrics()
        .ca_certificates_signed
        .get_or_create(&BackendLabel { backend })
        .get()
}

fn probe_failures(f: &Failover, backend: &'static str) -> u64 {
    f.metrics()
        .ca_probe_failures
        .get_or_create(&BackendLabel { backend })
        .get()
}

/// Whether `chain` was signed under one of `ca`'s roots.
fn issued_by(chain: &IssuedChain, ca: &ScriptedCa) -> bool {
    let roots = futures::executor::block_on(ca.trust_bundle()).unwrap();
    chain.roots_hint.iter().all(|r| roots.roots().contains(r))
}

#[tokio::test(start_paused = true)]
async fn the_fallback_signs_only_once_the_primary_failed_for_the_threshold() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(400);
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    let req = request(ttl);
    vault.set_outage(Some(down()));

    // No certificate yet: the threshold is a quarter of the asked TTL, 100 s.
    assert!(matches!(f.sign(&req).await, Err(CaError::Unavailable(_))));
    tokio::time::advance(Duration::from_secs(99)).await;
    assert!(matches!(f.sign(&req).await, Err(CaError::Unavailable(_))));
    assert_eq!(embedded.sign_calls(), 0, "asked before the threshold");
    assert_eq!(f.name(), "vault", "the error was vault's");
    assert!(!f.is_down("vault"));

    tokio::time::advance(Duration::from_secs(2)).await;
    let chain = f.sign(&req).await.expect("the fallback signs");
    assert!(issued_by(&chain, &embedded));
    assert_eq!(f.name(), "embedded");
    assert_eq!(f.active(), "embedded");
    assert!(f.is_down("vault"));
    assert_eq!((signed(&f, "vault"), signed(&f, "embedded")), (0, 1));
    // The manager never saw the vault error of this call: it is counted here.
    let swallowed = f
        .metrics()
        .ca_errors
        .get_or_create(&CaErrorLabels {
            backend: "vault",
            kind: "unavailable",
            retryable: "true",
        })
        .get();
    assert_eq!(swallowed, 1);

    // While down, the primary is not asked to sign: each renewal goes straight on.
    let asked = vault.sign_calls();
    f.sign(&req).await.unwrap();
    assert_eq!(vault.sign_calls(), asked);
    assert_eq!(embedded.sign_calls(), 2);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(f.on_fallback_for(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn the_threshold_follows_the_certificate_lifetime_or_the_flag() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    // The CA gives 40 s whatever is asked: the threshold is then 10 s, not 100 s.
    vault.set_lifetime(Some(Duration::from_secs(40)));
    let f = failover(
        &[("vault", &vault), ("embedded", &embedded)],
        None,
        Duration::from_secs(400),
    );
    let req = request(Duration::from_secs(400));
    f.sign(&req).await.unwrap();
    vault.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(f.sign(&req).await.is_ok());
    assert_eq!(f.active(), "embedded");

    // --ca-failover-after wins over the lifetime.
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let f = failover(
        &[("vault", &vault), ("embedded", &embedded)],
        Some(Duration::from_secs(3)),
        Duration::from_secs(400),
    );
    vault.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(f.sign(&req).await.is_ok());
    assert_eq!(embedded.sign_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_never_fails_over() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(400);
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    let req = request(ttl);
    vault.deny(id());
    for _ in 0..5 {
        assert!(matches!(f.sign(&req).await, Err(CaError::Denied(_))));
        tokio::time::advance(Duration::from_secs(100)).await;
    }
    assert_eq!(embedded.sign_calls(), 0);
    assert_eq!(
        f.name(),
        "vault",
        "the manager counts the error under vault"
    );
    assert!(!f.is_down("vault"));

    // Failing retryably past the threshold, then refusing: the refusal ends the failover's
    // clock (the CA answers), so it is not failed over either.
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    vault.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(50)).await;
    vault.set_outage(None);
    vault.deny(id());
    assert!(matches!(f.sign(&req).await, Err(CaError::Denied(_))));
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(matches!(f.sign(&req).await, Err(CaError::Denied(_))));
    assert_eq!(embedded.sign_calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_later_backend_signs_only_when_every_one_before_it_is_down() {
    let (a, b, c) = (ScriptedCa::new(), ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(400);
    let f = failover(
        &[("vault", &a), ("istiod", &b), ("embedded", &c)],
        None,
        ttl,
    );
    let req = request(ttl);
    a.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(100)).await;
    // The first is down: the second signs, the third is not asked.
    let chain = f.sign(&req).await.unwrap();
    assert!(issued_by(&chain, &b));
    assert_eq!((b.sign_calls(), c.sign_calls()), (1, 0));

    // The second fails too: its own clock starts now, so the third waits for it.
    b.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(99)).await;
    assert!(f.sign(&req).await.is_err());
    assert_eq!(c.sign_calls(), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    let chain = f.sign(&req).await.unwrap();
    assert!(issued_by(&chain, &c));
    assert_eq!(f.active(), "embedded");
    assert!(f.is_down("vault") && f.is_down("istiod"));
}

#[tokio::test(start_paused = true)]
async fn the_primary_is_probed_with_backoff_and_signs_again_at_the_next_renewal() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(400);
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    let shutdown = CancellationToken::new();
    tokio::spawn(f.clone().run(shutdown.clone()));
    let req = request(ttl);
    vault.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(100)).await;
    f.sign(&req).await.unwrap();
    assert_eq!(f.active(), "embedded");

    // A minute of outage: probes back off (1, 2, 4, 8, 16 s... with jitter), so a handful,
    // not sixty; and the primary is never asked to sign meanwhile.
    let asked = vault.sign_calls();
    let bundle_reads = vault.bundle_calls();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let failures = probe_failures(&f, "vault");
    assert!((4..=9).contains(&failures), "{failures} probes in 60 s");
    assert_eq!(vault.bundle_calls() - bundle_reads, failures as usize);
    assert_eq!(vault.sign_calls(), asked);
    assert!(f.is_down("vault"));

    // It answers again: the next probe (capped at an eighth of the lifetime, 50 s) finds it.
    vault.set_outage(None);
    let back = Instant::now();
    while f.is_down("vault") {
        assert!(
            back.elapsed() <= Duration::from_secs(60),
            "no probe in time"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The certificate in service is not replaced early: the fallback stays active until
    // the next renewal, which the primary signs.
    assert_eq!(f.active(), "embedded");
    let chain = f.sign(&req).await.unwrap();
    assert!(issued_by(&chain, &vault));
    assert_eq!(f.active(), "vault");
    assert_eq!(f.on_fallback_for(), Duration::ZERO);
    assert_eq!(f.metrics().ca_fallback_seconds.get(), 0.0);

    // A probe that succeeds while signing still fails (a pinned bundle answers the root call
    // without the CA): the renewal that tries the primary fails over at once, with no
    // second threshold to wait out.
    vault.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(100)).await;
    f.sign(&req).await.unwrap();
    assert_eq!(f.active(), "embedded");
    vault.set_outage(None);
    let back = Instant::now();
    while f.is_down("vault") {
        assert!(
            back.elapsed() <= Duration::from_secs(60),
            "no probe in time"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    vault.push_fault(Fault::Fail(down()));
    let signed_before = embedded.sign_calls();
    let chain = f.sign(&req).await.expect("failed over in the same call");
    assert!(issued_by(&chain, &embedded));
    assert_eq!(embedded.sign_calls(), signed_before + 1);
    assert!(f.is_down("vault"));
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_primary_whose_roots_come_with_certificates_is_probed_by_signing() {
    let (istiod, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    istiod.set_bundle_needs_a_certificate(true);
    let ttl = Duration::from_secs(400);
    let f = failover(&[("istiod", &istiod), ("embedded", &embedded)], None, ttl);
    let shutdown = CancellationToken::new();
    tokio::spawn(f.clone().run(shutdown.clone()));
    let req = request(ttl);
    let first = f.sign(&req).await.unwrap();
    istiod.set_outage(Some(down()));
    assert!(f.sign(&req).await.is_err());
    tokio::time::advance(Duration::from_secs(100)).await;
    f.sign(&req).await.unwrap();
    assert_eq!(f.active(), "embedded");
    let reads = istiod.bundle_calls();
    let asked = istiod.sign_calls();
    // Within its probe delay the renewal goes straight to the fallback.
    f.sign(&req).await.unwrap();
    assert_eq!(istiod.sign_calls(), asked);
    // Later renewals try it first (the probe); failing, they still get the fallback's.
    tokio::time::sleep(Duration::from_secs(5)).await;
    f.sign(&req).await.unwrap();
    assert_eq!(istiod.sign_calls(), asked + 1);
    assert_eq!(probe_failures(&f, "istiod"), 1);
    assert_eq!(f.active(), "embedded");
    assert_eq!(istiod.bundle_calls(), reads, "no root call to probe with");

    // The union kept istiod's roots, learnt from its first certificate, through it all.
    let union = f.trust_bundle().await.unwrap();
    assert!(first.roots_hint.iter().all(|r| union.roots().contains(r)));

    istiod.set_outage(None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let chain = f.sign(&req).await.unwrap();
    assert!(issued_by(&chain, &istiod));
    assert_eq!(f.active(), "istiod");
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_bundle_is_the_union_and_keeps_a_silent_backends_roots() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(400);
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    let own = |ca: &ScriptedCa| {
        futures::executor::block_on(ca.trust_bundle())
            .unwrap()
            .roots()
            .to_vec()
    };
    let expected: Vec<_> = own(&vault).into_iter().chain(own(&embedded)).collect();
    assert_eq!(f.trust_bundle().await.unwrap().roots(), expected);

    // The primary cannot be read: its last roots stay, so its certificates still verify.
    vault.set_outage(Some(down()));
    assert_eq!(f.trust_bundle().await.unwrap().roots(), expected);

    // A backend never read contributes nothing until it answers; the others still do.
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    vault.set_outage(Some(down()));
    assert_eq!(f.trust_bundle().await.unwrap().roots(), own(&embedded));
    // Every backend silent from the start: the error, not an empty bundle.
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    vault.set_outage(Some(down()));
    embedded.set_outage(Some(down()));
    let f = failover(&[("vault", &vault), ("embedded", &embedded)], None, ttl);
    assert!(matches!(
        f.trust_bundle().await,
        Err(CaError::Unavailable(_))
    ));
}

#[test]
fn fingerprints_are_sha256_of_the_der() {
    let ca = ScriptedCa::new();
    let bundle = futures::executor::block_on(ca.trust_bundle()).unwrap();
    let (subject, sha256) = super::describe(&bundle.roots()[0]);
    assert!(subject.contains("example.org"), "{subject}");
    assert_eq!(sha256.len(), 32 * 3 - 1);
    assert!(sha256.split(':').all(|b| {
        b.len() == 2
            && b.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
    }));
    let (_, again) = super::describe(&bundle.roots()[0]);
    assert_eq!(sha256, again);
}

/// The whole path: the secret manager renews through the failover; the primary goes down
/// at a renewal, the fallback's certificate is served before the primary's expires, and the
/// primary signs again at the renewal after it answers.
#[tokio::test(start_paused = true)]
async fn under_the_manager_the_fallback_covers_an_outage_and_the_primary_returns() {
    let (vault, embedded) = (ScriptedCa::new(), ScriptedCa::new());
    let ttl = Duration::from_secs(100);
    let metrics = Arc::new(Metrics::new());
    let backends: Vec<Arc<dyn CertificateAuthority>> = vec![
        Arc::new(Named {
            name: "vault",
            ca: vault.clone(),
        }),
        Arc::new(Named {
            name: "embedded",
            ca: embedded.clone(),
        }),
    ];
    let f = Failover::new(
        backends,
        vec![Duration::from_secs(5); 2],
        None,
        policy(ttl),
        metrics.clone(),
    );
    let manager = SecretManager::new(id(), policy(ttl), f.clone(), metrics.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(manager.clone().run(shutdown.clone()));
    tokio::spawn(f.clone().run(shutdown.clone()));
    let mut rx = manager.subscribe_cert(&id());
    let limit = Duration::from_secs(300);
    let first = tokio::time::timeout(limit, rx.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(first.backend, "vault");

    vault.set_outage(Some(down()));
    let started = Instant::now();
    // Every certificate published until the fallback's: never none (expired).
    let fallback = loop {
        tokio::time::timeout(limit, rx.changed())
            .await
            .unwrap()
            .unwrap();
        let cert = rx.borrow_and_update().clone();
        let cert = cert.expect("a certificate expired before the fallback signed");
        if cert.backend == "embedded" {
            break cert;
        }
    };
    // Renewal at ~50 s, then 25 s (a quarter of the lifetime) of failures.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(100),
        "{took:?}"
    );
    assert!(!manager.health().expired);
    assert_eq!(
        metrics
            .ca_active_backend
            .get_or_create(&BackendLabel {
                backend: "embedded"
            })
            .get(),
        1
    );
    // Chains to the served bundle: the manager validated it against the union.
    let bundle = manager.subscribe_bundle().borrow().clone().unwrap();
    assert!(bundle.pem.matches("BEGIN CERTIFICATE").count() == 2);

    vault.set_outage(None);
    let back = loop {
        tokio::time::timeout(limit, rx.changed())
            .await
            .unwrap()
            .unwrap();
        let cert = rx.borrow_and_update().clone().expect("served throughout");
        if cert.backend == "vault" {
            break cert;
        }
    };
    assert!(back.version > fallback.version);
    assert_eq!(metrics.ca_fallback_seconds.get(), 0.0);
    assert!(
        metrics
            .ca_certificates_signed
            .get_or_create(&BackendLabel {
                backend: "embedded"
            })
            .get()
            >= 1
    );
    assert!(!manager.health().expired);
    shutdown.cancel();
}
