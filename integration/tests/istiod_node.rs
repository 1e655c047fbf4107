//! The istiod backend in node mode against the test Istio CA's NodeAuthorizer
//! (`integration/src/istio_ca.rs`), which checks what istiod's does.
//!
//! The backend is built from its settings the way the agent builds it, with the agent's
//! mode in `BuildContext`. In node mode it signs with the node agent's own token and names
//! each identity in `ImpersonatedIdentity`; the CA grants that only to a trusted node
//! account, for a service account with a pod on the caller's node. In pod mode no metadata is
//! sent, and the CA signs for the token's own identity as before.
//!
//! Node mode's attestation (which pod is calling) is not exercised here: these tests cover
//! the backend and the CA only, so they need no kubelet, no cgroups and no Envoy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use sds_backends::istiod::settings::IstiodArgs;
use sds_backends::settings::{Backend, BuildContext, ResolveContext};
use sds_backends::{CaError, CertificateAuthority, SpiffeId, TrustDomain};
use sds_integration::bench::sign_request;
use sds_integration::istio_ca::{
    Call, IMPERSONATION_REFUSED, IstioTestCa, SERVER_NAME, token_for, write_token,
};
use sds_integration::mesh::{NAMESPACE, TRUST_DOMAIN};
use sds_integration::test_dir;
use sds_proto::pb::istio_v1_auth::IstioCertificateRequest;
use sds_proto::pb::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;
use sds_proto::prost_types::value::Kind;
use sds_proto::prost_types::{Struct, Value};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The node agent's own namespace and service account, trusted as a node account.
const AGENT_NS: &str = "sds-agent";
const AGENT_SA: &str = "sds-agent";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
        .parse()
        .unwrap()
}

/// The istiod backend for the test CA, with the token in `token_file`, built as the agent
/// builds it in `node_mode` or not.
fn backend(ca: &IstioTestCa, token_file: &Path, node_mode: bool) -> Arc<dyn CertificateAuthority> {
    let args = IstiodArgs {
        ca_addr: Some(ca.addr().to_string()),
        ca_root_cert: Some(ca.tls_root().to_owned()),
        ca_server_name: Some(SERVER_NAME.into()),
        ca_token_file: Some(token_file.to_owned()),
        ..Default::default()
    };
    let ctx = ResolveContext {
        namespace: NAMESPACE,
        node_mode,
        std_env: &|_| None,
    };
    let settings = args.resolve(&IstiodArgs::default(), &ctx).unwrap();
    let td: TrustDomain = TRUST_DOMAIN.parse().unwrap();
    settings
        .build(&BuildContext {
            trust_domain: &td,
            node_mode,
        })
        .unwrap()
}

/// A test CA that trusts the node agent's account, the agent's token bound to its pod on
/// node A (written to a file), and the backend in node mode with that token.
async fn node_setup(dir: &Path) -> (IstioTestCa, Arc<dyn CertificateAuthority>) {
    let ca = IstioTestCa::start(dir).await.unwrap();
    ca.trust_node_accounts(&[("istio-system", "ztunnel"), (AGENT_NS, AGENT_SA)])
        .await;
    ca.allow_node_agent(
        "node-a-agent-token",
        TRUST_DOMAIN,
        AGENT_NS,
        AGENT_SA,
        "sds-agent-x7k2p",
        NODE_A,
    )
    .await;
    let token = dir.join("node-a-agent-token");
    write_token(&token, "node-a-agent-token").unwrap();
    let backend = backend(&ca, &token, true);
    (ca, backend)
}

