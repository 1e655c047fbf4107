//! Interop with clients nobody here wrote, all on gRPC's C-core, which sends the
//! percent-encoded socket path as `:authority` on a Unix socket (`tmp%2F.tmpXYZ%2Fa.sock`):
//!
//! - grpcio (`integration/python/sds_grpcio.py`): StreamSecrets with its ACK, FetchSecrets
//!   and DeltaSecrets, called generically with hand-encoded requests, against the SDS socket;
//!   and a Workload API call without its `workload.spiffe.io` header;
//! - py-spiffe (`integration/python/workload_api.py`), the SPIFFE project's Workload API
//!   client, against `--workload-api-socket`: fetches, one stream across rotations, and a
//!   caller whose uid is refused;
//! - Envoy's `google_grpc` client (gRPC C-core inside Envoy) instead of `envoy_grpc`: two
//!   Envoys fed that way do mTLS through rotations.
//!
//! Without `SDS_AGENT_PYTHON` (a Python with grpcio and spiffe) or Envoy these tests print a
//! line and pass, unless `SDS_AGENT_REQUIRE_PYTHON=1` / `SDS_AGENT_REQUIRE_ENVOY=1` (both set
//! by `scripts/test.sh`). They need the agent binary: `cargo build -p sds-agent`. With
//! `SDS_E2E_KEEP_DIR` set, each test keeps its directory (the agent's log among them).

// Test code, helpers included (clippy's allow-unwrap-in-tests covers only `#[test]` bodies):
// a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::envoy::{Envoy, GOOGLE_GRPC_STAT_PREFIX, ROOT_SECRET, WORKLOAD_SECRET};
use sds_integration::mesh::{
    Mesh, MeshCa, SdsClient, check_rotation_under_traffic, rotation_paths,
};
use sds_integration::pki::SharedCa;
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::python::{python, run_json, script};
use sds_integration::{Serial, test_dir, wait_until};

const TRUST_DOMAIN: &str = "example.org";
const NAMESPACE: &str = "interop";
/// How long one run of a Python client may take, its own bounded waits included.
const SCRIPT_LIMIT: Duration = Duration::from_secs(60);
/// The Workload API socket, beside the SDS socket in the test's directory.
const WORKLOAD_SOCKET: &str = "workload.sock";

/// An agent on the embedded CA with the root `ca`, serving `service_account` with
/// certificates of `cert_ttl`, started with `extra` flags too.
async fn agent(
    dir: &Path,
    ca: &SharedCa,
    service_account: &str,
    cert_ttl: &str,
    extra: &[OsString],
) -> Agent {
    let mut args: Vec<OsString> = vec![
        "--embedded-ca-cert".into(),
        ca.cert.clone().into(),
        "--embedded-ca-key".into(),
        ca.key.clone().into(),
    ];
    args.extend_from_slice(extra);
    let config = AgentConfig {
        trust_domain: TRUST_DOMAIN,
        namespace: NAMESPACE,
        service_account,
        cert_ttl,
    };
    Agent::start_with(&agent_bin().unwrap(), dir, &config, &args)
        .await
        .unwrap()
}

/// `--workload-api-socket <dir>/workload.sock`, and that path.
fn workload_api_flag(dir: &Path) -> (Vec<OsString>, PathBuf) {
    let socket = dir.join(WORKLOAD_SOCKET);
    (
        vec!["--workload-api-socket".into(), socket.clone().into()],
        socket,
    )
}

/// Runs `integration/python/<name> args...`; a failure panics with its output and the
/// agent's log tail.
async fn run(python: &Path, agent: &Agent, name: &str, args: &[&str]) -> Value {
    match run_json(python, &script(name), args, SCRIPT_LIMIT).await {
        Ok(v) => {
            eprintln!("{name} {}: {v}", args.first().unwrap_or(&""));
            v
        }
        Err(e) => panic!("{e:?}\n{}", agent.process().tail(40)),
    }
}

fn abs(path: &Path) -> &str {
    assert!(path.is_absolute(), "{} is not absolute", path.display());
    path.to_str().unwrap()
}

fn serial(v: &Value) -> Serial {
    v.as_str()
        .unwrap_or_else(|| panic!("not a serial: {v}"))
        .parse()
        .unwrap()
}

/// The secrets of one SotW response by name.
fn by_name(secrets: &Value) -> std::collections::BTreeMap<String, Value> {
    secrets
        .as_array()
        .unwrap_or_else(|| panic!("not a list of secrets: {secrets}"))
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s.clone()))
        .collect()
}

