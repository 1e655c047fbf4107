//! The cert-manager backend in node mode against the fake Kubernetes API of
//! `integration/src/kube_api.rs`: one agent signs for pods of several namespaces, and each
//! pod's CertificateRequest is created, watched, read, deleted and swept in that pod's own
//! namespace (the `ns/<namespace>` of its SPIFFE ID).
//!
//! The backend is built from its settings the way `sds-agent run --mode node` builds it
//! (`ResolveContext` and `BuildContext` in node mode), with the agent's own namespace as
//! `--namespace`, which node mode must not use. Pod mode is `cert_manager.rs`'s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use sds_backends::cert_manager::settings::CertManagerArgs;
use sds_backends::cert_manager::{IDENTITY_LABEL, identity_hash};
use sds_backends::settings::{Backend, BuildContext, ResolveContext};
use sds_backends::{CaError, CertificateAuthority, SpiffeId, TrustBundle, TrustDomain};
use sds_integration::bench::sign_request;
use sds_integration::kube_api::{ISSUER, KubeApi, NAMESPACE, TOKEN};
use sds_integration::test_dir;
use serde_json::{Value, json};

const TD: &str = "cluster.local";
/// The agent's own namespace: `--namespace` of the DaemonSet, never a request's.
const AGENT_NS: &str = "sds-agent";
const WEB: &str = "web";
const PAYMENTS: &str = "payments";

fn id(ns: &str, sa: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}").parse().unwrap()
}

/// The fake API server with the pods' namespaces (and the agent's), and the backend as
/// node mode builds it: a ClusterIssuer, a kubeconfig for the agent's account.
struct Setup {
    api: KubeApi,
    ca: Arc<dyn CertificateAuthority>,
    _dir: tempfile::TempDir,
}

async fn setup(keep_requests: bool) -> Setup {
    let dir = test_dir().unwrap();
    let api = KubeApi::start().await.unwrap();
    for ns in [WEB, PAYMENTS, AGENT_NS] {
        api.add_namespace(ns);
    }
    let args = CertManagerArgs {
        cert_manager_issuer_name: Some(ISSUER.into()),
        cert_manager_issuer_kind: Some("ClusterIssuer".into()),
        cert_manager_timeout: Some("5s".into()),
        cert_manager_keep_requests: Some(keep_requests),
        kubeconfig: Some(api.write_kubeconfig(dir.path(), TOKEN).unwrap()),
        ..Default::default()
    };
    let ctx = ResolveContext {
        namespace: AGENT_NS,
        node_mode: true,
        std_env: &|_| None,
    };
    let settings = args.resolve(&CertManagerArgs::default(), &ctx).unwrap();
    let td: TrustDomain = TD.parse().unwrap();
    let ca = settings
        .build(&BuildContext {
            trust_domain: &td,
            node_mode: true,
        })
        .unwrap();
    Setup { api, ca, _dir: dir }
}

/// One signature for `identity` with a fresh key.
async fn sign(ca: &dyn CertificateAuthority, identity: &SpiffeId) -> Result<Vec<u8>, CaError> {
    let chain = ca.sign(&sign_request(identity).unwrap()).await?;
    let bundle = ca.trust_bundle().await?;
    verify(&bundle, &chain.leaf, &chain.intermediates, identity);
    Ok(chain.leaf.to_vec())
}

/// `leaf` chains to `bundle` now and carries exactly `identity`, as the secret manager
/// requires.
fn verify(
    bundle: &TrustBundle,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    identity: &SpiffeId,
) {
    let anchors: Vec<_> = bundle
        .roots()
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    webpki::EndEntityCert::try_from(leaf)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [identity.to_string()]);
}

/// The namespace of every call to the fake, in order, with its method (`WATCH` for a
/// watch, `LIST` for a list).
fn calls_by_namespace(api: &KubeApi) -> Vec<(String, String)> {
    api.calls()
        .iter()
        .map(|c| {
            let ns = c
                .uri
                .split("/namespaces/")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or("?")
                .to_owned();
            let what = match c.method.as_str() {
                "GET" if c.uri.contains("watch=true") => "WATCH",
                "GET" if c.uri.contains("labelSelector=") => "LIST",
                m => m,
            };
            (ns, what.to_owned())
        })
        .collect()
}

