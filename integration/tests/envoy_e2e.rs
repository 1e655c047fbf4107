//! End to end with the real Envoy: two agents share one embedded root; agent A serves
//! `frontend` to a client-side Envoy, agent B serves `backend` to a server-side Envoy. The
//! client Envoy originates mTLS to the server Envoy, each side checks the other's SPIFFE ID,
//! and HTTP flows through both while the certificates rotate every few seconds.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_types)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sds_integration::{
    Proc, agent_bin, envoy_bin, free_port, http_get, start_upstream, wait_until, write_shared_ca,
};

const TD: &str = "example.org";
const BODY: &str = "hello from the upstream\n";

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

struct Agent {
    proc: Proc,
    socket: PathBuf,
}

fn start_agent(dir: &Path, sa: &str, ca: &(PathBuf, PathBuf), ttl: &str) -> Agent {
    let socket = dir.join(format!("{sa}.sock"));
    let admin = free_port();
    let mut cmd = Command::new(agent_bin());
    cmd.args([
        "run",
        "--trust-domain",
        TD,
        "--namespace",
        "default",
        "--service-account",
        sa,
    ])
    .args(["--cert-ttl", ttl, "--log-level", "info"])
    .arg("--socket")
    .arg(&socket)
    .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
    .arg("--embedded-ca-cert")
    .arg(&ca.0)
    .arg("--embedded-ca-key")
    .arg(&ca.1);
    let proc = Proc::spawn(
        &format!("agent {sa}"),
        cmd,
        &dir.join(format!("agent-{sa}.log")),
    );
    let ready = wait_until(Duration::from_secs(20), || {
        http_get(admin, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    assert!(ready, "agent {sa} not ready\n{}", proc.tail(30));
    Agent { proc, socket }
}

/// The SDS cluster and config source every bootstrap shares.
fn sds_cluster(socket: &Path) -> String {
    format!(
        r#"
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: sds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ pipe: {{ path: "{}" }} }} }}
"#,
        socket.display()
    )
}

const SDS_SOURCE: &str = r#"{ resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, grpc_services: [ { envoy_grpc: { cluster_name: sds-grpc } } ] } }"#;

fn tls_context(peer_id: &str) -> String {
    format!(
        r#"
          common_tls_context:
            tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {SDS_SOURCE} }} ]
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{peer_id}" }} }} ]
              validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {SDS_SOURCE} }}"#
    )
}

fn http_filters(stat: &str, cluster: &str) -> String {
    format!(
        r#"
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [ {{ match: {{ prefix: "/" }}, route: {{ cluster: {cluster} }} }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#
    )
}

/// Server side: mTLS listener requiring a client certificate with `peer_id`, to `upstream`.
fn server_bootstrap(
    admin: u16,
    listen: u16,
    socket: &Path,
    peer_id: &str,
    upstream: u16,
) -> String {
    format!(
        r#"node: {{ id: server-envoy, cluster: backend }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: mtls_in
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{tls}{filters}
  clusters:{sds}
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }} ] }} ]
"#,
        tls = tls_context(peer_id),
        filters = http_filters("mtls_in", "upstream"),
        sds = sds_cluster(socket),
    )
}

/// Client side: plain HTTP listener, to `server` over mTLS expecting `peer_id`.
fn client_bootstrap(admin: u16, listen: u16, socket: &Path, peer_id: &str, server: u16) -> String {
    format!(
        r#"node: {{ id: client-envoy, cluster: frontend }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: plain_in
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - name: plain{filters}
  clusters:{sds}
  - name: backend
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext{tls}
    load_assignment:
      cluster_name: backend
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {server} }} }} }} }} ] }} ]
"#,
        filters = http_filters("plain_in", "backend"),
        tls = tls_context(peer_id).replace("\n          ", "\n        "),
        sds = sds_cluster(socket),
    )
}

fn start_envoy(envoy: &Path, dir: &Path, name: &str, bootstrap: String, admin: u16) -> Proc {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, bootstrap).unwrap();
    let mut cmd = Command::new(envoy);
    cmd.arg("-c").arg(&cfg).args([
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "--concurrency",
        "1",
    ]);
    let proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
    let up = wait_until(Duration::from_secs(30), || {
        http_get(admin, "/ready").is_ok_and(|(s, _)| s == 200)
    });
    assert!(up, "{name} not ready\n{}", proc.tail(40));
    proc
}

