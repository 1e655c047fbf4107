//! Node mode under real traffic: three pods on one node, each with a real Envoy 1.40 started
//! inside its pod (its cgroup, or its entry in a fake `/proc` where the machine has no
//! writable cgroup v2 hierarchy: `sds_integration::pods`), all fetching `default` and `ROOTCA` from one node agent, doing
//! mTLS to each other while their certificates rotate every few seconds.
//!
//! ```text
//!  pod frontend (shop)        pod backend (shop)         pod ledger (billing)
//!  ┌ Envoy ───────────┐      ┌ Envoy ───────────┐      ┌ Envoy ───────────┐
//!  │ out: /to/<pod> ══╪═mTLS═╪▶ in ─▶ upstream  │  ... │ in ─▶ upstream   │
//!  └────────┬─────────┘      └────────┬─────────┘      └────────┬─────────┘
//!           └──── SDS over one Unix socket: the node agent (--mode node) ───┘
//! ```
//!
//! Each Envoy's outbound side reaches both other pods, pinning the peer's SPIFFE ID; its
//! inbound side accepts only the other two. Every request opens a new connection, so a new
//! handshake with whatever certificates are current. Both Envoys name, in response headers,
//! the certificates the handshake actually used. The agent proves every Envoy by its
//! process's cgroup (as `/proc`, real or fake, shows it) and the fake kubelet's pod list,
//! nothing else: no Envoy says who it is.
//!
//! Passing means: not one failed request on any of the six directed paths; every handshake
//! had the right identities on both sides; every identity rotated at least twice and its new
//! certificates were used in handshakes; each Envoy only ever held its own identity, under
//! the agent's one root. Meanwhile a fourth pod (gRPC C-core, `node_probe.py`) asks for each
//! of the three identities by name over every SDS method and is refused every time, while
//! `default` and the Workload API give it its own.
//!
//! Skips without Envoy or Python (grpcio), unless `SDS_AGENT_REQUIRE_ENVOY=1` /
//! `SDS_AGENT_REQUIRE_PYTHON=1`. Without a writable cgroup v2 hierarchy it runs in a fake
//! `/proc`, unless `SDS_AGENT_REQUIRE_CGROUPS=1` (then it fails); `SDS_AGENT_PODS=fake-proc`
//! forces the fake (scripts/test.sh, `sds_integration::pods`).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use sds_integration::envoy::{
    self, Bootstrap, Envoy, downstream_tls_any, http_listener, route, sds_cluster, static_cluster,
    upstream_tls,
};
use sds_integration::http::{self, Upstream};
use sds_integration::kubelet::{FakeKubelet, FakePod};
use sds_integration::node::NodeAgent;
use sds_integration::pods::Pods;
use sds_integration::process::envoy_bin;
use sds_integration::{Serial, free_port, python, test_dir, wait_until};
use tokio::time::{Instant, MissedTickBehavior};

const TD: &str = "cluster.local";
const BODY: &str = "hello from the upstream\n";
/// Certificates of 20 s, renewed at half their life: a rotation every 10 s per identity.
const CERT_TTL: &str = "20s";
/// Long enough for four certificates per identity; the test asks for three.
const TRAFFIC: Duration = Duration::from_secs(40);
/// Pause between two requests of one path (six paths run at once).
const REQUEST_INTERVAL: Duration = Duration::from_millis(100);
const FAILURES_KEPT: usize = 20;

/// Added by the inbound (server) Envoy.
const CLIENT_URI: &str = "x-e2e-client-cert-uri";
const CLIENT_SERIAL: &str = "x-e2e-client-cert-serial";
/// Added by the outbound (client) Envoy.
const SERVER_URI: &str = "x-e2e-server-cert-uri";
const SERVER_CERT: &str = "x-e2e-server-cert";

/// One pod: its kubelet entry, identity and ports.
#[derive(Debug, Clone)]
struct Pod {
    pod: FakePod,
    id: String,
    inbound: u16,
    outbound: u16,
}

