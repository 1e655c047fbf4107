//! Node mode on each CA backend that signs for many identities with one credential, end to
//! end: one node agent (`run --mode node`), pods as processes proven by the kernel and the fake
//! kubelet (`sds_integration::pods`, real cgroups or the fake `/proc`), and the backend's real
//! peer or its test double:
//!
//! - **vault**: OpenBao, one token and one PKI role for the node, `allowed_uri_sans` narrowed
//!   to one namespace;
//! - **istiod**: the test Istio CA with istiod's node authorizer, the node's token and each
//!   pod's `ImpersonatedIdentity`;
//! - **acm-pca**: moto's ACM PCA, one CA, the default `EndEntityCertificate/V1` template that
//!   takes the SAN from the CSR.
//!
//! Each pod must get its own identity over the three SDS methods, and a pod the CA refuses
//! must get nothing while the others are served. Skips without Python (grpcio) or the
//! backend's peer, unless the `SDS_AGENT_REQUIRE_*` variables of scripts/test.sh say otherwise.
//! (cert-manager in node mode is tested against the fake Kubernetes API in
//! `integration/tests/cert_manager.rs`.)

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use sds_integration::istio_ca::{IstioTestCa, args_for, write_token};
use sds_integration::kubelet::{FakeKubelet, FakePod};
use sds_integration::moto::{Moto, agent_env};
use sds_integration::node::{NodeAgent, SDS_METHODS};
use sds_integration::pki::serial_of_pem;
use sds_integration::pods::Pods;
use sds_integration::python;
use sds_integration::vault::Vault;
use serde_json::Value;

const TD: &str = "cluster.local";

fn spiffe_id(pod: &FakePod) -> String {
    pod.spiffe_id(TD)
}

async fn probe(agent: &NodeAgent, cmd: Command, own: &str) -> Value {
    agent.probe(cmd, own, &[]).await.unwrap()
}

async fn metric(agent: &NodeAgent, prefix: &str) -> f64 {
    agent.metric(prefix).await.unwrap()
}

/// `out` (node_probe.py's) shows `own` served, with its key, over every SDS method.
fn assert_served(out: &Value, own: &str) {
    for m in SDS_METHODS {
        let asked = &out["sds"]["default,ROOTCA"][m];
        assert_eq!(asked["code"], "OK", "{own} {m}: {asked}");
        assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{m}: {asked}");
        assert!(asked["private_key"].as_bool().unwrap(), "{m}: {asked}");
    }
}

/// `out` shows `refused` given no certificate and no key, by `default` or by its own ID.
fn assert_not_served(out: &Value, refused: &str) {
    for label in ["default,ROOTCA", "own"] {
        for m in SDS_METHODS {
            let r = &out["sds"][label][m];
            assert_ne!(r["code"], "OK", "{refused} {m} {label}: {r}");
            assert_eq!(r["uri_sans"], serde_json::json!([]), "{m} {label}: {r}");
            assert!(!r["private_key"].as_bool().unwrap(), "{m} {label}: {r}");
        }
    }
}

/// Each of `served` asks for `default,ROOTCA` and is served its own identity over every SDS
/// method; then the agent holds certificates for exactly those pods.
async fn assert_each_served(agent: &NodeAgent, pods: &Pods, python: &Path, served: &[FakePod]) {
    for pod in served {
        let own = spiffe_id(pod);
        let out = probe(agent, pods.command_in(pod, python).unwrap(), &own).await;
        assert_served(&out, &own);
    }
    assert_eq!(
        issued(agent).await,
        served.iter().map(spiffe_id).collect(),
        "a certificate for each pod served, and none for another"
    );
}

/// The serials of the `ROOTCA` the agent serves.
async fn served_roots(agent: &NodeAgent) -> Vec<sds_integration::Serial> {
    agent
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "ROOTCA")
        .map(|s| s.serial)
        .collect()
}

/// The identities the agent holds a certificate for.
async fn issued(agent: &NodeAgent) -> BTreeSet<String> {
    agent
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "default")
        .map(|s| s.spiffe_id)
        .collect()
}

/// Node mode on the Vault backend against OpenBao, with a node role as docs/node-mode.md
/// sets one up, narrowed to one namespace: `allowed_uri_sans` of
/// `spiffe://cluster.local/ns/shop/sa/*`. The agent signs each shop pod's identity with its
/// one Vault token and role; a pod of another namespace gets no certificate (Vault refuses,
/// the agent says why), and that refusal costs the shop pods nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_signs_each_pod_within_the_node_roles_allowed_uri_sans() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = Pods::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = Vault::start(dir.path()).await.unwrap() else {
        return;
    };
    let root = vault.pki_with_root("pki", "node test root").await.unwrap();
    vault
        .role(
            "pki",
            "sds-node",
            &format!("spiffe://{TD}/ns/shop/sa/*"),
            "1h",
        )
        .await
        .unwrap();
    vault
        .sign_policy("sds-node", "pki", "sds-node")
        .await
        .unwrap();
    let token = vault.token("sds-node", "1h", true).await.unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, token).unwrap();

    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let shop = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("shop", "backend-5c4b", "backend"),
    ];
    let billing = FakePod::new("billing", "ledger-0", "ledger");
    for pod in shop.iter().chain([&billing]) {
        kubelet.add_pod(pod.clone());
    }
    let ca: Vec<OsString> = [
        "--ca",
        "vault",
        "--vault-addr",
        vault.addr(),
        "--vault-role",
        "sds-node",
    ]
    .iter()
    .map(Into::into)
    .chain(["--vault-token-file".into(), token_file.into()])
    .collect();
    let agent = NodeAgent::start(dir.path(), TD, &kubelet, &pods, &ca)
        .await
        .unwrap();
    assert_eq!(
        served_roots(&agent).await,
        [serial_of_pem(&root).unwrap()],
        "the bundle is Vault's root"
    );

    // The pod outside the role's namespace first: its refusal must not hurt the others.
    let refused = spiffe_id(&billing);
    let out = probe(
        &agent,
        pods.command_in(&billing, &python).unwrap(),
        &refused,
    )
    .await;
    assert_not_served(&out, &refused);
    assert!(
        agent.log_contains("refused to sign") && agent.log_contains("allowed_uri_sans"),
        "the agent's log does not say why Vault refused {refused}"
    );

    assert_each_served(&agent, &pods, &python, &shop).await;
    assert!(
        metric(&agent, "sds_agent_ca_errors_total{").await >= 1.0,
        "Vault's refusal is counted"
    );
}

