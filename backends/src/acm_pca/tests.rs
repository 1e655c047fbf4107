//! Unit tests of the ACM PCA backend. The error, retry and polling paths run through the real
//! SDK against a loopback stub that answers with AWS's exact JSON 1.1 shapes
//! (`{"__type": "...", "message": "..."}` with HTTP 400, as PCA does), because moto never
//! throttles, never answers `RequestInProgressException` and answers bad input with an HTML
//! 500. The happy path against moto's real wire protocol is in `integration/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_acmpca::config::Credentials;
use base64::Engine as _;
use parking_lot::Mutex as SyncMutex;
use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::{KeyType, SpiffeId, TrustDomain};

const ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b2c3d-4e5f";

struct TestPki {
    root_pem: String,
    int_pem: String,
    leaf_pem: String,
}

fn pki() -> TestPki {
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca("root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, &root_key);
    let int_key = KeyPair::generate().unwrap();
    let int_params = ca("int");
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let int_issuer = rcgen::Issuer::new(int_params, &int_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    )];
    let leaf = p.signed_by(&leaf_key, &int_issuer).unwrap();
    TestPki {
        root_pem: root.pem(),
        int_pem: int.pem(),
        leaf_pem: leaf.pem(),
    }
}

fn request(ttl: Duration) -> SignRequest {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap();
    SignRequest {
        identity: SpiffeId::for_service_account(
            TrustDomain::from_str("cluster.local").unwrap(),
            "a",
            "b",
        )
        .unwrap(),
        csr_der: csr.der().to_vec(),
        ttl,
        key_type: KeyType::EcdsaP256,
    }
}

/// What the stub answers to one call.
enum Reply {
    /// HTTP 200 with this JSON.
    Ok(Value),
    /// An AWS JSON error: HTTP 400 (or the status given) with `__type` and `message`.
    Error(u16, &'static str, &'static str),
    /// A non-AWS answer, e.g. an HTML error page.
    Raw(u16, &'static str, &'static str),
    /// Never answer.
    Hold,
    /// Answer after a pause.
    Slow(Duration, Value),
}

/// One call the stub received: the operation (from `X-Amz-Target`) and the JSON body.
#[derive(Debug, Clone)]
struct Call {
    op: String,
    body: Value,
}

type Script = Box<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// A loopback ACM PCA. `script(op, n)` answers the `n`-th call (from 0) of operation `op`.
struct Stub {
    addr: SocketAddr,
    calls: Arc<SyncMutex<Vec<Call>>>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Stub {
    async fn start(script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(SyncMutex::new(Vec::<Call>::new()));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(Box::new(script));
        let (seen, max) = (calls.clone(), max_in_flight.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (seen, max, in_flight, script) =
                    (seen.clone(), max.clone(), in_flight.clone(), script.clone());
                tokio::spawn(async move {
                    serve(conn, &seen, &max, &in_flight, &script).await;
                });
            }
        });
        Self {
            addr,
            calls,
            max_in_flight,
        }
    }

    fn calls(&self, op: &str) -> Vec<Value> {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.op == op)
            .map(|c| c.body.clone())
            .collect()
    }

    /// A backend pointed at the stub, with test credentials (never the developer's).
    async fn backend(&self, tweak: impl FnOnce(&mut AcmPcaConfig)) -> AcmPcaCa {
        let mut config = AcmPcaConfig::new(ARN.parse().unwrap());
        config.endpoint = Some(format!("http://{}", self.addr));
        config.request_timeout = Duration::from_secs(2);
        config.issue_wait = Duration::from_secs(5);
        tweak(&mut config);
        AcmPcaCa::with_credentials(
            config,
            Credentials::new("AKIDTEST", "secret", None, None, "test"),
        )
        .await
        .unwrap()
    }
}

