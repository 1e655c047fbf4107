//! SDS over a real Unix socket: a started agent (scripted CA) and tonic clients speaking
//! `envoy.service.secret.v3`, checking the xDS rules and the bad inputs of DESIGN.md.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{RawCodec, uds_channel, uds_channel_with};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use prost::Message;
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use sds_backends::testing::{Fault, ScriptedCa};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};
use x509_parser::prelude::{FromDer, X509Certificate};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Bound on every wait for a message in these tests.
const WAIT: Duration = Duration::from_secs(10);

struct Agent {
    agent: Option<RunningAgent>,
    ca: Arc<ScriptedCa>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start() -> Self {
        Self::start_with(ScriptedCa::new()).await
    }

    async fn start_with(ca: Arc<ScriptedCa>) -> Self {
        Self::start_args(ca, RunArgs::default()).await
    }

    /// Started with `args` (socket, admin address and identity filled in), and ready.
    async fn ready_with(args: RunArgs) -> Self {
        let a = Self::start_args(ScriptedCa::new(), args).await;
        wait_for(|| a.agent().manager().is_ready()).await;
        a
    }

    async fn start_args(ca: Arc<ScriptedCa>, args: RunArgs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let config = RunArgs {
            socket: Some(socket.to_string_lossy().into_owned()),
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
            _dir: dir,
        }
    }

    /// Started, and serving a certificate and a bundle.
    async fn ready() -> Self {
        let a = Self::start().await;
        wait_for(|| a.agent().manager().is_ready()).await;
        a
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

    async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        connect(&self.socket).await
    }
}

async fn connect(path: &Path) -> SecretDiscoveryServiceClient<Channel> {
    connect_endpoint(path, Endpoint::from_static("http://localhost")).await
}

/// An SDS client through `endpoint`'s settings to the Unix socket at `path`.
async fn connect_endpoint(
    path: &Path,
    endpoint: Endpoint,
) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(uds_channel_with(path, endpoint).await)
}

/// One SotW stream: requests go in through `tx`, responses come out of `rx`.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(client: &mut SecretDiscoveryServiceClient<Channel>, names: &[&str]) -> Self {
        let (tx, req_rx) = mpsc::channel(16);
        tx.send(request(names, "", "", None)).await.unwrap();
        let rx = client
            .stream_secrets(ReceiverStream::new(req_rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
        {
            Ok(Some(r)) => Ok(r),
            Ok(None) => panic!("stream ended"),
            Err(s) => Err(s),
        }
    }

    async fn send(&self, names: &[&str], version: &str, nonce: &str, error: Option<&str>) {
        self.tx
            .send(request(names, version, nonce, error))
            .await
            .unwrap();
    }

    async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) {
        self.send(names, &resp.version_info, &resp.nonce, None)
            .await;
    }
}

/// Opens a SotW stream with `req` as its only request and returns the error it ends with.
async fn first_error(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    req: DiscoveryRequest,
) -> tonic::Status {
    let (tx, rx) = mpsc::channel(1);
    tx.send(req).await.unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no answer in time")
        .expect_err("the request was served")
}

fn request(names: &[&str], version: &str, nonce: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| rpc::Status {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "test-node".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// name → decoded secret.
fn secrets(resp: &DiscoveryResponse) -> BTreeMap<String, Secret> {
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, SECRET_TYPE);
            let s = Secret::decode(any.value.as_slice()).unwrap();
            (s.name.clone(), s)
        })
        .collect()
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a `default` secret.
fn tls(s: &Secret) -> (String, String) {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("not a tls_certificate: {other:?}"),
    }
}

