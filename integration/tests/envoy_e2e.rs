//! End to end with the real Envoy: two agents share one embedded root; agent A serves
//! `frontend` to a client-side Envoy, agent B serves `backend` to a server-side Envoy. The
//! client Envoy originates mTLS to the server Envoy, each side checks the other's SPIFFE ID,
//! and HTTP flows through both to a small upstream while the certificates rotate.
//!
//! ```text
//! test ──HTTP──▶ client Envoy ══mTLS══▶ server Envoy ──HTTP──▶ upstream
//!                    ▲ SDS                  ▲ SDS
//!             agent A (frontend)     agent B (backend)     (one shared root CA)
//! ```
//!
//! Each Envoy also names, in a response header, the peer certificate of the TLS session that
//! carried the request (`%DOWNSTREAM_PEER_SERIAL%` on the server, `%UPSTREAM_PEER_CERT%` on
//! the client), so the tests see which certificates the handshakes actually used, not only
//! which ones Envoy holds.
//!
//! Without Envoy these tests print a line and pass, unless `SDS_AGENT_REQUIRE_ENVOY=1`
//! (set by `scripts/test.sh`). They need the agent binary: `cargo build -p sds-agent`.
//! With `SDS_E2E_KEEP_DIR` set, each test keeps its directory (bootstraps, the CA, every
//! process's log) and prints where it is.

// Test code, helpers included (clippy's allow-unwrap-in-tests covers only `#[test]` bodies):
// a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::envoy::{
    self, Bootstrap, Envoy, downstream_tls, http_listener, route, sds_cluster, static_cluster,
    upstream_tls,
};
use sds_integration::http::{self, Upstream};
use sds_integration::pki::SharedCa;
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::{Serial, free_port, wait_until};
use tokio::time::{Instant, MissedTickBehavior};

const TRUST_DOMAIN: &str = "example.org";
const NAMESPACE: &str = "default";
const BODY: &str = "hello from the upstream\n";

/// How long the rotation test sends traffic. With `--cert-ttl 20s` the agents renew at half
/// the certificates' lifetime, every 10 s or a little sooner, so this covers at least four
/// certificates on each side; the test asks for three.
const TRAFFIC: Duration = Duration::from_secs(46);
/// Pause between two requests of one request loop.
const REQUEST_INTERVAL: Duration = Duration::from_millis(50);
/// Pause between two looks at the Envoys' `/certs`.
const CERT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the first request through a fresh mesh may take to succeed.
const FIRST_REQUEST_LIMIT: Duration = Duration::from_secs(20);
/// How many failures a request loop describes in full.
const FAILURES_KEPT: usize = 20;

/// Added by the server Envoy: the serial of the client certificate of the session.
const CLIENT_CERT_SERIAL: &str = "x-e2e-client-cert-serial";
/// Added by the server Envoy: the URI SAN of the client certificate of the session.
const CLIENT_CERT_URI: &str = "x-e2e-client-cert-uri";
/// Added by the client Envoy: the server certificate of the session, URL-encoded PEM.
const SERVER_CERT: &str = "x-e2e-server-cert";
/// Added by the client Envoy: the URI SAN of the server certificate of the session.
const SERVER_CERT_URI: &str = "x-e2e-server-cert-uri";

/// One way through the client Envoy to the server Envoy: requests whose path starts with
/// `prefix` go to cluster `cluster`, which expects the server to be `expect_server`.
struct ClientPath {
    prefix: &'static str,
    cluster: &'static str,
    expect_server: String,
    /// A new connection, so a new mTLS handshake, for every request.
    fresh_connections: bool,
}

/// The two agents, the two Envoys and the upstream of one test, in their own directory.
/// Fields drop in order: the Envoys before the agents they depend on (so the Envoys' logs do
/// not end in complaints about a vanished SDS server), the directory holding the logs last.
struct Mesh {
    client: Envoy,
    server: Envoy,
    frontend: Agent,
    backend: Agent,
    _upstream: Upstream,
    ca: SharedCa,
    /// The client Envoy's plain-HTTP listener.
    entry: SocketAddr,
    dir: tempfile::TempDir,
}

/// What one request loop saw.
#[derive(Debug, Default)]
struct Traffic {
    ok: u64,
    failed: u64,
    /// The first failures, with when they happened.
    failures: Vec<String>,
    /// Responses that came back `200` from a session with the wrong peer, or without the
    /// headers naming it.
    wrong_peers: Vec<String>,
    /// Serials of the client certificates the server Envoy saw in handshakes.
    client_certs_used: BTreeSet<Serial>,
    /// Serials of the server certificates the client Envoy saw in handshakes.
    server_certs_used: BTreeSet<Serial>,
    slowest: Duration,
}

