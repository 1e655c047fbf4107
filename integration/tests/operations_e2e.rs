//! What an operator sees, end to end with the real Envoy: `/metrics` scraped during a mesh
//! run (two agents on the istiod-style test CA, two Envoys doing mTLS), and
//! `sds-agent status` checked against Envoy's own `/certs`.
//!
//! The test drives two forced rotations, then stops the CA and forces a third: the counters
//! must say exactly what happened (renewals by result, CA requests by result, ACKs equal to
//! pushes, no NACK, one stream gauge per connected stream) while traffic keeps flowing on the
//! last good certificate, and the agent recovers on its own once the CA is back.
//!
//! Without Envoy it prints a line and passes, unless `SDS_AGENT_REQUIRE_ENVOY=1` (set by
//! `scripts/test.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use sds_integration::agent::Agent;
use sds_integration::envoy::Envoy;
use sds_integration::istio_ca::{CLUSTER_ID, IstioTestCa, mesh_ca};
use sds_integration::mesh::{BODY, Mesh, rotation_paths};
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::{Serial, http, test_dir};
use serde_json::Value;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(20);

/// The value of the sample `series` (name and labels exactly as exposed), if present.
async fn sample(agent: &Agent, series: &str) -> Option<f64> {
    let body = http::get(agent.admin(), "/metrics").await.unwrap().body;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Polls `check` every 100 ms until it holds, failing with `what` and the agent's log after
/// [`LIMIT`].
async fn eventually<F: Future<Output = bool>>(agent: &Agent, what: &str, check: impl Fn() -> F) {
    let deadline = Instant::now() + LIMIT;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {LIMIT:?}\n{}",
            agent.process().tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `sds-agent status -o json` against `agent`: exit code and parsed output.
async fn status(agent: &Agent) -> (i32, Value) {
    let admin = agent.admin().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(agent_bin().unwrap())
            .args(["status", "--admin-addr", &admin, "--output", "json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The serials of the `default` and `ROOTCA` rows of a `status` report.
fn status_serials(report: &Value) -> (Serial, BTreeSet<Serial>) {
    let rows = report["secrets"].as_array().unwrap();
    let serial = |r: &Value| r["serial"].as_str().unwrap().parse::<Serial>().unwrap();
    let leaf = rows
        .iter()
        .find(|r| r["name"] == "default")
        .map(serial)
        .unwrap();
    let roots = rows
        .iter()
        .filter(|r| r["name"] == "ROOTCA")
        .map(serial)
        .collect();
    (leaf, roots)
}

/// The certificate every TLS context of `envoy` presents, once they all agree, and the
/// roots they trust.
async fn envoy_serials(envoy: &Envoy) -> Option<(Serial, BTreeSet<Serial>)> {
    let contexts = envoy.certs().await.ok()?;
    let leaves: BTreeSet<Serial> = contexts
        .iter()
        .filter_map(|c| c.chain.first().map(|l| l.serial.clone()))
        .collect();
    let roots: BTreeSet<Serial> = contexts
        .iter()
        .flat_map(|c| c.ca.iter().map(|r| r.serial.clone()))
        .collect();
    match (leaves.len(), contexts.iter().all(|c| !c.chain.is_empty())) {
        (1, true) => Some((leaves.into_iter().next()?, roots)),
        _ => None,
    }
}

/// `status` agrees with what `envoy` holds, every proxy has ACKed, exit 0.
async fn status_matches_envoy(agent: &Agent, envoy: &Envoy) -> Serial {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (code, report) = status(agent).await;
        let from_status = status_serials(&report);
        let from_envoy = envoy_serials(envoy).await;
        let all_acked = report["proxies"]
            .as_array()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["state"] == "acked"));
        if code == 0 && all_acked && from_envoy.as_ref() == Some(&from_status) {
            return from_status.0;
        }
        assert!(
            Instant::now() < deadline,
            "status never matched Envoy's /certs: status (exit {code}) {report:#}\nEnvoy {from_envoy:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rotate(agent: &Agent) {
    let r = http::request(agent.admin(), "POST", "/rotate")
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{r:?}");
}

async fn one_request(mesh: &Mesh) {
    let r = http::get(mesh.entry, "/fresh").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, BODY), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_tell_the_truth_through_rotations_and_a_ca_outage() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let mut ca = IstioTestCa::start(dir.path()).await.unwrap();
    let roots = ca.root_serials().await.unwrap();
    let mesh_ca = mesh_ca(&ca, dir.path(), Some(CLUSTER_ID), roots)
        .await
        .unwrap();
    // Long-lived certificates: every rotation here is one the test asks for.
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    let agent = &mesh.frontend;
    let first = status_matches_envoy(agent, &mesh.client).await;
    status_matches_envoy(&mesh.backend, &mesh.server).await;
    one_request(&mesh).await;

    // Two forced rotations, each seen by Envoy and by `status`.
    let mut serials = vec![first];
    for _ in 0..2 {
        rotate(agent).await;
        let deadline = Instant::now() + LIMIT;
        loop {
            let now = status_matches_envoy(agent, &mesh.client).await;
            if !serials.contains(&now) {
                serials.push(now);
                break;
            }
            assert!(Instant::now() < deadline, "rotation never reached Envoy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        one_request(&mesh).await;
    }

    // The counters after three issuances and two rotations.
    let success = "sds_agent_renewals_total{result=\"success\"}";
    assert_eq!(sample(agent, success).await, Some(3.0));
    assert_eq!(
        sample(agent, "sds_agent_renewals_total{result=\"failure\"}").await,
        Some(0.0),
        "the failure counter exists at zero before any failure"
    );
    assert_eq!(
        sample(
            agent,
            "sds_agent_ca_requests_total{backend=\"istiod\",operation=\"sign\",result=\"success\"}"
        )
        .await,
        Some(3.0)
    );
    let proxies: Vec<Value> =
        serde_json::from_str(&http::get(agent.admin(), "/proxies").await.unwrap().body).unwrap();
    let streams = proxies.len() as f64;
    assert!(streams >= 1.0);
    assert_eq!(
        sample(agent, "sds_agent_sds_streams_open{api=\"sotw\"}").await,
        Some(streams),
        "{proxies:?}"
    );
    let pushes = sample(agent, "sds_agent_sds_pushes_total{api=\"sotw\"}")
        .await
        .unwrap();
    let acks = sample(agent, "sds_agent_sds_acks_total{api=\"sotw\"}")
        .await
        .unwrap();
    assert_eq!(acks, pushes, "every push ACKed");
    // Each stream got its first push; those with `default` got one more per rotation.
    let with_default = proxies
        .iter()
        .filter(|p| {
            p["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "default")
        })
        .count() as f64;
    assert_eq!(pushes, streams + 2.0 * with_default, "{proxies:?}");
    assert_eq!(
        sample(agent, "sds_agent_sds_nacks_total{api=\"sotw\"}").await,
        Some(0.0)
    );
    let secrets: Value =
        serde_json::from_str(&http::get(agent.admin(), "/secrets").await.unwrap().body).unwrap();
    let not_after = humantime::parse_rfc3339(secrets[0]["not_after"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let id = agent.spiffe_id();
    let labels = format!("{{resource=\"default\",identity=\"{id}\"}}");
    assert_eq!(
        sample(
            agent,
            &format!("sds_agent_certificate_expiry_timestamp_seconds{labels}")
        )
        .await,
        Some(not_after)
    );
    let left = sample(
        agent,
        &format!("sds_agent_certificate_expiry_seconds{labels}"),
    )
    .await
    .unwrap();
    assert!(left > 3500.0 && left <= 3600.0, "{left}");

    // The CA goes away; a forced renewal fails, is counted, and changes nothing served.
    ca.stop().await;
    rotate(agent).await;
    let failure = "sds_agent_renewals_total{result=\"failure\"}";
    eventually(agent, "a counted renewal failure", || async {
        sample(agent, failure).await >= Some(1.0)
    })
    .await;
    assert!(
        sample(
            agent,
            "sds_agent_ca_errors_total{backend=\"istiod\",kind=\"unavailable\",retryable=\"true\"}"
        )
        .await
            >= Some(1.0)
    );
    assert!(
        sample(
            agent,
            "sds_agent_ca_requests_total{backend=\"istiod\",operation=\"sign\",result=\"unavailable\"}"
        )
        .await
            >= Some(1.0)
    );
    assert_eq!(sample(agent, success).await, Some(3.0));
    let (code, report) = status(agent).await;
    assert_eq!(
        code, 0,
        "still ready on the last good certificate: {report:#}"
    );
    assert_eq!(&status_serials(&report).0, serials.last().unwrap());
    one_request(&mesh).await;

    // The CA is back: the agent renews on its own, and Envoy gets the new certificate.
    ca.serve().await.unwrap();
    eventually(agent, "renewal after the CA came back", || async {
        sample(agent, success).await == Some(4.0)
    })
    .await;
    let recovered = status_matches_envoy(agent, &mesh.client).await;
    assert!(!serials.contains(&recovered));
    one_request(&mesh).await;
}
