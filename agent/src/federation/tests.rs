// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

use super::*;

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

/// A self-signed certificate: a CA unless `ca` is false, naming `spiffe://<san_td>` if
/// given, valid from `from` for `days`.
fn cert(ca: bool, san_td: Option<&str>, from: SystemTime, days: u64) -> rcgen::Certificate {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    if let Some(t) = san_td {
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{t}").try_into().unwrap())];
    }
    p.not_before = from.into();
    p.not_after = (from + Duration::from_secs(days * 86_400)).into();
    p.self_signed(&key).unwrap()
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn yesterday() -> SystemTime {
    now() - Duration::from_secs(86_400)
}

/// A SPIFFE bundle (JWKS) with one x509-svid key per certificate, and a jwt-svid key.
fn jwks(certs: &[&rcgen::Certificate]) -> String {
    let mut keys: Vec<serde_json::Value> = certs
        .iter()
        .map(|c| {
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": "unused", "y": "unused",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(c.der())],
            })
        })
        .collect();
    keys.push(serde_json::json!({ "use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "a", "y": "b" }));
    serde_json::json!({ "keys": keys, "spiffe_sequence": 7, "spiffe_refresh_hint": 300 })
        .to_string()
}

#[test]
fn a_spiffe_bundle_gives_its_x509_roots_and_ignores_jwt_keys() {
    let a = cert(true, Some("partner.example"), yesterday(), 30);
    let b = cert(true, None, yesterday(), 30);
    let bundle = parse_bundle(jwks(&[&a, &b]).as_bytes(), &td("partner.example"), now()).unwrap();
    assert_eq!(bundle.roots, 2);
    assert_eq!(bundle.der, [a.der().as_ref(), b.der().as_ref()].concat());
}

#[test]
fn pem_roots_are_a_bundle_too() {
    let a = cert(true, Some("partner.example"), yesterday(), 30);
    let bundle = parse_bundle(a.pem().as_bytes(), &td("partner.example"), now()).unwrap();
    assert_eq!(bundle.roots, 1);
    assert_eq!(bundle.der, a.der().to_vec());
}

#[test]
fn bad_bundles_are_refused_with_their_reason() {
    let expected = td("partner.example");
    let good = cert(true, Some("partner.example"), yesterday(), 30);
    let expired = cert(true, None, now() - Duration::from_secs(40 * 86_400), 30);
    let not_yet = cert(true, None, now() + Duration::from_secs(86_400), 30);
    let leaf = cert(false, None, yesterday(), 30);
    let other_domain = cert(true, Some("intruder.example"), yesterday(), 30);
    let only_jwt =
        r#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"k","crv":"P-256","x":"a","y":"b"}]}"#;
    let two_x5c = format!(
        r#"{{"keys":[{{"use":"x509-svid","kty":"EC","x5c":["{0}","{0}"]}}]}}"#,
        base64::engine::general_purpose::STANDARD.encode(good.der())
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"this is not a bundle".to_vec(), "empty"),
        ("broken JSON", b"{\"keys\": [".to_vec(), "malformed"),
        ("JSON without keys", b"{}".to_vec(), "malformed"),
        (
            "a JWKS with no x509-svid key",
            only_jwt.as_bytes().to_vec(),
            "empty",
        ),
        (
            "an x509-svid key with two x5c",
            two_x5c.into_bytes(),
            "malformed",
        ),
        (
            "x5c that is not base64",
            br#"{"keys":[{"use":"x509-svid","x5c":["%%%"]}]}"#.to_vec(),
            "malformed",
        ),
        (
            "x5c that is not a certificate",
            br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#.to_vec(),
            "not_ca",
        ),
        ("empty file", Vec::new(), "empty"),
        ("an expired root", expired.pem().into_bytes(), "expired"),
        (
            "a root not valid yet",
            not_yet.pem().into_bytes(),
            "expired",
        ),
        ("a leaf, not a CA", leaf.pem().into_bytes(), "not_ca"),
        (
            "a root of another trust domain",
            jwks(&[&good, &other_domain]).into_bytes(),
            "wrong_trust_domain",
        ),
    ];
    for (what, text, reason) in cases {
        let err = parse_bundle(&text, &expected, now()).unwrap_err();
        assert_eq!(err.reason(), reason, "{what}: {err}");
        assert!(
            crate::metrics::FEDERATION_ERROR_REASONS.contains(&err.reason()),
            "{what}: the reason is a primed metric label"
        );
    }
}

fn sources(dir: &std::path::Path) -> (Vec<FederationSource>, std::path::PathBuf) {
    let path = dir.join("partner.json");
    (
        vec![FederationSource {
            trust_domain: td("partner.example"),
            source: BundleSource::File(path.clone()),
        }],
        path,
    )
}

fn metric(metrics: &Metrics, line_start: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn a_bad_file_at_start_stops_the_agent_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, path) = sources(dir.path());
    let missing = Federation::start(sources.clone(), None, Arc::new(Metrics::new())).unwrap_err();
    let text = missing.to_string();
    assert!(
        text.contains("partner.example=") && text.contains("partner.json"),
        "{text}"
    );
    std::fs::write(&path, "garbage").unwrap();
    let garbage = Federation::start(sources, None, Arc::new(Metrics::new())).unwrap_err();
    assert!(garbage.to_string().contains("no X.509 root"), "{garbage}");
}