/// Serves one connection: reads requests, answers each from the script.
async fn serve(
    mut conn: tokio::net::TcpStream,
    seen: &SyncMutex<Vec<Call>>,
    max: &AtomicUsize,
    in_flight: &AtomicUsize,
    script: &Script,
) {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 16384];
        let (head_end, len) = loop {
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break (end, len);
                }
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let body: Value =
            serde_json::from_slice(&buf[head_end + 4..head_end + 4 + len]).unwrap_or(Value::Null);
        buf.drain(..head_end + 4 + len);
        let op = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-amz-target")
                    .then(|| value.trim().trim_start_matches("ACMPrivateCA.").to_owned())
            })
            .unwrap_or_default();
        let n = {
            let mut calls = seen.lock();
            let n = calls.iter().filter(|c| c.op == op).count();
            calls.push(Call {
                op: op.clone(),
                body,
            });
            n
        };
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        let (status, content_type, payload) = match script(&op, n) {
            Reply::Ok(v) => (200, "application/x-amz-json-1.1", v.to_string()),
            Reply::Error(status, code, message) => (
                status,
                "application/x-amz-json-1.1",
                json!({"__type": code, "message": message}).to_string(),
            ),
            Reply::Raw(status, content_type, body) => (status, content_type, body.to_owned()),
            Reply::Slow(pause, v) => {
                tokio::time::sleep(pause).await;
                (200, "application/x-amz-json-1.1", v.to_string())
            }
            Reply::Hold => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        };
        in_flight.fetch_sub(1, Ordering::SeqCst);
        let reply = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             x-amzn-requestid: test\r\n\r\n{payload}",
            payload.len()
        );
        if conn.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn describe(status: &str, key: &str, usage: &str, not_after: Option<SystemTime>) -> Value {
    let mut ca = json!({
        "Arn": ARN,
        "Status": status,
        "Type": "SUBORDINATE",
        "UsageMode": usage,
        "CertificateAuthorityConfiguration": {
            "KeyAlgorithm": key,
            "SigningAlgorithm": "SHA512WITHRSA",
            "Subject": {"CommonName": "test"},
        },
    });
    if let Some(t) = not_after {
        ca["NotAfter"] = json!(t.duration_since(UNIX_EPOCH).unwrap().as_secs());
    }
    json!({"CertificateAuthority": ca})
}

fn active_ec() -> Value {
    describe("ACTIVE", "EC_prime256v1", "GENERAL_PURPOSE", None)
}

fn issued(p: &TestPki) -> Value {
    json!({"Certificate": p.leaf_pem, "CertificateChain": format!("{}{}", p.int_pem, p.root_pem)})
}

