//! The SPIFFE Workload API over a real Unix socket: a started agent (scripted CA) and the
//! generated `SpiffeWorkloadAPI` client, checking what `SPIFFE_Workload_API.md` and
//! `SPIFFE_Workload_Endpoint.md` require and the bad inputs of DESIGN.md. The clients that
//! others wrote (py-spiffe, grpcio) are in integration/tests/interop_e2e.rs.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{RawCodec, uds_channel as channel};
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use sds_backends::CaError;
use sds_backends::testing::ScriptedCa;
use sds_proto::pb::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sds_proto::pb::spiffe_workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest,
    X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Bound on every wait for a message in these tests.
const WAIT: Duration = Duration::from_secs(10);
const SPIFFE_ID: &str = "spiffe://example.org/ns/default/sa/web";

struct Agent {
    agent: Option<RunningAgent>,
    ca: Arc<ScriptedCa>,
    socket: PathBuf,
    workload: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start_args(ca: Arc<ScriptedCa>, args: RunArgs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let workload = dir.path().join("api.sock");
        let config = RunArgs {
            socket: Some(socket.to_string_lossy().into_owned()),
            workload_api_socket: Some(workload.to_string_lossy().into_owned()),
            admin_addr: Some("127.0.0.1:0".into()),
            trust_domain: Some("example.org".into()),
            service_account: Some("web".into()),
            ..args
        }
        .resolve()
        .unwrap();
        let mut policy = Policy::from_config(&config);
        policy.backoff_initial = Duration::from_millis(10);
        let agent = RunningAgent::start(&config, policy, ca.clone())
            .await
            .unwrap();
        Self {
            agent: Some(agent),
            ca,
            socket,
            workload,
            _dir: dir,
        }
    }

    /// Started with `args`, and serving a certificate and a bundle.
    async fn ready_with(args: RunArgs) -> Self {
        let a = Self::start_args(ScriptedCa::new(), args).await;
        wait_for(|| a.agent().manager().is_ready()).await;
        a
    }

    async fn ready() -> Self {
        Self::ready_with(RunArgs::default()).await
    }

    fn agent(&self) -> &RunningAgent {
        self.agent.as_ref().unwrap()
    }

    fn metric(&self, needle: &str) -> u64 {
        self.agent()
            .metrics()
            .encode()
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap() as u64)
            .unwrap_or(0)
    }

    async fn client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(channel(&self.workload).await)
    }

    async fn svid_stream(&self) -> Streaming<X509svidResponse> {
        self.client()
            .await
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    async fn bundles_stream(&self) -> Streaming<X509BundlesResponse> {
        self.client()
            .await
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    fn serial(&self) -> String {
        self.agent()
            .manager()
            .subscribe_cert(&self.agent().manager().workload_identity().unwrap().clone())
            .borrow()
            .as_ref()
            .unwrap()
            .leaf
            .serial
            .clone()
    }
}

/// `message` with the metadata every Workload API call must carry.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

async fn wait_for(mut check: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition not met in time");
}

async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no message in time")
        .unwrap()
        .expect("stream ended")
}

/// The DER certificates of a concatenation, in order.
fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut certs = vec![];
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).unwrap();
        certs.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    certs
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial_as_string().replace(':', "")
}

#[tokio::test]
async fn fetch_x509_svid_serves_the_chain_key_and_bundle_as_der() {
    let a = Agent::ready().await;
    let mut stream = a.svid_stream().await;
    let msg = next(&mut stream).await;
    assert_eq!(msg.svids.len(), 1);
    assert!(msg.crl.is_empty());
    assert!(msg.federated_bundles.is_empty());
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, SPIFFE_ID);
    assert_eq!(svid.hint, "");

    // The chain is DER, leaf first: the leaf names the identity and is the one served.
    let chain = split_der(&svid.x509_svid);
    assert!(!chain.is_empty());
    assert_eq!(uri_sans(&chain[0]), vec![SPIFFE_ID.to_owned()]);
    assert_eq!(serial_of(&chain[0]).to_lowercase(), a.serial());

    // The key is PKCS#8 DER, and it is the leaf's.
    let key = rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(
        key.public_key_raw(),
        leaf.public_key().subject_public_key.data.as_ref()
    );

    // The bundle is the DER roots the chain verifies to.
    let roots = split_der(&svid.bundle);
    let served = a
        .agent()
        .manager()
        .subscribe_bundle()
        .borrow()
        .clone()
        .unwrap();
    assert_eq!(svid.bundle, served.der);
    assert_eq!(roots.len(), served.root_info.len());
    let (_, root) = X509Certificate::from_der(&roots[0]).unwrap();
    let issuer = X509Certificate::from_der(chain.last().unwrap()).unwrap().1;
    assert_eq!(issuer.issuer(), root.subject());
}

