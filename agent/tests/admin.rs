//! The admin endpoint over real HTTP: readiness follows the certificate, `/secrets` shows what
//! is served, `POST /rotate` renews, `/metrics` exposes the counters, and no key leaks.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use sds_backends::CaError;
use sds_backends::testing::ScriptedCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A minimal HTTP/1.1 exchange: (status, content type, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

async fn start(ca: Arc<ScriptedCa>) -> (RunningAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = RunArgs {
        socket: Some(dir.path().join("s").to_string_lossy().into_owned()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let mut policy = Policy::from_config(&config);
    policy.backoff_initial = Duration::from_millis(20);
    (RunningAgent::start(&config, policy, ca).await.unwrap(), dir)
}

async fn until(addr: SocketAddr, path: &str, want: u16) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let (status, _, body) = http(addr, "GET", path).await;
            if status == want {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("admin endpoint never reached the expected status")
}

#[tokio::test]
async fn readiness_follows_the_certificate() {
    let ca = ScriptedCa::new();
    ca.set_outage(Some(CaError::Unavailable("ca is down".into())));
    let (agent, _dir) = start(ca.clone()).await;
    let addr = agent.admin_addr();
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200);
    let body = until(addr, "/readyz", 503).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], false);
    // Wait until a failure has been recorded, then check it is reported.
    tokio::time::timeout(WAIT, async {
        while agent.manager().health().consecutive_failures == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let (_, _, body) = http(addr, "GET", "/readyz").await;
    assert!(body.contains("ca is down"), "{body}");
    ca.set_outage(None);
    until(addr, "/readyz", 200).await;
    agent.shutdown().await;
}

#[tokio::test]
async fn secrets_rotate_and_metrics() {
    let (agent, _dir) = start(ScriptedCa::new()).await;
    let addr = agent.admin_addr();
    until(addr, "/readyz", 200).await;

    let (_, ctype, body) = http(addr, "GET", "/secrets").await;
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let default = list.iter().find(|s| s["name"] == "default").unwrap();
    assert_eq!(
        default["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    for key in ["serial", "not_before", "not_after", "next_renewal"] {
        assert!(
            default[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key} missing: {default}"
        );
    }
    assert!(list.iter().any(|s| s["name"] == "ROOTCA"));
    assert!(!body.contains("PRIVATE KEY"));
    let serial = default["serial"].as_str().unwrap().to_owned();

    let (status, _, _) = http(addr, "POST", "/rotate").await;
    assert_eq!(status, 202);
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, _, body) = http(addr, "GET", "/secrets").await;
            if !body.contains(&serial) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("POST /rotate did not renew");

    let (status, ctype, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(
        body.contains("sds_agent_renewals_total{result=\"success\"} 2"),
        "{body}"
    );
    assert!(body.contains("sds_agent_certificate_expiry_timestamp_seconds"));
    assert!(body.trim_end().ends_with("# EOF"));
    assert_eq!(http(addr, "GET", "/nope").await.0, 404);
    agent.shutdown().await;
}
