//! The cert-manager backend end to end: `sds-agent --ca cert-manager --kubeconfig ...`
//! against the fake Kubernetes API of `integration/src/kube_api.rs` (HTTPS, bearer token,
//! CertificateRequests watched as on a real API server, a signer that plays cert-manager's
//! approver and CA issuer), with real Envoys.
//!
//! - Two agents, two Envoys, mTLS, and rotation under traffic with zero failed requests; no
//!   CertificateRequest is left once the traffic stops.
//! - Faults through the agent: the API server down at start-up (ready as soon as it is up),
//!   a denial (clear error, counted, not ready, recovery once approved), and ten forced
//!   rotations that leave nothing behind.
//!
//! Without Envoy the mTLS test prints a line and passes, unless `SDS_AGENT_REQUIRE_ENVOY=1`
//! (set by `scripts/test.sh`). The fake API server is in-process and always runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::http;
use sds_integration::kube_api::{Approval, ISSUER, KubeApi, TOKEN};
use sds_integration::mesh::{
    Mesh, MeshCa, NAMESPACE, TRUST_DOMAIN, check_rotation_under_traffic, rotation_paths,
};
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::{test_dir, wait_until};
use tokio::time::Instant;

fn agent_args(kubeconfig: &Path, service_account: &str) -> Vec<OsString> {
    vec![
        "--ca".into(),
        "cert-manager".into(),
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--cert-manager-issuer-name".into(),
        ISSUER.into(),
        "--cert-manager-timeout".into(),
        "10s".into(),
        "--pod-name".into(),
        format!("{service_account}-0").into(),
        "--pod-uid".into(),
        format!("00000000-0000-4000-8000-{:0>12}", service_account.len()).into(),
    ]
}

fn config<'a>(service_account: &'a str, cert_ttl: &'static str) -> AgentConfig<'a> {
    AgentConfig {
        trust_domain: TRUST_DOMAIN,
        namespace: NAMESPACE,
        service_account,
        cert_ttl,
    }
}

async fn metric(agent: &Agent, prefix: &str) -> u64 {
    agent.metric_total(prefix).await.unwrap()
}

#[tokio::test]
async fn envoy_mtls_and_rotation_under_traffic_through_cert_manager() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let api = KubeApi::start().await.unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), TOKEN).unwrap();
    let mesh_ca = MeshCa {
        agent_args: Box::new(move |sa| agent_args(&kubeconfig, sa)),
        roots: vec![api.root_serial().unwrap()],
        agent_env: Vec::new(),
    };
    // 10 s certificates renew about every 5 s: over 16 s of traffic, at least three each.
    let mesh = Mesh::start(&envoy, dir.path(), "10s", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    match check_rotation_under_traffic(&mesh, Duration::from_secs(16), 3).await {
        Ok(summary) => eprintln!("{summary}"),
        Err(report) => panic!("{report}"),
    }
    let created = api.created();
    assert!(created >= 6, "{created} CertificateRequests");
    // Every request was read and deleted. Renewals go on, so one per agent may be in flight,
    // and one just issued lives until its agent has read it: wait (bounded) for a moment with
    // no more than those in flight. A request left behind issued never lets that moment come.
    let api = &api;
    let settled = wait_until(
        "only requests in flight, none issued",
        Duration::from_secs(10),
        || async move {
            let left = api.requests();
            left.len() <= 2 && left.iter().all(|cr| cr["status"]["certificate"].is_null())
        },
    )
    .await;
    if let Err(e) = settled {
        panic!("{e}: {:#?}", api.requests());
    }
    // Watched, not polled: one watch per request, and no other GET than the leftovers'
    // list at each agent's first signature.
    let calls = api.calls();
    let gets = calls
        .iter()
        .filter(|c| c.method == "GET" && !c.uri.contains("watch=true"))
        .count();
    assert!(gets <= 2, "{calls:#?}");
}

#[tokio::test]
async fn the_agent_is_ready_as_soon_as_the_api_server_comes_up() {
    let dir = test_dir().unwrap();
    let mut api = KubeApi::start().await.unwrap();
    api.stop();
    let kubeconfig = api.write_kubeconfig(dir.path(), TOKEN).unwrap();
    let mut agent = Agent::spawn(
        &agent_bin().unwrap(),
        dir.path(),
        &config("late", "1h"),
        &agent_args(&kubeconfig, "late"),
        &[],
    )
    .unwrap();
    agent
        .wait_for_log(
            "certificate renewal failed; will retry",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(!agent.is_ready().await);
    let unavailable = "sds_agent_ca_errors_total{backend=\"cert-manager\",kind=\"unavailable\",retryable=\"true\"}";
    assert!(metric(&agent, unavailable).await >= 1);

    api.serve().await.unwrap();
    let up = Instant::now();
    agent.wait_ready(Duration::from_secs(20)).await.unwrap();
    eprintln!("ready {:?} after the API server came up", up.elapsed());
    assert!(agent.current_serial().await.unwrap().is_some());
    assert_eq!(api.created(), 1, "one request, and it was issued");
    wait_until("the request deleted", Duration::from_secs(5), || async {
        api.requests().is_empty()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_denial_is_a_clear_counted_error_and_the_agent_recovers_once_approved() {
    let dir = test_dir().unwrap();
    let api = KubeApi::start().await.unwrap();
    api.set_approval(Approval::Deny(
        "No policy approved this request: [mesh-workloads: spec.uris.0: Invalid value]".into(),
    ));
    let kubeconfig = api.write_kubeconfig(dir.path(), TOKEN).unwrap();
    let mut agent = Agent::spawn(
        &agent_bin().unwrap(),
        dir.path(),
        &config("denied", "1h"),
        &agent_args(&kubeconfig, "denied"),
        &[],
    )
    .unwrap();
    agent
        .wait_for_log("No policy approved this request", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(!agent.is_ready().await);
    let denied =
        "sds_agent_ca_errors_total{backend=\"cert-manager\",kind=\"denied\",retryable=\"false\"}";
    assert!(metric(&agent, denied).await >= 1);

    // The policy is fixed: the agent's own retry gets the certificate.
    api.set_approval(Approval::Approve);
    agent.wait_ready(Duration::from_secs(30)).await.unwrap();
    assert!(agent.current_serial().await.unwrap().is_some());
    wait_until("every request deleted", Duration::from_secs(5), || async {
        api.requests().is_empty()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn ten_forced_rotations_leave_no_certificate_request_behind() {
    let dir = test_dir().unwrap();
    let api = KubeApi::start().await.unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), TOKEN).unwrap();
    let agent = Agent::start_with(
        &agent_bin().unwrap(),
        dir.path(),
        &config("busy", "1h"),
        &agent_args(&kubeconfig, "busy"),
    )
    .await
    .unwrap();
    let mut serial = agent.current_serial().await.unwrap().unwrap();
    for round in 0..10 {
        let r = http::request(agent.admin(), "POST", "/rotate")
            .await
            .unwrap();
        assert!((200..300).contains(&r.status), "POST /rotate: {r:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = agent.current_serial().await.unwrap();
            if now.as_ref().is_some_and(|s| s != &serial) {
                serial = now.unwrap();
                break;
            }
            assert!(Instant::now() < deadline, "rotation {round} did not happen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(api.created(), 11);
    wait_until("every request deleted", Duration::from_secs(5), || async {
        api.requests().is_empty()
    })
    .await
    .unwrap();
}
