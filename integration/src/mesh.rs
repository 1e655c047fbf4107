//! A two-proxy mesh for end-to-end tests: two agents, two real Envoys doing mTLS, and an
//! upstream, whatever CA the agents use.
//!
//! ```text
//! test ──HTTP──▶ client Envoy ══mTLS══▶ server Envoy ──HTTP──▶ upstream
//!                    ▲ SDS                  ▲ SDS
//!             agent A (frontend)     agent B (backend)     (one trust domain)
//! ```
//!
//! Agent A serves `frontend` to the client-side Envoy, agent B `backend` to the server-side
//! Envoy; each side checks the other's SPIFFE ID. Each Envoy also names, in a response
//! header, the peer certificate of the TLS session that carried the request
//! (`%DOWNSTREAM_PEER_SERIAL%` on the server, `%UPSTREAM_PEER_CERT%` on the client), so the
//! tests see which certificates the handshakes actually used, not only which ones Envoy
//! holds. [`check_rotation_under_traffic`] is the shared "rotate under traffic with zero
//! failed requests" check; the CA is whatever [`MeshCa`] tells the agents to use.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::agent::{Agent, AgentConfig};
use crate::envoy::{
    self, Bootstrap, Envoy, downstream_tls, http_listener, route, sds_cluster, static_cluster,
    upstream_tls,
};
use crate::http::{self, Upstream};
use crate::process::agent_bin;
use crate::{Error, Serial, free_port, wait_until};

/// The mesh's trust domain.
pub const TRUST_DOMAIN: &str = "example.org";
/// The namespace of both workloads.
pub const NAMESPACE: &str = "default";
/// What the upstream answers.
pub const BODY: &str = "hello from the upstream\n";

/// How long the rotation test sends traffic. With `--cert-ttl 20s` the agents renew at half
/// the certificates' lifetime, every 10 s or a little sooner, so this covers at least four
/// certificates on each side; the test asks for three.
pub const TRAFFIC: Duration = Duration::from_secs(46);
/// Pause between two requests of one request loop.
pub const REQUEST_INTERVAL: Duration = Duration::from_millis(50);
/// Pause between two looks at the Envoys' `/certs`.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the first request through a fresh mesh may take to succeed.
pub const FIRST_REQUEST_LIMIT: Duration = Duration::from_secs(20);
/// How many failures a request loop describes in full.
pub const FAILURES_KEPT: usize = 20;

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
#[derive(Debug, Clone)]
pub struct ClientPath {
    prefix: &'static str,
    cluster: &'static str,
    expect_server: String,
    /// A new connection, so a new mTLS handshake, for every request.
    fresh_connections: bool,
}

/// The `run` flags that choose and configure the CA, for the agent of a service account.
pub type AgentArgs = Box<dyn Fn(&str) -> Vec<OsString> + Send + Sync>;

/// How the agents of a mesh get their certificates.
pub struct MeshCa {
    /// The `run` flags that choose and configure the CA, for the agent of this service
    /// account.
    pub agent_args: AgentArgs,
    /// Serials of the roots the Envoys must end up trusting.
    pub roots: Vec<Serial>,
    /// Variables added to the agents' environment (credentials for the CA, ...).
    pub agent_env: Vec<(String, String)>,
}

impl MeshCa {
    /// Every agent on the embedded CA with one shared root (written under `dir`), as an
    /// operator would hand it out.
    pub fn shared_root(dir: &Path) -> Result<Self, Error> {
        let ca = crate::pki::SharedCa::write(dir)?;
        let roots = vec![ca.serial.clone()];
        Ok(Self {
            agent_env: Vec::new(),
            agent_args: Box::new(move |_| {
                vec![
                    "--embedded-ca-cert".into(),
                    ca.cert.clone().into(),
                    "--embedded-ca-key".into(),
                    ca.key.clone().into(),
                ]
            }),
            roots,
        })
    }
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// The two agents, the two Envoys and the upstream of one test, in a directory the test
/// owns (and must keep until the mesh is dropped). Fields drop in order: the Envoys before
/// the agents they depend on, so the Envoys' logs do not end in complaints about a vanished
/// SDS server.
#[derive(Debug)]
pub struct Mesh {
    /// The client-side Envoy.
    pub client: Envoy,
    /// The server-side Envoy.
    pub server: Envoy,
    /// The agent of the client-side Envoy.
    pub frontend: Agent,
    /// The agent of the server-side Envoy.
    pub backend: Agent,
    _upstream: Upstream,
    /// The roots the Envoys must trust.
    pub roots: Vec<Serial>,
    /// The client Envoy's plain-HTTP listener.
    pub entry: SocketAddr,
    dir: PathBuf,
}

/// What one request loop saw.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Requests answered `200` with the upstream's body.
    pub ok: u64,
    /// The others.
    pub failed: u64,
    /// The first failures, with when they happened.
    pub failures: Vec<String>,
    /// Responses that came back `200` from a session with the wrong peer, or without the
    /// headers naming it.
    pub wrong_peers: Vec<String>,
    /// Serials of the client certificates the server Envoy saw in handshakes.
    pub client_certs_used: BTreeSet<Serial>,
    /// Serials of the server certificates the client Envoy saw in handshakes.
    pub server_certs_used: BTreeSet<Serial>,
    /// The slowest request.
    pub slowest: Duration,
}