/// Node mode on the istiod backend, the ztunnel way, end to end: the agent proves each pod
/// from its cgroup and the kubelet, then asks the test Istio CA (with istiod's node
/// authorizer) for that pod's identity with the node agent's own token and the identity in
/// `ImpersonatedIdentity`. A pod the kubelet lists here but istiod's registry places on
/// another node is refused by istiod too: a second, independent check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_signs_each_pod_for_the_node_agent_by_impersonation() {
    const NODE: &str = "node-a";
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = Pods::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let istio = IstioTestCa::start(dir.path()).await.unwrap();
    istio
        .trust_node_accounts(&[("sds-agent", "sds-agent")])
        .await;
    istio
        .allow_node_agent(
            "node-a-agent-token",
            TD,
            "sds-agent",
            "sds-agent",
            "sds-agent-x7k2p",
            NODE,
        )
        .await;
    let token_file = dir.path().join("node-a-agent-token");
    write_token(&token_file, "node-a-agent-token").unwrap();

    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let here = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("billing", "ledger-0", "ledger"),
    ];
    for pod in &here {
        kubelet.add_pod(pod.clone());
        istio
            .add_pod(
                NODE,
                &pod.namespace,
                pod.service_account.as_deref().unwrap(),
                &pod.name,
            )
            .await;
    }
    // Listed by this node's kubelet, but on node-b as istiod sees it.
    let elsewhere = FakePod::new("shop", "batch-1", "batch");
    kubelet.add_pod(elsewhere.clone());
    istio.add_pod("node-b", "shop", "batch", "batch-1").await;

    // No --ca-trust-bundle: istiod's roots come with the first pod's certificate, and the
    // node agent is ready (NodeAgent::start waits for /readyz) before any pod has asked.
    let ca = args_for(istio.addr(), istio.tls_root(), &token_file, None);
    let agent = NodeAgent::start(dir.path(), TD, &kubelet, &pods, &ca)
        .await
        .unwrap();
    assert_each_served(&agent, &pods, &python, &here).await;
    let refused = spiffe_id(&elsewhere);
    let out = probe(
        &agent,
        pods.command_in(&elsewhere, &python).unwrap(),
        &refused,
    )
    .await;
    let fetched = &out["sds"]["default,ROOTCA"]["fetch"];
    assert_ne!(fetched["code"], "OK", "{refused}: {fetched}");
    assert!(!fetched["private_key"].as_bool().unwrap(), "{fetched}");

    // Every call carried the node agent's token and named the pod it was for.
    let calls = istio.calls().await;
    assert!(!calls.is_empty());
    for call in &calls {
        assert_eq!(
            call.token.as_deref(),
            Some("node-a-agent-token"),
            "{call:?}"
        );
    }
    let signed: BTreeSet<String> = calls
        .iter()
        .filter(|c| c.outcome.is_ok())
        .filter_map(|c| c.impersonated.clone())
        .collect();
    let expected: BTreeSet<String> = here.iter().map(spiffe_id).collect();
    assert_eq!(signed, expected);
    let denied: Vec<&str> = calls
        .iter()
        .filter(|c| c.outcome.is_err())
        .filter_map(|c| c.refused_because.as_deref())
        .collect();
    assert!(
        !denied.is_empty()
            && calls
                .iter()
                .filter(|c| c.outcome.is_err())
                .all(|c| c.impersonated.as_deref() == Some(refused.as_str())),
        "only {refused} is refused, by the node authorizer: {calls:#?}"
    );
    assert!(
        agent.log_contains("request impersonation authentication failure"),
        "the agent's log does not carry istiod's answer"
    );
}

/// Node mode on ACM PCA (moto's): one CA and the default template, which takes the SAN from
/// the CSR, so each pod's certificate names that pod; the bundle is the CA's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acm_pca_signs_each_pod_with_the_san_from_its_csr() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = Pods::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let pca = moto.root_ca("sds-agent node test root").await.unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let here = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("billing", "ledger-0", "ledger"),
    ];
    for pod in &here {
        kubelet.add_pod(pod.clone());
    }
    let ca: Vec<OsString> = [
        "--ca",
        "acm-pca",
        "--acm-pca-arn",
        &pca.arn,
        "--acm-pca-endpoint",
        moto.endpoint(),
    ]
    .iter()
    .map(Into::into)
    .collect();
    let agent = NodeAgent::start_with_env(dir.path(), TD, &kubelet, &pods, &ca, &agent_env())
        .await
        .unwrap();
    assert_eq!(
        served_roots(&agent).await,
        [serial_of_pem(&pca.root_pem).unwrap()],
        "the bundle is the PCA's certificate"
    );
    assert_each_served(&agent, &pods, &python, &here).await;
}