fn leaf_serial(chain_pem: &str) -> String {
    let der = sds_backends::pem::decode_certificates(chain_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    leaf.raw_serial_as_string()
}

#[tokio::test]
async fn sotw_serves_the_certificate_and_the_bundle() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default", "ROOTCA"]).await;
    let resp = s.recv().await.unwrap();
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    assert_eq!(resp.type_url, SECRET_TYPE);
    let got = secrets(&resp);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["ROOTCA", "default"]);

    // The key served is the one the certificate certifies, and the SAN is the workload's.
    let (chain, key) = tls(&got["default"]);
    let der = sds_backends::pem::decode_certificates(chain.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    let pair = rcgen::KeyPair::from_pem(&key).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        pair.public_key_raw()
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        "[URI(\"spiffe://example.org/ns/default/sa/web\")]"
    );
    // ROOTCA: the SPIFFE validator with the agent's trust domain only.
    let domains = spiffe_domains(&got["ROOTCA"]);
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0].0, "example.org");
    assert!(domains[0].1.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[tokio::test]
async fn ack_is_recorded_and_a_nack_causes_no_push_loop() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    let first = s.recv().await.unwrap();
    s.ack(&first, &["default"]).await;
    wait_for(|| {
        a.agent()
            .sds()
            .proxies()
            .iter()
            .any(|p| p.acked_version.as_deref() == Some(first.version_info.as_str()))
    })
    .await;
    let proxies = a.agent().sds().proxies();
    assert_eq!(proxies[0].node_id, "test-node");
    assert_eq!(proxies[0].resources, ["default"]);

    // Rotate; the proxy rejects the new version.
    a.agent().manager().rotate_now();
    let second = s.recv().await.unwrap();
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    s.send(
        &["default"],
        &first.version_info,
        &second.nonce,
        Some("bad key"),
    )
    .await;
    wait_for(|| a.metric("sds_agent_sds_nacks_total{api=\"sotw\"}") == 1).await;
    assert_eq!(
        a.agent().sds().proxies()[0].nack.as_deref(),
        Some("bad key")
    );

    // Nothing is re-sent for the NACK: the next response is the next rotation.
    a.agent().manager().rotate_now();
    let third = s.recv().await.unwrap();
    assert_ne!(
        third.version_info, second.version_info,
        "the NACKed version was pushed again"
    );
    assert_eq!(a.metric("sds_agent_sds_pushes_total{api=\"sotw\"}"), 3);
    assert_eq!(a.metric("sds_agent_sds_acks_total{api=\"sotw\"}"), 1);
}

#[tokio::test]
async fn a_stale_nonce_is_ignored_and_a_new_name_set_is_honoured() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    let first = s.recv().await.unwrap();
    assert_eq!(secrets(&first).len(), 1);
    // A request carrying an old nonce asks for ROOTCA too: it must be ignored.
    s.send(&["default", "ROOTCA"], "", "not-a-nonce-we-sent", None)
        .await;
    wait_for(|| a.metric("sds_agent_sds_stale_nonces_total{api=\"sotw\"}") == 1).await;
    // The same change with the current nonce is honoured at once.
    s.send(
        &["default", "ROOTCA"],
        &first.version_info,
        &first.nonce,
        None,
    )
    .await;
    let both = s.recv().await.unwrap();
    assert_eq!(
        secrets(&both).keys().collect::<Vec<_>>(),
        ["ROOTCA", "default"]
    );
    // And narrowing to ROOTCA, then rotating the certificate, pushes nothing new for it...
    s.send(&["ROOTCA"], &both.version_info, &both.nonce, None)
        .await;
    a.agent().manager().rotate_now();
    // ...so the next thing we see is our own re-subscription to default.
    wait_for(|| a.agent().manager().status().first().map(|st| st.version) == Some(2)).await;
    s.send(
        &["ROOTCA", "default"],
        &both.version_info,
        &both.nonce,
        None,
    )
    .await;
    let after = s.recv().await.unwrap();
    assert_eq!(
        a.metric("sds_agent_sds_pushes_total{api=\"sotw\"}"),
        3,
        "a push for an unsubscribed name"
    );
    assert_ne!(
        leaf_serial(&tls(&secrets(&after)["default"]).0),
        leaf_serial(&tls(&secrets(&both)["default"]).0)
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let a = Agent::ready().await;
    let mut client = a.client().await;

    let mut s = Sotw::open(&mut client, &["default", "no-such-secret"]).await;
    let err = s.recv().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("no-such-secret") && err.message().contains("ROOTCA"),
        "{}",
        err.message()
    );

    let mut s = Sotw::open(&mut client, &[]).await;
    let err = s.recv().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must name the secrets"),
        "{}",
        err.message()
    );

    let mut wrong = request(&["default"], "", "", None);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let err = first_error(&mut client, wrong).await;
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = client
        .fetch_secrets(request(&["nope"], "", "", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Thousands of unknown names in one request: one clear error, quickly.
    let many: Vec<String> = (0..5000).map(|i| format!("unknown-{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut s = Sotw::open(&mut client, &refs).await;
    assert_eq!(s.recv().await.unwrap_err().code(), Code::NotFound);

    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"unknown_resource\"}"),
        3
    );
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"wildcard\"}"),
        1
    );
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"type_url\"}"),
        1
    );

    // The agent still serves well-behaved clients.
    let mut s = Sotw::open(&mut client, &["default"]).await;
    assert!(s.recv().await.is_ok());
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_cleaned_up() {
    let a = Agent::ready().await;
    {
        let mut client = a.client().await;
        let mut s = Sotw::open(&mut client, &["default"]).await;
        s.recv().await.unwrap();
        assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"sotw\"}"), 1);
        // Dropped here without closing its request side.
    }
    wait_for(|| a.metric("sds_agent_sds_streams_open{api=\"sotw\"}") == 0).await;
    assert!(a.agent().sds().proxies().is_empty());
    // Rotations after it left are fine.
    a.agent().manager().rotate_now();
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    assert!(s.recv().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_cause_one_csr_and_all_get_the_rotation() {
    let a = Agent::ready().await;
    let mut streams = Vec::new();
    // A few connections, many streams each, as a node agent would see from many proxies.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(a.client().await);
    }
    for i in 0..1000 {
        streams.push(Sotw::open(&mut clients[i % 10], &["default", "ROOTCA"]).await);
    }
    let mut serials = Vec::new();
    for s in &mut streams {
        let r = s.recv().await.unwrap();
        serials.push(leaf_serial(&tls(&secrets(&r)["default"]).0));
        s.ack(&r, &["default", "ROOTCA"]).await;
    }
    assert!(serials.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(a.ca.sign_calls(), 1, "1000 streams, one CSR");
    assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"sotw\"}"), 1000);

    // A rotation reaches every stream (how fast is the streams bench's business).
    a.agent().manager().rotate_now();
    let recv_all = futures::future::join_all(streams.iter_mut().map(|s| s.recv()));
    let responses = tokio::time::timeout(WAIT, recv_all)
        .await
        .expect("a rotation did not reach all 1000 streams");
    for r in responses {
        assert_ne!(
            leaf_serial(&tls(&secrets(&r.unwrap())["default"]).0),
            serials[0]
        );
    }
    assert_eq!(a.ca.sign_calls(), 2);
}

