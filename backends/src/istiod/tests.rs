//! The istiod backend against a loopback Istio CA API server over real TLS: what is sent
//! (token, cluster ID, headers, TTL, CSR), how answers are sorted into chain and roots, how
//! every gRPC status is classified, and that a retryable failure rebuilds the channel. The
//! server here is scripted per call; the test CA that behaves like istiod (identity from
//! the token, root rotation) is in `integration/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType,
};
use sds_proto::pb::istio_v1_auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use sds_proto::pb::istio_v1_auth::{IstioCertificateRequest, IstioCertificateResponse};
use tokio::sync::oneshot;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use sds_proto::prost_types::value::Kind;

use super::*;
use crate::embedded::EmbeddedCa;
use crate::pem::encode_certificates;
use crate::{KeyType, SpiffeId, TrustDomain};

/// What the stub saw of one call.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    cluster_id: Option<String>,
    tenant: Option<String>,
    validity: i64,
    csr: String,
    /// The request's `metadata` struct, each field as its string value (`None` for a value
    /// of another kind); `None` when the request had no metadata at all.
    metadata: Option<Vec<(String, Option<String>)>>,
}

type Script = dyn Fn(usize, &IstioCertificateRequest) -> Result<IstioCertificateResponse, Status>
    + Send
    + Sync;

#[derive(Clone)]
struct StubService {
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
    delay: Duration,
}

#[tonic::async_trait]
impl IstioCertificateService for StubService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let seen = Seen {
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
            tenant: header("x-tenant"),
            validity: request.get_ref().validity_duration,
            csr: request.get_ref().csr.clone(),
            metadata: request.get_ref().metadata.as_ref().map(|m| {
                m.fields
                    .iter()
                    .map(|(k, v)| {
                        let s = match &v.kind {
                            Some(Kind::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        };
                        (k.clone(), s)
                    })
                    .collect()
            }),
        };
        let n = {
            let mut all = self.seen.lock();
            all.push(seen);
            all.len() - 1
        };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (self.script)(n, request.get_ref()).map(Response::new)
    }
}

/// The parameters of a CA certificate named `common_name`.
fn ca_params(common_name: &str, constraint: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraint);
    params
}