/// `default` is the agent's current certificate for `spiffe_id`, with its key; `ROOTCA` is
/// the shared root, in the SPIFFE validator.
fn check_secrets(call: &str, secrets: &Value, spiffe_id: &str, leaf: &Serial, root: &Serial) {
    let s = by_name(secrets);
    assert_eq!(
        s.keys().collect::<Vec<_>>(),
        ["ROOTCA", "default"],
        "{call}: {secrets}"
    );
    let default = &s["default"];
    assert_eq!(default["kind"], "tls_certificate", "{call}: {default}");
    assert_eq!(
        default["pem_first_line"], "-----BEGIN CERTIFICATE-----",
        "{call}: {default}"
    );
    assert_eq!(default["private_key"], true, "{call}: {default}");
    assert!(
        default["private_key_first_line"]
            .as_str()
            .is_some_and(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")),
        "{call}: {default}"
    );
    assert_eq!(
        default["leaf"]["uri_sans"],
        serde_json::json!([spiffe_id]),
        "{call}: {default}"
    );
    assert_eq!(
        &serial(&default["leaf"]["serial"]),
        leaf,
        "{call}: {default}"
    );
    let rootca = &s["ROOTCA"];
    assert_eq!(rootca["kind"], "validation_context", "{call}: {rootca}");
    // Envoy's SPIFFE validator, listing the agent's trust domain alone.
    assert_eq!(rootca["validator"], "spiffe", "{call}: {rootca}");
    assert_eq!(
        rootca["trust_domains"],
        serde_json::json!([TRUST_DOMAIN]),
        "{call}: {rootca}"
    );
    assert_eq!(
        rootca["pem_first_line"], "-----BEGIN CERTIFICATE-----",
        "{call}: {rootca}"
    );
    let roots: Vec<Serial> = rootca["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serial(&r["serial"]))
        .collect();
    assert_eq!(roots, std::slice::from_ref(root), "{call}: {rootca}");
}

/// A uid that is not ours: the owner of a file we just made is our effective uid.
fn another_uid(dir: &Path) -> String {
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    let ours = std::fs::metadata(&probe).unwrap().uid();
    let other = if ours == 65534 { 65533 } else { 65534 };
    other.to_string()
}

/// grpcio, on the SDS socket, with the default authority (the socket path): StreamSecrets
/// answers `default` and `ROOTCA`, takes the ACK and stays up; FetchSecrets and DeltaSecrets
/// answer the same secrets. The certificate is the one the agent's `/secrets` names, and the
/// agent counts a push for each API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_stream_fetch_and_delta_secrets() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let agent = agent(dir.path(), &ca, "grpcio", "1h", &[]).await;
    let leaf = agent.current_serial().await.unwrap().unwrap();

    let out = run(
        &python,
        &agent,
        "sds_grpcio.py",
        &["sds", "--socket", abs(agent.socket())],
    )
    .await;
    assert_eq!(out["authority_override"], Value::Null);
    assert_eq!(out["grpc_version"], "1.85.1", "scripts/test.sh pins grpcio");

    let stream = &out["stream"];
    check_secrets(
        "StreamSecrets",
        &stream["first"]["secrets"],
        agent.spiffe_id(),
        &leaf,
        &ca.serial,
    );
    assert_eq!(stream["acked"], true);
    assert!(stream["alive_after_ack_s"].as_f64().unwrap() >= 1.0);
    // A 1 h certificate does not rotate during the test: nothing is pushed after the ACK.
    assert_eq!(
        stream["pushes_after_ack"],
        serde_json::json!([]),
        "{stream}"
    );

    check_secrets(
        "FetchSecrets",
        &out["fetch"]["secrets"],
        agent.spiffe_id(),
        &leaf,
        &ca.serial,
    );

    let delta = &out["delta"];
    assert_eq!(
        delta["names"],
        serde_json::json!(["ROOTCA", "default"]),
        "{delta}"
    );
    let resources: Vec<Value> = delta["responses"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().iter())
        .map(|r| r["secret"].clone())
        .collect();
    check_secrets(
        "DeltaSecrets",
        &Value::Array(resources),
        agent.spiffe_id(),
        &leaf,
        &ca.serial,
    );

    // The agent saw it all: a push on each API, the ACKs of both streams. The streams are
    // closed by now, so the counters no longer move.
    let pushes = |api: &'static str| {
        let agent = &agent;
        async move {
            agent
                .metric_total(&format!("sds_agent_sds_pushes_total{{api=\"{api}\"}}"))
                .await
                .unwrap()
        }
    };
    let (sotw, delta_pushes, fetch) = (
        pushes("sotw").await,
        pushes("delta").await,
        pushes("fetch").await,
    );
    // The last ACK may still be on its way when the script is done.
    wait_until(
        "the agent to count the two ACKs",
        Duration::from_secs(5),
        || async {
            agent
                .metric_total("sds_agent_sds_acks_total")
                .await
                .unwrap()
                >= 2
        },
    )
    .await
    .unwrap();
    let acks = agent
        .metric_total("sds_agent_sds_acks_total")
        .await
        .unwrap();
    let nacks = agent
        .metric_total("sds_agent_sds_nacks_total")
        .await
        .unwrap();
    eprintln!(
        "agent metrics: pushes sotw {sotw}, delta {delta_pushes}, fetch {fetch}; acks {acks}, \
         nacks {nacks}"
    );
    assert_eq!(sotw, 1, "one StreamSecrets response, ACKed, no rotation");
    assert!(delta_pushes >= 1, "DeltaSecrets pushes: {delta_pushes}");
    assert_eq!(fetch, 1, "one FetchSecrets call");
    assert_eq!(nacks, 0);
    // Still the same certificate: the comparison above was with what is served now.
    assert_eq!(agent.current_serial().await.unwrap(), Some(leaf));
}