/// A client on its own connection that never reads: HTTP/2 lets the agent send it `window`
/// bytes per stream, and it never gives them back.
async fn connect_never_reading(path: &Path, window: u32) -> SecretDiscoveryServiceClient<Channel> {
    connect_endpoint(
        path,
        Endpoint::from_static("http://localhost").initial_stream_window_size(window),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_hold_up_no_one_and_queue_nothing() {
    const ROTATIONS: usize = 20;
    let a = Agent::ready().await;
    // 20 streams that never read: 1 KiB of window each, less than one response.
    let mut stuck_client = connect_never_reading(&a.socket, 1024).await;
    let mut stuck = Vec::new();
    for _ in 0..20 {
        stuck.push(Sotw::open(&mut stuck_client, &["default", "ROOTCA"]).await);
    }
    let mut client = a.client().await;
    let mut good = Vec::new();
    for _ in 0..10 {
        let mut s = Sotw::open(&mut client, &["default", "ROOTCA"]).await;
        let r = s.recv().await.unwrap();
        s.ack(&r, &["default", "ROOTCA"]).await;
        good.push(s);
    }

    // Twenty rotations: every reading stream gets each at once, whatever the others do.
    let mut latest = String::new();
    for _ in 0..ROTATIONS {
        a.agent().manager().rotate_now();
        let previous = std::mem::take(&mut latest);
        for s in &mut good {
            let r = s.recv().await.unwrap();
            assert_ne!(r.version_info, previous);
            s.ack(&r, &["default", "ROOTCA"]).await;
            latest = r.version_info;
        }
    }
    // The stuck streams are still open, not ended by the agent.
    assert_eq!(a.agent().sds().proxies().len(), 30);
    assert_eq!(a.metric("sds_agent_sds_streams_open{api=\"sotw\"}"), 30);

    // When they start reading, each gets what HTTP/2 had already taken before its window
    // ran out (the response in flight and one or two more: 1 or 2 over 400 such streams),
    // then the newest secrets. The rotations did not queue up behind it: a queue would hold
    // all 20.
    let latest = &latest;
    futures::future::join_all(stuck.iter_mut().map(|s| async move {
        let mut versions = Vec::new();
        loop {
            let r = s.recv().await.unwrap();
            let done = r.version_info == *latest;
            versions.push(r.version_info.clone());
            if done {
                s.ack(&r, &["default", "ROOTCA"]).await;
                break;
            }
            assert!(versions.len() < 5, "a backlog was queued: {versions:?}");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.rx.message())
                .await
                .is_err(),
            "more after the newest: {versions:?}"
        );
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_storms_leave_nothing_behind() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let mut calm = Sotw::open(&mut client, &["default"]).await;
    let mut last = calm.recv().await.unwrap();
    calm.ack(&last, &["default"]).await;

    // 40 rounds of 25 clients at once, each doing one of the rude things a crashing or
    // restarting proxy does; a rotation every 10 rounds.
    for round in 0..40 {
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..25 {
            let socket = a.socket.clone();
            clients.spawn(async move {
                match i % 5 {
                    // Connect and hang up before saying anything.
                    0 => drop(tokio::net::UnixStream::connect(&socket).await.unwrap()),
                    // Not HTTP/2 at all.
                    1 => {
                        use tokio::io::AsyncWriteExt;
                        let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
                        let _ = raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    }
                    // Open a stream and go before the answer.
                    2 => {
                        let mut c = connect(&socket).await;
                        drop(Sotw::open(&mut c, &["default"]).await);
                    }
                    // Take the answer and go without closing the stream.
                    3 => {
                        let mut c = connect(&socket).await;
                        let mut s = Sotw::open(&mut c, &["default", "ROOTCA"]).await;
                        s.recv().await.unwrap();
                    }
                    // Half-close politely after the answer.
                    _ => {
                        let mut c = connect(&socket).await;
                        let Sotw { tx, mut rx } = Sotw::open(&mut c, &["default"]).await;
                        tokio::time::timeout(WAIT, rx.message())
                            .await
                            .unwrap()
                            .unwrap();
                        drop(tx);
                        let end = tokio::time::timeout(WAIT, rx.message()).await.unwrap();
                        assert!(matches!(end, Ok(None)), "{end:?}");
                    }
                }
            });
        }
        while let Some(r) = clients.join_next().await {
            r.unwrap();
        }
        if round % 10 == 9 {
            a.agent().manager().rotate_now();
            let r = calm.recv().await.unwrap();
            assert_ne!(r.version_info, last.version_info);
            calm.ack(&r, &["default"]).await;
            last = r;
        }
    }
    // Every stream the storm opened is gone from the agent's books; the calm one remains.
    wait_for(|| a.agent().sds().proxies().len() == 1).await;
    wait_for(|| a.metric("sds_agent_sds_streams_open{api=\"sotw\"}") == 1).await;
    assert_eq!(a.ca.sign_calls(), 5, "one CSR at start, one per rotation");
    a.agent().manager().rotate_now();
    assert_ne!(calm.recv().await.unwrap().version_info, last.version_info);
}

#[tokio::test]
async fn delta_subscribe_unsubscribe_unknown_and_nack() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: vec!["default".into(), "bogus".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut recv = async || -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let first = recv().await;
    assert!(!first.nonce.is_empty());
    assert_eq!(
        first.removed_resources,
        ["bogus"],
        "an unknown name is reported as not existing"
    );
    assert_eq!(first.resources.len(), 1);
    assert_eq!(first.resources[0].name, "default");
    let v1 = first.resources[0].version.clone();

    // Subscribe to ROOTCA while ACKing: only ROOTCA is sent (default is unchanged).
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        response_nonce: first.nonce.clone(),
        resource_names_subscribe: vec!["ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let second = recv().await;
    assert_eq!(
        second
            .resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["ROOTCA"]
    );

    // NACK it; then unsubscribe ROOTCA and rotate: only default comes, with a new version.
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        response_nonce: second.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "nope".into(),
            details: vec![],
        }),
        resource_names_unsubscribe: vec!["ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for(|| a.metric("sds_agent_sds_nacks_total{api=\"delta\"}") == 1).await;
    a.agent().manager().rotate_now();
    let third = recv().await;
    assert_eq!(third.resources.len(), 1);
    assert_eq!(third.resources[0].name, "default");
    assert_ne!(third.resources[0].version, v1);
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"unknown_resource\"}"),
        1
    );
}

#[tokio::test]
async fn delta_reconnect_with_current_versions_is_not_resent() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let first = {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: vec!["default".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let version = first.resources[0].version.clone();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: vec!["default".into()],
        initial_resource_versions: [("default".to_string(), version.clone())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Nothing is owed; the next message is the next rotation.
    a.agent().manager().rotate_now();
    let next = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(next.resources[0].version, version);
}

#[tokio::test]
async fn fetch_returns_the_current_secrets() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let resp = client
        .fetch_secrets(request(&["default", "ROOTCA"], "", "", None))
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    assert_eq!(secrets(&resp).len(), 2);
    let err = client
        .fetch_secrets(request(&[], "", "", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_ca_answers_never_reach_a_stream() {
    let ca = ScriptedCa::new();
    ca.push_fault(Fault::WrongKey);
    ca.push_fault(Fault::WrongSan(
        "spiffe://example.org/ns/default/sa/evil".parse().unwrap(),
    ));
    ca.push_fault(Fault::Expired);
    ca.push_fault(Fault::UnrelatedChain);
    let a = Agent::start_with(ca).await;
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    let resp = s.recv().await.unwrap();
    assert_eq!(
        a.ca.sign_calls(),
        5,
        "four rejected answers, then a good one"
    );
    let (chain, key) = tls(&secrets(&resp)["default"]);
    let der = sds_backends::pem::decode_certificates(chain.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    let pair = rcgen::KeyPair::from_pem(&key).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        pair.public_key_raw()
    );
    assert!(leaf.validity().is_valid());
    for reason in ["wrong_key", "wrong_san", "expired", "chain"] {
        let line = format!("sds_agent_ca_responses_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(a.metric(&line), 1, "{reason}");
    }
    assert_eq!(
        resp.version_info, "default:1",
        "only the good certificate was ever published"
    );
}

#[tokio::test]
async fn shutdown_ends_streams_and_removes_the_socket() {
    let mut a = Agent::ready().await;
    let mut client = a.client().await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    s.recv().await.unwrap();
    let agent = a.agent.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent.shutdown())
        .await
        .expect("shutdown took over 5 s");
    let end = tokio::time::timeout(WAIT, s.rx.message())
        .await
        .expect("stream not ended");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no more responses after shutdown"
    );
    assert!(!a.socket.exists(), "socket file left behind");
}

/// Polls `cond` every 10 ms for at most 10 s.
async fn wait_for(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition not met in time");
}

// ---------------------------------------------------------------------------------------
// Limits: streams, message size, request rate
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_stream_limit_refuses_the_next_stream_until_one_closes() {
    let a = Agent::ready_with(RunArgs {
        max_streams: Some("3".into()),
        ..Default::default()
    })
    .await;
    let mut client = a.client().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = Sotw::open(&mut client, &["default"]).await;
        s.recv().await.unwrap();
        open.push(s);
    }
    let (tx, rx) = mpsc::channel(1);
    tx.send(request(&["default"], "", "", None)).await.unwrap();
    let err = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "this agent serves at most 3 streams at once");
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"too_many_streams\"}"),
        1
    );
    // The open ones still get rotations.
    a.agent().manager().rotate_now();
    for s in &mut open {
        assert!(s.recv().await.is_ok());
    }
    // One closes; its place is free again.
    drop(open.pop());
    wait_for(|| a.agent().sds().proxies().len() == 2).await;
    let mut s = Sotw::open(&mut client, &["default"]).await;
    assert!(s.recv().await.is_ok());
}