/// The leaf's URI SANs.
fn uri_sans(leaf: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// Signs for `sa` and expects the CA's refusal: a denial that says what istiod requires,
/// and the reason the CA recorded.
async fn refused(ca: &IstioTestCa, backend: &dyn CertificateAuthority, sa: &str) -> Call {
    let err = backend
        .sign(&sign_request(&id(sa)).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains(IMPERSONATION_REFUSED), "{text}");
    assert!(text.contains("CA_TRUSTED_NODE_ACCOUNTS"), "{text}");
    let call = ca.calls().await.pop().unwrap();
    assert_eq!(
        call.impersonated.as_deref(),
        Some(id(sa).to_string().as_str())
    );
    assert_eq!(
        call.outcome.as_ref().unwrap_err(),
        &format!("Unauthenticated: {IMPERSONATION_REFUSED}")
    );
    call
}

fn reason(call: &Call) -> &str {
    call.refused_because.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn a_node_agent_gets_certificates_for_the_pods_on_its_node() {
    let dir = test_dir().unwrap();
    let (ca, backend) = node_setup(dir.path()).await;
    ca.add_pod(NODE_A, NAMESPACE, "frontend", "frontend-6d4f9-abcde")
        .await;
    ca.add_pod(NODE_A, NAMESPACE, "backend", "backend-7c8b5-fghij")
        .await;
    // Another pod of the same account elsewhere changes nothing.
    ca.add_pod(NODE_B, NAMESPACE, "backend", "backend-7c8b5-klmno")
        .await;

    for sa in ["frontend", "backend"] {
        let chain = backend.sign(&sign_request(&id(sa)).unwrap()).await.unwrap();
        assert_eq!(uri_sans(chain.leaf.as_ref()), [id(sa).to_string()]);
    }
    let calls = ca.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (call, sa) in calls.iter().zip(["frontend", "backend"]) {
        assert!(call.outcome.is_ok(), "{call:?}");
        // One token, the node agent's, for every pod.
        assert_eq!(call.token.as_deref(), Some("node-a-agent-token"));
        assert_eq!(call.impersonated, Some(id(sa).to_string()));
        assert_eq!(call.refused_because, None);
    }
    // The roots came with the certificates, as in pod mode.
    assert!(!backend.trust_bundle().await.unwrap().roots().is_empty());
}

#[tokio::test]
async fn an_untrusted_caller_cannot_impersonate() {
    let dir = test_dir().unwrap();
    let (ca, _) = node_setup(dir.path()).await;
    ca.add_pod(NODE_A, NAMESPACE, "frontend", "frontend-6d4f9-abcde")
        .await;

    // A workload's own token (the backend's), bound to its pod on the same node, asking for
    // its neighbour's identity: its account is not a node account.
    ca.allow_node_agent(
        "backend-token",
        TRUST_DOMAIN,
        NAMESPACE,
        "backend",
        "backend-7c8b5-fghij",
        NODE_A,
    )
    .await;
    let token = dir.path().join("backend-token");
    write_token(&token, "backend-token").unwrap();
    let untrusted = backend(&ca, &token, true);
    let call = refused(&ca, untrusted.as_ref(), "frontend").await;
    assert!(
        reason(&call).contains("default/backend is not allowed to impersonate"),
        "{call:?}"
    );

    // A token the CA does not know is refused before any impersonation is considered.
    write_token(&token, "forged-token").unwrap();
    let err = untrusted
        .sign(&sign_request(&id("frontend")).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    let call = ca.calls().await.pop().unwrap();
    assert!(
        call.outcome
            .as_ref()
            .unwrap_err()
            .contains("token was not accepted"),
        "{call:?}"
    );

    // With no trusted node account at all (CA_TRUSTED_NODE_ACCOUNTS unset), istiod has no
    // node authorizer and refuses every impersonation, even the node agent's.
    ca.trust_node_accounts(&[]).await;
    let agent = backend(&ca, &dir.path().join("node-a-agent-token"), true);
    let call = refused(&ca, agent.as_ref(), "frontend").await;
    assert!(reason(&call).contains("is not configured"), "{call:?}");
}

#[tokio::test]
async fn a_pod_on_another_node_or_an_unknown_account_is_refused() {
    let dir = test_dir().unwrap();
    let (ca, backend) = node_setup(dir.path()).await;
    ca.add_pod(NODE_A, NAMESPACE, "frontend", "frontend-6d4f9-abcde")
        .await;
    ca.add_pod(NODE_B, NAMESPACE, "db", "db-0").await;
    // Another namespace's pod of the same account name does not count.
    ca.add_pod(NODE_A, "other", "db", "db-0").await;

    // On node B only.
    let call = refused(&ca, backend.as_ref(), "db").await;
    assert!(
        reason(&call).contains("no instances of \"default/db\" found on node \"node-a\""),
        "{call:?}"
    );
    // No pod anywhere.
    let call = refused(&ca, backend.as_ref(), "ghost").await;
    assert!(reason(&call).contains("default/ghost"), "{call:?}");

    // A pod that left the node: granted while it ran, refused once it is gone.
    backend
        .sign(&sign_request(&id("frontend")).unwrap())
        .await
        .unwrap();
    ca.remove_pod(NAMESPACE, "frontend-6d4f9-abcde").await;
    let call = refused(&ca, backend.as_ref(), "frontend").await;
    assert!(reason(&call).contains("no instances"), "{call:?}");
}

#[tokio::test]
async fn the_node_agents_token_must_be_bound_to_its_current_pod() {
    let dir = test_dir().unwrap();
    let (ca, backend) = node_setup(dir.path()).await;
    ca.add_pod(NODE_A, NAMESPACE, "frontend", "frontend-6d4f9-abcde")
        .await;
    backend
        .sign(&sign_request(&id("frontend")).unwrap())
        .await
        .unwrap();

    // The agent's pod recreated under the same name: the old token's UID no longer matches.
    ca.add_pod(NODE_A, AGENT_NS, AGENT_SA, "sds-agent-x7k2p")
        .await;
    let call = refused(&ca, backend.as_ref(), "frontend").await;
    assert!(reason(&call).contains("UID does not match"), "{call:?}");

    // The agent's pod deleted.
    ca.remove_pod(AGENT_NS, "sds-agent-x7k2p").await;
    let call = refused(&ca, backend.as_ref(), "frontend").await;
    assert!(reason(&call).contains("failed to lookup pod"), "{call:?}");

    // A trusted account's token bound to no pod (not a projected token): no node to check.
    ca.allow("unbound-token", TRUST_DOMAIN, AGENT_NS, AGENT_SA)
        .await;
    let token = dir.path().join("unbound-token");
    write_token(&token, "unbound-token").unwrap();
    let unbound = self::backend(&ca, &token, true);
    let call = refused(&ca, unbound.as_ref(), "frontend").await;
    assert!(reason(&call).contains("failed to lookup pod"), "{call:?}");
}

/// What istiod reads of the metadata, sent by hand: an identity not of the
/// `spiffe://<td>/ns/<ns>/sa/<sa>` form is refused; a value that is not a string, or an
/// empty one, counts as absent.
#[tokio::test]
async fn the_ca_reads_impersonated_identity_as_istiod_does() {
    let dir = test_dir().unwrap();
    let (ca, _) = node_setup(dir.path()).await;
    ca.add_pod(NODE_A, NAMESPACE, "frontend", "frontend-6d4f9-abcde")
        .await;
    let tls = ClientTlsConfig::new()
        .domain_name(SERVER_NAME)
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.tls_root()).unwrap()));
    let channel = Endpoint::from_shared(format!("https://{}", ca.addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IstioCertificateServiceClient::new(channel);
    let call = |kind: Kind, sa: &'static str| {
        let csr_der = sign_request(&id(sa)).unwrap().csr_der;
        let csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr_der));
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: Some(Struct {
                fields: [(
                    "ImpersonatedIdentity".to_owned(),
                    Value { kind: Some(kind) },
                )]
                .into(),
            }),
        });
        request.metadata_mut().insert(
            "authorization",
            "Bearer node-a-agent-token".parse().unwrap(),
        );
        request
    };

    for bad in [
        "spiffe://example.org/workload/frontend",
        "spiffe://example.org/ns/default/sa/frontend/extra",
        "frontend",
    ] {
        let status = client
            .create_certificate(call(Kind::StringValue(bad.into()), "frontend"))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unauthenticated, IMPERSONATION_REFUSED)
        );
        let seen = ca.calls().await.pop().unwrap();
        assert!(
            reason(&seen).contains("failed to validate impersonated identity"),
            "{bad}: {seen:?}"
        );
    }

    // Not a string, or empty: no impersonation; the CA signs for the caller, the node agent.
    for kind in [Kind::BoolValue(true), Kind::StringValue(String::new())] {
        let answer = client
            .create_certificate(call(kind, "frontend"))
            .await
            .unwrap_err();
        // The CSR asks for the frontend, the caller is the agent: the usual mismatch.
        assert_eq!(answer.code(), tonic::Code::Unauthenticated);
        assert!(
            answer.message().contains("does not match the caller"),
            "{answer:?}"
        );
        let seen = ca.calls().await.pop().unwrap();
        assert_eq!((seen.had_metadata, seen.impersonated), (true, None));
    }
    // A null value, and a CSR for the agent's own identity: signed, as without metadata.
    let own_id: SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/{AGENT_NS}/sa/{AGENT_SA}")
        .parse()
        .unwrap();
    let csr_der = sign_request(&own_id).unwrap().csr_der;
    let mut own = call(Kind::NullValue(0), "frontend");
    own.get_mut().csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr_der));
    client.create_certificate(own).await.unwrap();
}

#[tokio::test]
async fn pod_mode_is_unchanged_and_sends_no_metadata() {
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    // Node authorization on, as in a mesh with ztunnel: pod-mode agents are not affected.
    ca.trust_node_accounts(&[(AGENT_NS, AGENT_SA)]).await;
    let token = token_for(&ca, dir.path(), "frontend").await.unwrap();
    let backend = backend(&ca, &token, false);

    let chain = backend
        .sign(&sign_request(&id("frontend")).unwrap())
        .await
        .unwrap();
    assert_eq!(uri_sans(chain.leaf.as_ref()), [id("frontend").to_string()]);
    // Its token names its identity and nothing else: another identity is the usual mismatch.
    let err = backend
        .sign(&sign_request(&id("backend")).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not match the caller"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("CA_TRUSTED_NODE_ACCOUNTS"),
        "{err}"
    );

    let calls = ca.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        assert!(!call.had_metadata, "{call:?}");
        assert_eq!((&call.impersonated, &call.refused_because), (&None, &None));
    }
}
