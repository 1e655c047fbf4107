//! Node mode end to end: one agent (`run --mode node`) serving three "pods" on one machine.
//!
//! Each pod is a cgroup v2 directory laid out as the kubelet lays it out
//! (`sds_integration::pods`), listed by the fake kubelet with the same pod UID and container
//! ID; each pod's process is gRPC C-core (grpcio, `integration/python/node_probe.py`) started
//! inside that cgroup. The agent proves every caller with the real SO_PEERCRED, the real
//! `/proc` and the kubelet's pod list, and each pod must get its own identity and nothing
//! else: over StreamSecrets, FetchSecrets and DeltaSecrets, by `default`, by its own SPIFFE ID
//! and by every other pod's, and over the Workload API. A process in no pod is refused
//! `UNAUTHENTICATED`; a pod the kubelet does not list is answered `UNAVAILABLE`.
//!
//! Skips without Python (grpcio) or a writable cgroup v2 hierarchy, unless
//! `SDS_AGENT_REQUIRE_PYTHON=1` / `SDS_AGENT_REQUIRE_CGROUPS=1` (scripts/test.sh sets the first
//! always, and the second where the machine has a cgroup v2 hierarchy it can write).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sds_integration::kubelet::{FakeKubelet, FakePod};
use sds_integration::pods::PodCgroups;
use sds_integration::process::{ChildGuard, agent_bin};
use sds_integration::{free_port, python};
use serde_json::Value;

const TD: &str = "cluster.local";

fn spiffe_id(pod: &FakePod) -> String {
    format!(
        "spiffe://{TD}/ns/{}/sa/{}",
        pod.namespace,
        pod.service_account.as_deref().unwrap()
    )
}

/// A node-mode agent on `dir/agent.sock` (SDS) and `dir/workload.sock`, asking `kubelet`.
struct NodeAgent {
    _proc: ChildGuard,
    admin: SocketAddr,
}

impl NodeAgent {
    async fn start(dir: &Path, kubelet: &FakeKubelet) -> Self {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let mut cmd = Command::new(agent_bin().unwrap());
        cmd.arg("run")
            .args(["--mode", "node", "--trust-domain", TD])
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--workload-api-socket")
            .arg(dir.join("workload.sock"))
            .args(["--admin-addr", &admin.to_string()])
            .args(["--kubelet-host", &kubelet.host()])
            .args(["--kubelet-port", &kubelet.port().to_string()])
            .arg("--kubelet-ca")
            .arg(kubelet.ca_path())
            .arg("--kubelet-token-file")
            .arg(kubelet.token_file())
            .args([
                "--kubelet-poll-interval",
                "50ms",
                "--kubelet-max-attempts",
                "4",
            ])
            .args(["--log-level", "info,sds_agent::attest=debug"])
            .env("NO_COLOR", "1");
        let proc = ChildGuard::spawn("node agent", cmd, &dir.join("agent.log")).unwrap();
        let agent = Self { _proc: proc, admin };
        // Ready (the trust bundle is read at start) before any pod has asked.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if agent
                .get("/readyz")
                .await
                .is_some_and(|(code, _)| code == 200)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node agent never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agent
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.text().await.ok()?))
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await.unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
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
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the probe did not finish in time")
    .unwrap();
    assert!(
        out.status.success(),
        "probe failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const METHODS: [&str; 3] = ["stream", "fetch", "delta"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_gets_its_own_identity_and_never_anothers() {
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let Some(cgroups) = PodCgroups::create().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let pods = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("shop", "backend-5c4b", "backend"),
        FakePod::new("billing", "ledger-0", "ledger"),
    ];
    for pod in &pods {
        kubelet.add_pod(pod.clone());
    }
    let agent = NodeAgent::start(dir.path(), &kubelet).await;
    let ids: Vec<String> = pods.iter().map(spiffe_id).collect();

    for (i, pod) in pods.iter().enumerate() {
        let own = &ids[i];
        let others: Vec<String> = ids.iter().filter(|id| *id != own).cloned().collect();
        let cmd = cgroups.command_in(pod, &python).unwrap();
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
    assert_eq!(agent.metric("sds_agent_identities ").await, 3.0);
    // Two other identities asked for by each pod, over three methods.
    assert_eq!(
        agent
            .metric("sds_agent_sds_bad_requests_total{reason=\"not_authorized\"}")
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
    let Some(cgroups) = PodCgroups::create().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let listed = FakePod::new("shop", "frontend-1", "frontend");
    kubelet.add_pod(listed.clone());
    let agent = NodeAgent::start(dir.path(), &kubelet).await;

    // A process in no pod's cgroup (this test's own children are not in one).
    let out = probe(Command::new(&python), dir.path(), &spiffe_id(&listed), &[]).await;
    let mut codes = Vec::new();
    for label in ["default,ROOTCA", "own"] {
        for m in METHODS {
            let r = &out["sds"][label][m];
            assert_eq!(r["names"], serde_json::json!([]), "{r}");
            assert!(!r["private_key"].as_bool().unwrap());
            codes.push(r["code"].as_str().unwrap().to_owned());
        }
    }
    // Refused, and the connection closed: a call racing the close sees it as UNAVAILABLE.
    assert_eq!(codes[0], "UNAUTHENTICATED", "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "UNAUTHENTICATED" || c == "UNAVAILABLE"),
        "{codes:?}"
    );
    assert_ne!(out["workload"]["code"], "OK", "{}", out["workload"]);
    assert!(agent.metric("sds_agent_attestations_refused_total ").await >= 1.0);

    // A pod in a cgroup the kubelet does not list: proven process, unknown pod.
    let unlisted = FakePod::new("shop", "ghost-1", "ghost");
    let cmd = cgroups.command_in(&unlisted, &python).unwrap();
    let out = probe(cmd, dir.path(), &spiffe_id(&unlisted), &[]).await;
    for m in METHODS {
        let r = &out["sds"]["default,ROOTCA"][m];
        assert_eq!(r["code"], "UNAVAILABLE", "{m}: {r}");
        assert_eq!(r["names"], serde_json::json!([]));
    }
    assert!(
        agent
            .metric("sds_agent_sds_bad_requests_total{reason=\"pod_unknown\"}")
            .await
            >= 3.0
    );
    // Nothing was issued for anyone.
    assert_eq!(agent.metric("sds_agent_identities ").await, 0.0);
}