/// A TLS root and a server certificate it signed, for `ca.test` and 127.0.0.1.
struct TlsPki {
    root_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl TlsPki {
    fn new() -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("stub CA TLS root", BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["ca.test".to_owned()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = server.signed_by(&key, &issuer).unwrap();
        Self {
            root_pem: root_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A scripted Istio CA API server on a loopback port, stopped when dropped.
struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    async fn start(pki: &TlsPki, script: Arc<Script>) -> Self {
        Self::start_on(pki, script, "127.0.0.1:0".parse().unwrap(), Duration::ZERO).await
    }

    async fn start_on(
        pki: &TlsPki,
        script: Arc<Script>,
        addr: SocketAddr,
        delay: Duration,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = StubService {
            script,
            seen: seen.clone(),
            delay,
        };
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert_pem, &pki.key_pem));
        let (stop, stopped) = oneshot::channel::<()>();
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(IstioCertificateServiceServer::new(service));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            seen,
            stop: Some(stop),
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A signing CA with an intermediate, answering like istiod: `[leaf, intermediates, root]`.
struct Signer {
    ca: EmbeddedCa,
    intermediate_pem: String,
    root_pem: String,
}

impl Signer {
    fn new() -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("workload root", BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let root_issuer = rcgen::Issuer::new(root, root_key);
        let int_key = KeyPair::generate().unwrap();
        let int = ca_params("workload intermediate", BasicConstraints::Constrained(0));
        let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
        let chain = format!("{}{}", int_cert.pem(), root_cert.pem());
        let ca = EmbeddedCa::from_pem(chain.as_bytes(), &int_key.serialize_pem()).unwrap();
        Self {
            ca,
            intermediate_pem: int_cert.pem(),
            root_pem: root_cert.pem(),
        }
    }

    /// Signs the request's CSR for `id`, as istiod would for a caller with that identity.
    fn answer(&self, id: &SpiffeId, req: &IstioCertificateRequest) -> IstioCertificateResponse {
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(req.csr.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        let (csr, spec) = self
            .ca
            .check_request(&SignRequest {
                identity: id.clone(),
                csr_der: der,
                ttl: Duration::from_secs(u64::try_from(req.validity_duration).unwrap()),
                key_type: KeyType::EcdsaP256,
            })
            .unwrap();
        let issued = self.ca.issue(&csr, &spec).unwrap();
        IstioCertificateResponse {
            cert_chain: vec![
                encode_certificates([&issued.leaf]),
                self.intermediate_pem.clone(),
                self.root_pem.clone(),
            ],
        }
    }
}

fn identity() -> SpiffeId {
    SpiffeId::for_service_account(
        TrustDomain::from_str("cluster.local").unwrap(),
        "ns1",
        "web",
    )
    .unwrap()
}

/// A CSR of a fresh P-256 key for `id`, as the agent builds it (one URI SAN, empty subject).
fn csr_for(id: &SpiffeId) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn sign_request() -> SignRequest {
    sign_request_for(identity())
}

fn sign_request_for(id: SpiffeId) -> SignRequest {
    SignRequest {
        csr_der: csr_for(&id),
        identity: id,
        ttl: Duration::from_secs(3600),
        key_type: KeyType::EcdsaP256,
    }
}

/// Files a client needs: the TLS root and a token.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(pki: &TlsPki, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls-root.pem"), &pki.root_pem).unwrap();
        std::fs::write(dir.path().join("token"), token).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, addr: SocketAddr) -> IstiodConfig {
        let mut config = IstiodConfig::new(addr.to_string().parse().unwrap());
        config.root_cert = Some(self.path("tls-root.pem"));
        config.server_name = Some("ca.test".into());
        config.token_file = self.path("token");
        config.request_timeout = Duration::from_secs(5);
        config
    }
}

/// Signs for whatever identity the request impersonates, else for [`identity`]: a stub that
/// grants every impersonation (the refusals are the test CA's, in `integration/`).
fn impersonating_script(signer: Arc<Signer>) -> Arc<Script> {
    Arc::new(move |_, req| {
        let id = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.parse::<SpiffeId>().unwrap()),
                _ => None,
            })
            .unwrap_or_else(identity);
        Ok(signer.answer(&id, req))
    })
}

fn signing_script(signer: Arc<Signer>) -> Arc<Script> {
    Arc::new(move |_, req| Ok(signer.answer(&identity(), req)))
}