/// Serial and URI SANs of the workload certificate(s) Envoy holds, from admin `/certs`.
fn envoy_certs(admin: u16) -> Vec<(String, Vec<String>)> {
    let Ok((200, body)) = http_get(admin, "/certs") else {
        return vec![];
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out = Vec::new();
    for c in json["certificates"].as_array().into_iter().flatten() {
        for leaf in c["cert_chain"].as_array().into_iter().flatten().take(1) {
            let serial = leaf["serial_number"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let uris = leaf["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["uri"].as_str().map(str::to_owned))
                .collect();
            out.push((serial, uris));
        }
    }
    out
}

fn stat(admin: u16, name: &str) -> u64 {
    let Ok((200, body)) = http_get(admin, &format!("/stats?filter={name}")) else {
        return 0;
    };
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.ends_with(name))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

struct Mesh {
    _dir: tempfile::TempDir,
    agents: Vec<Agent>,
    envoys: Vec<Proc>,
    client_port: u16,
    client_admin: u16,
    server_admin: u16,
}

impl Mesh {
    /// Two agents on one shared root, a server Envoy in front of an upstream, and a client
    /// Envoy that expects the server to be `expect_server`.
    fn start(envoy: &Path, ttl: &str, expect_server: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_shared_ca(dir.path());
        let a = start_agent(dir.path(), "frontend", &ca, ttl);
        let b = start_agent(dir.path(), "backend", &ca, ttl);
        let upstream = start_upstream(BODY).port();
        let (server_admin, server_port) = (free_port(), free_port());
        let server = start_envoy(
            envoy,
            dir.path(),
            "envoy-server",
            server_bootstrap(
                server_admin,
                server_port,
                &b.socket,
                &id("frontend"),
                upstream,
            ),
            server_admin,
        );
        let (client_admin, client_port) = (free_port(), free_port());
        let client = start_envoy(
            envoy,
            dir.path(),
            "envoy-client",
            client_bootstrap(
                client_admin,
                client_port,
                &a.socket,
                expect_server,
                server_port,
            ),
            client_admin,
        );
        Self {
            _dir: dir,
            agents: vec![a, b],
            envoys: vec![client, server],
            client_port,
            client_admin,
            server_admin,
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for a in &self.agents {
            s += &a.proc.tail(25);
            s += "\n";
        }
        for e in &self.envoys {
            s += &e.tail(25);
            s += "\n";
        }
        s
    }
}

#[test]
fn mtls_through_rotations_with_zero_failed_requests() {
    let Some(envoy) = envoy_bin() else { return };
    let mesh = Mesh::start(&envoy, "20s", &id("backend"));

    let first_ok = wait_until(Duration::from_secs(20), || {
        http_get(mesh.client_port, "/").is_ok_and(|(s, b)| s == 200 && b == BODY)
    });
    assert!(first_ok, "no request got through the mesh\n{}", mesh.logs());

    let (mut client_serials, mut server_serials) = (BTreeSet::new(), BTreeSet::new());
    let (mut ok, mut failed, mut failures) = (0u64, 0u64, Vec::new());
    let started = Instant::now();
    let mut next_poll = started;
    while started.elapsed() < Duration::from_secs(50) {
        match http_get(mesh.client_port, "/") {
            Ok((200, body)) if body == BODY => ok += 1,
            other => {
                failed += 1;
                if failures.len() < 10 {
                    failures.push(format!("{:?}: {other:?}", started.elapsed()));
                }
            }
        }
        if Instant::now() >= next_poll {
            next_poll += Duration::from_millis(500);
            for (serial, uris) in envoy_certs(mesh.client_admin) {
                assert_eq!(
                    uris,
                    [id("frontend")],
                    "client Envoy holds the wrong identity"
                );
                client_serials.insert(serial);
            }
            for (serial, uris) in envoy_certs(mesh.server_admin) {
                assert_eq!(
                    uris,
                    [id("backend")],
                    "server Envoy holds the wrong identity"
                );
                server_serials.insert(serial);
            }
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    eprintln!(
        "{ok} requests ok, {failed} failed; client Envoy saw {} certificates, server Envoy {}",
        client_serials.len(),
        server_serials.len()
    );
    assert_eq!(failed, 0, "failed requests: {failures:?}\n{}", mesh.logs());
    assert!(ok > 500, "too few requests: {ok}");
    assert!(
        client_serials.len() >= 3,
        "client Envoy saw {client_serials:?}: fewer than two rotations\n{}",
        mesh.logs()
    );
    assert!(
        server_serials.len() >= 3,
        "server Envoy saw {server_serials:?}: fewer than two rotations\n{}",
        mesh.logs()
    );
}

#[test]
fn envoy_rejects_a_peer_with_the_wrong_spiffe_id() {
    let Some(envoy) = envoy_bin() else { return };
    // The client expects a server identity that the server does not have.
    let mesh = Mesh::start(&envoy, "1h", &id("not-backend"));
    // Both sides have their certificates: the failure below is about identity, not absence.
    let both_have_certs = wait_until(Duration::from_secs(15), || {
        !envoy_certs(mesh.client_admin).is_empty() && !envoy_certs(mesh.server_admin).is_empty()
    });
    assert!(
        both_have_certs,
        "Envoys did not get certificates\n{}",
        mesh.logs()
    );
    for _ in 0..10 {
        let r = http_get(mesh.client_port, "/");
        assert!(
            !matches!(&r, Ok((200, _))),
            "a request got through to the wrong identity: {r:?}"
        );
    }
    let san_failures = stat(mesh.client_admin, "ssl.fail_verify_san");
    assert!(
        san_failures > 0,
        "requests failed, but not on the SAN check\n{}",
        mesh.logs()
    );
}
