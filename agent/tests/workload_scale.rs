//! Both APIs at scale in one agent: 1,000 Workload API `FetchX509SVID` streams and 1,000 SDS
//! `StreamSecrets` streams, over a few HTTP/2 connections each, all fed by one secret
//! manager. Every rotation must cost one CSR and reach every stream of both APIs with the
//! same certificate and key. How fast is the streams bench's business; this checks only
//! that it happens, with every wait bounded.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::uds_channel as channel;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use futures::future::join_all;
use prost::Message;
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::{Policy, ServedBundle, ServedCert};
use sds_backends::testing::ScriptedCa;
use sds_proto::pb::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sds_proto::pb::spiffe_workload::{X509svidRequest, X509svidResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// Streams per API.
const STREAMS: usize = 1_000;
/// HTTP/2 connections per API; the streams are spread over them evenly.
const CONNECTIONS: usize = 10;
const ROTATIONS: usize = 3;
/// Bound on every wait: generous, since a debug build fans out to 2,000 streams on 2 cores.
const WAIT: Duration = Duration::from_secs(30);
const SPIFFE_ID: &str = "spiffe://example.org/ns/default/sa/web";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const NAMES: [&str; 2] = ["default", "ROOTCA"];

/// One SotW stream: the sender that keeps it open and carries ACKs, and its responses.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

/// What every stream must have been sent after a rotation: the manager's certificate and
/// bundle of the moment.
struct Expected {
    cert: Arc<ServedCert>,
    bundle: Arc<ServedBundle>,
    /// The key, PKCS#8 DER, as the first Workload API message carried it.
    key_der: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_on_each_api_get_every_rotation_for_one_csr_each() {
    let dir = tempfile::tempdir().unwrap();
    let sds_socket = dir.path().join("sds.sock");
    let api_socket = dir.path().join("api.sock");
    let config = RunArgs {
        socket: Some(sds_socket.to_string_lossy().into_owned()),
        workload_api_socket: Some(api_socket.to_string_lossy().into_owned()),
        admin_addr: Some("127.0.0.1:0".into()),
        trust_domain: Some("example.org".into()),
        service_account: Some("web".into()),
        // Room for both APIs' streams (each API counts its own).
        max_streams: Some((2 * STREAMS).to_string()),
        // On the Workload API this limits new calls per second from one process, and all
        // 1,000 streams come from this one.
        max_requests_per_second: Some("100000".into()),
        ..RunArgs::default()
    }
    .resolve()
    .unwrap();
    let ca = ScriptedCa::new();
    let agent = RunningAgent::start(&config, Policy::from_config(&config), ca.clone())
        .await
        .unwrap();
    let manager = agent.manager().clone();
    let mut cert_rx = manager.subscribe_cert(&config.spiffe_id);
    let mut bundle_rx = manager.subscribe_bundle();
    tokio::time::timeout(WAIT, async {
        cert_rx.wait_for(Option::is_some).await.unwrap();
        bundle_rx.wait_for(Option::is_some).await.unwrap();
    })
    .await
    .expect("no certificate and bundle in time");

    // Open every stream of both APIs at once, spread round-robin over the connections.
    let mut api_clients = Vec::new();
    let mut sds_clients = Vec::new();
    for _ in 0..CONNECTIONS {
        api_clients.push(SpiffeWorkloadApiClient::new(channel(&api_socket).await));
        sds_clients.push(SecretDiscoveryServiceClient::new(
            channel(&sds_socket).await,
        ));
    }
    let opening = futures::future::join(
        join_all((0..STREAMS).map(|i| open_svid(api_clients[i % CONNECTIONS].clone()))),
        join_all((0..STREAMS).map(|i| open_sotw(sds_clients[i % CONNECTIONS].clone()))),
    );
    let (mut svids, mut sotws) = tokio::time::timeout(WAIT, opening)
        .await
        .expect("streams not opened in time");

    // Every stream gets its first message, all of them the same certificate.
    let (first_svids, first_sotws) = tokio::time::timeout(WAIT, next_all(&mut svids, &mut sotws))
        .await
        .expect("not every stream got its first message");
    let first = &first_svids[0].svids[0];
    let mut expected = Expected {
        cert: current(&cert_rx),
        bundle: bundle_rx.borrow().clone().unwrap(),
        key_der: first.x509_svid_key.clone(),
    };
    assert!(!expected.key_der.is_empty());
    check_all(&expected, &first_svids, &first_sotws);
    ack_all(&sotws, &first_sotws).await;
    assert_eq!(ca.sign_calls(), 1, "2,000 streams, one CSR");
    assert_eq!(
        metric(&agent, "sds_streams_open{api=\"workload\"}"),
        STREAMS
    );
    assert_eq!(metric(&agent, "sds_streams_open{api=\"sotw\"}"), STREAMS);

    for rotation in 1..=ROTATIONS {
        let calls = ca.sign_calls();
        let old = expected.cert.clone();
        cert_rx.borrow_and_update();
        manager.rotate_now();
        tokio::time::timeout(
            WAIT,
            cert_rx.wait_for(|c| c.as_ref().is_some_and(|c| c.version != old.version)),
        )
        .await
        .expect("the rotation issued nothing in time")
        .unwrap();
        let cert = current(&cert_rx);
        assert_ne!(cert.leaf.serial, old.leaf.serial);
        let (got_svids, got_sotws) = tokio::time::timeout(WAIT, next_all(&mut svids, &mut sotws))
            .await
            .unwrap_or_else(|_| panic!("rotation {rotation} did not reach every stream"));
        let key_der = got_svids[0].svids[0].x509_svid_key.clone();
        assert_ne!(key_der, expected.key_der, "one new key per issuance");
        // The bundle does not change: the CA's roots stay.
        expected = Expected {
            cert,
            bundle: expected.bundle,
            key_der,
        };
        check_all(&expected, &got_svids, &got_sotws);
        ack_all(&sotws, &got_sotws).await;
        assert_eq!(ca.sign_calls(), calls + 1, "rotation {rotation}: one CSR");
        // The certificate the streams got is still the one served: nothing issued twice.
        assert_eq!(current(&cert_rx).version, expected.cert.version);
    }

    // One message per stream at the start and per rotation, and not one more.
    let messages = STREAMS * (ROTATIONS + 1);
    assert_eq!(
        metric(&agent, "sds_pushes_total{api=\"workload\"}"),
        messages
    );
    assert_eq!(metric(&agent, "sds_pushes_total{api=\"sotw\"}"), messages);
    assert_eq!(ca.sign_calls(), 1 + ROTATIONS);
    let proxies = agent.sds().proxies();
    let sent = format!(
        "default:{},ROOTCA:{}",
        expected.cert.version, expected.bundle.version
    );
    for api in ["workload", "sotw"] {
        let of_api: Vec<_> = proxies.iter().filter(|p| p.api == api).collect();
        assert_eq!(of_api.len(), STREAMS, "{api} streams in /proxies");
        assert!(
            of_api
                .iter()
                .all(|p| p.sent_version.as_deref() == Some(sent.as_str())),
            "every {api} stream was last sent {sent}"
        );
    }
    agent.shutdown().await;
}

async fn open_svid(mut client: SpiffeWorkloadApiClient<Channel>) -> Streaming<X509svidResponse> {
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    client.fetch_x509svid(request).await.unwrap().into_inner()
}

async fn open_sotw(mut client: SecretDiscoveryServiceClient<Channel>) -> Sotw {
    let (tx, requests) = mpsc::channel(4);
    tx.send(request("", "")).await.unwrap();
    let rx = client
        .stream_secrets(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    Sotw { tx, rx }
}

fn request(version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: NAMES.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// The next message of every stream of both APIs, waited for concurrently.
async fn next_all(
    svids: &mut [Streaming<X509svidResponse>],
    sotws: &mut [Sotw],
) -> (Vec<X509svidResponse>, Vec<DiscoveryResponse>) {
    futures::future::join(
        join_all(svids.iter_mut().map(|s| async move {
            s.message()
                .await
                .expect("Workload API stream failed")
                .expect("Workload API stream ended")
        })),
        join_all(sotws.iter_mut().map(|s| async move {
            s.rx.message()
                .await
                .expect("SDS stream failed")
                .expect("SDS stream ended")
        })),
    )
    .await
}

async fn ack_all(sotws: &[Sotw], responses: &[DiscoveryResponse]) {
    for (s, r) in sotws.iter().zip(responses) {
        s.tx.send(request(&r.version_info, &r.nonce)).await.unwrap();
    }
}

/// Every Workload API message and every SDS response carries `expected`'s certificate chain,
/// key and bundle, and nothing else.
fn check_all(expected: &Expected, svids: &[X509svidResponse], sotws: &[DiscoveryResponse]) {
    let cert = &expected.cert;
    for (i, m) in svids.iter().enumerate() {
        assert_eq!(m.svids.len(), 1, "Workload API stream {i}: one SVID");
        let svid = &m.svids[0];
        assert_eq!(svid.spiffe_id, SPIFFE_ID);
        assert!(
            svid.x509_svid == cert.chain_der,
            "Workload API stream {i}: not the chain of serial {}",
            cert.leaf.serial
        );
        assert!(
            svid.x509_svid_key == expected.key_der,
            "Workload API stream {i}: another key"
        );
        assert!(
            svid.bundle == expected.bundle.der,
            "Workload API stream {i}: another bundle"
        );
    }
    let version = format!(
        "default:{},ROOTCA:{}",
        cert.version, expected.bundle.version
    );
    for (i, r) in sotws.iter().enumerate() {
        assert_eq!(r.version_info, version, "SDS stream {i}");
        let mut secrets: Vec<Secret> = r
            .resources
            .iter()
            .map(|any| Secret::decode(any.value.as_slice()).unwrap())
            .collect();
        secrets.sort_by(|a, b| a.name.cmp(&b.name));
        let [rootca, default] = secrets.as_slice() else {
            panic!("SDS stream {i}: {} secrets, not 2", secrets.len());
        };
        assert_eq!(
            (rootca.name.as_str(), default.name.as_str()),
            ("ROOTCA", "default")
        );
        let Some(secret::Type::TlsCertificate(tls)) = &default.r#type else {
            panic!("SDS stream {i}: default is not a tls_certificate");
        };
        let chain = inline(&tls.certificate_chain);
        assert!(
            chain == cert.chain_pem.as_bytes(),
            "SDS stream {i}: not the chain of serial {}",
            cert.leaf.serial
        );
        // The same chain and key as the Workload API streams got, in PEM.
        let der: Vec<u8> = sds_backends::pem::decode_certificates(chain)
            .unwrap()
            .iter()
            .flat_map(|c| c.as_ref().to_vec())
            .collect();
        assert!(
            der == cert.chain_der,
            "SDS stream {i}: PEM and DER chains differ"
        );
        let key = pem::parse(inline(&tls.private_key)).unwrap();
        assert_eq!(key.tag(), "PRIVATE KEY");
        assert!(
            key.contents() == expected.key_der,
            "SDS stream {i}: not the Workload API streams' key"
        );
        let Some(secret::Type::ValidationContext(vc)) = &rootca.r#type else {
            panic!("SDS stream {i}: ROOTCA is not a validation_context");
        };
        // The SPIFFE validator, with the agent's trust domain and the same roots.
        let custom = vc
            .custom_validator_config
            .as_ref()
            .expect("the SPIFFE validator");
        let config = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig::decode(
            custom.typed_config.as_ref().expect("its config").value.as_slice(),
        )
        .unwrap();
        assert_eq!(config.trust_domains.len(), 1);
        assert!(inline(&config.trust_domains[0].trust_bundle) == expected.bundle.pem.as_bytes());
    }
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> &[u8] {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b,
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The certificate served now.
fn current(cert_rx: &tokio::sync::watch::Receiver<Option<Arc<ServedCert>>>) -> Arc<ServedCert> {
    cert_rx.borrow().clone().expect("a certificate is served")
}

/// The value of the series `sds_agent_<series>`, 0 if absent.
fn metric(agent: &RunningAgent, series: &str) -> usize {
    let needle = format!("sds_agent_{series} ");
    agent
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as usize)
}
