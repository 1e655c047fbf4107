//! The ACM PCA backend against a real ACM PCA wire protocol: moto's server, with a root CA
//! created, self-issued, imported and checked `ACTIVE` as on AWS (`integration/src/moto.rs`).
//!
//! - Two agents get their certificates from the moto CA and two real Envoys do mTLS, with
//!   the right SPIFFE URI SANs, through forced rotations under traffic, not one request
//!   failing. moto always issues for 365 days, so rotations are forced (`POST /rotate`).
//! - Rotation follows the certificate's real expiry (365 days), not `--cert-ttl`, and that
//!   lifetime is logged as a warning while the certificate is used.
//! - A CA that is not `ACTIVE`, and an ARN moto does not know, give the error that says what
//!   to fix, a counted metric, an unready agent, and (for the first) recovery on its own.
//!
//! Throttling, `RequestInProgressException` and the other error shapes moto never sends are
//! tested through the real SDK against a stub in `backends/src/acm_pca/tests.rs`.
//!
//! Without `moto_server` (or Envoy, for the mTLS test) these tests print a line and pass,
//! unless `SDS_AGENT_REQUIRE_MOTO=1` / `SDS_AGENT_REQUIRE_ENVOY=1` (set by
//! `scripts/test.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::time::{Duration, SystemTime};

use aws_sdk_acmpca::types::CertificateAuthorityStatus;
use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::mesh::{
    Mesh, MeshCa, NAMESPACE, TRUST_DOMAIN, check_forced_rotation_under_traffic, rotation_paths,
};
use sds_integration::moto::{Moto, agent_env};
use sds_integration::pki::serial_of_pem;
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::test_dir;
use serde_json::Value;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn acm_args(arn: &str, endpoint: Option<&str>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--ca".into(),
        "acm-pca".into(),
        "--acm-pca-arn".into(),
        arn.into(),
    ];
    if let Some(e) = endpoint {
        args.extend(["--acm-pca-endpoint".into(), e.into()]);
    }
    args
}

fn config<'a>(service_account: &'a str, cert_ttl: &'static str) -> AgentConfig<'a> {
    AgentConfig {
        trust_domain: TRUST_DOMAIN,
        namespace: NAMESPACE,
        service_account,
        cert_ttl,
    }
}

fn rfc3339(v: &Value) -> SystemTime {
    humantime::parse_rfc3339_weak(v.as_str().unwrap()).unwrap()
}

/// Waits until the agent's log holds `needle`.
async fn log_shows(agent: &Agent, needle: &str) {
    agent
        .wait_for_log(needle, Duration::from_secs(20))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_moto_ca_is_created_issued_imported_and_active() {
    let dir = test_dir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let ca = moto.root_ca("sds-agent moto root").await.unwrap();
    assert_eq!(
        moto.status(&ca.arn).await.unwrap(),
        CertificateAuthorityStatus::Active
    );
    let out = moto
        .client()
        .get_certificate_authority_certificate()
        .certificate_authority_arn(&ca.arn)
        .send()
        .await
        .unwrap();
    assert_eq!(out.certificate(), Some(ca.root_pem.as_str()));
    let der = sds_backends::pem::decode_certificates(ca.root_pem.as_bytes()).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
    assert_eq!(root.subject(), root.issuer(), "self-signed");
    assert!(root.is_ca());
}

#[tokio::test]
async fn envoy_mtls_and_rotation_under_traffic_through_acm_pca() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let pca = moto.root_ca("sds-agent mesh root").await.unwrap();
    // The endpoint reaches the agents through AWS_ENDPOINT_URL_ACM_PCA, the SDK's own
    // variable; the other tests use --acm-pca-endpoint.
    let mut env = agent_env();
    env.push((
        "AWS_ENDPOINT_URL_ACM_PCA".into(),
        moto.endpoint().to_owned(),
    ));
    let arn = pca.arn.clone();
    let ca = MeshCa {
        agent_env: env,
        agent_args: Box::new(move |_| acm_args(&arn, None)),
        roots: vec![serial_of_pem(&pca.root_pem).unwrap()],
    };
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &ca)
        .await
        .unwrap();
    // Rotations every 4 s for 16 s: the first certificate and at least two more.
    match check_forced_rotation_under_traffic(
        &mesh,
        Duration::from_secs(16),
        3,
        Duration::from_secs(4),
    )
    .await
    {
        Ok(summary) => eprintln!("{summary}"),
        Err(report) => panic!("{report}"),
    }
}

