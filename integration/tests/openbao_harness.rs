//! The OpenBao harness against a real OpenBao dev server (or the external Vault of
//! `SDS_TEST_VAULT_ADDR`): the setup the Vault backend's tests rely on really lets a
//! policy-limited token sign an agent's CSR (empty subject, one SPIFFE URI SAN), through a
//! token, AppRole and Kubernetes login, and seal/unseal round-trips. It also pins the
//! answers Vault gives to the failures the backend must classify.
//!
//! Skips when there is no `bao` (unless `SDS_AGENT_REQUIRE_BAO=1`). Against a shared
//! external Vault, run with `--test-threads=1` (seal stops every other test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use serde_json::{Value, json};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use sds_integration::kube::TokenReviewServer;
use sds_integration::openbao::{OpenBao, sign_policy};

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/x";

/// A running Vault in its own directory, or `None` (skip).
async fn vault(dir: &tempfile::TempDir) -> Option<OpenBao> {
    OpenBao::for_test(dir.path()).await.unwrap()
}

/// What the agent sends: a P-256 CSR with an empty subject and `uri` as its only SAN.
fn csr(uri: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// `mount` with a root, role `agent` for `spiffe://cluster.local/*` and policy `agent`.
async fn pki(vault: &OpenBao, mount: &str) -> String {
    vault.enable_pki(mount, "87600h").await.unwrap();
    let root = vault
        .generate_root(mount, "sds-agent test root", "ec", "87600h")
        .await
        .unwrap();
    vault
        .create_role(mount, "agent", &["spiffe://cluster.local/*"], "1h")
        .await
        .unwrap();
    vault
        .write_policy(&format!("{mount}-agent"), &sign_policy(mount, "agent"))
        .await
        .unwrap();
    root
}

async fn sign(vault: &OpenBao, token: &str, path: &str, uri: &str, ttl: &str) -> (u16, Value) {
    vault
        .api_with_token(
            Some(token),
            "POST",
            path,
            Some(json!({"csr": csr(uri), "ttl": ttl})),
        )
        .await
        .unwrap()
}

/// The certificate of a sign answer carries exactly `uri`, an empty subject, and chains to
/// `root` by name.
fn assert_issued(answer: &Value, uri: &str, root_pem: &str) {
    let pem = answer["data"]["certificate"].as_str().unwrap();
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert_eq!(
        cert.subject().iter().count(),
        0,
        "subject {}",
        cert.subject()
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<_> = san.value.general_names.iter().collect();
    assert_eq!(names, [&GeneralName::URI(uri)]);
    let (_, root) = parse_x509_pem(root_pem.as_bytes()).unwrap();
    assert_eq!(cert.issuer(), root.parse_x509().unwrap().subject());
    let chain = answer["data"]["ca_chain"].as_array().unwrap();
    assert!(!chain.is_empty(), "{answer}");
}

fn errors(answer: &Value) -> String {
    answer["errors"].to_string()
}

#[tokio::test]
async fn a_policy_limited_token_signs_an_agent_csr() {
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = vault(&dir).await else {
        return;
    };
    let root = pki(&vault, "pki-token").await;
    let token = vault
        .create_token(&["pki-token-agent"], Some("10m"), true)
        .await
        .unwrap();

    for path in [
        "pki-token/sign/agent",
        "pki-token/issuer/default/sign/agent",
    ] {
        let (status, answer) = sign(&vault, &token, path, SPIFFE_ID, "5m").await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_issued(&answer, SPIFFE_ID, &root);
    }
    let (status, chain) = vault
        .api_with_token(Some(&token), "GET", "pki-token/cert/ca_chain", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{chain}");
    let (status, me) = vault
        .api_with_token(Some(&token), "GET", "auth/token/lookup-self", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{me}");
    let (status, renewed) = vault
        .api_with_token(
            Some(&token),
            "POST",
            "auth/token/renew-self",
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{renewed}");

    // A TTL above the role's max_ttl is clamped, not refused.
    let (status, answer) = sign(&vault, &token, "pki-token/sign/agent", SPIFFE_ID, "5h").await;
    assert_eq!(status, 200, "{answer}");
    let warnings = answer["warnings"].to_string();
    eprintln!("ttl above max_ttl: 200, warnings {warnings}");

    // The failures the backend must tell apart, as Vault words them.
    let (status, answer) = sign(
        &vault,
        &token,
        "pki-token/sign/agent",
        "spiffe://other.domain/ns/default/sa/x",
        "5m",
    )
    .await;
    eprintln!("forbidden URI SAN: {status} {}", errors(&answer));
    assert_eq!(status, 400);
    assert!(
        errors(&answer).contains("not valid for this role"),
        "{answer}"
    );

    // The policy names one role: another is denied before the role is looked up...
    let (status, answer) = sign(&vault, &token, "pki-token/sign/nope", SPIFFE_ID, "5m").await;
    eprintln!("unknown role, policy token: {status} {}", errors(&answer));
    assert_eq!(status, 403);
    // ...and with the root token, the role is unknown.
    let (status, answer) = sign(
        &vault,
        vault.root_token(),
        "pki-token/sign/nope",
        SPIFFE_ID,
        "5m",
    )
    .await;
    eprintln!("unknown role, root token: {status} {}", errors(&answer));
    assert_eq!(status, 400);
    assert!(errors(&answer).contains("unknown role"), "{answer}");

    let (status, answer) = sign(&vault, &token, "no-such-mount/sign/agent", SPIFFE_ID, "5m").await;
    eprintln!("missing mount, policy token: {status} {}", errors(&answer));
    assert_eq!(status, 403);
    let (status, answer) = sign(
        &vault,
        vault.root_token(),
        "no-such-mount/sign/agent",
        SPIFFE_ID,
        "5m",
    )
    .await;
    eprintln!("missing mount, root token: {status} {}", errors(&answer));
    assert_eq!(status, 404);

    vault.revoke_token(&token).await.unwrap();
    let (status, answer) = sign(&vault, &token, "pki-token/sign/agent", SPIFFE_ID, "5m").await;
    eprintln!("revoked token: {status} {}", errors(&answer));
    assert_eq!(status, 403);
    assert!(errors(&answer).contains("permission denied"), "{answer}");
}

#[tokio::test]
async fn an_intermediate_signs_and_chains_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = vault(&dir).await else {
        return;
    };
    vault.enable_pki("pki-int-root", "87600h").await.unwrap();
    vault
        .generate_root("pki-int-root", "sds-agent test root", "ec", "87600h")
        .await
        .unwrap();
    vault.enable_pki("pki-int", "43800h").await.unwrap();
    let intermediate = vault
        .generate_intermediate("pki-int", "pki-int-root", "sds-agent test intermediate")
        .await
        .unwrap();
    vault
        .create_role("pki-int", "agent", &["spiffe://cluster.local/*"], "1h")
        .await
        .unwrap();
    let (status, answer) = sign(
        &vault,
        vault.root_token(),
        "pki-int/sign/agent",
        SPIFFE_ID,
        "5m",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_issued(&answer, SPIFFE_ID, &intermediate);
    assert_eq!(answer["data"]["ca_chain"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn approle_and_kubernetes_logins_give_signing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = vault(&dir).await else {
        return;
    };
    let root = pki(&vault, "pki-login").await;

    let (role_id, secret_id) = vault
        .enable_approle("agent", &["pki-login-agent"], "10m", "1h")
        .await
        .unwrap();
    let (status, login) = vault
        .api_with_token(
            None,
            "POST",
            "auth/approle/login",
            Some(json!({"role_id": role_id, "secret_id": secret_id})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{login}");
    assert_eq!(login["auth"]["lease_duration"], 600);
    let token = login["auth"]["client_token"].as_str().unwrap();
    let (status, answer) = sign(&vault, token, "pki-login/sign/agent", SPIFFE_ID, "5m").await;
    assert_eq!(status, 200, "{answer}");
    assert_issued(&answer, SPIFFE_ID, &root);
    let (status, answer) = vault
        .api_with_token(
            None,
            "POST",
            "auth/approle/login",
            Some(json!({"role_id": role_id, "secret_id": "wrong"})),
        )
        .await
        .unwrap();
    eprintln!("approle wrong secret_id: {status} {}", errors(&answer));
    assert_eq!(status, 400);

    let kube = TokenReviewServer::start().await.unwrap();
    vault
        .enable_kubernetes(&kube, "agent", "x", "default", &["pki-login-agent"], "10m")
        .await
        .unwrap();
    let jwt = kube.mint_token("default", "x");
    let (status, login) = vault
        .api_with_token(
            None,
            "POST",
            "auth/kubernetes/login",
            Some(json!({"role": "agent", "jwt": jwt})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{login}");
    assert_eq!(kube.reviews(), 1);
    assert_eq!(
        login["auth"]["metadata"]["service_account_name"], "x",
        "{login}"
    );
    let token = login["auth"]["client_token"].as_str().unwrap();
    let (status, answer) = sign(&vault, token, "pki-login/sign/agent", SPIFFE_ID, "5m").await;
    assert_eq!(status, 200, "{answer}");

    // A service account the role is not bound to is refused before any review...
    let other = kube.mint_token("default", "other");
    let (status, answer) = vault
        .api_with_token(
            None,
            "POST",
            "auth/kubernetes/login",
            Some(json!({"role": "agent", "jwt": other})),
        )
        .await
        .unwrap();
    eprintln!(
        "kubernetes login, unbound service account: {status} {} (reviews {})",
        errors(&answer),
        kube.reviews()
    );
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        kube.reviews(),
        1,
        "no review for an unbound service account"
    );
    // ...and a token the API server did not issue is refused by the review.
    let forged = {
        let fresh = TokenReviewServer::start().await.unwrap();
        fresh.mint_token("default", "x")
    };
    let before = kube.reviews();
    let (status, answer) = vault
        .api_with_token(
            None,
            "POST",
            "auth/kubernetes/login",
            Some(json!({"role": "agent", "jwt": forged})),
        )
        .await
        .unwrap();
    eprintln!(
        "kubernetes login, unknown token: {status} {}",
        errors(&answer)
    );
    assert!(status == 400 || status == 403, "{status} {answer}");
    assert_eq!(kube.reviews(), before + 1);
}

#[tokio::test]
async fn a_sealed_vault_refuses_then_signs_again_once_unsealed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = vault(&dir).await else {
        return;
    };
    pki(&vault, "pki-seal").await;
    let token = vault
        .create_token(&["pki-seal-agent"], None, true)
        .await
        .unwrap();
    vault.seal().await.unwrap();
    let (status, health) = vault.health().await.unwrap();
    assert_eq!((status, &health["sealed"]), (503, &json!(true)), "{health}");
    let (status, answer) = sign(&vault, &token, "pki-seal/sign/agent", SPIFFE_ID, "5m").await;
    eprintln!("sealed: {status} {}", errors(&answer));
    assert_eq!(status, 503);
    assert!(errors(&answer).contains("sealed"), "{answer}");

    vault.unseal().await.unwrap();
    let (status, answer) = sign(&vault, &token, "pki-seal/sign/agent", SPIFFE_ID, "5m").await;
    assert_eq!(status, 200, "the token survives a seal: {answer}");
}