#[tokio::test]
async fn a_stream_faster_than_its_request_rate_is_ended_and_others_are_not() {
    let a = Agent::ready_with(RunArgs {
        max_requests_per_second: Some("5".into()),
        ..Default::default()
    })
    .await;
    let mut client = a.client().await;
    let mut calm = Sotw::open(&mut client, &["default"]).await;
    let first = calm.recv().await.unwrap();
    calm.ack(&first, &["default"]).await;

    let mut storm = Sotw::open(&mut client, &["default"]).await;
    let resp = storm.recv().await.unwrap();
    // Twenty ACKs at once: the burst allows 5 requests in all.
    for _ in 0..20 {
        storm.ack(&resp, &["default"]).await;
    }
    let err = loop {
        match storm.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "more than 5 requests per second on one stream"
    );
    assert_eq!(
        a.metric("sds_agent_sds_bad_requests_total{reason=\"rate_limited\"}"),
        1
    );
    // The calm stream is untouched and still gets the next rotation.
    a.agent().manager().rotate_now();
    let pushed = calm.recv().await.unwrap();
    assert_ne!(pushed.version_info, first.version_info);
}

#[tokio::test]
async fn an_oversized_request_ends_only_its_own_stream() {
    let a = Agent::ready_with(RunArgs {
        max_message_size: Some("2048".into()),
        ..Default::default()
    })
    .await;
    let mut client = a.client().await;
    let mut fine = Sotw::open(&mut client, &["default"]).await;
    fine.recv().await.unwrap();

    let mut big = request(&["default"], "", "", None);
    big.node.as_mut().unwrap().id = "x".repeat(4096);
    let err = first_error(&mut client, big).await;
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    wait_for(|| a.metric("sds_agent_sds_bad_requests_total{reason=\"too_large\"}") == 1).await;

    a.agent().manager().rotate_now();
    assert!(fine.recv().await.is_ok());
}