fn status_script(status: Status) -> Arc<Script> {
    Arc::new(move |_, _| Err(status.clone()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn ca_addresses_are_host_and_port_over_tls() {
    let a: CaAddr = "istiod.istio-system.svc:15012".parse().unwrap();
    assert_eq!((a.host(), a.port()), ("istiod.istio-system.svc", 15012));
    let a: CaAddr = "https://cert-manager-istio-csr.cert-manager.svc:443"
        .parse()
        .unwrap();
    assert_eq!(a.port(), 443);
    let a: CaAddr = "[::1]:15012".parse().unwrap();
    assert_eq!((a.host(), a.default_server_name()), ("[::1]", "::1"));
    assert_eq!(a.to_string(), "[::1]:15012");

    let err = |s: &str| s.parse::<CaAddr>().unwrap_err().to_string();
    assert!(err("http://istiod:15010").contains("TLS only"));
    assert!(err("istiod").contains("port is missing"));
    assert!(err("istiod:15012/v1").contains("without a path"));
    assert!(err("istiod:notaport").contains("expected host:port"));
    assert!(err("").contains("expected host:port"));
}

#[test]
fn extra_headers_are_checked_and_their_values_never_printed() {
    let h: ExtraHeader = "X-Tenant = blue team".parse().unwrap();
    assert_eq!(h.name(), "x-tenant");
    assert_eq!(format!("{h:?}"), "x-tenant=<redacted>");
    let err = |s: &str| s.parse::<ExtraHeader>().unwrap_err().to_string();
    assert!(err("Authorization=Bearer x").contains("--ca-token-file"));
    assert!(err("clusterid=c1").contains("--cluster-id"));
    assert!(err("grpc-timeout=1S").contains("set by sds-agent or gRPC"));
    assert!(err("x-key-bin=AAAA").contains("binary"));
    assert!(err("no-equals-sign").contains("KEY=VALUE"));
    assert!(err("=value").contains("empty"));
    assert!(err("bad header=x").contains("header name"));
    assert!(err("x-ok=caf\u{e9}").contains("header value"));
}

#[test]
fn a_chain_is_sorted_leaf_first_root_last() {
    let signer = Signer::new();
    let req = sign_request();
    let istio_req = IstioCertificateRequest {
        csr: ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone())),
        validity_duration: 3600,
        metadata: None,
    };
    let answer = signer.answer(&identity(), &istio_req);
    let root = decode_certificates(signer.root_pem.as_bytes()).unwrap();
    let int = decode_certificates(signer.intermediate_pem.as_bytes()).unwrap();

    // istiod's shape: leaf, intermediates, root.
    let chain = parse_cert_chain(&answer.cert_chain).unwrap();
    assert_eq!(chain.intermediates, int);
    assert_eq!(chain.roots_hint, root);

    // While a root rotates, the last element holds two roots: both are roots.
    let other_root = Signer::new().root_pem;
    let mut rotating = answer.cert_chain.clone();
    rotating[2] = format!("{}{}", signer.root_pem, other_root);
    let chain = parse_cert_chain(&rotating).unwrap();
    assert_eq!(chain.roots_hint.len(), 2);
    assert_eq!(chain.intermediates, int);

    // Everything in one element: the self-signed certificate is the root.
    let one = vec![answer.cert_chain.concat()];
    let chain = parse_cert_chain(&one).unwrap();
    assert_eq!((chain.intermediates, chain.roots_hint), (int, root));

    // Leaf only.
    let chain = parse_cert_chain(&answer.cert_chain[..1]).unwrap();
    assert!(chain.intermediates.is_empty() && chain.roots_hint.is_empty());

    let bad = |elements: Vec<String>| parse_cert_chain(&elements).unwrap_err();
    assert!(matches!(bad(vec![]), CaError::BadResponse(m) if m.contains("empty")));
    assert!(matches!(
        bad(vec![answer.cert_chain[0].clone(), "not PEM".into()]),
        CaError::BadResponse(m) if m.contains("element 1")
    ));
    assert!(matches!(
        bad(vec!["-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n".into()]),
        CaError::BadResponse(m) if m.contains("element 0")
    ));
}

#[tokio::test]
async fn a_call_carries_the_token_cluster_id_headers_ttl_and_csr() {
    let pki = TlsPki::new();
    let signer = Arc::new(Signer::new());
    let stub = Stub::start(&pki, signing_script(signer.clone())).await;
    let files = Files::new(&pki, "token-one\n");
    let mut config = files.config(stub.addr);
    config.cluster_id = Some("Kubernetes".into());
    config.headers = vec!["x-tenant=blue".parse().unwrap()];
    let ca = IstiodCa::new(config).unwrap();

    // No root is known before the first certificate, and the CA says so.
    assert!(ca.roots_come_with_certificates());
    assert!(matches!(
        ca.trust_bundle().await,
        Err(CaError::Unavailable(m)) if m.contains("first certificate")
    ));
    let req = sign_request();
    let chain = ca.sign(&req).await.unwrap();
    assert_eq!(chain.intermediates.len(), 1);
    let bundle = ca.trust_bundle().await.unwrap();
    assert_eq!(
        bundle.roots(),
        decode_certificates(signer.root_pem.as_bytes())
            .unwrap()
            .as_slice()
    );

    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer token-one"));
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(seen[0].tenant.as_deref(), Some("blue"));
    assert_eq!(seen[0].validity, 3600);
    let csr = rustls_pki_types::pem::PemObject::from_pem_slice(seen[0].csr.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
        .unwrap();
    assert_eq!(csr, req.csr_der);
}

#[tokio::test]
async fn the_token_file_is_read_at_every_call() {
    let pki = TlsPki::new();
    let stub = Stub::start(&pki, signing_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "first");
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    ca.sign(&sign_request()).await.unwrap();
    write(&files.path("token"), "second\n");
    ca.sign(&sign_request()).await.unwrap();
    let tokens: Vec<Option<String>> = stub.seen().into_iter().map(|s| s.authorization).collect();
    assert_eq!(
        tokens,
        [Some("Bearer first".into()), Some("Bearer second".into())]
    );
}

#[tokio::test]
async fn a_missing_or_unusable_token_is_a_clear_error_and_nothing_is_sent() {
    let pki = TlsPki::new();
    let stub = Stub::start(&pki, signing_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "");
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(
        matches!(&err, CaError::Misconfigured(m) if m.contains("is empty")),
        "{err}"
    );
    write(&files.path("token"), "two\nlines");
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(
        matches!(&err, CaError::Misconfigured(m) if m.contains("characters a header cannot carry")),
        "{err}"
    );
    assert!(!err.to_string().contains("two"), "the token leaked: {err}");
    std::fs::remove_file(files.path("token")).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(
        matches!(&err, CaError::Misconfigured(m) if m.contains("istio-ca") && m.contains("token")),
        "{err}"
    );
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn every_status_is_sorted_with_what_to_check() {
    let pki = TlsPki::new();
    let cases: &[(Code, &str, bool, &str)] = &[
        (Code::Unavailable, "unavailable", true, "Unavailable"),
        (Code::Aborted, "unavailable", true, "Aborted"),
        (Code::Internal, "unavailable", true, "Internal"),
        (Code::Unknown, "unavailable", true, "Unknown"),
        (
            Code::ResourceExhausted,
            "throttled",
            true,
            "ResourceExhausted",
        ),
        (Code::DeadlineExceeded, "timeout", true, ""),
        (Code::Unauthenticated, "denied", false, "audience"),
        (Code::PermissionDenied, "denied", false, "--service-account"),
        (Code::InvalidArgument, "misconfigured", false, "--cert-ttl"),
        (Code::Unimplemented, "misconfigured", false, "--ca-addr"),
    ];
    for &(code, kind, retryable, hint) in cases {
        let stub = Stub::start(&pki, status_script(Status::new(code, "the CA says\nno"))).await;
        let files = Files::new(&pki, "t");
        let mut config = files.config(stub.addr);
        config.cluster_id = Some("c1".into());
        let ca = IstiodCa::new(config).unwrap();
        let err = ca.sign(&sign_request()).await.unwrap_err();
        let text = err.to_string();
        assert_eq!(
            (err.kind(), err.is_retryable()),
            (kind, retryable),
            "{code:?}: {text}"
        );
        assert!(text.contains(hint), "{code:?}: {text}");
        if code != Code::DeadlineExceeded {
            assert!(text.contains("\"the CA says no\""), "{code:?}: {text}");
        }
        if code == Code::Unauthenticated {
            assert!(text.contains("--cluster-id (c1)"), "{text}");
        }
        assert!(!text.contains('\n'), "{text}");
    }
}

#[tokio::test]
async fn a_server_without_the_service_is_named_as_such() {
    let pki = TlsPki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert_pem, &pki.key_pem));
    // A gRPC server with some other service only.
    let other = tonic::service::Routes::default();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_routes(other)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let files = Files::new(&pki, "t");
    let ca = IstiodCa::new(files.config(addr)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    server.abort();
    assert!(
        matches!(&err, CaError::Misconfigured(m) if m.contains("does not serve istio.v1.auth.IstioCertificateService")),
        "{err}"
    );
}

#[tokio::test]
async fn a_ca_that_is_down_is_retryable() {
    let pki = TlsPki::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let files = Files::new(&pki, "t");
    let ca = IstiodCa::new(files.config(port)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.kind(), "unavailable", "{err}");
}

#[tokio::test]
async fn a_hung_ca_times_out() {
    let pki = TlsPki::new();
    let stub = Stub::start_on(
        &pki,
        signing_script(Arc::new(Signer::new())),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let files = Files::new(&pki, "t");
    let mut config = files.config(stub.addr);
    config.request_timeout = Duration::from_millis(300);
    let ca = IstiodCa::new(config).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), ca.sign(&sign_request()))
        .await
        .expect("the backend's own timeout applies")
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.kind(), "timeout", "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_tls_and_names_the_cause() {
    let pki = TlsPki::new();
    let stub = Stub::start(&pki, signing_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "t");
    let mut config = files.config(stub.addr);
    config.server_name = Some("istiod.other.svc".into());
    let ca = IstiodCa::new(config).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(stub.seen().is_empty());

    // A TLS root file that holds no certificate is named.
    write(&files.path("tls-root.pem"), "garbage");
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(
        matches!(&err, CaError::Misconfigured(m) if m.contains("--ca-root-cert")),
        "{err}"
    );
}

#[tokio::test]
async fn a_retryable_failure_rebuilds_the_channel_with_the_new_tls_root() {
    // The CA fails, then comes back on the same address with a new TLS certificate from a
    // new root, which the operator put in the --ca-root-cert file: the next call must
    // connect anew and read that file again.
    let first = TlsPki::new();
    let stub = Stub::start(&first, status_script(Status::unavailable("restarting"))).await;
    let addr = stub.addr;
    let files = Files::new(&first, "t");
    let ca = IstiodCa::new(files.config(addr)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    stub.stop().await;

    let second = TlsPki::new();
    write(&files.path("tls-root.pem"), &second.root_pem);
    let stub = Stub::start_on(
        &second,
        signing_script(Arc::new(Signer::new())),
        addr,
        Duration::ZERO,
    )
    .await;
    ca.sign(&sign_request()).await.unwrap();
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn roots_come_from_each_answer_or_from_the_pinned_bundle() {
    let pki = TlsPki::new();
    let signer = Arc::new(Signer::new());
    let script_signer = signer.clone();
    // Answers of one element: the leaf alone, no root.
    let leaf_only: Arc<Script> = Arc::new(move |_, req| {
        let mut answer = script_signer.answer(&identity(), req);
        answer.cert_chain.truncate(1);
        Ok(answer)
    });
    let stub = Stub::start(&pki, leaf_only).await;
    let files = Files::new(&pki, "t");
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    assert!(
        matches!(&err, CaError::BadResponse(m) if m.contains("--ca-trust-bundle")),
        "{err}"
    );

    let pinned =
        TrustBundle::new(decode_certificates(signer.root_pem.as_bytes()).unwrap()).unwrap();
    let mut config = files.config(stub.addr);
    config.trust_bundle = Some(pinned.clone());
    let ca = IstiodCa::new(config).unwrap();
    assert!(!ca.roots_come_with_certificates());
    assert_eq!(ca.trust_bundle().await.unwrap(), pinned);
    ca.sign(&sign_request()).await.unwrap();
    assert_eq!(ca.trust_bundle().await.unwrap(), pinned);

    // A CA that moves to a new root: the next answer's root is the bundle.
    let rotating = Arc::new(Signer::new());
    let (a, b) = (signer.clone(), rotating.clone());
    let script: Arc<Script> =
        Arc::new(move |n, req| Ok(if n == 0 { &a } else { &b }.answer(&identity(), req)));
    let stub = Stub::start(&pki, script).await;
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    ca.sign(&sign_request()).await.unwrap();
    let first = ca.trust_bundle().await.unwrap();
    ca.sign(&sign_request()).await.unwrap();
    let second = ca.trust_bundle().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(
        second.roots(),
        decode_certificates(rotating.root_pem.as_bytes())
            .unwrap()
            .as_slice()
    );
}

#[test]
fn config_errors_are_caught_before_any_call() {
    let mut config = IstiodConfig::new(DEFAULT_ADDR.parse().unwrap());
    config.cluster_id = Some("caf\u{e9}".into());
    assert!(
        matches!(IstiodCa::new(config), Err(CaError::Misconfigured(m)) if m.contains("cluster ID"))
    );
    let mut config = IstiodConfig::new(DEFAULT_ADDR.parse().unwrap());
    config.request_timeout = Duration::ZERO;
    assert!(IstiodCa::new(config).is_err());
}

fn other_identity() -> SpiffeId {
    SpiffeId::for_service_account(TrustDomain::from_str("cluster.local").unwrap(), "ns2", "db")
        .unwrap()
}

#[tokio::test]
async fn node_mode_names_each_identity_in_impersonated_identity_with_the_nodes_token() {
    let pki = TlsPki::new();
    let stub = Stub::start(&pki, impersonating_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "node-agent-token");
    let mut config = files.config(stub.addr);
    config.impersonate = true;
    let ca = IstiodCa::new(config).unwrap();
    assert!(format!("{ca:?}").contains("impersonate: true"));

    for id in [identity(), other_identity()] {
        let chain = ca.sign(&sign_request_for(id.clone())).await.unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(chain.leaf.as_ref()).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            sans.value.general_names,
            [x509_parser::extensions::GeneralName::URI(&id.to_string())]
        );
    }
    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    for (s, id) in seen.iter().zip([identity(), other_identity()]) {
        // The one token of the node agent, whoever the certificate is for.
        assert_eq!(s.authorization.as_deref(), Some("Bearer node-agent-token"));
        // Exactly one field, a string, spelled as istiod reads it.
        assert_eq!(
            s.metadata.as_deref(),
            Some(&[("ImpersonatedIdentity".to_owned(), Some(id.to_string()))][..])
        );
    }
}

#[tokio::test]
async fn pod_mode_never_sends_metadata() {
    let pki = TlsPki::new();
    let stub = Stub::start(&pki, impersonating_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "pod-token");
    let ca = IstiodCa::new(files.config(stub.addr)).unwrap();
    ca.sign(&sign_request()).await.unwrap();
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].metadata, None,
        "pod mode sent {:?}",
        seen[0].metadata
    );
}

