//! The cert-manager backend (`sds_backends::cert_manager`) against the fake Kubernetes API
//! of `integration/src/kube_api.rs`, over HTTPS with a kubeconfig, as the agent uses it:
//! what the request looks like, each of cert-manager's verdicts, the API server down and its
//! watch cut, RBAC and CRD errors, and what is left behind.
//!
//! The agent end to end (Envoy, rotation under traffic, metrics) is in `cert_manager_e2e.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use sds_backends::cert_manager::{
    CertManagerCa, CertManagerConfig, Credentials, IDENTITY_LABEL, IssuerRef, PodRef, identity_hash,
};
use sds_backends::{CaError, CertificateAuthority, SpiffeId, TrustBundle};
use sds_integration::bench::sign_request;
use sds_integration::kube_api::{Approval, ISSUER, Issuance, KubeApi, NAMESPACE, TOKEN, USER};
use sds_integration::test_dir;
use serde_json::json;

const ID: &str = "spiffe://example.org/ns/mesh/sa/web";
const POD_UID: &str = "0d3c2b1a-1111-4222-8333-444455556666";

fn identity() -> SpiffeId {
    ID.parse().unwrap()
}

fn issuer() -> IssuerRef {
    IssuerRef {
        name: ISSUER.into(),
        kind: "Issuer".into(),
        group: "cert-manager.io".into(),
    }
}

struct Setup {
    api: KubeApi,
    _dir: tempfile::TempDir,
    config: CertManagerConfig,
}

async fn setup() -> Setup {
    let dir = test_dir().unwrap();
    let api = KubeApi::start().await.unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), TOKEN).unwrap();
    let mut config = CertManagerConfig::new(NAMESPACE, issuer());
    config.credentials = Credentials::Kubeconfig(kubeconfig);
    config.pod = Some(PodRef {
        name: "web-7d9f8-abcde".into(),
        uid: POD_UID.into(),
    });
    config.timeout = Duration::from_secs(5);
    Setup {
        api,
        _dir: dir,
        config,
    }
}

/// One signature for [`ID`] with a fresh key, which must fail.
async fn fail(ca: &CertManagerCa) -> CaError {
    ca.sign(&sign_request(&identity()).unwrap())
        .await
        .unwrap_err()
}

/// One signature for [`ID`] with a fresh key, which must succeed.
async fn issue(ca: &CertManagerCa) -> sds_backends::IssuedChain {
    ca.sign(&sign_request(&identity()).unwrap()).await.unwrap()
}

/// Verifies `leaf` (with `intermediates`) to `bundle` now, as the secret manager does.
fn verifies(bundle: &TrustBundle, leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) {
    let anchors: Vec<_> = bundle
        .roots()
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let cert = webpki::EndEntityCert::try_from(leaf).unwrap();
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();
}

#[tokio::test]
async fn a_request_is_created_watched_read_and_deleted() {
    let s = setup().await;
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    let mut req = sign_request(&identity()).unwrap();
    req.ttl = Duration::from_secs(3600);

    let chain = ca.sign(&req).await.unwrap();
    let bundle = ca.trust_bundle().await.unwrap();
    verifies(&bundle, &chain.leaf, &chain.intermediates);
    assert_eq!(
        chain.intermediates.len(),
        1,
        "the issuing intermediate follows the leaf"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain.leaf).unwrap();
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3500..=3700).contains(&lifetime),
        "duration honoured: {lifetime} s"
    );

    // What was created, as the API server stored it (the DELETED event's object).
    let calls = s.api.calls();
    let methods: Vec<(&str, bool)> = calls
        .iter()
        .map(|c| (c.method.as_str(), c.uri.contains("watch=true")))
        .collect();
    // The first call of a run looks for leftovers (a list), then create, watch, delete; no
    // polling.
    assert_eq!(
        methods,
        [
            ("GET", false),
            ("POST", false),
            ("GET", true),
            ("DELETE", false)
        ],
        "{calls:#?}"
    );
    assert!(calls[0].uri.contains("labelSelector="), "{:?}", calls[0]);
    assert!(s.api.requests().is_empty(), "deleted once read");
    assert_eq!(s.api.created(), 1);
}