/// What the requests of one directed path saw.
#[derive(Debug, Default)]
struct PathTraffic {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    wrong_peers: Vec<String>,
    /// Serials of the certificates used in handshakes, by identity.
    used: BTreeMap<String, BTreeSet<Serial>>,
}

/// Sends `GET /to/<server>` through `from`'s outbound listener every [`REQUEST_INTERVAL`]
/// until `until`, checking both identities of every handshake.
async fn drive(from: &Pod, to: &Pod, index: usize, until: Instant) -> PathTraffic {
    let entry = SocketAddr::from((Ipv4Addr::LOCALHOST, from.outbound));
    let path = format!("/to/{index}");
    let mut t = PathTraffic::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(REQUEST_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while tick.tick().await < until {
        let at = started.elapsed();
        let r = match http::get(entry, &path).await {
            Ok(r) if r.status == 200 && r.body == BODY => r,
            other => {
                t.failed += 1;
                if t.failures.len() < FAILURES_KEPT {
                    t.failures.push(format!("at {at:.2?}: {other:?}"));
                }
                continue;
            }
        };
        t.ok += 1;
        let (client_uri, server_uri) = (r.header(CLIENT_URI), r.header(SERVER_URI));
        if client_uri != Some(from.id.as_str()) || server_uri != Some(to.id.as_str()) {
            t.wrong_peers.push(format!(
                "at {at:.2?}: client {client_uri:?}, server {server_uri:?}"
            ));
            continue;
        }
        match r.header(CLIENT_SERIAL).map(str::parse::<Serial>) {
            Some(Ok(s)) => {
                t.used.entry(from.id.clone()).or_default().insert(s);
            }
            other => t
                .wrong_peers
                .push(format!("at {at:.2?}: client serial {other:?}")),
        }
        match r.header(SERVER_CERT).map(envoy::serial_of_peer_cert) {
            Some(Ok(s)) => {
                t.used.entry(to.id.clone()).or_default().insert(s);
            }
            other => t
                .wrong_peers
                .push(format!("at {at:.2?}: server cert {other:?}")),
        }
    }
    t
}

/// Polls every Envoy's `/certs` until `until`: each must hold only its own identity, under
/// the agent's roots. Returns the problems and, by identity, the serials held.
async fn watch(
    pods: &[Pod],
    envoys: &[Envoy],
    roots: &[Serial],
    until: Instant,
) -> (Vec<String>, BTreeMap<String, BTreeSet<Serial>>) {
    let mut problems = Vec::new();
    let mut held: BTreeMap<String, BTreeSet<Serial>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while tick.tick().await < until {
        for (pod, envoy) in pods.iter().zip(envoys) {
            let contexts = match envoy.certs().await {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!("{}: {e}", pod.id));
                    continue;
                }
            };
            for ctx in contexts {
                let Some(leaf) = ctx.chain.first() else {
                    problems.push(format!("{}: a TLS context without a certificate", pod.id));
                    continue;
                };
                if leaf.uri_sans != [pod.id.as_str()] {
                    problems.push(format!(
                        "the Envoy of {} holds {} with URI SANs {:?}",
                        pod.id, leaf.serial, leaf.uri_sans
                    ));
                }
                let trusted: Vec<Serial> = ctx.ca.iter().map(|c| c.serial.clone()).collect();
                if trusted != roots {
                    problems.push(format!(
                        "the Envoy of {} trusts {trusted:?}, not {roots:?}",
                        pod.id
                    ));
                }
                held.entry(pod.id.clone())
                    .or_default()
                    .insert(leaf.serial.clone());
            }
        }
    }
    (problems, held)
}