#[tokio::test]
async fn a_request_that_is_not_protobuf_ends_its_stream_with_a_clear_error() {
    let a = Agent::ready().await;
    let mut client = a.client().await;
    let mut fine = Sotw::open(&mut client, &["default"]).await;
    fine.recv().await.unwrap();

    let path = std::fs::canonicalize(&a.socket).unwrap();
    let mut grpc = tonic::client::Grpc::new(uds_channel(&path).await);
    grpc.ready().await.unwrap();
    // Field 15 with wire type 7, which does not exist.
    let garbage = tokio_stream::iter(vec![vec![0x7f_u8, 0xff, 0xff, 0xff]]);
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    );
    let mut responses = grpc
        .streaming(
            tonic::Request::new(garbage),
            path,
            RawCodec::<DiscoveryResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");
    wait_for(|| a.metric("sds_agent_sds_bad_requests_total{reason=\"malformed\"}") == 1).await;

    a.agent().manager().rotate_now();
    assert!(fine.recv().await.is_ok());
}

// ---- Trust bundles: the SPIFFE certificate validator, federation, plain roots ----

/// The trust domains (name, PEM) of a bundle served through Envoy's SPIFFE validator; panics
/// if it is anything else.
fn spiffe_domains(s: &Secret) -> Vec<(String, String)> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig;
    let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
        panic!("{}: not a validation_context: {:?}", s.name, s.r#type);
    };
    assert!(
        vc.trusted_ca.is_none(),
        "{}: trusted_ca next to the validator",
        s.name
    );
    let custom = vc
        .custom_validator_config
        .as_ref()
        .expect("a custom validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    assert!(config.trust_bundles.is_none());
    config
        .trust_domains
        .iter()
        .map(|td| (td.name.clone(), inline(&td.trust_bundle)))
        .collect()
}