const CERT_ARN: &str =
    "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b2c3d-4e5f/certificate/abc";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn ca_arns_are_checked_and_give_the_region() {
    let arn: CaArn = ARN.parse().unwrap();
    assert_eq!(arn.region(), "eu-west-1");
    assert_eq!(arn.as_str(), ARN);
    for bad in [
        "",
        "arn:aws:acm:eu-west-1:123456789012:certificate/abc",
        "arn:aws:acm-pca::123456789012:certificate-authority/abc",
        "arn:aws:acm-pca:eu-west-1:1234:certificate-authority/abc",
        "arn:aws:acm-pca:eu-west-1:123456789012:template/abc",
        "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/",
        "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/a b",
        "arn:aws:acm-pca:EU_WEST:123456789012:certificate-authority/abc",
        "nra:aws:acm-pca:eu-west-1:123456789012:certificate-authority/abc",
    ] {
        let err = bad.parse::<CaArn>().unwrap_err();
        assert!(
            err.to_string().contains("certificate-authority/<id>"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn configs_that_cannot_work_are_refused_before_any_call() {
    let base = || AcmPcaConfig::new(ARN.parse().unwrap());
    assert!(base().check().is_ok());
    let mut c = base();
    c.signing_algorithm = Some("SHA1WITHRSA".into());
    let err = c.check().unwrap_err().to_string();
    assert!(err.contains("SHA256WITHECDSA"), "{err}");
    let mut c = base();
    c.template_arn = "EndEntityCertificate/V1".into();
    assert!(c.check().unwrap_err().to_string().contains("template"));
    let mut c = base();
    c.template_arn =
        "arn:aws:acm-pca:::template/EndEntityClientAuthCertificate_APIPassthrough/V1".into();
    assert!(c.check().is_ok());
    let mut c = base();
    c.endpoint = Some("localhost:5000".into());
    assert!(c.check().unwrap_err().to_string().contains("endpoint"));
    let mut c = base();
    c.region = Some("Not A Region".into());
    assert!(c.check().unwrap_err().to_string().contains("region"));
    let mut c = base();
    c.issue_wait = Duration::ZERO;
    assert!(AcmPcaCa::new(c).is_err());
}

#[test]
fn the_signing_algorithm_follows_the_ca_key() {
    let cases = [
        (KeyAlgorithm::EcPrime256v1, "SHA256WITHECDSA"),
        (KeyAlgorithm::EcSecp384r1, "SHA384WITHECDSA"),
        (KeyAlgorithm::Rsa2048, "SHA256WITHRSA"),
        (KeyAlgorithm::Rsa4096, "SHA512WITHRSA"),
        (KeyAlgorithm::MlDsa65, "ML_DSA_65"),
    ];
    for (key, alg) in cases {
        let derived = algorithm_for_key(&key).unwrap();
        assert_eq!(derived.as_str(), alg);
        assert!(algorithm_fits_key(&derived, &key));
    }
    assert!(!algorithm_fits_key(
        &SigningAlgorithm::Sha256Withrsa,
        &KeyAlgorithm::EcPrime256v1
    ));
    assert!(!algorithm_fits_key(
        &SigningAlgorithm::Sha256Withecdsa,
        &KeyAlgorithm::Rsa2048
    ));
    assert!(algorithm_fits_key(
        &SigningAlgorithm::Sha256WithrsaPss,
        &KeyAlgorithm::Rsa3072
    ));
}

#[test]
fn the_idempotency_token_is_the_csrs_and_fits_pca() {
    let a = request(Duration::from_secs(60));
    let b = request(Duration::from_secs(60));
    let token = idempotency_token(&a.csr_der);
    assert_eq!(token, idempotency_token(&a.csr_der));
    assert_ne!(token, idempotency_token(&b.csr_der));
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn answers_are_split_into_leaf_intermediates_and_roots() {
    let p = pki();
    let chain = format!("{}{}", p.int_pem, p.root_pem);
    let issued = parse_issued(Some(&p.leaf_pem), Some(&chain)).unwrap();
    assert_eq!(issued.intermediates.len(), 1);
    assert_eq!(issued.roots_hint.len(), 1);
    // A root CA issues directly: no chain, or an empty one.
    for none in [None, Some(""), Some("\n")] {
        let issued = parse_issued(Some(&p.leaf_pem), none).unwrap();
        assert!(issued.intermediates.is_empty() && issued.roots_hint.is_empty());
    }
    let two = format!("{}{}", p.leaf_pem, p.int_pem);
    for (cert, chain, needle) in [
        (None, None, "no Certificate"),
        (Some("junk"), None, "Certificate:"),
        (Some(two.as_str()), None, "expected 1"),
        (Some(p.leaf_pem.as_str()), Some("junk"), "CertificateChain"),
    ] {
        let err = parse_issued(cert, chain).unwrap_err();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    let certs = parse_ca_certificate(Some(&p.int_pem), Some(&p.root_pem)).unwrap();
    assert_eq!(roots_of("acm-pca", &[certs]).len(), 1);
}

#[tokio::test]
async fn issuance_sends_the_csr_validity_algorithm_template_and_token() {
    let p = pki();
    let answer = issued(&p);
    let stub = Stub::start(move |op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        "IssueCertificate" => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        "GetCertificate" => Reply::Ok(answer.clone()),
        _ => Reply::Error(400, "InvalidRequestException", "unexpected"),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let req = request(Duration::from_secs(3600));
    let before = unix_now();
    let chain = ca.sign(&req).await.unwrap();
    let after = unix_now();
    assert_eq!(chain.intermediates.len(), 1);
    assert_eq!(chain.roots_hint.len(), 1);

    let issue = &stub.calls("IssueCertificate")[0];
    assert_eq!(issue["CertificateAuthorityArn"], ARN);
    assert_eq!(issue["SigningAlgorithm"], "SHA256WITHECDSA");
    assert_eq!(issue["TemplateArn"], DEFAULT_TEMPLATE_ARN);
    assert_eq!(issue["IdempotencyToken"], idempotency_token(&req.csr_der));
    assert_eq!(issue["Validity"]["Type"], "ABSOLUTE");
    let end = issue["Validity"]["Value"].as_i64().unwrap();
    assert!((before + 3600..=after + 3601).contains(&end), "{end}");
    let csr = base64::engine::general_purpose::STANDARD
        .decode(issue["Csr"].as_str().unwrap())
        .unwrap();
    let csr = String::from_utf8(csr).unwrap();
    assert!(
        csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{csr}"
    );
    let get = &stub.calls("GetCertificate")[0];
    assert_eq!(get["CertificateArn"], CERT_ARN);

    // The CA is described once, not at every renewal.
    ca.sign(&request(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(stub.calls("DescribeCertificateAuthority").len(), 1);
    assert_eq!(stub.calls("IssueCertificate").len(), 2);
}

#[tokio::test]
async fn throttling_is_retried_with_the_same_idempotency_token() {
    let p = pki();
    let answer = issued(&p);
    let stub = Stub::start(move |op, n| match (op, n) {
        ("DescribeCertificateAuthority", _) => Reply::Ok(active_ec()),
        ("IssueCertificate", 0) => Reply::Error(400, "ThrottlingException", "Rate exceeded"),
        ("IssueCertificate", 1) => Reply::Error(400, "LimitExceededException", "Rate exceeded"),
        ("IssueCertificate", _) => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let req = request(Duration::from_secs(3600));
    ca.sign(&req).await.unwrap();
    let issues = stub.calls("IssueCertificate");
    assert_eq!(issues.len(), 3, "the SDK retried twice");
    let token = idempotency_token(&req.csr_der);
    assert!(
        issues
            .iter()
            .all(|i| i["IdempotencyToken"] == token.as_str())
    );
}

#[tokio::test]
async fn throttling_that_lasts_is_a_retryable_throttled_error() {
    let stub = Stub::start(|op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        _ => Reply::Error(400, "ThrottlingException", "Rate exceeded"),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "throttled", "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("Rate exceeded"), "{err}");
    assert_eq!(
        stub.calls("IssueCertificate").len(),
        SDK_MAX_ATTEMPTS as usize
    );
}

#[tokio::test]
async fn a_certificate_in_progress_is_polled_until_issued() {
    let p = pki();
    let answer = issued(&p);
    let stub = Stub::start(move |op, n| match (op, n) {
        ("DescribeCertificateAuthority", _) => Reply::Ok(active_ec()),
        ("IssueCertificate", _) => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        ("GetCertificate", 0) => Reply::Error(
            400,
            "RequestInProgressException",
            "The request to issue certificate is still in progress",
        ),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let chain = ca.sign(&request(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(chain.intermediates.len(), 1);
    assert_eq!(stub.calls("GetCertificate").len(), 2);
}

#[tokio::test]
async fn a_certificate_that_never_comes_is_a_timeout() {
    let stub = Stub::start(|op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        "IssueCertificate" => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        _ => Reply::Error(400, "RequestInProgressException", "still in progress"),
    })
    .await;
    let ca = stub
        .backend(|c| c.issue_wait = Duration::from_millis(1500))
        .await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaError::Timeout(d) if d == Duration::from_millis(1500)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(stub.calls("GetCertificate").len() >= 2, "it polled");
}

#[tokio::test]
async fn errors_a_person_must_fix_say_what_to_fix_and_are_not_retried() {
    let cases: [(&str, &str, &str, bool); 6] = [
        (
            "InvalidStateException",
            "misconfigured",
            "not ACTIVE",
            false,
        ),
        (
            "MalformedCSRException",
            "misconfigured",
            "--key-type",
            false,
        ),
        (
            "AccessDeniedException",
            "denied",
            "acm-pca:IssueCertificate",
            false,
        ),
        (
            "ResourceNotFoundException",
            "misconfigured",
            "--acm-pca-arn",
            false,
        ),
        (
            "InvalidArgsException",
            "misconfigured",
            "--acm-pca-template-arn",
            false,
        ),
        (
            "RequestFailedException",
            "unavailable",
            "RequestFailedException",
            true,
        ),
    ];
    for (code, kind, needle, retryable) in cases {
        let stub = Stub::start(move |op, _| match op {
            "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
            _ => Reply::Error(400, code, "from the stub"),
        })
        .await;
        let ca = stub.backend(|_| {}).await;
        let err = ca
            .sign(&request(Duration::from_secs(3600)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{code}: {err}");
        assert_eq!(err.is_retryable(), retryable, "{code}");
        let text = err.to_string();
        assert!(
            text.contains(needle) && text.contains("from the stub"),
            "{code}: {text}"
        );
        if !retryable {
            assert_eq!(
                stub.calls("IssueCertificate").len(),
                1,
                "{code} was retried"
            );
        }
    }
}

#[tokio::test]
async fn server_errors_and_html_pages_are_retryable() {
    let stub = Stub::start(|op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        _ => Reply::Raw(
            500,
            "text/html",
            "<!doctype html>\n<title>500 Internal Server Error</title>\n<h1>Internal Server Error</h1>",
        ),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(err.to_string().contains("500"), "{err}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");
    assert_eq!(
        stub.calls("IssueCertificate").len(),
        SDK_MAX_ATTEMPTS as usize
    );

    let stub = Stub::start(|_, _| Reply::Error(503, "ServiceUnavailable", "try later")).await;
    let ca = stub.backend(|_| {}).await;
    let err = ca.trust_bundle().await.unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
}

#[tokio::test]
async fn a_ca_that_does_not_answer_times_out() {
    let stub = Stub::start(|_, _| Reply::Hold).await;
    let ca = stub
        .backend(|c| c.request_timeout = Duration::from_millis(300))
        .await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
    assert!(err.is_retryable());
    assert!(stub.calls("IssueCertificate").is_empty());
}

#[tokio::test]
async fn a_ca_that_is_not_active_is_reported_before_issuing_and_looked_at_again() {
    let p = pki();
    let answer = issued(&p);
    let stub = Stub::start(move |op, n| match (op, n) {
        ("DescribeCertificateAuthority", 0) => Reply::Ok(describe(
            "DISABLED",
            "EC_prime256v1",
            "GENERAL_PURPOSE",
            None,
        )),
        ("DescribeCertificateAuthority", _) => Reply::Ok(active_ec()),
        ("IssueCertificate", 0) => Reply::Error(
            400,
            "InvalidStateException",
            "The certificate authority is not in a valid state for issuing certificates.",
        ),
        ("IssueCertificate", _) => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "misconfigured");
    assert!(err.to_string().contains("DISABLED, not ACTIVE"), "{err}");
    assert!(stub.calls("IssueCertificate").is_empty());

    // Active now; then PCA says the state changed under us: the facts are read again.
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not ACTIVE"), "{err}");
    ca.sign(&request(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(stub.calls("DescribeCertificateAuthority").len(), 3);
}

#[tokio::test]
async fn validity_is_capped_by_short_lived_mode_and_the_cas_own_expiry() {
    let p = pki();
    let answer = issued(&p);
    let ca_end = SystemTime::now() + Duration::from_secs(2 * 24 * 3600);
    let stub = Stub::start(move |op, n| match (op, n) {
        ("DescribeCertificateAuthority", _) => Reply::Ok(describe(
            "ACTIVE",
            "RSA_2048",
            "SHORT_LIVED_CERTIFICATE",
            None,
        )),
        ("IssueCertificate", _) => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let before = unix_now();
    ca.sign(&request(Duration::from_secs(30 * 24 * 3600)))
        .await
        .unwrap();
    let issue = &stub.calls("IssueCertificate")[0];
    let end = issue["Validity"]["Value"].as_i64().unwrap();
    let cap = SHORT_LIVED_MAX.as_secs() as i64;
    assert!((before + cap..=before + cap + 5).contains(&end), "{end}");
    assert_eq!(issue["SigningAlgorithm"], "SHA256WITHRSA");

    let stub = Stub::start({
        let answer = issued(&p);
        move |op, _| match op {
            "DescribeCertificateAuthority" => Reply::Ok(describe(
                "ACTIVE",
                "EC_secp384r1",
                "GENERAL_PURPOSE",
                Some(ca_end),
            )),
            "IssueCertificate" => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
            _ => Reply::Ok(answer.clone()),
        }
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    ca.sign(&request(Duration::from_secs(30 * 24 * 3600)))
        .await
        .unwrap();
    let issue = &stub.calls("IssueCertificate")[0];
    let end = issue["Validity"]["Value"].as_i64().unwrap();
    let ca_end = ca_end.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((ca_end - 5..=ca_end).contains(&end), "{end} vs {ca_end}");
    assert_eq!(issue["SigningAlgorithm"], "SHA384WITHECDSA");
}

#[tokio::test]
async fn a_signing_algorithm_for_another_key_type_is_refused_without_issuing() {
    let stub = Stub::start(|op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        _ => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
    })
    .await;
    let ca = stub
        .backend(|c| c.signing_algorithm = Some("SHA256WITHRSA".into()))
        .await;
    let err = ca
        .sign(&request(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "misconfigured");
    assert!(err.to_string().contains("EC_prime256v1"), "{err}");
    assert!(stub.calls("IssueCertificate").is_empty());
}

#[tokio::test]
async fn the_trust_bundle_is_the_root_above_the_ca() {
    let p = pki();
    let (int, root) = (p.int_pem.clone(), p.root_pem.clone());
    let stub = Stub::start(move |op, n| match (op, n) {
        ("GetCertificateAuthorityCertificate", 0) => {
            Reply::Ok(json!({"Certificate": int, "CertificateChain": root}))
        }
        ("GetCertificateAuthorityCertificate", 1) => Reply::Ok(json!({"Certificate": root})),
        ("GetCertificateAuthorityCertificate", _) => Reply::Ok(json!({"Certificate": "junk"})),
        _ => Reply::Error(400, "InvalidRequestException", "unexpected"),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let want = decode_certificates(p.root_pem.as_bytes()).unwrap();
    // A subordinate CA: its chain's root. A root CA: itself.
    assert_eq!(ca.trust_bundle().await.unwrap().roots(), &want[..]);
    assert_eq!(ca.trust_bundle().await.unwrap().roots(), &want[..]);
    let err = ca.trust_bundle().await.unwrap_err();
    assert_eq!(err.kind(), "bad_response", "{err}");

    // Pinned: PCA is not asked.
    let pinned = TrustBundle::new(want.clone()).unwrap();
    let ca = stub
        .backend(|c| c.trust_bundle = Some(pinned.clone()))
        .await;
    assert_eq!(ca.trust_bundle().await.unwrap(), pinned);
    assert_eq!(stub.calls("GetCertificateAuthorityCertificate").len(), 3);
}

#[tokio::test]
async fn concurrent_issuances_are_bounded() {
    let p = pki();
    let answer = issued(&p);
    let stub = Stub::start(move |op, _| match op {
        "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
        "IssueCertificate" => Reply::Slow(
            Duration::from_millis(100),
            json!({"CertificateArn": CERT_ARN}),
        ),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = Arc::new(stub.backend(|_| {}).await);
    let signs = (0..12).map(|_| {
        let ca = ca.clone();
        tokio::spawn(async move { ca.sign(&request(Duration::from_secs(3600))).await })
    });
    for sign in futures_join(signs).await {
        sign.unwrap().unwrap();
    }
    assert_eq!(stub.calls("IssueCertificate").len(), 12);
    assert_eq!(
        stub.calls("DescribeCertificateAuthority").len(),
        1,
        "single flight"
    );
    let max = stub.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= MAX_IN_FLIGHT, "{max} calls at once");
    assert!(max >= 2, "the bound is not a lock: {max}");
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await);
    }
    out
}

#[tokio::test]
async fn errors_while_collecting_the_certificate_are_sorted_too() {
    let cases: [(&str, &str, &str); 3] = [
        ("AccessDeniedException", "denied", "acm-pca:GetCertificate"),
        ("ThrottlingException", "throttled", "GetCertificate"),
        (
            "ResourceNotFoundException",
            "misconfigured",
            "--acm-pca-arn",
        ),
    ];
    for (code, kind, needle) in cases {
        let stub = Stub::start(move |op, _| match op {
            "DescribeCertificateAuthority" => Reply::Ok(active_ec()),
            "IssueCertificate" => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
            _ => Reply::Error(400, code, "from the stub"),
        })
        .await;
        let ca = stub.backend(|_| {}).await;
        let err = ca
            .sign(&request(Duration::from_secs(3600)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{code}: {err}");
        assert!(err.to_string().contains(needle), "{code}: {err}");
    }
}

/// A credentials chain that finds nothing, as on a node without an AWS identity.
#[derive(Debug)]
struct NoCredentials;

impl aws_sdk_acmpca::config::ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::not_loaded(
                "no credentials found in chain",
            ),
        ))
    }
}

#[tokio::test]
async fn missing_credentials_say_so_on_one_line_and_are_retried() {
    let stub = Stub::start(|_, _| Reply::Ok(active_ec())).await;
    let mut config = AcmPcaConfig::new(ARN.parse().unwrap());
    config.endpoint = Some(format!("http://{}", stub.addr));
    let ca = AcmPcaCa::with_credentials(config, NoCredentials)
        .await
        .unwrap();
    let err = ca.trust_bundle().await.unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
    let text = err.to_string();
    assert!(text.contains("no usable AWS credentials"), "{text}");
    assert!(text.contains("IRSA"), "{text}");
    assert!(
        !text.contains('\n') && !text.contains("DispatchFailure {"),
        "{text}"
    );
    assert!(stub.calls.lock().is_empty(), "nothing was sent unsigned");
}

#[tokio::test]
async fn a_renewed_ca_certificate_is_noticed_when_its_old_expiry_would_cap() {
    let p = pki();
    let answer = issued(&p);
    let old_end = SystemTime::now() + Duration::from_secs(3600);
    let new_end = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    let stub = Stub::start(move |op, n| match (op, n) {
        ("DescribeCertificateAuthority", 0) => Reply::Ok(describe(
            "ACTIVE",
            "EC_prime256v1",
            "GENERAL_PURPOSE",
            Some(old_end),
        )),
        ("DescribeCertificateAuthority", _) => Reply::Ok(describe(
            "ACTIVE",
            "EC_prime256v1",
            "GENERAL_PURPOSE",
            Some(new_end),
        )),
        ("IssueCertificate", _) => Reply::Ok(json!({"CertificateArn": CERT_ARN})),
        _ => Reply::Ok(answer.clone()),
    })
    .await;
    let ca = stub.backend(|_| {}).await;
    let day = Duration::from_secs(24 * 3600);
    ca.sign(&request(day)).await.unwrap();
    // Capped by the CA's expiry, just read: not read again at once.
    ca.sign(&request(day)).await.unwrap();
    assert_eq!(stub.calls("DescribeCertificateAuthority").len(), 1);
    // Later, the cap would still apply: the CA is read again, and it was renewed.
    if let Some(facts) = ca.facts.lock().await.as_mut() {
        facts.described_at -= STALE_FACTS * 2;
    }
    let before = unix_now();
    ca.sign(&request(day)).await.unwrap();
    assert_eq!(stub.calls("DescribeCertificateAuthority").len(), 2);
    let ends: Vec<i64> = stub
        .calls("IssueCertificate")
        .iter()
        .map(|i| i["Validity"]["Value"].as_i64().unwrap())
        .collect();
    let old_end = old_end.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(ends[0] <= old_end && ends[1] <= old_end, "{ends:?}");
    assert!(ends[2] >= before + day.as_secs() as i64, "{ends:?}");
}