/// grpcio's ACKed StreamSecrets stream receives the next certificate when the agent rotates
/// (`--cert-ttl 10s`, renewed at about 5 s), without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_acked_stream_receives_the_rotation() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let agent = agent(dir.path(), &ca, "grpcio-rotation", "10s", &[]).await;

    let out = run(
        &python,
        &agent,
        "sds_grpcio.py",
        &["sds", "--socket", abs(agent.socket()), "--watch", "15"],
    )
    .await;
    let stream = &out["stream"];
    let first = by_name(&stream["first"]["secrets"]);
    let pushes = stream["pushes_after_ack"].as_array().unwrap();
    assert!(!pushes.is_empty(), "no push after the ACK: {stream}");
    let pushed = by_name(&pushes[0]["secrets"]);
    let (before, after) = (
        serial(&first["default"]["leaf"]["serial"]),
        serial(&pushed["default"]["leaf"]["serial"]),
    );
    assert_ne!(
        before, after,
        "the push carried the same certificate: {stream}"
    );
    assert_eq!(
        pushed["default"]["leaf"]["uri_sans"],
        serde_json::json!([agent.spiffe_id()])
    );
    assert_ne!(
        stream["first"]["version_info"], pushes[0]["version_info"],
        "{stream}"
    );
    eprintln!("rotation on the grpcio stream: {before} -> {after}");
}

/// py-spiffe's fetch_x509_svid, fetch_x509_bundles and fetch_x509_context on the Workload
/// API socket: the SVID of `spiffe://<td>/ns/<ns>/sa/<sa>`, the certificate `/secrets` names,
/// and a bundle for the trust domain holding the shared root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_svid_bundles_and_context() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let (flags, socket) = workload_api_flag(dir.path());
    let agent = agent(dir.path(), &ca, "spiffe-fetch", "1h", &flags).await;
    let leaf = agent.current_serial().await.unwrap().unwrap();
    assert_eq!(
        agent.spiffe_id(),
        format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/spiffe-fetch")
    );

    let out = run(
        &python,
        &agent,
        "workload_api.py",
        &[
            "fetch",
            "--socket",
            abs(&socket),
            "--spiffe-id",
            agent.spiffe_id(),
            "--trust-domain",
            TRUST_DOMAIN,
        ],
    )
    .await;
    for svid in [&out["x509_svid"], &out["x509_context"]["default_svid"]] {
        assert_eq!(svid["spiffe_id"], agent.spiffe_id(), "{svid}");
        assert_eq!(svid["trust_domain"], TRUST_DOMAIN, "{svid}");
        assert_eq!(svid["private_key"], true, "{svid}");
        assert_eq!(serial(&svid["leaf_serial"]), leaf, "{svid}");
    }
    for bundles in [&out["x509_bundles"], &out["x509_context"]] {
        assert_eq!(
            bundles["trust_domains"],
            serde_json::json!([TRUST_DOMAIN]),
            "{bundles}"
        );
        let authorities: Vec<Serial> = bundles["authorities"]
            .as_array()
            .unwrap()
            .iter()
            .map(serial)
            .collect();
        assert_eq!(authorities, std::slice::from_ref(&ca.serial), "{bundles}");
    }
    assert_eq!(out["x509_context"]["svids"], 1);
    assert_eq!(out["x509_context"]["leaf_issued_by_chain_or_bundle"], true);
}