/// What the Envoys' `/certs` showed over time.
#[derive(Debug, Default)]
struct CertWatch {
    polls: u32,
    client_held: BTreeSet<Serial>,
    server_held: BTreeSet<Serial>,
    /// Wrong identities, wrong roots, admin endpoints that did not answer.
    problems: Vec<String>,
}

impl ClientPath {
    fn new(
        prefix: &'static str,
        cluster: &'static str,
        expect_server: String,
        fresh_connections: bool,
    ) -> Self {
        Self {
            prefix,
            cluster,
            expect_server,
            fresh_connections,
        }
    }
}

impl Mesh {
    /// Starts everything with certificates of `cert_ttl`; the client Envoy gets one cluster
    /// and one route per entry of `paths`, in order.
    async fn start(envoy_bin: &Path, cert_ttl: &str, paths: &[ClientPath]) -> Self {
        let agent_bin = agent_bin().unwrap();
        let mut dir = tempfile::tempdir().unwrap();
        if std::env::var_os("SDS_E2E_KEEP_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("SDS_E2E_KEEP_DIR: keeping {}", dir.path().display());
        }
        let ca = SharedCa::write(dir.path()).unwrap();
        let config = |service_account| AgentConfig {
            trust_domain: TRUST_DOMAIN,
            namespace: NAMESPACE,
            service_account,
            cert_ttl,
        };
        let (frontend_config, backend_config) = (config("frontend"), config("backend"));
        let (frontend, backend) = tokio::try_join!(
            Agent::start(&agent_bin, dir.path(), &frontend_config, &ca),
            Agent::start(&agent_bin, dir.path(), &backend_config, &ca),
        )
        .unwrap();
        let upstream = Upstream::start(BODY).await.unwrap();

        let server_port = free_port().unwrap();
        let server_bootstrap = Bootstrap::new(
            "server-envoy",
            "backend",
            vec![http_listener(
                "mtls_in",
                server_port,
                Some(downstream_tls(frontend.spiffe_id())),
                vec![route("/", "upstream")],
                &[
                    (CLIENT_CERT_SERIAL, "%DOWNSTREAM_PEER_SERIAL%"),
                    (CLIENT_CERT_URI, "%DOWNSTREAM_PEER_URI_SAN%"),
                ],
            )],
            vec![
                sds_cluster(backend.socket()),
                static_cluster("upstream", upstream.addr(), None, false),
            ],
        )
        .unwrap();

        let entry_port = free_port().unwrap();
        let server_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server_port));
        let mut clusters = vec![sds_cluster(frontend.socket())];
        clusters.extend(paths.iter().map(|p| {
            static_cluster(
                p.cluster,
                server_addr,
                Some(upstream_tls(&p.expect_server)),
                p.fresh_connections,
            )
        }));
        let client_bootstrap = Bootstrap::new(
            "client-envoy",
            "frontend",
            vec![http_listener(
                "plain_in",
                entry_port,
                None,
                paths.iter().map(|p| route(p.prefix, p.cluster)).collect(),
                &[
                    (SERVER_CERT, "%UPSTREAM_PEER_CERT%"),
                    (SERVER_CERT_URI, "%UPSTREAM_PEER_URI_SAN%"),
                ],
            )],
            clusters,
        )
        .unwrap();

        let (server, client) = tokio::try_join!(
            Envoy::start(envoy_bin, dir.path(), "envoy-server", &server_bootstrap),
            Envoy::start(envoy_bin, dir.path(), "envoy-client", &client_bootstrap),
        )
        .unwrap();
        Self {
            client,
            server,
            frontend,
            backend,
            _upstream: upstream,
            ca,
            entry: SocketAddr::from((Ipv4Addr::LOCALHOST, entry_port)),
            dir,
        }
    }

    /// What the agents and Envoys hold right now, for failure messages. (The processes'
    /// log tails are printed by their guards when the test panics.)
    async fn diagnostics(&self) -> String {
        let mut out = format!(
            "test directory (removed unless SDS_E2E_KEEP_DIR is set): {}\n",
            self.dir.path().display()
        );
        for agent in [&self.frontend, &self.backend] {
            let secrets = agent.secrets_json().await;
            let _ = writeln!(out, "{} /secrets: {secrets:?}", agent.process().name());
        }
        for envoy in [&self.client, &self.server] {
            let certs = envoy.certs().await;
            let _ = writeln!(out, "{} /certs: {certs:?}", envoy.process().name());
        }
        out
    }
}