fn bootstrap(me: &Pod, pods: &[Pod], agent: &NodeAgent, upstream: SocketAddr) -> Bootstrap {
    let peers: Vec<&str> = pods
        .iter()
        .filter(|p| p.id != me.id)
        .map(|p| p.id.as_str())
        .collect();
    let mut routes = Vec::new();
    let mut clusters = vec![
        sds_cluster(&agent.socket()),
        static_cluster("upstream", upstream, None, false),
    ];
    for (i, p) in pods.iter().enumerate().filter(|(_, p)| p.id != me.id) {
        let name = format!("to-{i}");
        routes.push(route(&format!("/to/{i}"), &name));
        clusters.push(static_cluster(
            &name,
            SocketAddr::from((Ipv4Addr::LOCALHOST, p.inbound)),
            Some(upstream_tls(&p.id)),
            true,
        ));
    }
    Bootstrap::new(
        &format!("envoy-{}", me.pod.name),
        me.pod.service_account.as_deref().unwrap(),
        vec![
            http_listener(
                "mtls_in",
                me.inbound,
                Some(downstream_tls_any(&peers)),
                vec![route("/", "upstream")],
                &[
                    (CLIENT_URI, "%DOWNSTREAM_PEER_URI_SAN%"),
                    (CLIENT_SERIAL, "%DOWNSTREAM_PEER_SERIAL%"),
                ],
            ),
            http_listener(
                "plain_out",
                me.outbound,
                None,
                routes,
                &[
                    (SERVER_URI, "%UPSTREAM_PEER_URI_SAN%"),
                    (SERVER_CERT, "%UPSTREAM_PEER_CERT%"),
                ],
            ),
        ],
        clusters,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_do_mtls_through_one_node_agent_and_rotate_with_zero_failed_requests() {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let Some(python) = python::python().unwrap() else {
        return;
    };
    let place = Pods::create().unwrap();
    let dir = test_dir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let fakes = [
        FakePod::new("shop", "frontend-7d9f", "frontend"),
        FakePod::new("shop", "backend-5c4b", "backend"),
        FakePod::new("billing", "ledger-0", "ledger"),
    ];
    for p in &fakes {
        kubelet.add_pod(p.clone());
    }
    let ttl: Vec<OsString> = vec!["--cert-ttl".into(), CERT_TTL.into()];
    let agent = NodeAgent::start(dir.path(), TD, &kubelet, &place, &ttl)
        .await
        .unwrap();
    let pods: Vec<Pod> = fakes
        .iter()
        .map(|pod| Pod {
            id: agent.spiffe_id(pod),
            pod: pod.clone(),
            inbound: free_port().unwrap(),
            outbound: free_port().unwrap(),
        })
        .collect();
    let upstream = Upstream::start(BODY).await.unwrap();

    let mut envoys = Vec::new();
    for p in &pods {
        let b = bootstrap(p, &pods, &agent, upstream.addr());
        let launch = place.command_in(&p.pod, &envoy_bin).unwrap();
        let (program, args): (OsString, Vec<OsString>) = (
            launch.get_program().to_owned(),
            launch.get_args().map(ToOwned::to_owned).collect(),
        );
        let envoy = Envoy::start_in(
            move || {
                let mut cmd = std::process::Command::new(&program);
                cmd.args(&args);
                Ok(cmd)
            },
            dir.path(),
            &format!("envoy-{}", p.pod.name),
            &b,
        )
        .await
        .unwrap();
        envoys.push(envoy);
    }
    let roots: Vec<Serial> = agent
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "ROOTCA")
        .map(|s| s.serial)
        .collect();
    assert_eq!(roots.len(), 1, "one root");

    // Every path works before traffic starts counting.
    for (i, from) in pods.iter().enumerate() {
        for (j, _) in pods.iter().enumerate().filter(|(j, _)| *j != i) {
            let entry = SocketAddr::from((Ipv4Addr::LOCALHOST, from.outbound));
            let path = format!("/to/{j}");
            wait_until(
                &format!("a first request {i} -> {j}"),
                Duration::from_secs(20),
                || {
                    let path = path.clone();
                    async move {
                        http::get(entry, &path)
                            .await
                            .is_ok_and(|r| r.status == 200 && r.body == BODY)
                    }
                },
            )
            .await
            .unwrap();
        }
    }

    // A fourth pod on the node, no Envoy, asks during the traffic for each of the three
    // identities by name, over every SDS method, and for `default` and the Workload API.
    let intruder = FakePod::new("shop", "debug-shell", "intruder");
    kubelet.add_pod(intruder.clone());
    let intruder_id = agent.spiffe_id(&intruder);
    let others: Vec<String> = pods.iter().map(|p| p.id.clone()).collect();
    let ask = agent.probe_command(
        place.command_in(&intruder, &python).unwrap(),
        &intruder_id,
        &others,
    );
    let intruding = tokio::spawn(python::run_json_command(
        ask,
        "node_probe.py",
        Duration::from_secs(90),
    ));

    let until = Instant::now() + TRAFFIC;
    let mut loops = tokio::task::JoinSet::new();
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate().filter(|(j, _)| *j != i) {
            let (from, to) = (from.clone(), to.clone());
            loops.spawn(async move { (i, j, drive(&from, &to, j, until).await) });
        }
    }
    let (mut paths, (problems, held)) = tokio::join!(
        async move {
            let mut done = Vec::new();
            while let Some(r) = loops.join_next().await {
                done.push(r.unwrap());
            }
            done
        },
        watch(&pods, &envoys, &roots, until)
    );
    paths.sort_by_key(|(i, j, _)| (*i, *j));

    let mut used: BTreeMap<String, BTreeSet<Serial>> = BTreeMap::new();
    let mut summary = Vec::new();
    for (i, j, t) in &paths {
        summary.push(format!("{i}->{j}: {} ok / {} failed", t.ok, t.failed));
        assert_eq!(
            t.failed, 0,
            "path {i} -> {j} had failed requests: {:#?}",
            t.failures
        );
        assert!(
            t.wrong_peers.is_empty(),
            "path {i} -> {j}: {:#?}",
            t.wrong_peers
        );
        // At one request per 100 ms, fewer than a third of the possible requests means
        // the loop was stalled and the zero above would mean little.
        let expected = (TRAFFIC.as_millis() / REQUEST_INTERVAL.as_millis() / 3) as u64;
        assert!(t.ok >= expected, "path {i} -> {j}: only {} requests", t.ok);
        for (id, serials) in &t.used {
            used.entry(id.clone())
                .or_default()
                .extend(serials.iter().cloned());
        }
    }
    eprintln!("{}", summary.join(", "));
    assert!(problems.is_empty(), "{problems:#?}");
    for p in &pods {
        let in_handshakes = used.get(&p.id).map_or(0, BTreeSet::len);
        let in_envoy = held.get(&p.id).map_or(0, BTreeSet::len);
        eprintln!(
            "{}: {in_handshakes} certificates used in handshakes, {in_envoy} held",
            p.id
        );
        assert!(
            in_handshakes >= 3 && in_envoy >= 3,
            "{}: {in_handshakes} certificates in handshakes, {in_envoy} held: fewer than two rotations",
            p.id
        );
    }
    // Certificates of different identities never share a serial (each is its own).
    let all: Vec<&Serial> = used.values().flatten().collect();
    let distinct: BTreeSet<&Serial> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "a serial served to two identities"
    );

    let out = intruding.await.unwrap().unwrap();
    for m in ["stream", "fetch", "delta"] {
        let own = &out["sds"]["default,ROOTCA"][m];
        assert_eq!(own["code"], "OK", "the fourth pod, {m}: {own}");
        assert_eq!(own["uri_sans"], serde_json::json!([intruder_id]), "{own}");
        for k in 0..pods.len() {
            let r = &out["sds"][format!("other{k}")][m];
            assert_eq!(
                r["code"], "INVALID_ARGUMENT",
                "the fourth pod asking {m} for {}: {r}",
                pods[k].id
            );
            assert_eq!(r["names"], serde_json::json!([]), "{r}");
            assert!(!r["private_key"].as_bool().unwrap(), "{r}");
        }
    }
    assert_eq!(
        out["workload"]["spiffe_ids"],
        serde_json::json!([intruder_id]),
        "{}",
        out["workload"]
    );
    assert_eq!(
        agent.metric("sds_agent_identities ").await.unwrap(),
        4.0,
        "one identity per pod"
    );
    assert_eq!(
        agent
            .metric("sds_agent_attestations_refused_total ")
            .await
            .unwrap(),
        0.0
    );
}
