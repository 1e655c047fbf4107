//! The istiod backend end to end: `sds-agent --ca istiod` against the test Istio CA of
//! `integration/src/istio_ca.rs` (a tonic server over TLS that authenticates by bearer token
//! and takes the identity from the caller, as istiod does), with real Envoys.
//!
//! - Two agents, two Envoys, mTLS, and rotation under traffic with zero failed requests.
//! - Faults: the CA down at start-up (ready as soon as it comes up), down during a rotation
//!   (the last good certificate stays, recovery on its own), the token file rotated between
//!   calls, wrong tokens and a wrong cluster ID (clear errors, counted, not ready), and a root
//!   rotated by the CA (Envoy receives the new `ROOTCA`, and traffic between a workload
//!   under the new root and one under the old keeps flowing while both are trusted).
//!
//! Without Envoy the mTLS tests print a line and pass, unless `SDS_AGENT_REQUIRE_ENVOY=1`
//! (set by `scripts/test.sh`). The test CA is in-process and always runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::http;
use sds_integration::istio_ca::{
    CLUSTER_ID, IstioTestCa, args_for, mesh_ca, token_file, token_for, write_token,
};
use sds_integration::mesh::{
    BODY, Mesh, NAMESPACE, TRUST_DOMAIN, check_rotation_under_traffic, drive, rotation_paths,
};
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::{Serial, test_dir, wait_until};
use tokio::time::Instant;

fn istiod_args(ca: &IstioTestCa, token_file: &Path, cluster_id: &str) -> Vec<OsString> {
    args_for(ca.addr(), ca.tls_root(), token_file, Some(cluster_id))
}

fn config<'a>(service_account: &'a str, cert_ttl: &'static str) -> AgentConfig<'a> {
    AgentConfig {
        trust_domain: TRUST_DOMAIN,
        namespace: NAMESPACE,
        service_account,
        cert_ttl,
    }
}

async fn start_agent(ca: &IstioTestCa, dir: &Path, sa: &str, ttl: &'static str) -> Agent {
    let token = token_for(ca, dir, sa).await.unwrap();
    Agent::start_with(
        &agent_bin().unwrap(),
        dir,
        &config(sa, ttl),
        &istiod_args(ca, &token, CLUSTER_ID),
    )
    .await
    .unwrap()
}

async fn rotate(agent: &Agent) {
    let r = http::request(agent.admin(), "POST", "/rotate")
        .await
        .unwrap();
    assert!((200..300).contains(&r.status), "POST /rotate: {r:?}");
}

/// Waits until the agent's log holds `needle`.
async fn log_shows(agent: &Agent, needle: &str) {
    agent
        .wait_for_log(needle, Duration::from_secs(20))
        .await
        .unwrap();
}

async fn metric(agent: &Agent, prefix: &str) -> u64 {
    agent.metric_total(prefix).await.unwrap()
}

#[tokio::test]
async fn envoy_mtls_and_rotation_under_traffic_through_the_istio_ca() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    let mesh_ca = mesh_ca(
        &ca,
        dir.path(),
        Some(CLUSTER_ID),
        ca.root_serials().await.unwrap(),
    )
    .await
    .unwrap();
    // 10 s certificates renew about every 5 s: over 16 s of traffic, at least three each.
    let mesh = Mesh::start(&envoy, dir.path(), "10s", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    match check_rotation_under_traffic(&mesh, Duration::from_secs(16), 3).await {
        Ok(summary) => eprintln!("{summary}"),
        Err(report) => panic!("{report}"),
    }
    // What the CA saw: every call authenticated, with the cluster ID and the TTL asked for.
    let calls = ca.calls().await;
    assert!(calls.len() >= 6, "{calls:?}");
    for call in &calls {
        assert!(call.outcome.is_ok(), "{call:?}");
        assert_eq!(call.cluster_id.as_deref(), Some(CLUSTER_ID));
        assert_eq!(call.validity, 10);
        assert_eq!(call.root, Some(1));
    }
}

#[tokio::test]
async fn the_agent_is_ready_as_soon_as_the_ca_comes_up() {
    let dir = test_dir().unwrap();
    let mut ca = IstioTestCa::new(dir.path()).unwrap();
    let token = token_for(&ca, dir.path(), "late").await.unwrap();
    let mut agent = Agent::spawn(
        &agent_bin().unwrap(),
        dir.path(),
        &config("late", "1h"),
        &istiod_args(&ca, &token, CLUSTER_ID),
        &[],
    )
    .unwrap();
    log_shows(&agent, "certificate renewal failed; will retry").await;
    assert!(!agent.is_ready().await);
    assert!(
        metric(
            &agent,
            "sds_agent_ca_errors_total{backend=\"istiod\",kind=\"unavailable\",retryable=\"true\"}"
        )
        .await
            >= 1
    );

    // The CA comes up after the first failure: the next retry (1 to 2 s later) succeeds.
    ca.serve().await.unwrap();
    let up = Instant::now();
    agent.wait_ready(Duration::from_secs(15)).await.unwrap();
    eprintln!("ready {:?} after the CA came up", up.elapsed());
    assert!(agent.current_serial().await.unwrap().is_some());
    assert_eq!(ca.calls().await.len(), 1, "one call, and it succeeded");
}

