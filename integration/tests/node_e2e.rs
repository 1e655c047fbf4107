//! Node mode end to end: one agent (`run --mode node`) serving three "pods" on one machine.
//!
//! Each pod is a cgroup v2 directory laid out as the kubelet lays it out, or, where the
//! machine has no writable cgroup v2 hierarchy, an entry in a fake `/proc` given to the agent
//! as `--proc-root` (`sds_integration::pods`, which says what the fake does not prove); either
//! way listed by the fake kubelet with the same pod UID and container ID. Each pod's process
//! is gRPC C-core (grpcio, `integration/python/node_probe.py`) started in that pod. The agent
//! proves every caller with the real SO_PEERCRED, the (real or fake) `/proc` and the kubelet's
//! pod list, and each pod must get its own identity and nothing else: over StreamSecrets,
//! FetchSecrets and DeltaSecrets, by `default`, by its own SPIFFE ID and by every other pod's,
//! and over the Workload API. A process in no pod is refused `UNAUTHENTICATED`; a pod the
//! kubelet does not list is answered `UNAVAILABLE`.
//!
//! Every test runs in the mode `Pods::create()` picks (real cgroups where it can create a
//! cgroup v2 directory; `SDS_AGENT_PODS=fake-proc` forces the fake), except two: the PID-reuse
//! test needs the real kernel, and skips without a writable cgroup v2 hierarchy, and the
//! `..._in_a_fake_proc` tests always use the fake, so that it is tested on every machine.
//!
//! Skips without Python (grpcio), unless `SDS_AGENT_REQUIRE_PYTHON=1`. With
//! `SDS_AGENT_REQUIRE_CGROUPS=1` a machine without a writable cgroup v2 hierarchy fails instead
//! of falling back to the fake (scripts/test.sh sets the first always, and the second where
//! the machine has a cgroup v2 hierarchy it can write).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sds_integration::istio_ca::{IstioTestCa, args_for, write_token};
use sds_integration::kubelet::{FakeKubelet, FakePod};
use sds_integration::node::NodeAgent;
use sds_integration::pki::serial_of_pem;
use sds_integration::pods::Pods;
use sds_integration::vault::Vault;
use sds_integration::{Error, python};
use serde_json::Value;

const TD: &str = "cluster.local";

fn spiffe_id(pod: &FakePod) -> String {
    format!(
        "spiffe://{TD}/ns/{}/sa/{}",
        pod.namespace,
        pod.service_account.as_deref().unwrap()
    )
}

/// A node-mode agent on the embedded CA in `dir`, asking `kubelet`, seeing `pods`.
async fn node_agent(dir: &Path, kubelet: &FakeKubelet, pods: &Pods) -> NodeAgent {
    NodeAgent::start(dir, TD, kubelet, pods, &[]).await.unwrap()
}

async fn metric(agent: &NodeAgent, prefix: &str) -> f64 {
    agent.metric(prefix).await.unwrap()
}