impl Traffic {
    fn fail(&mut self, at: Duration, what: String) {
        self.failed += 1;
        if self.failures.len() < FAILURES_KEPT {
            self.failures.push(format!("at {at:.2?}: {what}"));
        }
    }

    /// Records which certificates carried a successful response, and checks their identities.
    fn record_peers(&mut self, at: Duration, response: &http::Response) {
        let client_uri = response.header(CLIENT_CERT_URI).unwrap_or_default();
        let server_uri = response.header(SERVER_CERT_URI).unwrap_or_default();
        if client_uri != spiffe_id("frontend") || server_uri != spiffe_id("backend") {
            self.wrong_peers.push(format!(
                "at {at:.2?}: client certificate {client_uri:?}, server certificate {server_uri:?}"
            ));
        }
        match response.header(CLIENT_CERT_SERIAL).map(str::parse) {
            Some(Ok(serial)) => {
                self.client_certs_used.insert(serial);
            }
            other => self
                .wrong_peers
                .push(format!("at {at:.2?}: client certificate serial {other:?}")),
        }
        match response.header(SERVER_CERT).map(envoy::serial_of_peer_cert) {
            Some(Ok(serial)) => {
                self.server_certs_used.insert(serial);
            }
            other => self
                .wrong_peers
                .push(format!("at {at:.2?}: server certificate {other:?}")),
        }
    }
}