#[tokio::test]
async fn the_last_good_certificate_stays_while_the_ca_is_down_and_renewal_resumes_alone() {
    let dir = test_dir().unwrap();
    let mut ca = IstioTestCa::start(dir.path()).await.unwrap();
    let agent = start_agent(&ca, dir.path(), "steady", "1h").await;
    let first = agent.current_serial().await.unwrap().unwrap();

    ca.stop().await;
    rotate(&agent).await;
    log_shows(&agent, "certificate renewal failed; will retry").await;
    assert!(metric(&agent, "sds_agent_renewals_total{result=\"failure\"}").await >= 1);
    assert_eq!(agent.current_serial().await.unwrap(), Some(first.clone()));
    assert!(
        agent.is_ready().await,
        "the last good certificate is still served"
    );

    // Back: the agent's own retry renews, no rotation asked.
    ca.serve().await.unwrap();
    let renewed = agent
        .next_serial(&first, Duration::from_secs(20))
        .await
        .unwrap();
    assert_ne!(renewed, first);
}

#[tokio::test]
async fn a_token_rotated_in_its_file_is_used_at_the_next_call() {
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    let agent = start_agent(&ca, dir.path(), "rotating", "1h").await;
    let first = agent.current_serial().await.unwrap().unwrap();

    // kubelet refreshes the projected token; the CA no longer accepts the old one.
    ca.allow(
        "projected-token-rotating-2",
        TRUST_DOMAIN,
        NAMESPACE,
        "rotating",
    )
    .await;
    ca.revoke("projected-token-rotating-1").await;
    write_token(
        &token_file(dir.path(), "rotating"),
        "projected-token-rotating-2\n",
    )
    .unwrap();
    rotate(&agent).await;
    agent
        .next_serial(&first, Duration::from_secs(20))
        .await
        .unwrap();
    let tokens: Vec<Option<String>> = ca.calls().await.into_iter().map(|c| c.token).collect();
    assert_eq!(
        tokens,
        [
            Some("projected-token-rotating-1".into()),
            Some("projected-token-rotating-2".into())
        ]
    );
    assert_eq!(
        metric(&agent, "sds_agent_ca_errors_total").await,
        0,
        "not one call with a stale token"
    );
}

#[tokio::test]
async fn wrong_tokens_and_a_wrong_cluster_id_are_clear_counted_errors() {
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    let bin = agent_bin().unwrap();
    // A token the CA never issued; another workload's token; the right token, wrong cluster.
    let unknown = token_file(dir.path(), "unknown");
    write_token(&unknown, "not-a-token-the-ca-knows").unwrap();
    let other = token_for(&ca, dir.path(), "someone-else").await.unwrap();
    let right = token_for(&ca, dir.path(), "elsewhere").await.unwrap();
    let cases = [
        (
            "unknown",
            istiod_args(&ca, &unknown, CLUSTER_ID),
            "audience",
        ),
        (
            "impostor",
            istiod_args(&ca, &other, CLUSTER_ID),
            "does not match the caller",
        ),
        (
            "elsewhere",
            istiod_args(&ca, &right, "other-cluster"),
            "--cluster-id (other-cluster)",
        ),
    ];
    for (sa, args, needle) in cases {
        let agent = Agent::spawn(&bin, dir.path(), &config(sa, "1h"), &args, &[]).unwrap();
        log_shows(&agent, "Unauthenticated from the CA").await;
        log_shows(&agent, needle).await;
        assert!(!agent.is_ready().await, "{sa}");
        assert!(
            metric(
                &agent,
                "sds_agent_ca_errors_total{backend=\"istiod\",kind=\"denied\",retryable=\"false\"}"
            )
            .await
                >= 1,
            "{sa}"
        );
        assert!(agent.current_serial().await.unwrap().is_none(), "{sa}");
    }
    let calls = ca.calls().await;
    assert!(calls.iter().all(|c| c.outcome.is_err()), "{calls:?}");
}

/// The roots each Envoy trusts and the serial of the certificate it presents.
async fn envoy_view(envoy: &sds_integration::envoy::Envoy) -> Option<(Vec<Serial>, Serial)> {
    let certs = envoy.certs().await.ok()?;
    let ctx = certs.first()?;
    let roots = ctx.ca.iter().map(|c| c.serial.clone()).collect();
    Some((roots, ctx.chain.first()?.serial.clone()))
}

