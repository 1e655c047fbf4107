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

/// `sds_agent_federation_dir_skipped_total{reason}`.
fn skipped(metrics: &Metrics, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("sds_agent_federation_dir_skipped_total{{reason=\"{reason}\"}}"),
    )
}

fn dir_federation(dir: &std::path::Path, metrics: &Arc<Metrics>) -> Federation {
    Federation::start(vec![], None, metrics.clone())
        .unwrap()
        .with_dir(dir, &td("cluster.local"))
        .unwrap()
}

#[test]
fn a_federation_dir_adds_updates_and_removes_domains_with_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let a1 = cert(true, Some("a.example"), yesterday(), 30);
    let b1 = cert(true, Some("b.example"), yesterday(), 30);
    std::fs::write(dir.path().join("a.example.json"), jwks(&[&a1])).unwrap();
    std::fs::write(dir.path().join("b.example.pem"), b1.pem()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let federation = dir_federation(dir.path(), &metrics);
    let mut rx = federation.subscribe();
    let first = rx.borrow_and_update().clone();
    assert_eq!(
        first.keys().map(TrustDomain::as_str).collect::<Vec<_>>(),
        ["a.example", "b.example"]
    );
    assert_eq!(first[&td("a.example")].der, a1.der().to_vec());
    assert_eq!(first[&td("b.example")].pem, b1.pem().replace("\r\n", "\n"));
    assert_eq!(metric(&metrics, "sds_agent_federated_domains "), 2.0);

    // Nothing changed: nothing sent.
    federation.refresh();
    assert!(!rx.has_changed().unwrap());

    // A changed file updates its domain only, with a new version and generation.
    let a2 = cert(true, Some("a.example"), yesterday(), 30);
    std::fs::write(dir.path().join("a.example.json"), jwks(&[&a1, &a2])).unwrap();
    federation.refresh();
    let second = rx.borrow_and_update().clone();
    assert_eq!(second[&td("a.example")].roots, 2);
    assert!(second[&td("a.example")].version > first[&td("a.example")].version);
    assert_eq!(second[&td("b.example")], first[&td("b.example")]);
    assert!(second.generation > first.generation);

    // A bad file keeps the last good bundle, counted.
    std::fs::write(dir.path().join("a.example.json"), "{\"keys\": [").unwrap();
    federation.refresh();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(
        metric(
            &metrics,
            "sds_agent_federation_errors_total{trust_domain=\"a.example\",reason=\"malformed\"}"
        ),
        1.0
    );

    // A removed file removes its domain; a new one adds its domain.
    std::fs::remove_file(dir.path().join("b.example.pem")).unwrap();
    let c1 = cert(true, None, yesterday(), 30);
    std::fs::write(dir.path().join("c.example.pem"), c1.pem()).unwrap();
    federation.refresh();
    let third = rx.borrow_and_update().clone();
    assert_eq!(
        third.keys().map(TrustDomain::as_str).collect::<Vec<_>>(),
        ["a.example", "c.example"]
    );
    assert_eq!(third[&td("a.example")].roots, 2, "the last good one stays");
    assert!(third.generation > second.generation);
    assert_eq!(metric(&metrics, "sds_agent_federated_domains "), 2.0);

    // Removed and brought back: a version never seen before.
    std::fs::remove_file(dir.path().join("c.example.pem")).unwrap();
    federation.refresh();
    assert!(!rx.borrow_and_update().contains_key(&td("c.example")));
    std::fs::write(dir.path().join("c.example.pem"), c1.pem()).unwrap();
    federation.refresh();
    let back = rx.borrow_and_update().clone();
    assert!(back[&td("c.example")].version > third[&td("c.example")].version);
}

