//! Unit tests of the Vault backend: answer parsing, and how each HTTP outcome is sorted,
//! against a scripted loopback server. The real OpenBao runs in `integration/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::{KeyType, SpiffeId, TrustDomain};

struct TestPki {
    root_pem: String,
    int_pem: String,
    leaf_pem: String,
}

fn pki() -> TestPki {
    let root_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "root");
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = p.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(p, &root_key);

    let int_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "int");
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let int = p.signed_by(&int_key, &root_issuer).unwrap();
    let int_issuer = rcgen::Issuer::new(p, &int_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
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

#[test]
fn a_sign_answer_gives_leaf_intermediates_roots_and_warnings() {
    let p = pki();
    let body = json!({
        "data": {
            "certificate": p.leaf_pem,
            "ca_chain": [p.int_pem, p.root_pem],
            "issuing_ca": p.int_pem,
            "serial_number": "01",
        },
        "warnings": ["TTL \"24h0m0s\" is longer than permitted maxTTL \"1h0m0s\", so maxTTL is being used"],
    });
    let (chain, warnings) = parse_sign_response(body.to_string().as_bytes()).unwrap();
    assert_eq!(chain.intermediates.len(), 1);
    assert_eq!(chain.roots_hint.len(), 1);
    assert_eq!(
        chain.leaf,
        decode_certificates(p.leaf_pem.as_bytes()).unwrap()[0]
    );
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("maxTTL"));

    // Older Vaults: no ca_chain, only issuing_ca.
    let body = json!({"data": {"certificate": p.leaf_pem, "issuing_ca": p.int_pem}});
    let (chain, warnings) = parse_sign_response(body.to_string().as_bytes()).unwrap();
    assert_eq!(chain.intermediates.len(), 1);
    assert!(chain.roots_hint.is_empty());
    assert!(warnings.is_empty());
}