/// A federated trust domain (`--federate-with partner.example=<PEM>`) reaches py-spiffe: its
/// bundle is in the bundle sets of fetch_x509_bundles and fetch_x509_context, next to the
/// agent's own, with the partner's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_sees_a_federated_trust_domain() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let partner_dir = dir.path().join("partner");
    std::fs::create_dir(&partner_dir).unwrap();
    let partner = SharedCa::write(&partner_dir).unwrap();
    let (mut flags, socket) = workload_api_flag(dir.path());
    flags.extend([
        OsString::from("--federate-with"),
        format!("partner.example={}", partner.cert.display()).into(),
    ]);
    let agent = agent(dir.path(), &ca, "spiffe-federated", "1h", &flags).await;
    let out = run(
        &python,
        &agent,
        "workload_api.py",
        &[
            "fetch",
            "--socket",
            abs(&socket),
            "--spiffe-id",
            agent.spiffe_id(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--federated",
            "partner.example",
        ],
    )
    .await;
    for bundles in [&out["x509_bundles"], &out["x509_context"]] {
        assert_eq!(
            bundles["trust_domains"],
            serde_json::json!([TRUST_DOMAIN, "partner.example"]),
            "{bundles}"
        );
    }
    let partner_roots: Vec<Serial> = out["federated"]["partner.example"]
        .as_array()
        .unwrap()
        .iter()
        .map(serial)
        .collect();
    assert_eq!(
        partner_roots,
        std::slice::from_ref(&partner.serial),
        "{out}"
    );
}

/// One py-spiffe stream_x509_contexts stream (no reconnects allowed) sees at least three
/// different certificates as the agent rotates (`--cert-ttl 10s`, renewed at about 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_stream_sees_rotations_on_one_stream() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let (flags, socket) = workload_api_flag(dir.path());
    let agent = agent(dir.path(), &ca, "spiffe-stream", "10s", &flags).await;

    let out = run(
        &python,
        &agent,
        "workload_api.py",
        &[
            "stream",
            "--socket",
            abs(&socket),
            "--spiffe-id",
            agent.spiffe_id(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--serials",
            "3",
            "--within",
            "30",
        ],
    )
    .await;
    let distinct = out["distinct_serials"].as_array().unwrap();
    assert!(distinct.len() >= 3, "{out}");
    assert_eq!(out["errors"], serde_json::json!([]), "{out}");
    // Each update is a new certificate: the agent streams on rotation, not repeats.
    let updates = out["updates"].as_array().unwrap();
    assert_eq!(updates.len(), distinct.len(), "repeated updates: {out}");
    eprintln!(
        "py-spiffe stream: {} certificates on one stream: {distinct:?}",
        distinct.len()
    );
}

/// A Workload API call without `workload.spiffe.io: true` is refused with INVALID_ARGUMENT,
/// and the same call with it is answered: the header is the only difference. The Workload
/// API socket gets `--socket-mode`, as the SDS socket does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_without_its_header_is_invalid_argument() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let (mut flags, socket) = workload_api_flag(dir.path());
    flags.extend(["--socket-mode".into(), "0660".into()]);
    let agent = agent(dir.path(), &ca, "spiffe-header", "1h", &flags).await;
    for s in [&socket, agent.socket()] {
        let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{}: mode {mode:o}", s.display());
    }

    let out = run(
        &python,
        &agent,
        "sds_grpcio.py",
        &[
            "workload-header",
            "--socket",
            abs(&socket),
            "--expect-code",
            "INVALID_ARGUMENT",
        ],
    )
    .await;
    assert_eq!(out["without_header"]["code"], "INVALID_ARGUMENT", "{out}");
    assert_eq!(out["with_header"]["code"], "OK", "{out}");
    let svids = out["with_header"]["response"]["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{out}");
    assert_eq!(svids[0]["spiffe_id"], agent.spiffe_id(), "{out}");
    assert_eq!(svids[0]["private_key"], true, "{out}");
}