/// The SPIFFE ID of a service account of the test namespace.
fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// Sends `GET path` to `entry` every [`REQUEST_INTERVAL`] until `until`, one at a time.
async fn drive(entry: SocketAddr, path: &str, until: Instant) -> Traffic {
    let mut traffic = Traffic::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(REQUEST_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while tick.tick().await < until {
        let sent = Instant::now();
        let result = http::get(entry, path).await;
        traffic.slowest = traffic.slowest.max(sent.elapsed());
        let at = sent - started;
        match result {
            Ok(r) if r.status == 200 && r.body == BODY => {
                traffic.ok += 1;
                traffic.record_peers(at, &r);
            }
            Ok(r) => traffic.fail(at, format!("status {}, body {:?}", r.status, r.body)),
            Err(e) => traffic.fail(at, e.to_string()),
        }
    }
    traffic
}

/// Looks at both Envoys' `/certs` every [`CERT_POLL_INTERVAL`] until `until`.
async fn watch_certs(mesh: &Mesh, until: Instant) -> CertWatch {
    let mut watch = CertWatch::default();
    let mut tick = tokio::time::interval(CERT_POLL_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let sides = [
        (&mesh.client, spiffe_id("frontend")),
        (&mesh.server, spiffe_id("backend")),
    ];
    while tick.tick().await < until {
        watch.polls += 1;
        for (i, (envoy, expected)) in sides.iter().enumerate() {
            let name = envoy.process().name();
            let contexts = match envoy.certs().await {
                Ok(c) => c,
                Err(e) => {
                    watch.problems.push(format!("{name}: {e}"));
                    continue;
                }
            };
            for ctx in contexts {
                let Some(leaf) = ctx.chain.first() else {
                    watch
                        .problems
                        .push(format!("{name}: a TLS context without a certificate"));
                    continue;
                };
                if leaf.uri_sans != [expected.as_str()] {
                    watch.problems.push(format!(
                        "{name} holds {} with URI SANs {:?}, not [{expected}]",
                        leaf.serial, leaf.uri_sans
                    ));
                }
                let roots: Vec<&Serial> = ctx.ca.iter().map(|c| &c.serial).collect();
                if roots != [&mesh.ca.serial] {
                    watch.problems.push(format!(
                        "{name} trusts {roots:?}, not the shared root {}",
                        mesh.ca.serial
                    ));
                }
                let held = if i == 0 {
                    &mut watch.client_held
                } else {
                    &mut watch.server_held
                };
                held.insert(leaf.serial.clone());
            }
        }
    }
    watch
}

/// Client and server certificates rotate at least twice each while requests flow through
/// both Envoys, half of them on a new mTLS connection each, half on a reused one; not one
/// request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_through_rotations_with_zero_failed_requests() {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let mesh = Mesh::start(
        &envoy_bin,
        "20s",
        &[
            ClientPath::new("/fresh", "backend-fresh", spiffe_id("backend"), true),
            // The catch-all: `/pooled` lands here.
            ClientPath::new("/", "backend-pooled", spiffe_id("backend"), false),
        ],
    )
    .await;
    let entry = mesh.entry;

    let first = wait_until(
        "a first request through the mesh",
        FIRST_REQUEST_LIMIT,
        || async move {
            http::get(entry, "/fresh")
                .await
                .is_ok_and(|r| r.status == 200 && r.body == BODY)
        },
    )
    .await;
    if let Err(e) = first {
        panic!("{e}\n{}", mesh.diagnostics().await);
    }

    let until = Instant::now() + TRAFFIC;
    let (fresh, pooled, watch) = tokio::join!(
        drive(entry, "/fresh", until),
        drive(entry, "/pooled", until),
        watch_certs(&mesh, until),
    );
    eprintln!(
        "rotation test: fresh connections {} ok / {} failed (slowest {:.0?}), reused connections \
         {} ok / {} failed (slowest {:.0?}); certificates held: client Envoy {}, server Envoy {} \
         over {} polls; used in handshakes: client {}, server {} (on reused connections: {}, {})",
        fresh.ok,
        fresh.failed,
        fresh.slowest,
        pooled.ok,
        pooled.failed,
        pooled.slowest,
        watch.client_held.len(),
        watch.server_held.len(),
        watch.polls,
        fresh.client_certs_used.len(),
        fresh.server_certs_used.len(),
        pooled.client_certs_used.len(),
        pooled.server_certs_used.len(),
    );

    let failed = fresh.failed + pooled.failed;
    if failed > 0 {
        panic!(
            "{failed} failed requests\nnew connection each: {:#?}\nreused connections: {:#?}\n{}",
            fresh.failures,
            pooled.failures,
            mesh.diagnostics().await
        );
    }
    let wrong: Vec<&String> = fresh
        .wrong_peers
        .iter()
        .chain(&pooled.wrong_peers)
        .collect();
    assert!(
        wrong.is_empty(),
        "sessions with the wrong peers: {wrong:#?}"
    );
    assert!(
        watch.problems.is_empty(),
        "what the Envoys held: {:#?}",
        watch.problems
    );
    // At one request per 50 ms, fewer than a third of the possible requests means the loops
    // were stalled, and the zero above would mean little.
    let expected = (TRAFFIC.as_millis() / REQUEST_INTERVAL.as_millis() / 3) as u64;
    assert!(
        fresh.ok >= expected && pooled.ok >= expected,
        "too few requests: {} and {} (expected at least {expected} each)",
        fresh.ok,
        pooled.ok
    );
    for (what, seen) in [
        ("client Envoy held", &watch.client_held),
        ("server Envoy held", &watch.server_held),
        (
            "handshakes used as client certificate",
            &fresh.client_certs_used,
        ),
        (
            "handshakes used as server certificate",
            &fresh.server_certs_used,
        ),
    ] {
        assert!(
            seen.len() >= 3,
            "{what} only {seen:?}: fewer than two rotations\n{}",
            mesh.diagnostics().await
        );
    }

    // The latest rotation reached each Envoy too (allowing for one in flight).
    for (agent, envoy) in [
        (&mesh.frontend, &mesh.client),
        (&mesh.backend, &mesh.server),
    ] {
        let converged = wait_until(
            "the Envoy to hold its agent's current certificate",
            Duration::from_secs(5),
            || async move {
                let issued = agent.current_serial().await.ok().flatten();
                let held = envoy.certs().await.ok().and_then(|c| {
                    c.first()
                        .and_then(|ctx| ctx.chain.first())
                        .map(|leaf| leaf.serial.clone())
                });
                issued.is_some() && issued == held
            },
        )
        .await;
        if let Err(e) = converged {
            panic!(
                "{}: {e}\n{}",
                envoy.process().name(),
                mesh.diagnostics().await
            );
        }
    }
}

/// A client Envoy that expects a server identity the server does not have refuses every
/// connection, for that reason (`ssl.fail_verify_san`), while a cluster of the same Envoy that
/// expects the right identity gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_rejects_a_peer_with_the_wrong_spiffe_id() {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let mesh = Mesh::start(
        &envoy_bin,
        "1h",
        &[
            ClientPath::new("/control", "control", spiffe_id("backend"), true),
            ClientPath::new("/", "backend", spiffe_id("not-backend"), true),
        ],
    )
    .await;
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
}