#[tokio::test]
async fn the_request_carries_the_csr_the_issuer_usages_labels_and_owner() {
    let s = setup().await;
    let mut config = s.config.clone();
    config.keep_requests = true;
    let ca = CertManagerCa::new(config).unwrap();
    let req = sign_request(&identity()).unwrap();
    ca.sign(&req).await.unwrap();

    let kept = s.api.requests();
    assert_eq!(kept.len(), 1, "kept with keep_requests");
    let cr = &kept[0];
    let meta = &cr["metadata"];
    assert!(
        meta["name"].as_str().unwrap().starts_with("sds-agent-web-"),
        "{meta}"
    );
    assert_eq!(meta["namespace"], NAMESPACE);
    assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "sds-agent");
    assert_eq!(meta["labels"][IDENTITY_LABEL], identity_hash(&identity()));
    assert_eq!(meta["labels"]["sds-agent.io/pod-uid"], POD_UID);
    assert_eq!(meta["annotations"]["sds-agent.io/spiffe-id"], ID);
    assert_eq!(
        meta["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "web-7d9f8-abcde", "uid": POD_UID}])
    );
    let spec = &cr["spec"];
    assert_eq!(
        spec["issuerRef"],
        json!({"name": ISSUER, "kind": "Issuer", "group": "cert-manager.io"})
    );
    assert_eq!(spec["duration"], "3600s");
    assert_eq!(spec["isCA"], false);
    assert_eq!(
        spec["usages"],
        json!([
            "digital signature",
            "key encipherment",
            "server auth",
            "client auth"
        ])
    );
    assert_eq!(spec["username"], USER, "the webhook recorded the caller");
    // The CSR is the one given, PEM, with exactly one URI SAN.
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(spec["request"].as_str().unwrap())
        .unwrap();
    let parsed = ::pem::parse(&pem).unwrap();
    assert_eq!(parsed.tag(), "CERTIFICATE REQUEST");
    assert_eq!(parsed.contents(), req.csr_der.as_slice());
    // And its status is cert-manager's, issued.
    let conditions = cr["status"]["conditions"].as_array().unwrap();
    let types: Vec<&str> = conditions
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Approved", "Ready"]);
}

#[tokio::test]
async fn a_denied_request_fails_with_the_approvers_message_and_is_deleted() {
    let s = setup().await;
    s.api.set_approval(Approval::Deny(
        "No policy approved this request: [mesh-workloads: spec.uris.0: Invalid value]".into(),
    ));
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("was denied (policy.cert-manager.io)"),
        "{text}"
    );
    assert!(text.contains("No policy approved this request"), "{text}");
    assert!(text.contains(ID), "names the identity: {text}");
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn a_failed_or_invalid_request_ends_the_attempt_with_cert_managers_message() {
    let s = setup().await;
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    s.api.set_issuance(Issuance::Fail(
        "Failed to sign certificate: the CA key pair is not valid".into(),
    ));
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(
        err.to_string().contains("the CA key pair is not valid"),
        "{err}"
    );
    assert!(err.to_string().contains("(Failed)"), "{err}");

    s.api.set_issuance(Issuance::Invalid(
        "isCA is not allowed for this issuer".into(),
    ));
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(
        err.to_string()
            .contains("is invalid for issuer Issuer/mesh-ca"),
        "{err}"
    );
    assert!(err.to_string().contains("isCA is not allowed"), "{err}");
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn a_request_never_approved_times_out_and_is_deleted() {
    let s = setup().await;
    s.api.set_approval(Approval::Ignore);
    let mut config = s.config.clone();
    config.timeout = Duration::from_secs(2);
    let ca = CertManagerCa::new(config).unwrap();
    let started = tokio::time::Instant::now();
    let err = fail(&ca).await;
    let took = started.elapsed();
    assert!(
        matches!(err, CaError::Timeout(d) if d == Duration::from_secs(2)),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(
        s.api.requests().is_empty(),
        "an abandoned request is not left to be approved later"
    );
    // One watch the whole time, not a poll.
    let gets = s
        .api
        .calls()
        .iter()
        .filter(|c| c.method == "GET" && !c.uri.contains("labelSelector"))
        .count();
    assert_eq!(gets, 1, "{:#?}", s.api.calls());
}

#[tokio::test]
async fn watches_that_end_at_once_are_resumed_at_a_paced_rate() {
    let s = setup().await;
    s.api.set_approval(Approval::Ignore);
    s.api.set_watch_lifetime(Some(Duration::ZERO));
    let mut config = s.config.clone();
    config.timeout = Duration::from_secs(3);
    let ca = CertManagerCa::new(config).unwrap();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Timeout(_)), "{err}");
    // Paced from 100 ms doubling to 2 s: a handful of watches in 3 s, not thousands.
    let watches = s
        .api
        .calls()
        .iter()
        .filter(|c| c.uri.contains("watch=true"))
        .count();
    assert!((3..=10).contains(&watches), "{watches} watches");
}