/// Runs the probe as `cmd` (already wrapped into a pod, or not) and returns its JSON.
async fn probe(mut cmd: Command, dir: &Path, own: &str, others: &[String]) -> Value {
    cmd.arg(python::script("node_probe.py"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--workload-socket")
        .arg(dir.join("workload.sock"))
        .args(["--own", own, "--timeout", "5"]);
    for o in others {
        cmd.args(["--other", o]);
    }
    python::run_json_command(cmd, "node_probe.py", Duration::from_secs(90))
        .await
        .unwrap()
}

const METHODS: [&str; 3] = ["stream", "fetch", "delta"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_gets_its_own_identity_and_never_anothers() {
    each_pod_gets_its_own_identity(Pods::create).await;
}

/// The same in a fake `/proc`, whatever the machine allows: the fallback is exercised
/// everywhere, not only where it is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_gets_its_own_identity_and_never_anothers_in_a_fake_proc() {
    each_pod_gets_its_own_identity(Pods::fake_proc).await;
}

/// Three pods in `pods`, each asking for its own identity and the other two's.
async fn each_pod_gets_its_own_identity(make_pods: fn() -> Result<Pods, Error>) {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = make_pods().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let fakes = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("shop", "backend-5c4b", "backend"),
        FakePod::new("billing", "ledger-0", "ledger"),
    ];
    for pod in &fakes {
        kubelet.add_pod(pod.clone());
    }
    let agent = node_agent(dir.path(), &kubelet, &pods).await;
    let ids: Vec<String> = fakes.iter().map(spiffe_id).collect();

    for (i, pod) in fakes.iter().enumerate() {
        let own = &ids[i];
        let others: Vec<String> = ids.iter().filter(|id| *id != own).cloned().collect();
        let cmd = pods.command_in(pod, &python).unwrap();
        let out = probe(cmd, dir.path(), own, &others).await;
        for m in METHODS {
            let asked = &out["sds"]["default,ROOTCA"][m];
            assert_eq!(asked["code"], "OK", "{own} {m} default,ROOTCA: {asked}");
            assert_eq!(
                asked["uri_sans"],
                serde_json::json!([own]),
                "{own} {m}: {asked}"
            );
            assert!(asked["private_key"].as_bool().unwrap());
            let by_id = &out["sds"]["own"][m];
            assert_eq!(by_id["code"], "OK", "{own} {m} by its own ID: {by_id}");
            assert_eq!(by_id["names"], serde_json::json!([own]), "{m}: {by_id}");
            assert_eq!(by_id["uri_sans"], serde_json::json!([own]), "{m}: {by_id}");
            for (k, other) in others.iter().enumerate() {
                let refused = &out["sds"][format!("other{k}")][m];
                assert_eq!(
                    refused["code"], "INVALID_ARGUMENT",
                    "{own} asking {m} for {other}: {refused}"
                );
                assert!(
                    refused["details"]
                        .as_str()
                        .unwrap()
                        .contains("not authorized for the requested identities"),
                    "{refused}"
                );
                assert_eq!(refused["names"], serde_json::json!([]));
                assert!(!refused["private_key"].as_bool().unwrap());
            }
        }
        assert_eq!(
            out["workload"]["spiffe_ids"],
            serde_json::json!([own]),
            "Workload API: {}",
            out["workload"]
        );
    }
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 3.0);
    // Two other identities asked for by each pod, over three methods.
    assert_eq!(
        metric(
            &agent,
            "sds_agent_sds_bad_requests_total{reason=\"not_authorized\"}"
        )
        .await,
        18.0
    );
    // One kubelet list answered every pod (they were all listed from the start), give or
    // take the pods that asked while a list was already cached.
    assert!(
        kubelet.pods_requests() <= 3,
        "{} kubelet requests",
        kubelet.pods_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_are_not_proven_pods_get_nothing() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = Pods::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let listed = FakePod::new("shop", "frontend-1", "frontend");
    kubelet.add_pod(listed.clone());
    let agent = node_agent(dir.path(), &kubelet, &pods).await;

    // A process in no pod's cgroup (with real cgroups, this test's own children are not in
    // one; in a fake /proc, its entry names the container runtime's service).
    let cmd = pods.command_in_no_pod(&python).unwrap();
    let out = probe(cmd, dir.path(), &spiffe_id(&listed), &[]).await;
    assert_unauthenticated(&out);
    assert!(metric(&agent, "sds_agent_attestations_refused_total ").await >= 1.0);

    // A pod in a cgroup the kubelet does not list: proven process, unknown pod.
    let unlisted = FakePod::new("shop", "ghost-1", "ghost");
    let cmd = pods.command_in(&unlisted, &python).unwrap();
    let out = probe(cmd, dir.path(), &spiffe_id(&unlisted), &[]).await;
    for m in METHODS {
        let r = &out["sds"]["default,ROOTCA"][m];
        assert_eq!(r["code"], "UNAVAILABLE", "{m}: {r}");
        assert_eq!(r["names"], serde_json::json!([]));
    }
    assert!(
        metric(
            &agent,
            "sds_agent_sds_bad_requests_total{reason=\"pod_unknown\"}"
        )
        .await
            >= 3.0
    );
    // Nothing was issued for anyone.
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 0.0);
}