/// What the Envoys' `/certs` showed over time.
#[derive(Debug, Default)]
pub struct CertWatch {
    /// How many times both were looked at.
    pub polls: u32,
    /// Serials of the certificates the client Envoy held.
    pub client_held: BTreeSet<Serial>,
    /// Serials of the certificates the server Envoy held.
    pub server_held: BTreeSet<Serial>,
    /// Wrong identities, wrong roots, admin endpoints that did not answer.
    pub problems: Vec<String>,
}

impl ClientPath {
    /// A path: `prefix` routes to `cluster`, which expects the server `expect_server`, over a
    /// new connection per request if `fresh_connections`.
    pub fn new(
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

/// Which of Envoy's two gRPC clients the Envoys of a mesh fetch their secrets with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdsClient {
    /// `envoy_grpc` through [`envoy::SDS_CLUSTER`], as the shipped bootstraps do.
    EnvoyGrpc,
    /// `google_grpc` (gRPC's C-core) straight to the agent's socket
    /// ([`envoy::use_google_grpc`]).
    GoogleGrpc,
}

impl Mesh {
    /// Starts everything in `dir` with certificates of `cert_ttl` from `ca`; the client
    /// Envoy gets one cluster and one route per entry of `paths`, in order. The Envoys fetch
    /// their secrets with `envoy_grpc`.
    pub async fn start(
        envoy_bin: &Path,
        dir: &Path,
        cert_ttl: &str,
        paths: &[ClientPath],
        ca: &MeshCa,
    ) -> Result<Self, Error> {
        Self::start_with_sds(envoy_bin, dir, cert_ttl, paths, ca, SdsClient::EnvoyGrpc).await
    }

    /// Like [`Mesh::start`], with the Envoys fetching their secrets with `sds_client`.
    pub async fn start_with_sds(
        envoy_bin: &Path,
        dir: &Path,
        cert_ttl: &str,
        paths: &[ClientPath],
        ca: &MeshCa,
        sds_client: SdsClient,
    ) -> Result<Self, Error> {
        let agent_bin = agent_bin()?;
        let config = |service_account| AgentConfig {
            trust_domain: TRUST_DOMAIN,
            namespace: NAMESPACE,
            service_account,
            cert_ttl,
        };
        let (frontend_config, backend_config) = (config("frontend"), config("backend"));
        let (frontend_args, backend_args) =
            ((ca.agent_args)("frontend"), (ca.agent_args)("backend"));
        let (frontend, backend) = tokio::try_join!(
            Agent::start_with_env(
                &agent_bin,
                dir,
                &frontend_config,
                &frontend_args,
                &ca.agent_env
            ),
            Agent::start_with_env(
                &agent_bin,
                dir,
                &backend_config,
                &backend_args,
                &ca.agent_env
            ),
        )?;
        let upstream = Upstream::start(BODY).await?;

        let server_port = free_port()?;
        let mut server_bootstrap = Bootstrap::new(
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
        )?;

        let entry_port = free_port()?;
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
        let mut client_bootstrap = Bootstrap::new(
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
        )?;
        if sds_client == SdsClient::GoogleGrpc {
            envoy::use_google_grpc(&mut server_bootstrap, backend.socket());
            envoy::use_google_grpc(&mut client_bootstrap, frontend.socket());
        }

        let (server, client) = tokio::try_join!(
            Envoy::start(envoy_bin, dir, "envoy-server", &server_bootstrap),
            Envoy::start(envoy_bin, dir, "envoy-client", &client_bootstrap),
        )?;
        Ok(Self {
            client,
            server,
            frontend,
            backend,
            _upstream: upstream,
            roots: ca.roots.clone(),
            entry: SocketAddr::from((Ipv4Addr::LOCALHOST, entry_port)),
            dir: dir.to_owned(),
        })
    }

