//! Federation end to end with the real Envoy and the SPIFFE certificate validator: three trust
//! domains, `a.test`, `b.test` and `c.test`, each with its own agent on its own embedded root,
//! and its own Envoys: a server (mTLS in front of a small upstream) and a client (plain HTTP
//! in, mTLS out to every server, a new connection per request). Every TLS context validates
//! its peer with the agent's `ALL` bundle, served as Envoy's SPIFFE validator, and pins no
//! SPIFFE ID: which trust domains are accepted is decided by the bundles alone.
//!
//! - `a` and `b` federate with each other through a `--federation-dir` bundle file;
//! - `c` federates with both (so its client trusts their servers), but neither with `c`: its
//!   requests must fail on both servers, at the TLS handshake.
//!
//! Without Envoy these tests print a line and pass, unless `SDS_AGENT_REQUIRE_ENVOY=1`; the
//! removal test also needs `SDS_AGENT_PYTHON` (py-spiffe). They need the agent binary:
//! `cargo build -p sds-agent`. With `SDS_E2E_KEEP_DIR` set, each test keeps its directory.

// Test code, helpers included (clippy's allow-unwrap-in-tests covers only `#[test]` bodies):
// a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::envoy::{
    ALL_SECRET, Bootstrap, Envoy, common_tls_context_validated_by, downstream_tls_with,
    http_listener, route, sds_cluster, static_cluster, upstream_tls_with,
};
use sds_integration::http::{self, Upstream};
use sds_integration::pki::SharedCa;
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::python::{python, run_json, script};
use sds_integration::{free_port, test_dir, wait_until};
use tokio::sync::watch;
use tokio::time::Instant;

const BODY: &str = "hello across trust domains\n";
/// How often the agents look at their federation directory.
const POLL: &str = "200ms";
/// Bound on every wait for a change to reach the Envoys.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);
/// Bound on a traffic loop, whatever the test does meanwhile.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(180);
/// Between two requests of a traffic loop.
const REQUEST_INTERVAL: Duration = Duration::from_millis(50);

/// One trust domain's agent and Envoys.
struct Domain {
    /// `a`, `b`, ...: also the path prefix that routes to its server.
    name: &'static str,
    /// `a.test`, ...
    td: String,
    dir: PathBuf,
    /// Its `--federation-dir`.
    fed_dir: PathBuf,
    ca: SharedCa,
    client: Option<Envoy>,
    server: Option<Envoy>,
    agent: Option<Agent>,
    server_port: u16,
    entry: SocketAddr,
}

