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

use sds_integration::kubelet::{FakeKubelet, FakePod};
use sds_integration::node::{NodeAgent, SDS_METHODS};
use sds_integration::pods::Pods;
use sds_integration::{Error, python};
use serde_json::Value;

const TD: &str = "cluster.local";

fn spiffe_id(pod: &FakePod) -> String {
    pod.spiffe_id(TD)
}

/// A node-mode agent on the embedded CA in `dir`, asking `kubelet`, seeing `pods`.
async fn node_agent(dir: &Path, kubelet: &FakeKubelet, pods: &Pods) -> NodeAgent {
    NodeAgent::start(dir, TD, kubelet, pods, &[]).await.unwrap()
}

async fn metric(agent: &NodeAgent, prefix: &str) -> f64 {
    agent.metric(prefix).await.unwrap()
}

/// Runs `node_probe.py` as `cmd` (already wrapped into a pod, or not) against `agent`.
async fn probe(agent: &NodeAgent, cmd: Command, own: &str, others: &[String]) -> Value {
    agent.probe(cmd, own, others).await.unwrap()
}

const METHODS: [&str; 3] = SDS_METHODS;

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
        let out = probe(&agent, cmd, own, &others).await;
        for m in METHODS {
            let asked = &out["sds"]["default,ROOTCA"][m];
            assert_eq!(asked["code"], "OK", "{own} {m} default,ROOTCA: {asked}");
            assert_eq!(
                asked["uri_sans"],
                serde_json::json!([own]),
                "{own} {m}: {asked}"
            );
            assert!(asked["private_key"].as_bool().unwrap());
            let bundles = &out["sds"]["bundles"][m];
            assert_eq!(
                bundles["code"], "OK",
                "{own} {m} ALL, spiffe://<td>: {bundles}"
            );
            let mut names: Vec<&str> = bundles["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            names.sort_unstable();
            assert_eq!(names, ["ALL", &format!("spiffe://{TD}")], "{m}: {bundles}");
            assert!(!bundles["private_key"].as_bool().unwrap(), "{m}: {bundles}");
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
    let out = probe(&agent, cmd, &spiffe_id(&listed), &[]).await;
    assert_unauthenticated(&out);
    assert!(metric(&agent, "sds_agent_attestations_refused_total ").await >= 1.0);

    // A pod in a cgroup the kubelet does not list: proven process, unknown pod.
    let unlisted = FakePod::new("shop", "ghost-1", "ghost");
    let cmd = pods.command_in(&unlisted, &python).unwrap();
    let out = probe(&agent, cmd, &spiffe_id(&unlisted), &[]).await;
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
    let why = assert_unauthenticated(&probe(&agent, cmd, &own, &[]).await);
    assert!(why.contains("is not a pod container"), "{why}");

    // No entry: to the agent, a process that is gone.
    let cmd = pods.command_without_entry(&python).unwrap();
    let why = assert_unauthenticated(&probe(&agent, cmd, &own, &[]).await);
    assert!(why.contains("is gone"), "{why}");
    assert!(metric(&agent, "sds_agent_attestations_refused_total ").await >= 2.0);
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 0.0);

    // The listed pod's process, with its entry, is served: the refusals above were the
    // entries', not an agent that cannot read the fake /proc.
    let cmd = pods.command_in(&listed, &python).unwrap();
    let out = probe(&agent, cmd, &own, &[]).await;
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
        &agent,
        pods.command_in(&victim, &python).unwrap(),
        &own,
        &[],
    )
    .await;
    let asked = &out["sds"]["default,ROOTCA"]["fetch"];
    assert_eq!(asked["code"], "OK", "{asked}");
    assert_eq!(asked["uri_sans"], serde_json::json!([own]), "{asked}");
    assert_eq!(metric(&agent, "sds_agent_identities ").await, 1.0);
}