/// A fake `/proc` is not a free pass: the agent reads it as it reads the real one, so a
/// process whose entry names no pod, or that has no entry at all, is refused
/// `UNAUTHENTICATED`, while the process of a listed pod beside them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fake_proc_an_entry_naming_no_pod_or_no_entry_is_refused() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let pods = Pods::fake_proc().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let listed = FakePod::new("shop", "frontend-1", "frontend");
    kubelet.add_pod(listed.clone());
    let agent = node_agent(dir.path(), &kubelet, &pods).await;
    let own = spiffe_id(&listed);

    // An entry whose cgroup is the container runtime's service: no pod's.
    let cmd = pods.command_in_no_pod(&python).unwrap();
    let why = assert_unauthenticated(&probe(cmd, dir.path(), &own, &[]).await);
    assert!(why.contains("is not a pod container"), "{why}");

    // No entry: to the agent, a process that is gone.
    let cmd = pods.command_without_entry(&python).unwrap();
    let why = assert_unauthenticated(&probe(cmd, dir.path(), &own, &[]).await);
    assert!(why.contains("is gone"), "{why}");
    assert!(metric(&agent, "sds_agent_attestations_refused_total ").await >= 2.0);
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 0.0);

    // The listed pod's process, with its entry, is served: the refusals above were the
    // entries', not an agent that cannot read the fake /proc.
    let cmd = pods.command_in(&listed, &python).unwrap();
    let out = probe(cmd, dir.path(), &own, &[]).await;
    let asked = &out["sds"]["default,ROOTCA"]["fetch"];
    assert_eq!(asked["code"], "OK", "{asked}");
    assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{asked}");
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 1.0);
}