#[tokio::test]
async fn one_stream_gets_a_full_message_on_every_rotation_and_one_csr_each() {
    let a = Agent::ready().await;
    let mut s1 = a.svid_stream().await;
    let mut s2 = a.svid_stream().await;
    let first = next(&mut s1).await;
    next(&mut s2).await;
    let calls = a.ca.sign_calls();
    let mut serials = vec![serial_of(&split_der(&first.svids[0].x509_svid)[0])];
    for _ in 0..3 {
        let before = a.serial();
        a.agent().manager().rotate_now();
        wait_for(|| a.serial() != before).await;
        let m1 = next(&mut s1).await;
        let m2 = next(&mut s2).await;
        assert_eq!(m1, m2, "both streams see the same SVID");
        let svid = &m1.svids[0];
        assert!(!svid.x509_svid_key.is_empty() && !svid.bundle.is_empty());
        serials.push(serial_of(&split_der(&svid.x509_svid)[0]));
    }
    serials.dedup();
    assert_eq!(serials.len(), 4, "a new serial per rotation: {serials:?}");
    assert_eq!(a.ca.sign_calls(), calls + 3, "one CSR per rotation");
    assert_eq!(
        a.metric("sds_agent_sds_pushes_total{api=\"workload\"}"),
        8,
        "two streams, four messages each"
    );
}

#[tokio::test]
async fn bundles_are_keyed_by_trust_domain_and_sent_again_only_when_they_change() {
    let a = Agent::ready().await;
    let mut bundles = a.bundles_stream().await;
    let mut svids = a.svid_stream().await;
    let first = next(&mut bundles).await;
    next(&mut svids).await;
    assert!(first.crl.is_empty());
    assert_eq!(
        first.bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://example.org"]
    );
    let served = a
        .agent()
        .manager()
        .subscribe_bundle()
        .borrow()
        .clone()
        .unwrap();
    assert_eq!(first.bundles["spiffe://example.org"], served.der);

    // A new certificate under the same roots: the SVID stream hears of it, the bundle
    // stream does not.
    let before = a.serial();
    a.agent().manager().rotate_now();
    wait_for(|| a.serial() != before).await;
    next(&mut svids).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bundles.message())
            .await
            .is_err(),
        "identical bundles were sent again"
    );

    // A new root: both streams get it.
    a.ca.start_root_rotation();
    a.agent().manager().rotate_now();
    let second = next(&mut bundles).await;
    let roots = split_der(&second.bundles["spiffe://example.org"]);
    assert_eq!(roots.len(), 2, "old and new root");
    let svid = loop {
        let m = next(&mut svids).await;
        if split_der(&m.svids[0].bundle).len() == 2 {
            break m;
        }
    };
    assert_eq!(svid.svids[0].bundle, second.bundles["spiffe://example.org"]);
}

#[tokio::test]
async fn a_stream_opened_before_the_first_certificate_waits_for_it() {
    let ca = ScriptedCa::new();
    ca.set_outage(Some(CaError::Unavailable("down for the test".into())));
    let a = Agent::start_args(ca.clone(), RunArgs::default()).await;
    let mut stream = a.svid_stream().await;
    wait_for(|| ca.sign_calls() >= 2).await;
    assert!(!a.agent().manager().is_ready());
    let pending = a.agent().sds().proxies();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].state, "waiting");

    ca.set_outage(None);
    let msg = next(&mut stream).await;
    assert_eq!(msg.svids[0].spiffe_id, SPIFFE_ID);
}