#[test]
fn a_changed_file_replaces_the_bundle_and_a_bad_one_never_does() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, path) = sources(dir.path());
    let first = cert(true, Some("partner.example"), yesterday(), 30);
    std::fs::write(&path, jwks(&[&first])).unwrap();
    let metrics = Arc::new(Metrics::new());
    let federation = Federation::start(sources, None, metrics.clone()).unwrap();
    let mut rx = federation.subscribe();
    let partner = td("partner.example");
    assert_eq!(rx.borrow_and_update()[&partner].der, first.der().to_vec());
    let errors = |reason: &str| {
        metric(
            &metrics,
            &format!(
                "sds_agent_federation_errors_total{{trust_domain=\"partner.example\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(errors("malformed"), 0.0, "primed at zero");

    // Unchanged: nothing sent.
    federation.refresh();
    assert!(!rx.has_changed().unwrap());

    // Each bad version is refused, counted, and the first bundle stays.
    let expired = cert(true, None, now() - Duration::from_secs(40 * 86_400), 30);
    let intruder = cert(true, Some("intruder.example"), yesterday(), 30);
    for (text, reason) in [
        ("{\"keys\": [".to_owned(), "malformed"),
        (String::new(), "empty"),
        (expired.pem(), "expired"),
        (jwks(&[&intruder]), "wrong_trust_domain"),
    ] {
        std::fs::write(&path, text).unwrap();
        federation.refresh();
        assert!(!rx.has_changed().unwrap(), "{reason}");
        assert_eq!(rx.borrow()[&partner].der, first.der().to_vec(), "{reason}");
        assert_eq!(errors(reason), 1.0, "{reason}");
    }
    std::fs::remove_file(&path).unwrap();
    federation.refresh();
    assert_eq!(errors("unreadable"), 1.0);
    assert_eq!(rx.borrow()[&partner].der, first.der().to_vec());

    // A good new bundle replaces it.
    let second = cert(true, Some("partner.example"), yesterday(), 30);
    std::fs::write(&path, jwks(&[&first, &second])).unwrap();
    federation.refresh();
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update()[&partner].roots, 2);
    assert_eq!(
        metric(
            &metrics,
            "sds_agent_federation_updates_total{trust_domain=\"partner.example\"}"
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn run_re_reads_the_files_at_the_interval_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, path) = sources(dir.path());
    let first = cert(true, Some("partner.example"), yesterday(), 30);
    std::fs::write(&path, first.pem()).unwrap();
    let federation = Arc::new(Federation::start(sources, None, Arc::new(Metrics::new())).unwrap());
    let mut rx = federation.subscribe();
    rx.borrow_and_update();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        federation
            .clone()
            .run(Duration::from_secs(5), shutdown.clone()),
    );
    let second = cert(true, Some("partner.example"), yesterday(), 30);
    std::fs::write(&path, second.pem()).unwrap();
    tokio::time::timeout(Duration::from_secs(6), rx.changed())
        .await
        .expect("re-read within one interval")
        .unwrap();
    assert_eq!(
        rx.borrow()[&td("partner.example")].der,
        second.der().to_vec()
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("stops on shutdown")
        .unwrap();
}
