//! End to end with the real Envoy on the embedded CA: two agents share one embedded root and
//! serve the two Envoys of a [`sds_integration::mesh`]; the client Envoy originates mTLS to
//! the server Envoy, each side checks the other's SPIFFE ID, and HTTP flows through both to a
//! small upstream while the certificates rotate.
//!
//! Without Envoy these tests print a line and pass, unless `SDS_AGENT_REQUIRE_ENVOY=1`
//! (set by `scripts/test.sh`). They need the agent binary: `cargo build -p sds-agent`.
//! With `SDS_E2E_KEEP_DIR` set, each test keeps its directory (bootstraps, the CA, every
//! process's log) and prints where it is.

// Test code, helpers included (clippy's allow-unwrap-in-tests covers only `#[test]` bodies):
// a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sds_integration::http;
use sds_integration::mesh::{
    BODY, ClientPath, Mesh, MeshCa, TRAFFIC, check_rotation_under_traffic, rotation_paths,
    spiffe_id,
};
use sds_integration::process::envoy_bin;
use sds_integration::{test_dir, wait_until};
use tokio::time::Instant;

/// Client and server certificates rotate at least twice each while requests flow through
/// both Envoys, half of them on a new mTLS connection each, half on a reused one; not one
/// request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_through_rotations_with_zero_failed_requests() {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = MeshCa::shared_root(dir.path()).unwrap();
    let mesh = Mesh::start(&envoy_bin, dir.path(), "20s", &rotation_paths(), &ca)
        .await
        .unwrap();
    match check_rotation_under_traffic(&mesh, TRAFFIC, 3).await {
        Ok(summary) => eprintln!("rotation test: {summary}"),
        Err(report) => panic!("{report}"),
    }
}

/// A client Envoy that expects a server identity the server does not have refuses every
/// connection, for that reason (`ssl.fail_verify_san`), while a cluster of the same Envoy that
/// expects the right identity gets through: `ROOTCA` is Envoy's SPIFFE validator, which
/// honours the bootstrap's URI SAN matchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_rejects_a_peer_with_the_wrong_spiffe_id() {
    rejects_a_peer_with_the_wrong_spiffe_id(false).await;
}

/// The same with `--sds-plain-roots`: `ROOTCA` is a plain `trusted_ca`, as for proxies without
/// the SPIFFE validator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_rejects_a_peer_with_the_wrong_spiffe_id_with_plain_roots() {
    rejects_a_peer_with_the_wrong_spiffe_id(true).await;
}

async fn rejects_a_peer_with_the_wrong_spiffe_id(plain_roots: bool) {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let mut ca = MeshCa::shared_root(dir.path()).unwrap();
    if plain_roots {
        let args = std::mem::replace(&mut ca.agent_args, Box::new(|_| Vec::new()));
        ca.agent_args = Box::new(move |sa| {
            let mut flags = args(sa);
            flags.push("--sds-plain-roots".into());
            flags
        });
    }
    let mesh = Mesh::start(
        &envoy_bin,
        dir.path(),
        "1h",
        &[
            ClientPath::new("/control", "control", spiffe_id("backend"), true),
            ClientPath::new("/", "backend", spiffe_id("not-backend"), true),
        ],
        &ca,
    )
    .await
    .unwrap();
    let entry = mesh.entry;

    // The control path proves that both agents, both Envoys and the upstream work.
    let control = wait_until(
        "a request through the control cluster",
        Duration::from_secs(10),
        || async move {
            http::get(entry, "/control")
                .await
                .is_ok_and(|r| r.status == 200 && r.body == BODY)
        },
    )
    .await;
    if let Err(e) = control {
        panic!("{e}\n{}", mesh.diagnostics().await);
    }

    let until = Instant::now() + Duration::from_secs(3);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut refused, mut other) = (0u64, Vec::new());
    while tick.tick().await < until {
        match http::get(entry, "/").await {
            Ok(r) if r.status == 503 => refused += 1,
            r => other.push(format!("{r:?}")),
        }
    }
    assert!(
        other.is_empty(),
        "requests to a server with the wrong identity did not fail with 503: {other:#?}"
    );
    assert!(refused >= 10, "too few attempts: {refused}");

    let client = &mesh.client;
    let san_failures = client
        .counter("cluster.backend.ssl.fail_verify_san")
        .await
        .unwrap();
    let handshakes = client
        .counter("cluster.backend.ssl.handshake")
        .await
        .unwrap();
    let control_san_failures = client
        .counter("cluster.control.ssl.fail_verify_san")
        .await
        .unwrap();
    let control_handshakes = client
        .counter("cluster.control.ssl.handshake")
        .await
        .unwrap();
    eprintln!(
        "rejection test: {refused} requests refused; backend cluster: {san_failures} SAN \
         failures, {handshakes} handshakes; control cluster: {control_san_failures} SAN \
         failures, {control_handshakes} handshakes"
    );
    assert!(
        san_failures >= refused,
        "{refused} requests refused but only {san_failures} SAN verification failures\n{}",
        mesh.diagnostics().await
    );
    assert_eq!(
        handshakes, 0,
        "a handshake with the wrong identity completed"
    );
    assert_eq!(control_san_failures, 0);
    assert!(control_handshakes >= 1);

    // And the right identity still gets through afterwards.
    let r = http::get(entry, "/control").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, BODY));

    // What both Envoys validated with.
    for envoy in [&mesh.client, &mesh.server] {
        let rootca = envoy.active_secret("ROOTCA").await.unwrap().unwrap();
        let vc = &rootca["secret"]["validation_context"];
        if plain_roots {
            assert!(vc["trusted_ca"]["inline_bytes"].is_string(), "{rootca}");
            assert!(vc["custom_validator_config"].is_null(), "{rootca}");
        } else {
            assert!(vc["trusted_ca"].is_null(), "{rootca}");
            let validator = &vc["custom_validator_config"];
            assert_eq!(
                validator["name"], "envoy.tls.cert_validator.spiffe",
                "{rootca}"
            );
            assert_eq!(
                validator["typed_config"]["trust_domains"][0]["name"], "example.org",
                "{rootca}"
            );
        }
    }
}