#[tokio::test]
async fn every_call_without_the_security_header_is_invalid_argument_and_counted() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let statuses = [
        client
            .fetch_x509svid(X509svidRequest {})
            .await
            .err()
            .unwrap(),
        client
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .err()
            .unwrap(),
        client
            .fetch_jwtsvid(JwtsvidRequest::default())
            .await
            .err()
            .unwrap(),
        client
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .err()
            .unwrap(),
        client
            .validate_jwtsvid(ValidateJwtsvidRequest::default())
            .await
            .err()
            .unwrap(),
    ];
    for status in &statuses {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("workload.spiffe.io"),
            "{status:?}"
        );
    }
    // A header with another value is no header.
    let mut wrong = tonic::Request::new(X509svidRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    let status = client.fetch_x509svid(wrong).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        a.metric("sds_agent_workload_api_bad_requests_total{reason=\"missing_security_header\"}"),
        6
    );
    assert!(a.agent().sds().proxies().is_empty());
}

#[tokio::test]
async fn jwt_methods_are_unimplemented_with_a_message_saying_why() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let statuses = [
        client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            }))
            .await
            .err()
            .unwrap(),
        client
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .err()
            .unwrap(),
        client
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest::default()))
            .await
            .err()
            .unwrap(),
    ];
    for status in &statuses {
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(
            status.message().contains("does not issue JWT-SVIDs"),
            "{status:?}"
        );
    }
    assert_eq!(
        a.metric("sds_agent_workload_api_bad_requests_total{reason=\"jwt_not_issued\"}"),
        3
    );
}

#[tokio::test]
async fn a_caller_whose_uid_is_not_allowed_gets_permission_denied_and_is_counted() {
    // Nobody may call but uid 65534, which this test process is not.
    let a = Agent::ready_with(RunArgs {
        allowed_uids: Some("65534".into()),
        ..Default::default()
    })
    .await;
    let mut client = a.client().await;
    let status = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(a.metric("sds_agent_workload_api_callers_denied_total"), 2);
    assert_eq!(a.metric("sds_agent_sds_callers_denied_total"), 0);
}

#[tokio::test]
async fn workload_api_streams_count_against_max_streams_apart_from_sds() {
    let a = Agent::ready_with(RunArgs {
        max_streams: Some("2".into()),
        ..Default::default()
    })
    .await;
    let mut s1 = a.svid_stream().await;
    let mut s2 = a.bundles_stream().await;
    next(&mut s1).await;
    next(&mut s2).await;
    let status = a
        .client()
        .await
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        a.metric("sds_agent_workload_api_bad_requests_total{reason=\"too_many_streams\"}"),
        1
    );
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"too_many_streams\"}"),
        0
    );

    // The SDS socket still takes its own two streams.
    let mut sds = envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel(&a.socket).await);
    let fetched = sds
        .fetch_secrets(
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
                resource_names: vec!["default".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().resources.len(), 1);

    // Closing one makes room.
    drop(s1);
    wait_for(|| a.agent().sds().proxies().len() == 1).await;
    let mut s3 = a.svid_stream().await;
    next(&mut s3).await;
    assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"workload\"}"), 2);
}

#[tokio::test]
async fn a_process_opening_calls_faster_than_the_rate_limit_is_refused() {
    let a = Agent::ready_with(RunArgs {
        max_requests_per_second: Some("3".into()),
        ..Default::default()
    })
    .await;
    let mut client = a.client().await;
    let mut refused = None;
    // A burst of 3 is allowed; well within a second, the fourth or a later one is refused.
    for _ in 0..10 {
        if let Err(status) = client.fetch_x509svid(with_header(X509svidRequest {})).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("no call was refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("calls per second"), "{status:?}");
    assert!(a.metric("sds_agent_workload_api_bad_requests_total{reason=\"rate_limited\"}") >= 1);
}

async fn raw_fetch(a: &Agent, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel(&a.workload).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID");
    match grpc
        .server_streaming(
            with_header(body),
            path,
            RawCodec::<X509svidResponse>::default(),
        )
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            tokio::time::timeout(WAIT, stream.message())
                .await
                .unwrap()
                .expect_err("the request was served")
        }
    }
}