/// With `--allowed-uids` naming only a uid that is not ours, py-spiffe's fetches and stream
/// are refused with PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_from_a_refused_uid_gets_permission_denied() {
    let Some(python) = python().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = SharedCa::write(dir.path()).unwrap();
    let (mut flags, socket) = workload_api_flag(dir.path());
    let other = another_uid(dir.path());
    flags.extend(["--allowed-uids".into(), other.into()]);
    let agent = agent(dir.path(), &ca, "spiffe-refused", "1h", &flags).await;

    let out = run(
        &python,
        &agent,
        "workload_api.py",
        &[
            "refused",
            "--socket",
            abs(&socket),
            "--expect-code",
            "PERMISSION_DENIED",
        ],
    )
    .await;
    assert_eq!(out["fetch_x509_svid"]["code"], "PERMISSION_DENIED", "{out}");
    assert_eq!(
        out["fetch_x509_bundles"]["code"], "PERMISSION_DENIED",
        "{out}"
    );
    assert_eq!(
        out["stream_x509_contexts"]["updates"],
        serde_json::json!([]),
        "{out}"
    );
}

/// The streams Envoy's google_grpc client opened for `default` and for `ROOTCA`: each secret
/// has its own subscription, counted as `sds.<secret>.grpc.<stat_prefix>.streams_total`.
async fn sds_streams(envoy: &Envoy) -> [u64; 2] {
    let mut out = [0; 2];
    for (n, secret) in out.iter_mut().zip([WORKLOAD_SECRET, ROOT_SECRET]) {
        let counter = format!("sds.{secret}.grpc.{GOOGLE_GRPC_STAT_PREFIX}.streams_total");
        *n = envoy.counter(&counter).await.unwrap();
    }
    out
}

/// Two Envoys whose secrets come over `google_grpc` (gRPC C-core, `target_uri:
/// unix:///...`, no SDS cluster at all) get `default` and `ROOTCA`, and do mTLS through
/// rotations (`--cert-ttl 10s`, 20 s of traffic) with not one failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_google_grpc_mtls_through_rotations() {
    let Some(envoy_bin) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = MeshCa::shared_root(dir.path()).unwrap();
    let mesh = Mesh::start_with_sds(
        &envoy_bin,
        dir.path(),
        "10s",
        &rotation_paths(),
        &ca,
        SdsClient::GoogleGrpc,
    )
    .await
    .unwrap();

    // The secrets came over google_grpc: its client opened streams, and there is no SDS
    // cluster through which envoy_grpc could have fetched them.
    let mut streams_at_start = Vec::new();
    for envoy in [&mesh.client, &mesh.server] {
        let name = envoy.process().name().to_owned();
        let streams = sds_streams(envoy).await;
        assert_eq!(
            streams,
            [1, 1],
            "{name}: google_grpc SDS streams (default, ROOTCA); more than one each means the \
             agent refused streams and Envoy retried"
        );
        streams_at_start.push(streams);
        assert!(
            envoy
                .counter("cluster.sds-grpc.upstream_cx_total")
                .await
                .is_err(),
            "{name} has an SDS cluster"
        );
        let contexts = envoy.certs().await.unwrap();
        assert!(!contexts.is_empty(), "{name}: no TLS contexts");
        for ctx in &contexts {
            assert_eq!(ctx.chain.len(), 1, "{name}: {contexts:?}");
            assert_eq!(
                ctx.ca.iter().map(|c| &c.serial).collect::<Vec<_>>(),
                mesh.roots.iter().collect::<Vec<_>>(),
                "{name}: {contexts:?}"
            );
        }
    }
    match check_rotation_under_traffic(&mesh, Duration::from_secs(20), 3).await {
        Ok(summary) => eprintln!("google_grpc rotation test: {summary}"),
        Err(report) => panic!("{report}"),
    }
    // The rotations came over the streams opened at start: none was opened again (Envoy's
    // gRPC retries would count a new one).
    for (envoy, at_start) in [&mesh.client, &mesh.server]
        .into_iter()
        .zip(streams_at_start)
    {
        let name = envoy.process().name().to_owned();
        let streams = sds_streams(envoy).await;
        assert_eq!(
            streams, at_start,
            "{name}: SDS streams reopened during the rotations"
        );
        eprintln!("{name}: google_grpc SDS streams opened (default, ROOTCA): {streams:?}");
    }
}