/// The `trusted_ca` of a plain bundle; panics if it is anything else.
fn plain_roots(s: &Secret) -> String {
    let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
        panic!("{}: not a validation_context", s.name);
    };
    assert!(
        vc.custom_validator_config.is_none(),
        "{}: a validator",
        s.name
    );
    inline(&vc.trusted_ca)
}

/// A self-signed CA certificate, PEM with LF line ends (as served).
fn root_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem().replace("\r\n", "\n")
}

/// A SPIFFE bundle document with the one root of `pem`.
fn spiffe_bundle(pem: &str) -> String {
    use base64::Engine as _;
    let der = sds_backends::pem::decode_certificates(pem.as_bytes()).unwrap();
    serde_json::json!({ "keys": [ {
        "use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "-", "y": "-",
        "x5c": [ base64::engine::general_purpose::STANDARD.encode(&der[0]) ],
    } ] })
    .to_string()
}

/// An agent of `example.org` federated through a `--federation-dir` polled every 100 ms that
/// holds `partner.example.pem` and `other.example.json`; `args` may set more.
struct Federated {
    a: Agent,
    dir: tempfile::TempDir,
    partner: String,
    other: String,
}

impl Federated {
    async fn start(args: RunArgs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (partner, other) = (root_pem(), root_pem());
        std::fs::write(dir.path().join("partner.example.pem"), &partner).unwrap();
        std::fs::write(dir.path().join("other.example.json"), spiffe_bundle(&other)).unwrap();
        let a = Agent::ready_with(RunArgs {
            federation_dir: Some(dir.path().to_owned()),
            federation_poll_interval: Some("100ms".into()),
            ..args
        })
        .await;
        Self {
            a,
            dir,
            partner,
            other,
        }
    }

    /// The agent's own roots, PEM.
    fn own(&self) -> String {
        self.a
            .agent()
            .manager()
            .subscribe_bundle()
            .borrow()
            .clone()
            .unwrap()
            .pem
            .clone()
    }
}

/// A request whose node metadata says `disable_spiffe_cert_validation: <value>`.
fn with_metadata(
    mut req: DiscoveryRequest,
    value: envoy_types::pb::google::protobuf::value::Kind,
) -> DiscoveryRequest {
    use envoy_types::pb::google::protobuf::{Struct, Value};
    let node = req.node.get_or_insert_with(Default::default);
    node.metadata = Some(Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_string(),
            Value { kind: Some(value) },
        )]
        .into(),
    });
    req
}

#[tokio::test]
async fn rootca_all_and_trust_domain_names_are_spiffe_validators_of_their_domains() {
    let f = Federated::start(RunArgs::default()).await;
    let own = f.own();
    let names = [
        "ROOTCA",
        "ALL",
        "spiffe://partner.example",
        "spiffe://other.example",
        "spiffe://example.org",
    ];
    let mut client = f.a.client().await;
    let mut s = Sotw::open(&mut client, &names).await;
    let streamed = s.recv().await.unwrap();
    let fetched = client
        .fetch_secrets(request(&names, "", "", None))
        .await
        .unwrap()
        .into_inner();
    for resp in [streamed, fetched] {
        let got = secrets(&resp);
        assert_eq!(got.len(), 5, "{:?}", got.keys());
        let d = |name: &str| spiffe_domains(&got[name]);
        let ours = vec![("example.org".to_string(), own.clone())];
        assert_eq!(d("ROOTCA"), ours);
        assert_eq!(d("spiffe://example.org"), ours);
        assert_eq!(
            d("spiffe://partner.example"),
            [("partner.example".to_string(), f.partner.clone())]
        );
        assert_eq!(
            d("spiffe://other.example"),
            [("other.example".to_string(), f.other.clone())]
        );
        assert_eq!(
            d("ALL"),
            [
                ("example.org".to_string(), own.clone()),
                ("other.example".to_string(), f.other.clone()),
                ("partner.example".to_string(), f.partner.clone()),
            ]
        );
    }
}