#[test]
fn bad_sign_answers_are_refused_with_a_reason() {
    let p = pki();
    let cases = [
        ("not json".to_owned(), "not JSON"),
        (json!({}).to_string(), "no data"),
        (json!({"data": {}}).to_string(), "no data.certificate"),
        (
            json!({"data": {"certificate": "garbage"}}).to_string(),
            "data.certificate",
        ),
        (
            json!({"data": {"certificate": format!("{}{}", p.leaf_pem, p.int_pem)}}).to_string(),
            "expected 1",
        ),
        (
            json!({"data": {"certificate": p.leaf_pem, "ca_chain": ["junk"]}}).to_string(),
            "data.ca_chain",
        ),
    ];
    for (body, needle) in cases {
        let err = parse_sign_response(body.as_bytes()).unwrap_err();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

#[test]
fn roots_are_the_self_issued_certificates_without_duplicates() {
    let p = pki();
    let root = decode_certificates(p.root_pem.as_bytes())
        .unwrap()
        .remove(0);
    let int = decode_certificates(p.int_pem.as_bytes()).unwrap().remove(0);
    let roots = roots_of(
        "vault",
        &[vec![int.clone(), root.clone()], vec![root.clone()]],
    );
    assert_eq!(roots, vec![root.clone()]);
    // A chain that stops at an intermediate: its top is the anchor.
    assert_eq!(roots_of("vault", &[vec![int.clone()]]), vec![int]);
    assert!(roots_of("vault", &[]).is_empty());
}

#[test]
fn issuer_lists_and_issuer_answers_parse() {
    let body = json!({"data": {"keys": ["0c5f...", "a/../b", "5e1b7bd8-2f6e-4ce8"]}});
    assert_eq!(
        issuer_ids(body.to_string().as_bytes()),
        vec!["0c5f...".to_owned(), "5e1b7bd8-2f6e-4ce8".to_owned()]
    );
    assert!(issuer_ids(b"{}").is_empty());
    let p = pki();
    let body = json!({"data": {"certificate": p.int_pem, "ca_chain": [p.int_pem, p.root_pem]}});
    assert_eq!(parse_issuer(body.to_string().as_bytes()).unwrap().len(), 3);
    assert!(parse_issuer(b"[]").is_err());
}

#[test]
fn vault_error_bodies_become_one_line() {
    assert_eq!(
        vault_errors(br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#),
        "permission denied"
    );
    assert_eq!(
        vault_errors(br#"{"errors":["unknown role: x", "second"]}"#),
        "unknown role: x; second"
    );
    assert_eq!(vault_errors(br#"{"errors":[]}"#), "(no error message)");
    assert_eq!(vault_errors(b""), "(empty body)");
    assert_eq!(
        vault_errors(b"<html>bad gateway</html>"),
        "<html>bad gateway</html>"
    );
    assert_eq!(vault_errors(&[b'x'; 1000]).len(), 200);
}

#[test]
fn names_that_go_into_paths_and_headers_are_checked() {
    assert!(check_path("mount", "pki").is_ok());
    assert!(check_path("mount", "team-a/pki_int").is_ok());
    for bad in [
        "", "/pki", "pki/", "a//b", "..", "a/../b", "pki?x=1", "pki#", "p ki",
    ] {
        assert!(check_path("mount", bad).is_err(), "{bad:?}");
    }
    assert!(is_header_safe("hvs.CAESIJ"));
    assert!(!is_header_safe("tok\nen"));
    assert!(!is_header_safe(""));
}

/// One scripted answer of [`scripted`].
enum Answer {
    /// This status and body.
    Reply(u16, String),
    /// Write `contents` to `path`, then reply.
    WriteThenReply(std::path::PathBuf, &'static str, u16, String),
    /// Hold the connection open without answering.
    Hold,
}

/// A loopback server that answers each connection with the next scripted answer, and keeps
/// the head of every request it read.
async fn scripted(answers: Vec<Answer>) -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 65536];
            let mut read = 0;
            // Read the head and a Content-Length body.
            loop {
                let n = conn.read(&mut buf[read..]).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                read += n;
                let text = String::from_utf8_lossy(&buf[..read]);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if read >= end + 4 + len {
                        seen.lock().push(text[..end].to_owned());
                        break;
                    }
                }
            }
            let (status, body) = match answers.next() {
                Some(Answer::Reply(status, body)) => (status, body),
                Some(Answer::WriteThenReply(path, contents, status, body)) => {
                    std::fs::write(path, contents).unwrap();
                    (status, body)
                }
                Some(Answer::Hold) | None => {
                    held.push(conn);
                    continue;
                }
            };
            let reply = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    });
    (addr, heads)
}

fn config(addr: SocketAddr, dir: &std::path::Path) -> VaultConfig {
    let token = dir.join("token");
    std::fs::write(&token, "s.test-token\n").unwrap();
    VaultConfig {
        addr: Url::parse(&format!("http://{addr}")).unwrap(),
        namespace: Some("team-a".into()),
        ca_cert: None,
        pki_mount: "pki".into(),
        role: "sds".into(),
        issuer: None,
        sign_verbatim: false,
        trust_bundle: None,
        auth: VaultAuth::Token(TokenSource::File(token)),
        request_timeout: Duration::from_millis(500),
    }
}

fn request() -> SignRequest {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap();
    SignRequest {
        identity: SpiffeId::for_service_account(
            "cluster.local".parse::<TrustDomain>().unwrap(),
            "a",
            "b",
        )
        .unwrap(),
        csr_der: csr.der().to_vec(),
        ttl: Duration::from_secs(3600),
        key_type: KeyType::EcdsaP256,
    }
}

/// A lookup-self answer: a token with lease 0 that never expires.
fn lookup_ok() -> Answer {
    Answer::Reply(
        200,
        json!({
            "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false,
            "data": {
                "accessor": "a", "creation_time": 0, "creation_ttl": 0, "display_name": "t",
                "entity_id": "", "expire_time": null, "explicit_max_ttl": 0, "id": "s.test-token",
                "issue_time": null, "meta": null, "num_uses": 0, "orphan": true, "path": "auth/token/create",
                "policies": ["root"], "renewable": false, "ttl": 0
            },
            "warnings": null, "wrap_info": null, "auth": null
        })
        .to_string(),
    )
}

fn status(code: u16, message: &str) -> Answer {
    Answer::Reply(code, json!({"errors": [message]}).to_string())
}

#[tokio::test]
async fn each_http_outcome_of_a_sign_is_sorted_into_its_kind() {
    let cases: Vec<(Vec<Answer>, &str, bool, &str)> = vec![
        (
            vec![status(429, "rate limit quota exceeded")],
            "throttled",
            true,
            "429",
        ),
        (
            vec![status(503, "Vault is sealed")],
            "unavailable",
            true,
            "unseal",
        ),
        (
            vec![status(500, "internal error")],
            "unavailable",
            true,
            "500",
        ),
        (vec![status(412, "standby")], "unavailable", true, "412"),
        (
            vec![status(400, "unknown role: sds")],
            "misconfigured",
            false,
            "--vault-role",
        ),
        (
            vec![status(
                400,
                "URI Subject Alternative Names were provided via CSR which are not valid for this role",
            )],
            "denied",
            false,
            "allowed_uri_sans",
        ),
        (
            vec![status(404, "no handler for route")],
            "misconfigured",
            false,
            "--vault-pki-mount",
        ),
        // A 403, the token file unchanged: no fresh token, so the 403 stands.
        (
            vec![status(403, "permission denied")],
            "denied",
            false,
            "pki/sign/sds",
        ),
        (vec![Answer::Hold], "timeout", true, "timed out"),
        (
            vec![Answer::Reply(200, "{not json".into())],
            "bad_response",
            false,
            "not JSON",
        ),
    ];
    for (answers, kind, retryable, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut script = vec![lookup_ok()];
        script.extend(answers);
        let (addr, _) = scripted(script).await;
        let ca = VaultCa::new(config(addr, dir.path())).unwrap();
        let err = ca.sign(&request()).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(err.is_retryable(), retryable, "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    }
}

#[tokio::test]
async fn a_refused_vault_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = VaultCa::new(config(port, dir.path())).unwrap();
    let err = ca.sign(&request()).await.unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(err.to_string().contains("cannot reach vault"), "{err}");
    let err = ca.trust_bundle().await.unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
}

#[tokio::test]
async fn a_403_is_retried_once_with_a_fresh_token_then_stands() {
    let p = pki();
    let ok = json!({"data": {"certificate": p.leaf_pem, "ca_chain": [p.int_pem, p.root_pem]}});
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // The token is rotated on disk while Vault refuses the old one: the sign is repeated
    // once, with the new token.
    let (addr, heads) = scripted(vec![
        lookup_ok(),
        Answer::WriteThenReply(
            token_file.clone(),
            "s.rotated\n",
            403,
            json!({"errors": ["permission denied"]}).to_string(),
        ),
        lookup_ok(),
        Answer::Reply(200, ok.to_string()),
    ])
    .await;
    let ca = VaultCa::new(config(addr, dir.path())).unwrap();
    let chain = ca.sign(&request()).await.unwrap();
    assert_eq!(chain.intermediates.len(), 1);
    let heads = heads.lock().clone();
    assert_eq!(heads.len(), 4, "{heads:#?}");
    let token_of = |h: &str| {
        h.lines()
            .find_map(|l| l.strip_prefix("x-vault-token: "))
            .map(str::to_owned)
    };
    assert!(
        heads[1].starts_with("POST /v1/pki/sign/sds "),
        "{}",
        heads[1]
    );
    assert_eq!(token_of(&heads[1]).as_deref(), Some("s.test-token"));
    assert!(
        heads[3].starts_with("POST /v1/pki/sign/sds "),
        "{}",
        heads[3]
    );
    assert_eq!(token_of(&heads[3]).as_deref(), Some("s.rotated"));
    assert!(
        heads[3].contains("x-vault-namespace: team-a"),
        "{}",
        heads[3]
    );

    // Two 403s in a row with no new token: one sign call to Vault, then the error.
    let (addr, heads) = scripted(vec![lookup_ok(), status(403, "permission denied")]).await;
    let ca = VaultCa::new(config(addr, dir.path())).unwrap();
    let err = ca.sign(&request()).await.unwrap_err();
    assert_eq!(err.kind(), "denied");
    assert_eq!(heads.lock().len(), 2);
}

#[tokio::test]
async fn pinned_bundles_need_no_vault_and_config_is_checked() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let root = decode_certificates(p.root_pem.as_bytes()).unwrap();
    let cfg = VaultConfig {
        trust_bundle: Some(TrustBundle::new(root.clone()).unwrap()),
        ..config("127.0.0.1:1".parse().unwrap(), dir.path())
    };
    let ca = VaultCa::new(cfg.clone()).unwrap();
    assert_eq!(ca.trust_bundle().await.unwrap().roots(), root.as_slice());

    let bad = [
        VaultConfig {
            pki_mount: "../sys".into(),
            ..cfg.clone()
        },
        VaultConfig {
            role: "".into(),
            ..cfg.clone()
        },
        VaultConfig {
            namespace: Some("a\nb".into()),
            ..cfg.clone()
        },
        VaultConfig {
            addr: Url::parse("ftp://vault").unwrap(),
            ..cfg.clone()
        },
        VaultConfig {
            ca_cert: Some(dir.path().join("missing.pem")),
            ..cfg.clone()
        },
        VaultConfig {
            auth: VaultAuth::Token(TokenSource::Literal(Zeroizing::new("a b\n\u{7}".into()))),
            ..cfg.clone()
        },
        VaultConfig {
            auth: VaultAuth::AppRole {
                mount: "approle".into(),
                role_id: " ".into(),
                secret_id_file: "/x".into(),
            },
            ..cfg.clone()
        },
    ];
    for c in bad {
        assert!(VaultCa::new(c.clone()).is_err(), "{c:?} accepted");
    }
    // Secrets never show in Debug.
    let literal = VaultAuth::Token(TokenSource::Literal(Zeroizing::new("s.very-secret".into())));
    assert!(!format!("{literal:?}").contains("very-secret"));
}