    /// What the agents and Envoys hold right now, for failure messages. (The processes'
    /// log tails are printed by their guards when the test panics.)
    pub async fn diagnostics(&self) -> String {
        let mut out = format!(
            "test directory (removed unless SDS_E2E_KEEP_DIR is set): {}\n",
            self.dir.display()
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
pub fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// Sends `GET path` to `entry` every [`REQUEST_INTERVAL`] until `until`, one at a time.
pub async fn drive(entry: SocketAddr, path: &str, until: Instant) -> Traffic {
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
pub async fn watch_certs(mesh: &Mesh, until: Instant) -> CertWatch {
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
                if roots != mesh.roots.iter().collect::<Vec<_>>() {
                    watch.problems.push(format!(
                        "{name} trusts {roots:?}, not the mesh's roots {:?}",
                        mesh.roots
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

/// The client paths [`check_rotation_under_traffic`] drives: `/fresh`, a new connection (so a
/// new mTLS handshake) per request, and `/pooled` (the catch-all), reused connections; both
/// to `backend`.
pub fn rotation_paths() -> Vec<ClientPath> {
    vec![
        ClientPath::new("/fresh", "backend-fresh", spiffe_id("backend"), true),
        ClientPath::new("/", "backend-pooled", spiffe_id("backend"), false),
    ]
}

/// Waits for a first request to get through `mesh`, then sends traffic for `traffic` on two
/// loops (a new mTLS connection per request, and reused connections) while watching the
/// Envoys' certificates. It passes when not one request failed, every session had the right
/// peers, both Envoys held and used at least `min_certs` certificates each (so
/// `min_certs - 1` rotations), and each Envoy ends on its agent's current certificate.
/// `Ok` is a one-line summary; `Err` is a full report.
/// `mesh` must have been started with [`rotation_paths`].
pub async fn check_rotation_under_traffic(
    mesh: &Mesh,
    traffic: Duration,
    min_certs: usize,
) -> Result<String, String> {
    check_rotation(mesh, traffic, min_certs, None).await
}

/// [`check_rotation_under_traffic`] for CAs whose certificates outlive any test (moto's 365
/// days): rotations are forced with `POST /rotate` on both agents every `every`, the path
/// `sds-agent rotate` takes. The new certificates go through the same issue, validate and
/// push as scheduled renewals.
pub async fn check_forced_rotation_under_traffic(
    mesh: &Mesh,
    traffic: Duration,
    min_certs: usize,
    every: Duration,
) -> Result<String, String> {
    check_rotation(mesh, traffic, min_certs, Some(every)).await
}

/// `POST /rotate` on both agents every `every` until `until`; the failures, if any.
async fn force_rotations(mesh: &Mesh, until: Instant, every: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Leave the last interval for the final rotation to reach the Envoys.
    while tick.tick().await + every < until {
        for agent in [&mesh.frontend, &mesh.backend] {
            match http::request(agent.admin(), "POST", "/rotate").await {
                Ok(r) if (200..300).contains(&r.status) => {}
                other => problems.push(format!("POST /rotate on {}: {other:?}", agent.spiffe_id())),
            }
        }
    }
    problems
}

async fn check_rotation(
    mesh: &Mesh,
    traffic: Duration,
    min_certs: usize,
    force_every: Option<Duration>,
) -> Result<String, String> {
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
        return Err(format!("{e}\n{}", mesh.diagnostics().await));
    }

    let until = Instant::now() + traffic;
    let forcing = async {
        match force_every {
            Some(every) => force_rotations(mesh, until, every).await,
            None => Vec::new(),
        }
    };
    let (fresh, pooled, mut watch, forced) = tokio::join!(
        drive(entry, "/fresh", until),
        drive(entry, "/pooled", until),
        watch_certs(mesh, until),
        forcing,
    );
    watch.problems.extend(forced);
    let summary = format!(
        "fresh connections {} ok / {} failed (slowest {:.0?}), reused connections {} ok / {} \
         failed (slowest {:.0?}); certificates held: client Envoy {}, server Envoy {} over {} \
         polls; used in handshakes: client {}, server {} (on reused connections: {}, {})",
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
        return Err(format!(
            "{summary}\n{failed} failed requests\nnew connection each: {:#?}\nreused \
             connections: {:#?}\n{}",
            fresh.failures,
            pooled.failures,
            mesh.diagnostics().await
        ));
    }
    let wrong: Vec<&String> = fresh
        .wrong_peers
        .iter()
        .chain(&pooled.wrong_peers)
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "{summary}\nsessions with the wrong peers: {wrong:#?}"
        ));
    }
    if !watch.problems.is_empty() {
        return Err(format!(
            "{summary}\nwhat the Envoys held: {:#?}",
            watch.problems
        ));
    }
    // At one request per 50 ms, fewer than a third of the possible requests means the loops
    // were stalled, and the zero above would mean little.
    let expected = (traffic.as_millis() / REQUEST_INTERVAL.as_millis() / 3) as u64;
    if fresh.ok < expected || pooled.ok < expected {
        return Err(format!(
            "{summary}\ntoo few requests: {} and {} (expected at least {expected} each)",
            fresh.ok, pooled.ok
        ));
    }
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
        if seen.len() < min_certs {
            return Err(format!(
                "{summary}\n{what} only {seen:?}: fewer than {} rotations\n{}",
                min_certs - 1,
                mesh.diagnostics().await
            ));
        }
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
            return Err(format!(
                "{}: {e}\n{}",
                envoy.process().name(),
                mesh.diagnostics().await
            ));
        }
    }
    Ok(summary)
}