#[tokio::test]
async fn renewal_follows_the_real_expiry_and_a_long_lifetime_is_warned_and_used() {
    let dir = test_dir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let pca = moto.root_ca("sds-agent root").await.unwrap();
    let before = SystemTime::now();
    let agent = Agent::start_with_env(
        &agent_bin().unwrap(),
        dir.path(),
        &config("long", "1h"),
        &acm_args(&pca.arn, Some(moto.endpoint())),
        &agent_env(),
    )
    .await
    .unwrap();
    let secrets: Value = serde_json::from_str(&agent.secrets_json().await.unwrap()).unwrap();
    let default = secrets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default")
        .unwrap();
    let not_after = rfc3339(&default["not_after"]);
    let next = rfc3339(&default["next_renewal"]);
    // moto ignored the 1 h asked for and issued for 365 days.
    let lifetime = not_after.duration_since(before).unwrap();
    assert!(lifetime > 364 * DAY && lifetime < 366 * DAY, "{lifetime:?}");
    // Renewal at half the real lifetime less up to 10 % jitter: 164 to 183 days, not 30 min.
    let until_renewal = next.duration_since(before).unwrap();
    assert!(
        until_renewal > 163 * DAY && until_renewal < 183 * DAY,
        "next renewal in {until_renewal:?}"
    );
    // It is served, and the log says why its lifetime differs from --cert-ttl.
    assert!(agent.current_serial().await.unwrap().is_some());
    log_shows(&agent, "living far longer than --cert-ttl").await;
    log_shows(&agent, "acm-pca CA described").await;
}

#[tokio::test]
async fn a_ca_that_is_not_active_is_reported_counted_and_recovered_from() {
    let dir = test_dir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let pca = moto.root_ca("sds-agent root").await.unwrap();
    moto.set_status(&pca.arn, CertificateAuthorityStatus::Disabled)
        .await
        .unwrap();
    let mut agent = Agent::spawn(
        &agent_bin().unwrap(),
        dir.path(),
        &config("disabled", "1h"),
        &acm_args(&pca.arn, Some(moto.endpoint())),
        &agent_env(),
    )
    .unwrap();
    log_shows(&agent, "not ACTIVE").await;
    assert_not_ready(&agent).await;
    let errors = agent
        .metric_total("sds_agent_ca_errors_total{backend=\"acm-pca\",kind=\"misconfigured\"")
        .await
        .unwrap();
    assert!(errors >= 1, "no counted CA error");

    // Re-enabled: the agent recovers on its own, within its retry backoff.
    moto.set_status(&pca.arn, CertificateAuthorityStatus::Active)
        .await
        .unwrap();
    agent.wait_ready(Duration::from_secs(40)).await.unwrap();
    assert!(agent.current_serial().await.unwrap().is_some());
}

#[tokio::test]
async fn an_arn_moto_does_not_know_is_a_clear_misconfiguration() {
    let dir = test_dir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let arn = "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/00000000-0000-0000-0000-000000000000";
    let agent = Agent::spawn(
        &agent_bin().unwrap(),
        dir.path(),
        &config("unknown", "1h"),
        &acm_args(arn, Some(moto.endpoint())),
        &agent_env(),
    )
    .unwrap();
    log_shows(&agent, "check --acm-pca-arn and --aws-region").await;
    assert_not_ready(&agent).await;
    let errors = agent.metric_total("sds_agent_ca_errors_total{backend=\"acm-pca\",kind=\"misconfigured\",retryable=\"false\"}").await.unwrap();
    assert!(errors >= 1, "no counted CA error");
}

async fn assert_not_ready(agent: &Agent) {
    assert!(!agent.is_ready().await, "the agent is ready");
}