#[tokio::test]
async fn a_root_rotated_by_the_ca_reaches_envoy_and_traffic_flows_across_both_roots() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    let old_root = ca.root_serials().await.unwrap();
    let mesh_ca = mesh_ca(&ca, dir.path(), None, old_root.clone())
        .await
        .unwrap();
    // Long-lived certificates: every rotation here is one the test asks for.
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    let entry = mesh.entry;
    wait_until("a first request", Duration::from_secs(20), || async move {
        http::get(entry, "/fresh")
            .await
            .is_ok_and(|r| r.status == 200 && r.body == BODY)
    })
    .await
    .unwrap();

    let until = Instant::now() + Duration::from_secs(20);
    let steps = async {
        // 1. The CA adds a new root to what it sends; both agents renew and push both roots.
        tokio::time::sleep(Duration::from_secs(2)).await;
        ca.add_next_root().await.unwrap();
        let both = ca.root_serials().await.unwrap();
        let first = mesh.frontend.current_serial().await.unwrap().unwrap();
        let second = mesh.backend.current_serial().await.unwrap().unwrap();
        rotate(&mesh.frontend).await;
        rotate(&mesh.backend).await;
        // The bundle is published before the certificate of the same answer: wait for the
        // certificates too, so that step 2's rotation is not taken up by one still running.
        mesh.frontend
            .next_serial(&first, Duration::from_secs(20))
            .await
            .unwrap();
        mesh.backend
            .next_serial(&second, Duration::from_secs(20))
            .await
            .unwrap();
        for side in [&mesh.client, &mesh.server] {
            let both = both.clone();
            wait_until("Envoy to trust both roots", Duration::from_secs(10), || {
                let both = both.clone();
                async move {
                    envoy_view(side)
                        .await
                        .is_some_and(|(roots, _)| roots == both)
                }
            })
            .await
            .unwrap();
        }
        // 2. The CA signs under the new root. The frontend renews first, so for a while the
        //    client presents a certificate of the new root to a server of the old one.
        ca.sign_with_next_root().await;
        let before = mesh.frontend.current_serial().await.unwrap().unwrap();
        rotate(&mesh.frontend).await;
        let new_client = mesh
            .frontend
            .next_serial(&before, Duration::from_secs(20))
            .await
            .unwrap();
        let client = &mesh.client;
        wait_until(
            "the client Envoy to present its new certificate",
            Duration::from_secs(10),
            || {
                let new_client = new_client.clone();
                async move {
                    envoy_view(client)
                        .await
                        .is_some_and(|(_, leaf)| leaf == new_client)
                }
            },
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        // 3. The backend moves too.
        let before = mesh.backend.current_serial().await.unwrap().unwrap();
        rotate(&mesh.backend).await;
        let new_server = mesh
            .backend
            .next_serial(&before, Duration::from_secs(20))
            .await
            .unwrap();
        (both, new_client, new_server)
    };
    let (fresh, pooled, (both, new_client, new_server)) = tokio::join!(
        drive(entry, "/fresh", until),
        drive(entry, "/pooled", until),
        steps,
    );
    let report = format!(
        "fresh: {} ok, {} failed {:?}; pooled: {} ok, {} failed {:?}\n{}",
        fresh.ok,
        fresh.failed,
        fresh.failures,
        pooled.ok,
        pooled.failed,
        pooled.failures,
        mesh.diagnostics().await
    );
    assert_eq!(fresh.failed + pooled.failed, 0, "{report}");
    assert!(fresh.ok > 100 && pooled.ok > 100, "{report}");
    assert!(both.len() == 2 && both[0] == old_root[0], "{both:?}");
    // The handshakes used the new-root client certificate against the old-root server one.
    assert!(fresh.client_certs_used.contains(&new_client), "{report}");
    assert!(fresh.server_certs_used.contains(&new_server), "{report}");
    for side in [&mesh.client, &mesh.server] {
        let (roots, _) = envoy_view(side).await.unwrap();
        assert_eq!(roots, both, "{report}");
    }
    eprintln!(
        "root rotation: fresh connections {} ok, reused {} ok, 0 failed; client certificates \
         used {}, server certificates used {}; both Envoys trust {both:?}",
        fresh.ok,
        pooled.ok,
        fresh.client_certs_used.len(),
        fresh.server_certs_used.len()
    );
    let roots_used: Vec<Option<u8>> = ca.calls().await.iter().map(|c| c.root).collect();
    // First certificates, renewals after the new root was added, the renewals of phase 2 of
    // the agents' staged rotation (once the Envoys ACKed both roots; root_rotation_e2e.rs
    // follows the phases), then the two under the new root.
    assert!(
        roots_used.windows(2).all(|w| w[0] <= w[1])
            && roots_used.iter().filter(|r| **r == Some(2)).count() == 2
            && roots_used.iter().filter(|r| **r == Some(1)).count() >= 4
            && roots_used.iter().all(|r| r.is_some()),
        "{roots_used:?}"
    );
}