fn stored_in(api: &KubeApi, ns: &str) -> Vec<Value> {
    api.requests()
        .into_iter()
        .filter(|r| r["metadata"]["namespace"] == ns)
        .collect()
}

#[tokio::test]
async fn each_pods_request_is_created_watched_and_deleted_in_its_own_namespace() {
    let s = setup(false).await;
    let frontend = id(WEB, "frontend");
    let checkout = id(PAYMENTS, "checkout");

    sign(s.ca.as_ref(), &frontend).await.unwrap();
    let web_calls = calls_by_namespace(&s.api);
    sign(s.ca.as_ref(), &checkout).await.unwrap();
    let all = calls_by_namespace(&s.api);
    let payments_calls = &all[web_calls.len()..];

    // Each signature: the leftovers of its identity looked for (a list), then create,
    // watch and delete, all in the pod's namespace; nothing in the agent's own.
    let steps = |ns: &str| -> Vec<(String, String)> {
        ["LIST", "POST", "WATCH", "DELETE"]
            .iter()
            .map(|m| (ns.to_owned(), (*m).to_owned()))
            .collect()
    };
    assert_eq!(web_calls, steps(WEB), "{:#?}", s.api.calls());
    assert_eq!(payments_calls, steps(PAYMENTS), "{:#?}", s.api.calls());
    assert_eq!(s.api.created(), 2);
    assert!(s.api.requests().is_empty(), "deleted once read");
}