#[test]
fn bad_names_the_own_domain_and_duplicates_are_skipped_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let good = cert(true, None, yesterday(), 30);
    for name in [
        "Not_A_Domain.pem",
        "readme.txt",
        "cluster.local.pem",
        "twice.example.pem",
        "twice.example.json",
        "fine.example.pem",
    ] {
        std::fs::write(dir.path().join(name), good.pem()).unwrap();
    }
    // Dotfiles and directories are not bundles, and say nothing.
    std::fs::write(dir.path().join(".hidden.example.pem"), good.pem()).unwrap();
    std::fs::create_dir(dir.path().join("sub.example.pem")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let federation = dir_federation(dir.path(), &metrics);
    let rx = federation.subscribe();
    assert_eq!(
        rx.borrow()
            .keys()
            .map(TrustDomain::as_str)
            .collect::<Vec<_>>(),
        ["fine.example"]
    );
    assert_eq!(skipped(&metrics, "bad_name"), 2.0);
    assert_eq!(skipped(&metrics, "own_trust_domain"), 1.0);
    assert_eq!(skipped(&metrics, "duplicate"), 2.0);
    // Counted once per file, not at every poll.
    federation.refresh();
    federation.refresh();
    assert_eq!(skipped(&metrics, "bad_name"), 2.0);
    assert_eq!(skipped(&metrics, "duplicate"), 2.0);

    // A domain served from one file keeps its bundle when a second file appears for it.
    let fine2 = cert(true, None, yesterday(), 30);
    std::fs::write(dir.path().join("fine.example.json"), jwks(&[&fine2])).unwrap();
    federation.refresh();
    assert_eq!(rx.borrow()[&td("fine.example")].der, good.der().to_vec());
    assert_eq!(skipped(&metrics, "duplicate"), 4.0);
}

#[test]
fn a_dir_that_cannot_be_listed_or_repeats_a_federate_with_domain_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Federation::start(vec![], None, Arc::new(Metrics::new()))
        .unwrap()
        .with_dir(&dir.path().join("nope"), &td("cluster.local"))
        .unwrap_err();
    assert!(
        missing.to_string().starts_with("--federation-dir "),
        "{missing}"
    );

    let (sources, path) = sources(dir.path());
    let root = cert(true, None, yesterday(), 30);
    std::fs::write(&path, root.pem()).unwrap();
    let bundles = dir.path().join("bundles");
    std::fs::create_dir(&bundles).unwrap();
    std::fs::write(bundles.join("partner.example.pem"), root.pem()).unwrap();
    let twice = Federation::start(sources, None, Arc::new(Metrics::new()))
        .unwrap()
        .with_dir(&bundles, &td("cluster.local"))
        .unwrap_err();
    assert!(
        twice
            .to_string()
            .contains("partner.example is also given by --federate-with"),
        "{twice}"
    );
}

/// The kubelet's ConfigMap layout: `DIR/<key>` -> `..data/<key>`, `..data` ->
/// `..<timestamp>`, switched atomically by replacing the `..data` link.
#[cfg(unix)]
#[test]
fn a_configmap_layout_of_symlinks_is_followed_and_its_swaps_seen() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = cert(true, None, yesterday(), 30);
    let b = cert(true, None, yesterday(), 30);
    std::fs::create_dir(d.join("..2026_12_04_v1")).unwrap();
    std::fs::write(d.join("..2026_12_04_v1/a.example.pem"), a.pem()).unwrap();
    std::fs::write(d.join("..2026_12_04_v1/b.example.pem"), b.pem()).unwrap();
    symlink("..2026_12_04_v1", d.join("..data")).unwrap();
    symlink("..data/a.example.pem", d.join("a.example.pem")).unwrap();
    symlink("..data/b.example.pem", d.join("b.example.pem")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let federation = dir_federation(d, &metrics);
    let mut rx = federation.subscribe();
    assert_eq!(rx.borrow_and_update().len(), 2);
    assert_eq!(
        skipped(&metrics, "bad_name"),
        0.0,
        "dot entries say nothing"
    );

    // The next version drops b: the kubelet writes a new timestamped dir, swaps `..data`,
    // and removes the dangling top-level link.
    std::fs::create_dir(d.join("..2026_12_04_v2")).unwrap();
    std::fs::write(d.join("..2026_12_04_v2/a.example.pem"), a.pem()).unwrap();
    symlink("..2026_12_04_v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_12_04_v1")).unwrap();
    federation.refresh();
    // A dangling link is no file: b is removed even before its link goes.
    assert_eq!(
        rx.borrow_and_update()
            .keys()
            .map(TrustDomain::as_str)
            .collect::<Vec<_>>(),
        ["a.example"]
    );
    std::fs::remove_file(d.join("b.example.pem")).unwrap();
    federation.refresh();
    assert!(!rx.has_changed().unwrap());
}