/// Asserts that node_probe.py's answer `out` got nothing: every SDS question refused
/// `UNAUTHENTICATED` (a call racing the close of the refused connection sees `UNAVAILABLE`),
/// and the Workload API refused too. Returns the details of the first refusal.
fn assert_unauthenticated(out: &Value) -> String {
    let mut codes = Vec::new();
    for label in ["default,ROOTCA", "own"] {
        for m in METHODS {
            let r = &out["sds"][label][m];
            assert_eq!(r["names"], serde_json::json!([]), "{r}");
            assert!(!r["private_key"].as_bool().unwrap());
            codes.push(r["code"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(codes[0], "UNAUTHENTICATED", "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "UNAUTHENTICATED" || c == "UNAVAILABLE"),
        "{codes:?}"
    );
    assert_ne!(out["workload"]["code"], "OK", "{}", out["workload"]);
    out["sds"]["default,ROOTCA"][METHODS[0]]["details"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether this process may set the kernel's next pid (root in the initial PID namespace).
/// Without it the PID-reuse test cannot force a reuse and skips, unless
/// `SDS_AGENT_REQUIRE_PID_REUSE=1` (scripts/test.sh sets it where the file is writable).
fn can_choose_pids() -> bool {
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/kernel/ns_last_pid")
        .is_ok();
    if !writable {
        assert_ne!(
            std::env::var("SDS_AGENT_REQUIRE_PID_REUSE").as_deref(),
            Ok("1"),
            "/proc/sys/kernel/ns_last_pid is not writable, and SDS_AGENT_REQUIRE_PID_REUSE=1"
        );
        eprintln!("skipping: /proc/sys/kernel/ns_last_pid is not writable (needs root)");
    }
    writable
}

/// Runs `integration/python/pid_reuse.py` as `cmd` (inside the attacker's pod) against the
/// agent, handing the connecting process's pid to a process in `victim_cgroup` unless
/// `no_reuse`, and returns its JSON.
async fn pid_reuse(
    mut cmd: Command,
    agent: &NodeAgent,
    victim_cgroup: &Path,
    no_reuse: bool,
) -> Value {
    cmd.arg(python::script("pid_reuse.py"))
        .arg("--socket")
        .arg(agent.socket())
        .arg("--victim-cgroup")
        .arg(victim_cgroup);
    if no_reuse {
        cmd.arg("--no-reuse");
    }
    python::run_json_command(cmd, "pid_reuse.py", Duration::from_secs(60))
        .await
        .unwrap()
}

/// The connection's process exits and its pid goes to a process of another pod, which the
/// kubelet lists and which would be served if it asked itself: the connection must get
/// nothing, and certainly not that pod's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_pid_is_reused_by_another_pod_gets_nothing() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    // The real kernel or nothing: a fake /proc's entries outlive their processes.
    let Some(pods) = Pods::cgroups().unwrap() else {
        return;
    };
    if !can_choose_pids() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let attacker = FakePod::new("shop", "web-1", "web");
    let victim = FakePod::new("bank", "teller-0", "teller");
    kubelet.add_pod(attacker.clone());
    kubelet.add_pod(victim.clone());
    let agent = node_agent(dir.path(), &kubelet, &pods).await;
    let victim_cgroup = pods.container_cgroup(&victim).unwrap();

    // Control: the connecting process is gone and nobody has its pid.
    let out = pid_reuse(
        pods.command_in(&attacker, &python).unwrap(),
        &agent,
        &victim_cgroup,
        true,
    )
    .await;
    assert_eq!(out["code"], "UNAUTHENTICATED", "{out}");
    assert_eq!(out["names"], serde_json::json!([]), "{out}");
    let gone = format!("process {} is gone", out["connected_pid"]);
    assert!(agent.log_contains(&gone), "no {gone:?} in the agent's log");

    // The attack: the victim pod's process now has the connecting process's pid.
    let out = pid_reuse(
        pods.command_in(&attacker, &python).unwrap(),
        &agent,
        &victim_cgroup,
        false,
    )
    .await;
    eprintln!("pid reuse: {out}");
    assert_eq!(out["victim_pid"], out["connected_pid"], "{out}");
    assert_eq!(out["code"], "UNAUTHENTICATED", "{out}");
    assert_eq!(out["names"], serde_json::json!([]), "{out}");
    assert_eq!(out["uri_sans"], serde_json::json!([]), "{out}");
    let reused = format!(
        "process {} started after its connection was accepted: the pid was reused",
        out["connected_pid"]
    );
    assert!(
        agent.log_contains(&reused),
        "no {reused:?} in the agent's log"
    );
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 0.0);
    assert!(metric(&agent, "sds_agent_attestations_refused_total ").await >= 2.0);

    // The victim pod asking for itself is served: the refusal above was the PID-reuse
    // defence, not a pod the agent could not find.
    let own = spiffe_id(&victim);
    let out = probe(
        pods.command_in(&victim, &python).unwrap(),
        dir.path(),
        &own,
        &[],
    )
    .await;
    let asked = &out["sds"]["default,ROOTCA"]["fetch"];
    assert_eq!(asked["code"], "OK", "{asked}");
    assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{asked}");
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 1.0);
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
    let ca: Vec<std::ffi::OsString> = [
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
    let vault_root = serial_of_pem(&root).unwrap();
    let served_roots: Vec<_> = agent
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "ROOTCA")
        .map(|s| s.serial)
        .collect();
    assert_eq!(served_roots, [vault_root], "the bundle is Vault's root");

    // The pod outside the role's namespace first: its refusal must not hurt the others.
    let refused = spiffe_id(&billing);
    let out = probe(
        pods.command_in(&billing, &python).unwrap(),
        dir.path(),
        &refused,
        &[],
    )
    .await;
    for label in ["default,ROOTCA", "own"] {
        for m in METHODS {
            let r = &out["sds"][label][m];
            assert_ne!(r["code"], "OK", "{refused} {m} {label}: {r}");
            assert_eq!(r["uri_sans"], serde_json::json!([]), "{m} {label}: {r}");
            assert!(!r["private_key"].as_bool().unwrap(), "{m} {label}: {r}");
        }
    }
    assert!(
        agent.log_contains("refused to sign") && agent.log_contains("allowed_uri_sans"),
        "the agent's log does not say why Vault refused {refused}"
    );

    for pod in &shop {
        let own = spiffe_id(pod);
        let out = probe(
            pods.command_in(pod, &python).unwrap(),
            dir.path(),
            &own,
            &[],
        )
        .await;
        for m in METHODS {
            let asked = &out["sds"]["default,ROOTCA"][m];
            assert_eq!(asked["code"], "OK", "{own} {m}: {asked}");
            assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{m}: {asked}");
        }
    }
    let issued: Vec<String> = agent
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "default")
        .map(|s| s.spiffe_id)
        .collect();
    let mut expected: Vec<String> = shop.iter().map(spiffe_id).collect();
    expected.sort();
    assert_eq!(issued, expected, "only the shop pods hold certificates");
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
    for pod in &here {
        let own = spiffe_id(pod);
        let out = probe(
            pods.command_in(pod, &python).unwrap(),
            dir.path(),
            &own,
            &[],
        )
        .await;
        for m in METHODS {
            let asked = &out["sds"]["default,ROOTCA"][m];
            assert_eq!(asked["code"], "OK", "{own} {m}: {asked}");
            assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{m}: {asked}");
        }
    }
    let refused = spiffe_id(&elsewhere);
    let out = probe(
        pods.command_in(&elsewhere, &python).unwrap(),
        dir.path(),
        &refused,
        &[],
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
    let signed: std::collections::BTreeSet<String> = calls
        .iter()
        .filter(|c| c.outcome.is_ok())
        .filter_map(|c| c.impersonated.clone())
        .collect();
    let expected: std::collections::BTreeSet<String> = here.iter().map(spiffe_id).collect();
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