#[tokio::test]
async fn an_issuer_that_does_not_exist_waits_then_times_out() {
    let s = setup().await;
    let mut config = s.config.clone();
    config.timeout = Duration::from_secs(2);
    config.issuer.name = "no-such-issuer".into();
    let ca = CertManagerCa::new(config).unwrap();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn the_api_server_down_is_retryable_and_the_next_call_after_it_returns_succeeds() {
    let mut s = setup().await;
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    s.api.stop();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Unavailable(_)), "{err}");
    assert!(err.is_retryable());
    s.api.serve().await.unwrap();
    let chain = issue(&ca).await;
    verifies(
        &ca.trust_bundle().await.unwrap(),
        &chain.leaf,
        &chain.intermediates,
    );
}

#[tokio::test]
async fn a_watch_cut_mid_wait_is_resumed_and_the_certificate_still_arrives() {
    let s = setup().await;
    s.api.set_approval(Approval::Ignore);
    let mut config = s.config.clone();
    config.timeout = Duration::from_secs(15);
    let ca = std::sync::Arc::new(CertManagerCa::new(config).unwrap());
    let signing = tokio::spawn({
        let ca = ca.clone();
        async move { ca.sign(&sign_request(&identity()).unwrap()).await }
    });
    let watches = |api: &KubeApi| {
        api.calls()
            .iter()
            .filter(|c| c.uri.contains("watch=true"))
            .count()
    };
    sds_integration::wait_until("the first watch", Duration::from_secs(5), || async {
        watches(&s.api) >= 1
    })
    .await
    .unwrap();
    // Give the stream time to be established before cutting it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.api.cut_connections();
    sds_integration::wait_until("a second watch", Duration::from_secs(5), || async {
        watches(&s.api) >= 2
    })
    .await
    .unwrap();
    s.api.set_approval(Approval::Approve);
    let chain = tokio::time::timeout(Duration::from_secs(15), signing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    verifies(
        &ca.trust_bundle().await.unwrap(),
        &chain.leaf,
        &chain.intermediates,
    );
    assert_eq!(s.api.created(), 1, "the same request, not a new one");
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn rbac_refusals_name_the_missing_verb_and_are_not_retryable() {
    let s = setup().await;
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    s.api.set_allowed("create", false);
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("403 Forbidden"), "{text}");
    assert!(text.contains("verbs [\"create\"]"), "{text}");
    assert!(text.contains(&format!("namespace {NAMESPACE}")), "{text}");
    assert!(text.contains(USER), "quotes the API server: {text}");

    s.api.set_allowed("create", true);
    s.api.set_allowed("watch", false);
    let err = fail(&ca).await;
    assert!(err.to_string().contains("verbs [\"watch\"]"), "{err}");
    // The request it could create but not watch is deleted, not left behind.
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn without_list_leftovers_are_left_to_the_garbage_collector_and_signing_works() {
    let s = setup().await;
    s.api.set_allowed("list", false);
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    issue(&ca).await;
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn a_missing_crd_says_cert_manager_is_not_installed() {
    let s = setup().await;
    s.api.set_crd_installed(false);
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("is cert-manager installed"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_namespace_and_a_rejected_token_are_named() {
    let s = setup().await;
    let mut config = s.config.clone();
    config.namespace = "nowhere".into();
    let err = fail(&CertManagerCa::new(config).unwrap()).await;
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(
        err.to_string().contains("namespace nowhere does not exist"),
        "{err}"
    );

    let dir = test_dir().unwrap();
    let mut config = s.config.clone();
    config.credentials =
        Credentials::Kubeconfig(s.api.write_kubeconfig(dir.path(), "revoked").unwrap());
    let err = fail(&CertManagerCa::new(config).unwrap()).await;
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn a_bad_kubeconfig_stops_the_backend_at_construction() {
    let dir = test_dir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, "clusters: [not: a, kubeconfig").unwrap();
    let mut config = CertManagerConfig::new(NAMESPACE, issuer());
    config.credentials = Credentials::Kubeconfig(path.clone());
    let err = CertManagerCa::new(config).unwrap_err();
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let mut config = CertManagerConfig::new(NAMESPACE, issuer());
    config.credentials = Credentials::Kubeconfig(dir.path().join("missing"));
    assert!(CertManagerCa::new(config).is_err());
}

#[tokio::test]
async fn ten_rotations_leave_no_request_behind_or_only_the_last_one_when_kept() {
    let s = setup().await;
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    for _ in 0..10 {
        issue(&ca).await;
    }
    assert_eq!(s.api.created(), 10);
    assert!(s.api.requests().is_empty(), "{:#?}", s.api.requests());

    let mut config = s.config.clone();
    config.keep_requests = true;
    let ca = CertManagerCa::new(config).unwrap();
    let mut last = String::new();
    for _ in 0..10 {
        issue(&ca).await;
        let kept = s.api.requests();
        assert_eq!(kept.len(), 1, "{kept:#?}");
        let name = kept[0]["metadata"]["name"].as_str().unwrap().to_owned();
        assert_ne!(name, last, "the kept one is the newest");
        last = name;
    }
}

#[tokio::test]
async fn requests_left_by_a_crashed_run_of_this_pod_are_deleted_and_others_kept() {
    let s = setup().await;
    let leftover = |pod_uid: &str, id: &SpiffeId| {
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
            "metadata": {
                "generateName": "sds-agent-web-", "namespace": NAMESPACE,
                "labels": {
                    "app.kubernetes.io/managed-by": "sds-agent",
                    IDENTITY_LABEL: identity_hash(id),
                    "sds-agent.io/pod-uid": pod_uid,
                },
            },
            "spec": {
                "request": base64_csr(id),
                "issuerRef": {"name": ISSUER, "kind": "Issuer", "group": "cert-manager.io"},
            },
        })
    };
    s.api.set_approval(Approval::Ignore);
    let ours_1 = s.api.insert(leftover(POD_UID, &identity())).unwrap();
    let ours_2 = s.api.insert(leftover(POD_UID, &identity())).unwrap();
    let other_pod = s.api.insert(leftover("another-pod", &identity())).unwrap();
    let other_id: SpiffeId = "spiffe://example.org/ns/mesh/sa/db".parse().unwrap();
    let other_identity = s.api.insert(leftover(POD_UID, &other_id)).unwrap();
    s.api.set_approval(Approval::Approve);

    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    issue(&ca).await;
    let left: Vec<String> = s
        .api
        .requests()
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !left.contains(&ours_1) && !left.contains(&ours_2),
        "{left:?}"
    );
    assert!(
        left.contains(&other_pod),
        "another pod's request is not ours: {left:?}"
    );
    assert!(left.contains(&other_identity), "{left:?}");
    assert_eq!(left.len(), 2, "{left:?}");
}

fn base64_csr(id: &SpiffeId) -> String {
    use base64::Engine as _;
    let req = sign_request(id).unwrap();
    let pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der));
    base64::engine::general_purpose::STANDARD.encode(pem)
}

#[tokio::test]
async fn an_issuer_without_status_ca_needs_pinned_roots() {
    let s = setup().await;
    s.api.set_send_ca(false);
    let ca = CertManagerCa::new(s.config.clone()).unwrap();
    let err = fail(&ca).await;
    assert!(matches!(err, CaError::BadResponse(_)), "{err}");
    assert!(
        err.to_string().contains("--cert-manager-trust-bundle"),
        "{err}"
    );

    let root = ::pem::parse(s.api.root_pem()).unwrap();
    let pinned = TrustBundle::new(vec![CertificateDer::from(root.contents().to_vec())]).unwrap();
    let mut config = s.config.clone();
    config.trust_bundle = Some(pinned.clone());
    let ca = CertManagerCa::new(config).unwrap();
    let chain = issue(&ca).await;
    assert_eq!(ca.trust_bundle().await.unwrap(), pinned);
    verifies(&pinned, &chain.leaf, &chain.intermediates);
}