#[tokio::test]
async fn oversized_and_undecodable_requests_are_refused_and_counted() {
    let a = Agent::ready_with(RunArgs {
        max_message_size: Some("1024".into()),
        ..Default::default()
    })
    .await;
    let mut fine = a.svid_stream().await;
    next(&mut fine).await;

    // Field 15 with wire type 7, which does not exist.
    let status = raw_fetch(&a, vec![0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(
        a.metric("sds_agent_workload_api_bad_requests_total{reason=\"malformed\"}"),
        1
    );

    // An unknown bytes field (number 9) of 2,000 bytes: valid protobuf, over the limit.
    let mut big = vec![0x4a, 0xd0, 0x0f];
    big.extend(std::iter::repeat_n(b'x', 2000));
    let status = raw_fetch(&a, big).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(
        a.metric("sds_agent_workload_api_bad_requests_total{reason=\"too_large\"}"),
        1
    );

    // Nothing was lost: the good stream still gets the next rotation.
    let before = a.serial();
    a.agent().manager().rotate_now();
    wait_for(|| a.serial() != before).await;
    let msg = next(&mut fine).await;
    assert_eq!(
        serial_of(&split_der(&msg.svids[0].x509_svid)[0]).to_lowercase(),
        a.serial()
    );
}

#[tokio::test]
async fn proxies_lists_workload_api_streams_beside_sds_ones() {
    let a = Agent::ready().await;
    let mut svid = a.svid_stream().await;
    let mut bundles = a.bundles_stream().await;
    next(&mut svid).await;
    next(&mut bundles).await;
    let proxies = a.agent().sds().proxies();
    assert_eq!(proxies.len(), 2);
    for p in &proxies {
        assert_eq!(p.api, "workload");
        assert_eq!(p.state, "streaming");
        assert_eq!(p.caller.uid, own_uid());
        assert!(p.sent_version.is_some());
    }
    let mut resources: Vec<_> = proxies.iter().flat_map(|p| p.resources.clone()).collect();
    resources.sort_unstable();
    assert_eq!(resources, vec!["x509-bundles", "x509-svid"]);
    assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"workload\"}"), 2);
    drop(svid);
    drop(bundles);
    wait_for(|| a.agent().sds().proxies().is_empty()).await;
    assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"workload\"}"), 0);
}

/// This process's uid, read from /proc (the crate forbids unsafe code, so no libc call).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test]
async fn the_workload_api_socket_gets_the_socket_mode_and_is_removed_at_shutdown() {
    let mut a = Agent::ready_with(RunArgs {
        socket_mode: Some("0660".into()),
        ..Default::default()
    })
    .await;
    let mode = std::fs::metadata(&a.workload).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    a.agent.take().unwrap().shutdown().await;
    assert!(!a.workload.exists());
    assert!(!a.socket.exists());
}