#[tokio::test]
async fn the_requests_kept_are_in_each_pods_namespace_with_its_identity() {
    let s = setup(true).await;
    let frontend = id(WEB, "frontend");
    let checkout = id(PAYMENTS, "checkout");
    sign(s.ca.as_ref(), &frontend).await.unwrap();
    sign(s.ca.as_ref(), &checkout).await.unwrap();

    for (ns, identity, prefix) in [
        (WEB, &frontend, "sds-agent-frontend-"),
        (PAYMENTS, &checkout, "sds-agent-checkout-"),
    ] {
        let kept = stored_in(&s.api, ns);
        assert_eq!(kept.len(), 1, "{ns}: {kept:#?}");
        let meta = &kept[0]["metadata"];
        assert!(meta["name"].as_str().unwrap().starts_with(prefix), "{meta}");
        assert_eq!(
            meta["annotations"]["sds-agent.io/spiffe-id"],
            identity.to_string()
        );
        assert_eq!(meta["labels"][IDENTITY_LABEL], identity_hash(identity));
        assert!(
            meta.get("ownerReferences").is_none(),
            "no owner across namespaces: {meta}"
        );
        assert!(
            meta["labels"].get("sds-agent.io/pod-uid").is_none(),
            "{meta}"
        );
        assert_eq!(
            kept[0]["spec"]["issuerRef"],
            json!({"name": ISSUER, "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
    }
    for ns in [AGENT_NS, NAMESPACE, "default"] {
        assert!(stored_in(&s.api, ns).is_empty(), "{ns}");
    }

    // The next certificate of web's pod replaces the one kept in web, and leaves payments'
    // alone.
    let first_web = stored_in(&s.api, WEB)[0]["metadata"]["name"].clone();
    let first_payments = stored_in(&s.api, PAYMENTS)[0]["metadata"]["name"].clone();
    sign(s.ca.as_ref(), &frontend).await.unwrap();
    let web = stored_in(&s.api, WEB);
    assert_eq!(web.len(), 1, "{web:#?}");
    assert_ne!(web[0]["metadata"]["name"], first_web);
    assert_eq!(
        stored_in(&s.api, PAYMENTS)[0]["metadata"]["name"],
        first_payments
    );
}

#[tokio::test]
async fn a_namespace_the_agent_may_not_use_fails_alone_and_names_itself() {
    let s = setup(false).await;
    // RoleBindings in web only: no ClusterRole.
    s.api.set_granted_in(Some(&[WEB]));
    let checkout = id(PAYMENTS, "checkout");
    let err = sign(s.ca.as_ref(), &checkout).await.unwrap_err();
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("403 Forbidden"), "{text}");
    assert!(
        text.contains("in the namespace \\\"payments\\\""),
        "quotes the API server: {text}"
    );
    assert!(text.contains("certificaterequests in payments"), "{text}");
    assert!(text.contains("(here payments)"), "{text}");
    assert!(text.contains("needs a ClusterRole"), "{text}");
    assert!(!text.contains(" web"), "{text}");

    // The other namespace still works, in the meantime and after.
    let frontend = id(WEB, "frontend");
    sign(s.ca.as_ref(), &frontend).await.unwrap();
    let err = sign(s.ca.as_ref(), &checkout).await.unwrap_err();
    assert!(err.to_string().contains("payments"), "{err}");
    sign(s.ca.as_ref(), &frontend).await.unwrap();

    // Granted cluster-wide, payments works too.
    s.api.set_granted_in(None);
    sign(s.ca.as_ref(), &checkout).await.unwrap();
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn a_pods_namespace_that_does_not_exist_fails_alone_and_names_itself() {
    let s = setup(false).await;
    let ghost = id("gone", "ghost");
    let err = sign(s.ca.as_ref(), &ghost).await.unwrap_err();
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("namespaces \\\"gone\\\" not found"), "{text}");
    assert!(text.contains("namespace gone, the pod's"), "{text}");
    assert!(!text.contains("--cert-manager-namespace"), "{text}");

    sign(s.ca.as_ref(), &id(WEB, "frontend")).await.unwrap();
    assert!(s.api.requests().is_empty());
}

#[tokio::test]
async fn leftovers_are_swept_in_each_namespace_when_it_is_first_used() {
    let s = setup(false).await;
    let frontend = id(WEB, "frontend");
    let checkout = id(PAYMENTS, "checkout");
    // What a crashed run of a node agent left: one decided request per pod namespace.
    let leftover = |ns: &str, identity: &SpiffeId| {
        let req = sign_request(identity).unwrap();
        let pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der));
        use base64::Engine as _;
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
            "metadata": {
                "generateName": "sds-agent-leftover-", "namespace": ns,
                "labels": {
                    "app.kubernetes.io/managed-by": "sds-agent",
                    IDENTITY_LABEL: identity_hash(identity),
                },
            },
            "spec": {
                "request": base64::engine::general_purpose::STANDARD.encode(pem),
                "issuerRef": {"name": ISSUER, "kind": "ClusterIssuer", "group": "cert-manager.io"},
            },
        })
    };
    let web_left = s.api.insert(leftover(WEB, &frontend)).unwrap();
    let payments_left = s.api.insert(leftover(PAYMENTS, &checkout)).unwrap();
    // Decided (issued) before the agent starts: no one can be waiting for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s
        .api
        .requests()
        .iter()
        .any(|r| !r["status"]["conditions"].to_string().contains("Issued"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            s.api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let names = |ns: &str| -> Vec<String> {
        stored_in(&s.api, ns)
            .iter()
            .map(|r| r["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };

    assert_eq!(names(WEB), [web_left]);
    assert_eq!(names(PAYMENTS), std::slice::from_ref(&payments_left));

    sign(s.ca.as_ref(), &frontend).await.unwrap();
    assert!(names(WEB).is_empty(), "swept in web: {:?}", names(WEB));
    assert_eq!(names(PAYMENTS), [payments_left], "not used yet");

    sign(s.ca.as_ref(), &checkout).await.unwrap();
    assert!(names(PAYMENTS).is_empty(), "swept in payments");
    // Each list looked in the namespace of the identity being signed.
    let lists: Vec<String> = calls_by_namespace(&s.api)
        .into_iter()
        .filter(|(_, what)| what == "LIST")
        .map(|(ns, _)| ns)
        .collect();
    assert_eq!(lists, [WEB, PAYMENTS]);
}