#[tokio::test]
async fn plain_roots_by_flag_or_by_node_metadata_are_trusted_ca() {
    use envoy_types::pb::google::protobuf::value::Kind;
    let names = ["ROOTCA", "ALL", "spiffe://partner.example"];
    let check = |got: &BTreeMap<String, Secret>, f: &Federated| {
        let own = f.own();
        assert_eq!(plain_roots(&got["ROOTCA"]), own);
        assert_eq!(plain_roots(&got["spiffe://partner.example"]), f.partner);
        assert_eq!(
            plain_roots(&got["ALL"]),
            format!("{own}{}{}", f.other, f.partner),
            "ALL: every domain's roots, the agent's first"
        );
    };

    // --sds-plain-roots: every stream and fetch.
    let f = Federated::start(RunArgs {
        sds_plain_roots: Some("true".into()),
        ..Default::default()
    })
    .await;
    let mut client = f.a.client().await;
    check(
        &secrets(&Sotw::open(&mut client, &names).await.recv().await.unwrap()),
        &f,
    );
    let fetched = client
        .fetch_secrets(request(&names, "", "", None))
        .await
        .unwrap();
    check(&secrets(&fetched.into_inner()), &f);

    // Node metadata, per stream: true (or "true") is plain; the stream next to it, and one
    // saying false, get the validator.
    let f = Federated::start(RunArgs::default()).await;
    let mut client = f.a.client().await;
    for value in [Kind::BoolValue(true), Kind::StringValue("true".into())] {
        let (tx, rx) = mpsc::channel(1);
        tx.send(with_metadata(request(&names, "", "", None), value))
            .await
            .unwrap();
        let mut stream = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let resp = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        check(&secrets(&resp), &f);
    }
    let fetched = client
        .fetch_secrets(with_metadata(
            request(&names, "", "", None),
            Kind::BoolValue(true),
        ))
        .await
        .unwrap();
    check(&secrets(&fetched.into_inner()), &f);
    let (tx, rx) = mpsc::channel(1);
    tx.send(with_metadata(
        request(&names, "", "", None),
        Kind::BoolValue(false),
    ))
    .await
    .unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(spiffe_domains(&secrets(&resp)["ALL"]).len(), 3);
    let plain = Sotw::open(&mut client, &names).await.recv().await.unwrap();
    assert_eq!(spiffe_domains(&secrets(&plain)["ROOTCA"]).len(), 1);
}