/// The agent's mode reaches the backend through `BuildContext`: impersonation in node mode,
/// never in pod mode.
#[tokio::test]
async fn the_build_context_decides_impersonation() {
    use crate::settings::{Backend, BuildContext, ResolveContext};
    use settings::IstiodArgs;

    let pki = TlsPki::new();
    let stub = Stub::start(&pki, impersonating_script(Arc::new(Signer::new()))).await;
    let files = Files::new(&pki, "token");
    let args = IstiodArgs {
        ca_addr: Some(stub.addr.to_string()),
        ca_root_cert: Some(files.path("tls-root.pem")),
        ca_server_name: Some("ca.test".into()),
        ca_token_file: Some(files.path("token")),
        ..Default::default()
    };
    let resolve_ctx = ResolveContext {
        namespace: "ns1",
        node_mode: false,
        std_env: &|_| None,
    };
    let settings = args.resolve(&IstiodArgs::default(), &resolve_ctx).unwrap();
    let td = TrustDomain::from_str("cluster.local").unwrap();
    for node_mode in [false, true] {
        let ctx = BuildContext {
            trust_domain: &td,
            node_mode,
        };
        let ca = settings.build(&ctx).unwrap();
        ca.sign(&sign_request()).await.unwrap();
    }
    let metadata: Vec<_> = stub.seen().into_iter().map(|s| s.metadata).collect();
    assert_eq!(
        metadata,
        [
            None,
            Some(vec![(
                "ImpersonatedIdentity".to_owned(),
                Some(identity().to_string())
            )])
        ]
    );
}

/// istiod answers a refused impersonation with an opaque `Unauthenticated`; in node mode the
/// error says what istiod checks.
#[tokio::test]
async fn a_refused_impersonation_says_what_istiod_requires() {
    let pki = TlsPki::new();
    let stub = Stub::start(
        &pki,
        status_script(Status::unauthenticated(
            "request impersonation authentication failure",
        )),
    )
    .await;
    let files = Files::new(&pki, "t");
    let mut config = files.config(stub.addr);
    config.impersonate = true;
    let ca = IstiodCa::new(config).unwrap();
    let err = ca.sign(&sign_request()).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(
        (err.kind(), err.is_retryable()),
        ("denied", false),
        "{text}"
    );
    for needle in [
        "request impersonation authentication failure",
        "CA_TRUSTED_NODE_ACCOUNTS",
        "on the caller's node",
        "--ca-token-file",
    ] {
        assert!(text.contains(needle), "{text} lacks {needle:?}");
    }
}
