//! Federation from a SPIFFE bundle endpoint (`--federate-with TD=https://...`), through the
//! agent's `Federation` against a local HTTPS server that plays the endpoint (`https_web`: a
//! TLS certificate from a CA given as `--federation-endpoint-ca`): the bundle is fetched, and
//! fetched again at its `spiffe_refresh_hint`; garbage, a bundle for the wrong trust domain,
//! one with no `x509-svid` key, an expired root, an error status and an endpoint that hangs
//! each leave the last good bundle in place, are counted by reason, and are named in the log.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use sds_agent::federation::{BundleSource, Federation, FederationSource};
use sds_agent::metrics::Metrics;
use sds_backends::TrustDomain;
use tokio::net::TcpListener;

/// What the endpoint answers now.
#[derive(Clone)]
enum Answer {
    Ok(String),
    Status(StatusCode),
    Hang,
}

/// The endpoint's state: what it answers, and how many requests it had.
type Shared = (Arc<Mutex<Answer>>, Arc<Mutex<u32>>);

struct Endpoint {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<Mutex<u32>>,
    ca_pem: String,
}

async fn answer(State((answer, hits)): State<Shared>) -> impl IntoResponse {
    *hits.lock() += 1;
    let now = answer.lock().clone();
    match now {
        Answer::Ok(body) => (StatusCode::OK, body).into_response(),
        Answer::Status(code) => (code, "no").into_response(),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Endpoint {
    async fn start() -> Self {
        let (ca_pem, tls) = sds_integration::pki::serving_tls(
            "bundle endpoint",
            "sds-agent federation test",
            "bundle endpoint CA",
            &["localhost"],
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer_now = Arc::new(Mutex::new(Answer::Status(StatusCode::SERVICE_UNAVAILABLE)));
        let hits = Arc::new(Mutex::new(0));
        let app = Router::new()
            .fallback(answer)
            .with_state((answer_now.clone(), hits.clone()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            answer: answer_now,
            hits,
            ca_pem,
        }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    fn url(&self) -> url::Url {
        format!("https://localhost:{}/bundle", self.addr.port())
            .parse()
            .unwrap()
    }
}

fn root(trust_domain: Option<&str>, from: SystemTime, days: u64) -> rcgen::Certificate {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    if let Some(td) = trust_domain {
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{td}").try_into().unwrap(),
        )];
    }
    p.not_before = from.into();
    p.not_after = (from + Duration::from_secs(days * 86_400)).into();
    p.self_signed(&key).unwrap()
}

fn yesterday() -> SystemTime {
    SystemTime::now() - Duration::from_secs(86_400)
}

/// A SPIFFE bundle of `roots`, with a refresh hint.
fn bundle(roots: &[&rcgen::Certificate], hint_secs: u64) -> String {
    let keys: Vec<serde_json::Value> = roots
        .iter()
        .map(|c| {
            serde_json::json!({
                "use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "x", "y": "y",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(c.der())],
            })
        })
        .collect();
    serde_json::json!({ "keys": keys, "spiffe_sequence": 1, "spiffe_refresh_hint": hint_secs })
        .to_string()
}

fn errors(metrics: &Metrics, reason: &str) -> f64 {
    let prefix = format!(
        "sds_agent_federation_errors_total{{trust_domain=\"partner.example\",reason=\"{reason}\"}}"
    );
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_endpoint_is_fetched_and_bad_answers_never_replace_the_last_good_bundle() {
    let endpoint = Endpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("endpoint-ca.pem");
    std::fs::write(&ca, &endpoint.ca_pem).unwrap();
    let partner: TrustDomain = "partner.example".parse().unwrap();
    let metrics = Arc::new(Metrics::new());
    let federation = Federation::start(
        vec![FederationSource {
            trust_domain: partner.clone(),
            source: BundleSource::Endpoint(endpoint.url()),
        }],
        Some(&ca),
        metrics.clone(),
    )
    .unwrap()
    .with_fetch_timeout(Duration::from_millis(500))
    .with_max_retry(Duration::from_secs(1));
    let mut rx = federation.subscribe();
    assert!(rx.borrow_and_update().is_empty(), "not required at start");

    // Down at first: counted, nothing served, tried again later.
    federation.refresh_endpoints().await;
    assert_eq!(errors(&metrics, "fetch_failed"), 1.0);
    assert!(rx.borrow().is_empty());

    // A good bundle with a 1 s refresh hint (the shortest obeyed).
    let first = root(Some("partner.example"), yesterday(), 30);
    endpoint.set(Answer::Ok(bundle(&[&first], 1)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    federation.refresh_endpoints().await;
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update()[&partner].der, first.der().to_vec());

    // Not due yet: no request at all.
    let hits = *endpoint.hits.lock();
    federation.refresh_endpoints().await;
    assert_eq!(
        *endpoint.hits.lock(),
        hits,
        "fetched before its refresh hint"
    );

    // Each bad answer: refused, counted by reason, the first bundle kept.
    let expired = root(
        None,
        SystemTime::now() - Duration::from_secs(40 * 86_400),
        30,
    );
    let intruder = root(Some("intruder.example"), yesterday(), 30);
    let cases = [
        (Answer::Ok("<html>500</html>".into()), "empty"),
        (Answer::Ok("{\"keys\": [".into()), "malformed"),
        (
            Answer::Ok(r#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"k"}]}"#.into()),
            "empty",
        ),
        (Answer::Ok(bundle(&[&expired], 1)), "expired"),
        (Answer::Ok(bundle(&[&intruder], 1)), "wrong_trust_domain"),
        (Answer::Status(StatusCode::NOT_FOUND), "fetch_failed"),
        (Answer::Hang, "fetch_failed"),
    ];
    for (answer, reason) in cases {
        let before = errors(&metrics, reason);
        endpoint.set(answer);
        // Due again within a second (the hint, or the retry after a failure).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let started = tokio::time::Instant::now();
        federation.refresh_endpoints().await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{reason}: a hung endpoint held the refresh for {:?}",
            started.elapsed()
        );
        assert_eq!(errors(&metrics, reason), before + 1.0, "{reason}");
        assert!(
            !rx.has_changed().unwrap(),
            "{reason}: a refused bundle was served"
        );
        assert_eq!(
            rx.borrow()[&partner].der,
            first.der().to_vec(),
            "{reason}: the last good bundle is kept"
        );
    }

    // A new good bundle replaces it.
    let second = root(Some("partner.example"), yesterday(), 30);
    endpoint.set(Answer::Ok(bundle(&[&first, &second], 1)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    federation.refresh_endpoints().await;
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update()[&partner].roots, 2);
}

#[test]
fn an_endpoint_ca_that_is_not_pem_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "nonsense").unwrap();
    let err = Federation::start(
        vec![FederationSource {
            trust_domain: "partner.example".parse().unwrap(),
            source: BundleSource::Endpoint("https://bundle.partner.example/".parse().unwrap()),
        }],
        Some(&ca),
        Arc::new(Metrics::new()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("--federation-endpoint-ca"),
        "{err}"
    );
}