#[tokio::test]
async fn an_untrusted_trust_domain_is_unknown_and_another_workloads_id_refused() {
    let f = Federated::start(RunArgs::default()).await;
    let mut client = f.a.client().await;
    let err = first_error(
        &mut client,
        request(&["ROOTCA", "spiffe://nobody.example"], "", "", None),
    )
    .await;
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("spiffe://nobody.example"), "{err:?}");
    let err = client
        .fetch_secrets(request(&["spiffe://nobody.example"], "", "", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = first_error(
        &mut client,
        request(&["spiffe://partner.example/ns/web/sa/api"], "", "", None),
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Delta: "does not exist", and sent once the domain is federated.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: vec!["spiffe://nobody.example".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.removed_resources, ["spiffe://nobody.example"]);
    assert_eq!(first.resources.len(), 1);
    let nobody = root_pem();
    std::fs::write(f.dir.path().join("nobody.example.pem"), &nobody).unwrap();
    let next = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.resources.len(), 1);
    assert_eq!(next.resources[0].name, "spiffe://nobody.example");
    let s = Secret::decode(
        next.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(spiffe_domains(&s), [("nobody.example".to_string(), nobody)]);
}

/// The next message on `s`, or `None` if nothing comes in `quiet`.
async fn next_within(s: &mut Sotw, quiet: Duration) -> Option<DiscoveryResponse> {
    match tokio::time::timeout(quiet, s.rx.message()).await {
        Ok(r) => Some(r.unwrap().unwrap()),
        Err(_) => None,
    }
}

/// Opens a stream of `names`, takes its first response and ACKs it.
async fn acked(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    names: &[&str],
) -> (Sotw, DiscoveryResponse) {
    let mut s = Sotw::open(client, names).await;
    let first = s.recv().await.unwrap();
    s.ack(&first, names).await;
    (s, first)
}

#[tokio::test]
async fn a_changed_federated_bundle_is_pushed_only_to_the_streams_that_list_it() {
    let f = Federated::start(RunArgs::default()).await;
    let mut client = f.a.client().await;
    let (mut root, _) = acked(&mut client, &["ROOTCA"]).await;
    let (mut all, all1) = acked(&mut client, &["ALL"]).await;
    let (mut partner, partner1) = acked(&mut client, &["spiffe://partner.example"]).await;
    let (mut other, _) = acked(&mut client, &["spiffe://other.example"]).await;

    let partner2 = root_pem();
    std::fs::write(
        f.dir.path().join("partner.example.pem"),
        format!("{}{partner2}", f.partner),
    )
    .unwrap();
    let all2 = all.recv().await.unwrap();
    let p2 = partner.recv().await.unwrap();
    assert_ne!(all2.version_info, all1.version_info);
    assert_ne!(p2.version_info, partner1.version_info);
    assert_eq!(
        spiffe_domains(&secrets(&p2)["spiffe://partner.example"])[0].1,
        format!("{}{partner2}", f.partner)
    );
    assert_eq!(
        spiffe_domains(&secrets(&all2)["ALL"])[2].1,
        format!("{}{partner2}", f.partner)
    );
    // Neither ROOTCA nor another domain changed: those streams get nothing.
    let quiet = Duration::from_millis(300);
    assert!(
        next_within(&mut root, quiet).await.is_none(),
        "ROOTCA pushed"
    );
    assert!(
        next_within(&mut other, quiet).await.is_none(),
        "another domain pushed"
    );
    assert_eq!(
        f.a.metric("sds_agent_federated_domains "),
        2,
        "the gauge counts the federated domains"
    );
}

#[tokio::test]
async fn a_removed_domain_is_a_removed_resource_on_delta_and_left_out_on_sotw() {
    let f = Federated::start(RunArgs::default()).await;
    let mut client = f.a.client().await;
    let names = ["ALL", "spiffe://partner.example"];
    let (mut sotw, first) = acked(&mut client, &names).await;
    assert_eq!(secrets(&first).len(), 2);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut delta = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut recv = async || {
        tokio::time::timeout(WAIT, delta.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let d1 = recv().await;
    assert_eq!(d1.resources.len(), 2);

    std::fs::remove_file(f.dir.path().join("partner.example.pem")).unwrap();
    let d2 = recv().await;
    assert_eq!(d2.removed_resources, ["spiffe://partner.example"]);
    assert_eq!(d2.resources.len(), 1);
    assert_eq!(d2.resources[0].name, "ALL");
    let s = Secret::decode(d2.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(
        spiffe_domains(&s)
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["example.org", "other.example"]
    );
    let s2 = sotw.recv().await.unwrap();
    let got = secrets(&s2);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["ALL"],
        "the removed domain is left out"
    );
    assert_eq!(spiffe_domains(&got["ALL"]).len(), 2);
    // The ACK that names the removed domain again does not end the stream.
    sotw.ack(&s2, &names).await;
    assert_eq!(f.a.metric("sds_agent_federated_domains "), 1);

    // Back again: both streams get it.
    std::fs::write(f.dir.path().join("partner.example.pem"), &f.partner).unwrap();
    let d3 = recv().await;
    let mut sent: Vec<_> = d3.resources.iter().map(|r| r.name.as_str()).collect();
    sent.sort_unstable();
    assert_eq!(sent, ["ALL", "spiffe://partner.example"]);
    assert_eq!(secrets(&sotw.recv().await.unwrap()).len(), 2);
}

// ---- Staged root rotation: the ACKs it waits for ----

/// Phase 1 of a root rotation ends when every stream subscribed to a bundle of the agent's
/// roots has ACKed one holding the new root: here a stream that asks for `ALL` only.
#[tokio::test]
async fn a_root_rotation_waits_for_the_ack_of_a_stream_subscribed_to_all() {
    use sds_agent::secrets::roots::Phase;
    use sds_backends::embedded::EmbeddedCa;
    use sds_backends::embedded::rotating::{NextSource, RotatingCa};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let config = RunArgs {
        socket: Some(socket.to_string_lossy().into_owned()),
        admin_addr: Some("127.0.0.1:0".into()),
        trust_domain: Some("example.org".into()),
        root_overlap: Some("1h".into()),
        ..RunArgs::default()
    }
    .resolve()
    .unwrap();
    let td = config.spiffe_id.trust_domain().clone();
    let ca = Arc::new(RotatingCa::new(
        EmbeddedCa::generate(&td).unwrap().local_requests_only(),
        NextSource::Generate(td),
    ));
    let agent = RunningAgent::start(&config, Policy::from_config(&config), ca)
        .await
        .unwrap();
    let manager = agent.manager().clone();
    wait_for(|| manager.is_ready()).await;
    let mut client = connect(&socket).await;
    let mut all = Sotw::open(&mut client, &["ALL"]).await;
    let first = all.recv().await.unwrap();
    assert_eq!(spiffe_domains(&secrets(&first)["ALL"]).len(), 1);
    all.ack(&first, &["ALL"]).await;
    wait_for(|| manager.trust_status().proxies_subscribed == 1).await;

    manager.begin_root_rotation().unwrap();
    let second = all.recv().await.unwrap();
    let domains = spiffe_domains(&secrets(&second)["ALL"]);
    let roots = sds_backends::pem::decode_certificates(domains[0].1.as_bytes()).unwrap();
    assert_eq!(roots.len(), 2, "the old root and the new one");
    // Not ACKed yet: the rotation waits (the overlap is an hour).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(manager.trust_status().rotation.phase, Phase::Announced);
    all.ack(&second, &["ALL"]).await;
    wait_for(|| manager.trust_status().rotation.phase >= Phase::Issuing).await;
    // The stream going away stops counting.
    drop(all);
    wait_for(|| manager.trust_status().proxies_subscribed == 0).await;
}