impl Domain {
    /// Writes the domain's root and an empty federation directory under `root/<name>`.
    fn new(root: &Path, name: &'static str) -> Self {
        let dir = root.join(name);
        let fed_dir = dir.join("federation");
        std::fs::create_dir_all(&fed_dir).unwrap();
        let ca = SharedCa::write(&dir).unwrap();
        Self {
            name,
            td: format!("{name}.test"),
            dir,
            fed_dir,
            ca,
            client: None,
            server: None,
            agent: None,
            server_port: free_port().unwrap(),
            entry: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap())),
        }
    }

    /// Puts `other`'s root into this domain's federation directory, as `<td>.pem`.
    fn federate_with(&self, other: &Domain) {
        let pem = std::fs::read_to_string(&other.ca.cert).unwrap();
        write_atomically(&self.fed_dir.join(format!("{}.pem", other.td)), &pem);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn client(&self) -> &Envoy {
        self.client.as_ref().unwrap()
    }

    fn server(&self) -> &Envoy {
        self.server.as_ref().unwrap()
    }

    /// Starts (or restarts) the agent on `ca` with `extra` flags.
    async fn start_agent(&mut self, ca: &SharedCa, extra: &[&str]) {
        let mut args: Vec<OsString> = vec![
            "--embedded-ca-cert".into(),
            ca.cert.clone().into(),
            "--embedded-ca-key".into(),
            ca.key.clone().into(),
            "--federation-dir".into(),
            self.fed_dir.clone().into(),
            "--federation-poll-interval".into(),
            POLL.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let config = AgentConfig {
            trust_domain: &self.td,
            namespace: "default",
            service_account: "web",
            cert_ttl: "1h",
        };
        self.agent = None;
        self.agent = Some(
            Agent::start_with(&agent_bin().unwrap(), &self.dir, &config, &args)
                .await
                .unwrap(),
        );
    }

    /// Starts the server Envoy (mTLS in, validated by `ALL`) and the client Envoy (routes
    /// `/<name>` to each of `servers`, validated by `ALL`, a new connection per request).
    async fn start_envoys(&mut self, envoy: &Path, upstream: SocketAddr, servers: &[(&str, u16)]) {
        let validated = || upstream_tls_with(common_tls_context_validated_by(ALL_SECRET, &[]));
        let socket = self.agent().socket().to_owned();
        let server = Bootstrap::new(
            &format!("{}-server", self.name),
            &self.td,
            vec![http_listener(
                "mtls_in",
                self.server_port,
                Some(downstream_tls_with(common_tls_context_validated_by(
                    ALL_SECRET,
                    &[],
                ))),
                vec![route("/", "upstream")],
                &[],
            )],
            vec![
                sds_cluster(&socket),
                static_cluster("upstream", upstream, None, false),
            ],
        )
        .unwrap();
        let mut clusters = vec![sds_cluster(&socket)];
        let mut routes = Vec::new();
        for (name, port) in servers {
            clusters.push(static_cluster(
                name,
                SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
                Some(validated()),
                true,
            ));
            routes.push(route(&format!("/{name}"), name));
        }
        let client = Bootstrap::new(
            &format!("{}-client", self.name),
            &self.td,
            vec![http_listener(
                "plain_in",
                self.entry.port(),
                None,
                routes,
                &[],
            )],
            clusters,
        )
        .unwrap();
        let (server, client) = tokio::try_join!(
            Envoy::start(envoy, &self.dir, "envoy-server", &server),
            Envoy::start(envoy, &self.dir, "envoy-client", &client),
        )
        .unwrap();
        self.server = Some(server);
        self.client = Some(client);
    }

    /// Whether a request from this domain's client to `to`'s server succeeds now.
    async fn reaches(&self, to: &Domain) -> bool {
        http::get(self.entry, &format!("/{}", to.name))
            .await
            .is_ok_and(|r| r.status == 200 && r.body == BODY)
    }

    /// The server listener's `ssl.<stat>`.
    async fn server_ssl(&self, stat: &str) -> u64 {
        self.server()
            .counter(&format!(
                "listener.127.0.0.1_{}.ssl.{stat}",
                self.server_port
            ))
            .await
            .unwrap()
    }

    /// The version of `ALL` that both of this domain's Envoys hold, once they agree.
    async fn all_version(&self) -> Option<String> {
        let mut versions = Vec::new();
        for envoy in [self.server(), self.client()] {
            let secret = envoy.active_secret(ALL_SECRET).await.ok()??;
            versions.push(secret["version_info"].as_str()?.to_owned());
        }
        (versions[0] == versions[1]).then(|| versions.remove(0))
    }

    /// Waits until both Envoys hold a version of `ALL` other than `before`.
    async fn wait_all_changed(&self, before: &str) -> String {
        let deadline = Instant::now() + CHANGE_LIMIT;
        loop {
            let now = self.all_version().await;
            if let Some(v) = now.as_deref().filter(|v| *v != before) {
                return v.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{}'s Envoys still hold ALL {now:?} (before: {before}) after {CHANGE_LIMIT:?}",
                self.td
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Domain {
    /// The Envoys go before the agent they depend on.
    fn drop(&mut self) {
        self.client = None;
        self.server = None;
    }
}

/// Replaces `path` with `text` in one rename, as the kubelet swaps a ConfigMap's files: the
/// agent never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_file_name(".tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `a` and `b` federated with each other, `c` with both, each with its agent and Envoys
/// started; the upstream they all front.
async fn start_three(envoy: &Path, dir: &Path) -> ([Domain; 3], Upstream) {
    let (mut a, mut b, mut c) = (
        Domain::new(dir, "a"),
        Domain::new(dir, "b"),
        Domain::new(dir, "c"),
    );
    a.federate_with(&b);
    b.federate_with(&a);
    c.federate_with(&a);
    c.federate_with(&b);
    let (ca_a, ca_b, ca_c) = (a.ca.clone(), b.ca.clone(), c.ca.clone());
    let ws = a.dir.join("workload.sock").to_str().unwrap().to_owned();
    let a_flags = ["--workload-api-socket", ws.as_str()];
    tokio::join!(
        a.start_agent(&ca_a, &a_flags),
        b.start_agent(&ca_b, &[]),
        c.start_agent(&ca_c, &[]),
    );
    let upstream = Upstream::start(BODY).await.unwrap();
    let servers = [("a", a.server_port), ("b", b.server_port)];
    tokio::join!(
        a.start_envoys(envoy, upstream.addr(), &servers),
        b.start_envoys(envoy, upstream.addr(), &servers),
        c.start_envoys(envoy, upstream.addr(), &servers),
    );
    ([a, b, c], upstream)
}

/// Requests from `from`'s client to `to`'s server, one every [`REQUEST_INTERVAL`] until
/// `stop` says so (or [`TRAFFIC_LIMIT`]): (succeeded, failures with when they happened).
async fn traffic(
    entry: SocketAddr,
    to: &'static str,
    mut stop: watch::Receiver<bool>,
) -> (u64, Vec<String>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(REQUEST_INTERVAL);
    let (mut ok, mut failures) = (0, Vec::new());
    while !*stop.borrow_and_update() && started.elapsed() < TRAFFIC_LIMIT {
        tick.tick().await;
        match http::get(entry, &format!("/{to}")).await {
            Ok(r) if r.status == 200 && r.body == BODY => ok += 1,
            Ok(r) => failures.push(format!(
                "{:?}: status {} {:?}",
                started.elapsed(),
                r.status,
                r.body
            )),
            Err(e) => failures.push(format!("{:?}: {e}", started.elapsed())),
        }
    }
    (ok, failures)
}

/// Waits until `check` holds, within [`CHANGE_LIMIT`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(what, CHANGE_LIMIT, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Envoys on each side accept the other federated domain's workloads through `ALL` and the
/// SPIFFE validator, and refuse a third domain at the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_domains_accept_each_other_and_refuse_a_third() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ([a, b, c], _upstream) = start_three(&envoy, dir.path()).await;

    // What the Envoys hold: the SPIFFE validator listing the agent's domain and the other.
    let all = a.server().active_secret(ALL_SECRET).await.unwrap().unwrap();
    let validator = &all["secret"]["validation_context"]["custom_validator_config"];
    assert_eq!(
        validator["name"], "envoy.tls.cert_validator.spiffe",
        "{all}"
    );
    let names: Vec<&str> = validator["typed_config"]["trust_domains"]
        .as_array()
        .unwrap_or_else(|| panic!("{all}"))
        .iter()
        .map(|td| td["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.test", "b.test"], "{all}");

    for (from, to) in [(&a, &b), (&b, &a), (&a, &a), (&b, &b)] {
        eventually(&format!("{} -> {} to succeed", from.td, to.td), || {
            from.reaches(to)
        })
        .await;
    }
    // c trusts a and b, but they do not trust c: every handshake fails on their side.
    let (refused_a, refused_b) = (
        a.server_ssl("fail_verify_error").await,
        b.server_ssl("fail_verify_error").await,
    );
    for _ in 0..5 {
        for to in [&a, &b] {
            assert!(!c.reaches(to).await, "c.test reached {}", to.td);
        }
    }
    assert!(a.server_ssl("fail_verify_error").await >= refused_a + 5);
    assert!(b.server_ssl("fail_verify_error").await >= refused_b + 5);
    assert_eq!(a.server_ssl("fail_verify_san").await, 0);
    // a and b are still served, and their handshakes never failed.
    assert!(a.reaches(&b).await && b.reaches(&a).await);
    assert_eq!(
        c.client()
            .counter("cluster.a.ssl.fail_verify_error")
            .await
            .unwrap(),
        0,
        "c's client accepted a's server: the refusal is a's"
    );
    eprintln!(
        "federation: a and b accept each other; c refused {} times by a, {} by b",
        a.server_ssl("fail_verify_error").await - refused_a,
        b.server_ssl("fail_verify_error").await - refused_b
    );
}

/// b's root changes while requests flow both ways, a new handshake each: a's file for b is
/// first given both roots, then b moves to the new root, then the old one is dropped from
/// a's file. Not one request fails, and at the end a workload of b still holding a
/// certificate of the old root is refused by a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_root_rotates_under_traffic_with_zero_failed_requests() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ([a, mut b, _c], upstream) = start_three(&envoy, dir.path()).await;
    // A second workload of b that stays on the old root.
    let mut legacy = Domain::new(dir.path(), "legacy");
    legacy.td = "b.test".into();
    legacy.ca = b.ca.clone();
    legacy.federate_with(&a);
    let legacy_ca = legacy.ca.clone();
    legacy.start_agent(&legacy_ca, &[]).await;
    legacy
        .start_envoys(&envoy, upstream.addr(), &[("a", a.server_port)])
        .await;
    for (from, to) in [(&a, &b), (&b, &a), (&legacy, &a)] {
        eventually(
            &format!("{} -> {} to succeed", from.dir.display(), to.td),
            || from.reaches(to),
        )
        .await;
    }

    let (stop, stopped) = watch::channel(false);
    let a_to_b = tokio::spawn(traffic(a.entry, "b", stopped.clone()));
    let b_to_a = tokio::spawn(traffic(b.entry, "a", stopped));

    // 1. a trusts b's old and new roots.
    let new_root_dir = dir.path().join("b-new");
    std::fs::create_dir(&new_root_dir).unwrap();
    let new_root = SharedCa::write(&new_root_dir).unwrap();
    let old_pem = std::fs::read_to_string(&b.ca.cert).unwrap();
    let new_pem = std::fs::read_to_string(&new_root.cert).unwrap();
    let v0 = a.all_version().await.unwrap();
    write_atomically(
        &a.fed_dir.join("b.test.pem"),
        &format!("{old_pem}{new_pem}"),
    );
    let v1 = a.wait_all_changed(&v0).await;

    // 2. b moves to the new root: its agent restarts on it, and its Envoys take its
    // certificates.
    b.start_agent(&new_root, &[]).await;
    let serial = b.agent().current_serial().await.unwrap().unwrap();
    for envoy in [b.server(), b.client()] {
        eventually(
            "b's Envoys to present a certificate of the new root",
            || async {
                envoy.certs().await.is_ok_and(|contexts| {
                    !contexts.is_empty()
                        && contexts
                            .iter()
                            .all(|c| c.chain.first().is_some_and(|l| l.serial == serial))
                })
            },
        )
        .await;
    }

    // 3. The old root leaves a's file.
    let refused = a.server_ssl("fail_verify_error").await;
    write_atomically(&a.fed_dir.join("b.test.pem"), &new_pem);
    let v2 = a.wait_all_changed(&v1).await;
    // A few more seconds of traffic on the new root alone.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(b.agent().is_ready().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.send(true).unwrap();
    let (a_to_b, b_to_a) = (a_to_b.await.unwrap(), b_to_a.await.unwrap());
    assert!(
        a_to_b.1.is_empty() && b_to_a.1.is_empty(),
        "failed requests: a -> b {:?}; b -> a {:?}",
        a_to_b.1,
        b_to_a.1
    );
    assert!(
        a_to_b.0 > 50 && b_to_a.0 > 50,
        "too little traffic: {a_to_b:?} {b_to_a:?}"
    );

    // The workload still on the old root is refused by a, at the handshake.
    for _ in 0..3 {
        assert!(
            !legacy.reaches(&a).await,
            "the old root is still trusted by a"
        );
    }
    assert!(a.server_ssl("fail_verify_error").await >= refused + 3);
    eprintln!(
        "federated root rotation: ALL {v0} -> {v1} -> {v2}; a -> b {} ok, b -> a {} ok, 0 failed",
        a_to_b.0, b_to_a.0
    );
}

/// Deleting b's file from a's `--federation-dir` removes b.test from a's `ALL` (a's Envoys
/// refuse b's workloads on new connections, both ways) and from a's Workload API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_domains_file_makes_envoy_refuse_it_and_the_workload_api_forget_it() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ([a, b, _c], _upstream) = start_three(&envoy, dir.path()).await;
    for (from, to) in [(&a, &b), (&b, &a)] {
        eventually(&format!("{} -> {} to succeed", from.td, to.td), || {
            from.reaches(to)
        })
        .await;
    }
    let socket = a.dir.join("workload.sock");
    let fetch = || async {
        run_json(
            &python,
            &script("workload_api.py"),
            &[
                "fetch",
                "--socket",
                socket.to_str().unwrap(),
                "--spiffe-id",
                a.agent().spiffe_id(),
                "--trust-domain",
                "a.test",
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
    };
    let before = fetch().await;
    assert_eq!(
        before["x509_bundles"]["trust_domains"],
        serde_json::json!(["a.test", "b.test"]),
        "{before}"
    );

    let v0 = a.all_version().await.unwrap();
    let refused = a.server_ssl("fail_verify_error").await;
    std::fs::remove_file(a.fed_dir.join("b.test.pem")).unwrap();
    let v1 = a.wait_all_changed(&v0).await;
    let all = a.server().active_secret(ALL_SECRET).await.unwrap().unwrap();
    let names: Vec<&str> = all["secret"]["validation_context"]["custom_validator_config"]
        ["typed_config"]["trust_domains"]
        .as_array()
        .unwrap_or_else(|| panic!("{all}"))
        .iter()
        .map(|td| td["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.test"], "{all}");
    for _ in 0..3 {
        assert!(!b.reaches(&a).await, "a's server still accepts b.test");
        assert!(!a.reaches(&b).await, "a's client still accepts b.test");
    }
    assert!(a.server_ssl("fail_verify_error").await >= refused + 3);
    assert!(
        a.client()
            .counter("cluster.b.ssl.fail_verify_error")
            .await
            .unwrap()
            >= 3
    );
    // a's own domain is still served.
    assert!(a.reaches(&a).await);

    let after = fetch().await;
    for bundles in [&after["x509_bundles"], &after["x509_context"]] {
        assert_eq!(
            bundles["trust_domains"],
            serde_json::json!(["a.test"]),
            "{after}"
        );
    }
    assert_eq!(
        a.agent()
            .metric_total("sds_agent_federated_domains")
            .await
            .unwrap(),
        0
    );
    eprintln!("federated domain removed: a's ALL {v0} -> {v1}; b refused both ways");
}
