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
    start_with_backoff(ca, Duration::from_millis(20)).await
}

async fn start_with_backoff(
    ca: Arc<ScriptedCa>,
    backoff: Duration,
) -> (RunningAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = RunArgs {
        socket: Some(dir.path().join("s").to_string_lossy().into_owned()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let mut policy = Policy::from_config(&config);
    policy.backoff_initial = backoff;
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

/// The value of the one sample `series` (name and labels, exactly as exposed) in `body`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_renewals_ca_calls_and_latencies_and_show_expiry() {
    let ca = ScriptedCa::new();
    // No retry within the test, so each count below is exact.
    let (agent, _dir) = start_with_backoff(ca.clone(), Duration::from_secs(3600)).await;
    let addr = agent.admin_addr();
    until(addr, "/readyz", 200).await;
    let serial_of = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v[0]["serial"].as_str().unwrap().to_owned()
    };
    let first = serial_of(&http(addr, "GET", "/secrets").await.2);
    assert_eq!(http(addr, "POST", "/rotate").await.0, 202);
    tokio::time::timeout(WAIT, async {
        while serial_of(&http(addr, "GET", "/secrets").await.2) == first {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no rotation");
    // The CA goes down; a forced renewal fails and is counted, the certificate stays.
    ca.set_outage(Some(CaError::Unavailable("ca is down".into())));
    assert_eq!(http(addr, "POST", "/rotate").await.0, 202);
    let failed = "sds_agent_renewals_total{result=\"failure\"}";
    let body = tokio::time::timeout(WAIT, async {
        loop {
            let body = http(addr, "GET", "/metrics").await.2;
            if sample(&body, failed).is_some_and(|n| n >= 1.0) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the failure was never counted");

    let id = "spiffe://cluster.local/ns/default/sa/default";
    let want = [
        ("sds_agent_renewals_total{result=\"success\"}", 2.0),
        (failed, 1.0),
        (
            "sds_agent_ca_requests_total{backend=\"scripted\",operation=\"sign\",result=\"success\"}",
            2.0,
        ),
        (
            "sds_agent_ca_requests_total{backend=\"scripted\",operation=\"sign\",result=\"unavailable\"}",
            1.0,
        ),
        (
            "sds_agent_ca_errors_total{backend=\"scripted\",kind=\"unavailable\",retryable=\"true\"}",
            1.0,
        ),
        (
            "sds_agent_ca_request_duration_seconds_count{backend=\"scripted\",operation=\"sign\"}",
            3.0,
        ),
        (
            "sds_agent_key_generation_duration_seconds_count{key_type=\"ecdsa-p256\"}",
            3.0,
        ),
    ];
    for (series, value) in want {
        assert_eq!(sample(&body, series), Some(value), "{series}\n{body}");
    }
    let bundle_calls = sample(
        &body,
        "sds_agent_ca_requests_total{backend=\"scripted\",operation=\"trust_bundle\",result=\"success\"}",
    );
    assert!(bundle_calls >= Some(1.0), "{body}");
    let build = format!(
        "sds_agent_build_info{{version=\"{}\",backends=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        sds_agent::BACKENDS.join(",")
    );
    assert_eq!(sample(&body, &build), Some(1.0), "{build}\n{body}");

    // Expiry: the timestamp is the served notAfter, the seconds left count down from it.
    let secrets: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/secrets").await.2).unwrap();
    let not_after = humantime::parse_rfc3339(secrets[0]["not_after"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let labels = format!("{{resource=\"default\",identity=\"{id}\"}}");
    assert_eq!(
        sample(
            &body,
            &format!("sds_agent_certificate_expiry_timestamp_seconds{labels}")
        ),
        Some(not_after)
    );
    let not_before = humantime::parse_rfc3339(secrets[0]["not_before"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(
        sample(
            &body,
            &format!("sds_agent_certificate_lifetime_seconds{labels}")
        ),
        Some(not_after - not_before)
    );
    let left = sample(
        &body,
        &format!("sds_agent_certificate_expiry_seconds{labels}"),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (left - (not_after - now)).abs() < 5.0,
        "{left} vs {}",
        not_after - now
    );
    let root = "{resource=\"ROOTCA\",identity=\"spiffe://cluster.local\"}";
    assert!(
        sample(
            &body,
            &format!("sds_agent_certificate_expiry_seconds{root}")
        ) > Some(left),
        "{body}"
    );
    let next = sample(
        &body,
        &format!("sds_agent_next_renewal_timestamp_seconds{{identity=\"{id}\"}}"),
    )
    .unwrap();
    // The retry after the failure, within the 5 min backoff cap; long before expiry.
    assert!(
        next > now && next <= now + 301.0 && next < not_after,
        "the retry is the next renewal: {next} (now {now})"
    );
    agent.shutdown().await;
}