#[test]
fn the_workload_api_socket_must_differ_from_the_sds_socket_and_may_be_a_unix_uri() {
    let err = RunArgs {
        socket: Some("./run/x.sock".into()),
        workload_api_socket: Some("run/./x.sock".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err();
    assert!(err.to_string().contains("must be different paths"), "{err}");

    let config = RunArgs {
        workload_api_socket: Some("unix:///tmp/spire-agent/public/api.sock".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(
        config.workload_api_socket.as_deref(),
        Some(Path::new("/tmp/spire-agent/public/api.sock"))
    );
    assert_eq!(
        RunArgs::default().resolve().unwrap().workload_api_socket,
        None
    );
    let one_slash = RunArgs {
        workload_api_socket: Some("unix:/run/spiffe/api.sock".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(
        one_slash.workload_api_socket.as_deref(),
        Some(Path::new("/run/spiffe/api.sock"))
    );

    // The default SDS socket is relative to the working directory: its absolute spelling
    // is the same file.
    let cwd = std::env::current_dir().unwrap();
    let absolute = cwd.join("var/run/secrets/workload-spiffe-uds/socket");
    let err = RunArgs {
        workload_api_socket: Some(absolute.to_string_lossy().into_owned()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err();
    assert!(err.to_string().contains("must be different paths"), "{err}");

    let err = RunArgs {
        workload_api_socket: Some("".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err();
    assert!(err.to_string().contains("workload-api-socket"), "{err}");
}

/// A self-signed CA certificate of `trust_domain` (its URI SAN `spiffe://<td>`).
fn federated_root(trust_domain: &str) -> rcgen::Certificate {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{trust_domain}").try_into().unwrap(),
    )];
    p.self_signed(&key).unwrap()
}

#[tokio::test]
async fn federated_bundles_are_served_and_pushed_again_when_their_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("partner.pem");
    let first = federated_root("partner.example");
    std::fs::write(&file, first.pem()).unwrap();
    let a = Agent::ready_with(RunArgs {
        federate_with: vec![format!("partner.example={}", file.display())],
        federation_poll_interval: Some("100ms".into()),
        ..RunArgs::default()
    })
    .await;
    let mut svids = a.svid_stream().await;
    let mut bundles = a.bundles_stream().await;
    let svid = next(&mut svids).await;
    assert_eq!(
        svid.federated_bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://partner.example"]
    );
    assert_eq!(
        svid.federated_bundles["spiffe://partner.example"],
        first.der().to_vec()
    );
    let all = next(&mut bundles).await;
    let mut keys: Vec<_> = all.bundles.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://partner.example"]);
    assert_eq!(
        all.bundles["spiffe://partner.example"],
        first.der().to_vec()
    );

    // A bad file: refused, counted, and nothing is pushed.
    std::fs::write(&file, "not a bundle").unwrap();
    wait_for(|| {
        a.metric(
            "sds_agent_federation_errors_total{trust_domain=\"partner.example\",reason=\"empty\"}",
        ) >= 1
    })
    .await;
    for stream in [
        tokio::time::timeout(Duration::from_millis(300), svids.message())
            .await
            .is_err(),
        tokio::time::timeout(Duration::from_millis(300), bundles.message())
            .await
            .is_err(),
    ] {
        assert!(stream, "a refused bundle was pushed");
    }

    // A new good one reaches both streams.
    let second = federated_root("partner.example");
    std::fs::write(&file, second.pem()).unwrap();
    let svid = next(&mut svids).await;
    assert_eq!(
        svid.federated_bundles["spiffe://partner.example"],
        second.der().to_vec()
    );
    let all = next(&mut bundles).await;
    assert_eq!(
        all.bundles["spiffe://partner.example"],
        second.der().to_vec()
    );
    assert_eq!(
        a.metric("sds_agent_federation_updates_total{trust_domain=\"partner.example\"}"),
        1
    );
}

#[tokio::test]
async fn a_domain_whose_file_leaves_the_federation_dir_is_no_longer_served() {
    let dir = tempfile::tempdir().unwrap();
    let partner = federated_root("partner.example");
    let other = federated_root("other.example");
    std::fs::write(dir.path().join("partner.example.pem"), partner.pem()).unwrap();
    std::fs::write(dir.path().join("other.example.pem"), other.pem()).unwrap();
    let a = Agent::ready_with(RunArgs {
        federation_dir: Some(dir.path().to_owned()),
        federation_poll_interval: Some("100ms".into()),
        ..RunArgs::default()
    })
    .await;
    let mut svids = a.svid_stream().await;
    let mut bundles = a.bundles_stream().await;
    let mut keys = next(&mut svids)
        .await
        .federated_bundles
        .into_keys()
        .collect::<Vec<_>>();
    keys.sort();
    assert_eq!(keys, ["spiffe://other.example", "spiffe://partner.example"]);
    assert_eq!(next(&mut bundles).await.bundles.len(), 3);

    std::fs::remove_file(dir.path().join("partner.example.pem")).unwrap();
    let svid = next(&mut svids).await;
    assert_eq!(
        svid.federated_bundles.keys().collect::<Vec<_>>(),
        ["spiffe://other.example"]
    );
    let all = next(&mut bundles).await;
    let mut keys: Vec<_> = all.bundles.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://other.example"]);
    assert_eq!(a.metric("sds_agent_federated_domains "), 1);
}
