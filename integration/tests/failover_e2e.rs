//! CA failover end to end: two agents with `--ca vault,embedded` (OpenBao primary, the
//! embedded CA with one shared root as fallback) serve two real Envoys doing mTLS under
//! continuous traffic, while OpenBao is killed for longer than half the certificate lifetime
//! and then started again on the same address with the same root (a dev server keeps
//! everything in memory, so the root's key, the role, the policy and the token are restored
//! the way an operator restores a CA).
//!
//! Asserted: not one failed request; no expired certificate ever held by an Envoy or served
//! by an agent; the fallback signed during the outage (metric and the certificate's issuer);
//! OpenBao signed again after it came back; the Envoys trusted the union of both roots
//! throughout.
//!
//! Without `bao` or Envoy the test prints a line and passes, unless `SDS_AGENT_REQUIRE_BAO=1`
//! / `SDS_AGENT_REQUIRE_ENVOY=1`. An external Vault (`SDS_TEST_VAULT_ADDR`) cannot be stopped,
//! so the test needs its own OpenBao.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sds_integration::agent::Agent;
use sds_integration::mesh::{
    Mesh, MeshCa, TRUST_DOMAIN, check_rotation_under_traffic, rotation_paths,
};
use sds_integration::pki::{SharedCa, serial_of_pem};
use sds_integration::process::envoy_bin;
use sds_integration::vault::Vault;
use sds_integration::{http, test_dir, wait_until};
use serde_json::Value;
use tokio::time::Instant;

const MOUNT: &str = "pki";
const ROLE: &str = "sds";
const POLICY: &str = "sds-agent";
const TOKEN_ID: &str = "sds-agent-failover-token";
/// Certificate lifetime: renewed every ~15 s; the failover threshold is a quarter, ~7.5 s.
const TTL: &str = "30s";
const LIFETIME: Duration = Duration::from_secs(30);
/// Traffic, with OpenBao down from 2 s in until the fallback has signed on both sides and
/// more than half the lifetime has passed, then back for the primary's next renewals.
const TRAFFIC: Duration = Duration::from_secs(80);
const OUTAGE_STARTS: Duration = Duration::from_secs(2);
/// How long OpenBao stays down after the fallback signed: probes back off from 1 s, so a
/// few of them fail meanwhile.
const PROBING: Duration = Duration::from_secs(6);
/// How long each step of the outage may take before the test fails.
const STEP_LIMIT: Duration = Duration::from_secs(40);

/// Sets up the PKI mount with `root` (cert, key), the role, the policy and the token.
async fn provision(vault: &Vault, root: Option<(&str, &str)>) -> (String, String) {
    let (cert, key) = match root {
        None => vault
            .pki_with_exported_root(MOUNT, "sds-agent failover test root")
            .await
            .unwrap(),
        Some((cert, key)) => {
            vault.pki_import_root(MOUNT, cert, key).await.unwrap();
            (cert.to_owned(), key.to_owned())
        }
    };
    vault
        .role(MOUNT, ROLE, &format!("spiffe://{TRUST_DOMAIN}/*"), "1h")
        .await
        .unwrap();
    vault.sign_policy(POLICY, MOUNT, ROLE).await.unwrap();
    vault.token_with_id(TOKEN_ID, POLICY, "1h").await.unwrap();
    (cert, key)
}

/// The value of one series of an agent's `/metrics`, 0 if absent.
async fn metric(agent: &Agent, series: &str) -> f64 {
    agent
        .metric_lines(series)
        .await
        .unwrap_or_default()
        .iter()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn signed_by(agent: &Agent, backend: &str) -> f64 {
    metric(
        agent,
        &format!("sds_agent_ca_certificates_signed_total{{backend=\"{backend}\"}}"),
    )
    .await
}

/// The backend the agent's `/secrets` names for its `default` certificate.
async fn serving_backend(agent: &Agent) -> Option<String> {
    let json: Value = serde_json::from_str(&agent.secrets_json().await.ok()?).ok()?;
    let entries = json.as_array().or_else(|| json["secrets"].as_array())?;
    entries
        .iter()
        .find(|e| e["name"] == "default")
        .and_then(|e| e["backend"].as_str().map(str::to_owned))
}

/// What the outage driver saw.
#[derive(Debug, Default)]
struct Outage {
    /// How long OpenBao was down.
    down_for: Duration,
    /// When each agent's fallback had signed, from the outage's start.
    fallback_after: Vec<Duration>,
    /// When OpenBao signed again on both, from its return.
    primary_again_after: Option<Duration>,
    problems: Vec<String>,
}

/// Kills OpenBao 2 s into the traffic, waits until the fallback has signed on both agents
/// and more than half the lifetime has passed, starts OpenBao again with the same root,
/// then waits until both agents have a certificate from it again.
async fn outage(vault: &mut Vault, dir: &Path, mesh: &Mesh, root: (&str, &str)) -> Outage {
    let mut seen = Outage::default();
    tokio::time::sleep(OUTAGE_STARTS).await;
    let before = [
        signed_by(&mesh.frontend, "vault").await,
        signed_by(&mesh.backend, "vault").await,
    ];
    vault.stop().unwrap();
    let stopped = Instant::now();
    for agent in [&mesh.frontend, &mesh.backend] {
        let r = wait_until("the fallback to sign", STEP_LIMIT, || async {
            signed_by(agent, "embedded").await >= 1.0
        })
        .await;
        match r {
            Ok(()) => seen.fallback_after.push(stopped.elapsed()),
            Err(e) => seen.problems.push(format!("{}: {e}", agent.spiffe_id())),
        }
        let on_fallback = serving_backend(agent).await;
        if on_fallback.as_deref() != Some("embedded") {
            seen.problems.push(format!(
                "{}: /secrets names {on_fallback:?} during the outage",
                agent.spiffe_id()
            ));
        }
    }
    // Longer than half the lifetime (without the fallback, certificates would expire), and
    // long enough after the fallback signed for probes of OpenBao to fail.
    let half = LIFETIME / 2 + Duration::from_secs(3);
    let probing = stopped.elapsed() + PROBING;
    if let Some(rest) = half.max(probing).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // Neither agent signed with OpenBao while it was down.
    for (agent, was) in [&mesh.frontend, &mesh.backend].into_iter().zip(before) {
        let now = signed_by(agent, "vault").await;
        if now != was {
            seen.problems
                .push(format!("{}: vault signed while down", agent.spiffe_id()));
        }
    }
    vault.restart(dir, "openbao-restarted.log").await.unwrap();
    seen.down_for = stopped.elapsed();
    provision(vault, Some(root)).await;
    let back = Instant::now();
    let after: Vec<f64> = vec![
        signed_by(&mesh.frontend, "vault").await,
        signed_by(&mesh.backend, "vault").await,
    ];
    let mut all = true;
    for (agent, was) in [&mesh.frontend, &mesh.backend].into_iter().zip(after) {
        let r = wait_until("OpenBao to sign again", STEP_LIMIT, || async {
            signed_by(agent, "vault").await > was
                && serving_backend(agent).await.as_deref() == Some("vault")
        })
        .await;
        if let Err(e) = r {
            seen.problems.push(format!("{}: {e}", agent.spiffe_id()));
            all = false;
        }
    }
    if all {
        seen.primary_again_after = Some(back.elapsed());
    }
    seen
}

/// Looks at both Envoys' `/certs` and both agents' `/secrets` every 250 ms until `until`:
/// every certificate held or served must be inside its validity. The problems, and how many
/// looks.
async fn watch_expiry(mesh: &Mesh, until: Instant) -> (Vec<String>, u32) {
    let mut problems = Vec::new();
    let mut looks = 0;
    while Instant::now() < until {
        looks += 1;
        let now = SystemTime::now();
        for envoy in [&mesh.client, &mesh.server] {
            let Ok(r) = http::get(envoy.admin(), "/certs").await else {
                problems.push(format!("{}: /certs did not answer", envoy.process().name()));
                continue;
            };
            let json: Value = serde_json::from_str(&r.body).unwrap_or_default();
            for ctx in json["certificates"].as_array().into_iter().flatten() {
                for cert in ctx["cert_chain"].as_array().into_iter().flatten() {
                    let Some(exp) = cert["expiration_time"].as_str() else {
                        continue;
                    };
                    match humantime::parse_rfc3339_weak(exp.trim_end_matches('Z')) {
                        Ok(t) if t > now => {}
                        Ok(_) => problems.push(format!(
                            "{} holds certificate {} that expired at {exp}",
                            envoy.process().name(),
                            cert["serial_number"]
                        )),
                        Err(e) => problems.push(format!("expiration_time {exp:?}: {e}")),
                    }
                }
            }
        }
        for agent in [&mesh.frontend, &mesh.backend] {
            let Ok(text) = agent.secrets_json().await else {
                continue;
            };
            let json: Value = serde_json::from_str(&text).unwrap_or_default();
            let entries = json
                .as_array()
                .or_else(|| json["secrets"].as_array())
                .cloned()
                .unwrap_or_default();
            for e in entries.iter().filter(|e| e["name"] == "default") {
                let Some(not_after) = e["not_after"].as_str() else {
                    continue;
                };
                match humantime::parse_rfc3339(not_after) {
                    Ok(t) if t > now => {}
                    Ok(_) => problems.push(format!(
                        "{} serves a certificate that expired at {not_after}",
                        agent.spiffe_id()
                    )),
                    Err(e) => problems.push(format!("not_after {not_after:?}: {e}")),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (problems, looks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_down_for_half_the_lifetime_is_covered_by_the_embedded_fallback() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let Some(mut vault) = Vault::start(dir.path()).await.unwrap() else {
        return;
    };
    if !vault.is_own_process() {
        eprintln!("skipped: an external Vault (SDS_TEST_VAULT_ADDR) cannot be stopped");
        return;
    }
    let (root_cert, root_key) = provision(&vault, None).await;
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, TOKEN_ID).unwrap();
    let embedded_dir = dir.path().join("embedded");
    std::fs::create_dir_all(&embedded_dir).unwrap();
    let shared = SharedCa::write(&embedded_dir).unwrap();
    let addr = vault.addr().to_owned();
    let args = {
        let shared = shared.clone();
        move |_: &str| -> Vec<OsString> {
            vec![
                "--ca".into(),
                "vault,embedded".into(),
                "--vault-addr".into(),
                addr.clone().into(),
                "--vault-role".into(),
                ROLE.into(),
                "--vault-token-file".into(),
                token_file.clone().into(),
                "--embedded-ca-cert".into(),
                shared.cert.clone().into(),
                "--embedded-ca-key".into(),
                shared.key.clone().into(),
            ]
        }
    };
    let ca = MeshCa {
        agent_args: Box::new(args),
        // The union, primary first: what every Envoy must trust throughout.
        roots: vec![serial_of_pem(&root_cert).unwrap(), shared.serial.clone()],
        agent_env: Vec::new(),
    };
    let mesh = Mesh::start(&envoy, dir.path(), TTL, &rotation_paths(), &ca)
        .await
        .unwrap();
    for agent in [&mesh.frontend, &mesh.backend] {
        assert_eq!(serving_backend(agent).await.as_deref(), Some("vault"));
        let log = std::fs::read_to_string(agent.process().log_path()).unwrap();
        assert!(log.contains("trusted root"), "the union was not logged");
    }

    let until = Instant::now() + TRAFFIC;
    let (traffic, outage, (expired, looks)) = tokio::join!(
        check_rotation_under_traffic(&mesh, TRAFFIC, 3),
        outage(&mut vault, dir.path(), &mesh, (&root_cert, &root_key)),
        watch_expiry(&mesh, until),
    );
    let summary = match traffic {
        Ok(summary) => summary,
        Err(report) => panic!("{report}\noutage: {outage:?}"),
    };
    eprintln!("failover under traffic: {summary}; outage: {outage:?}; {looks} expiry checks");
    assert!(outage.problems.is_empty(), "{outage:?}");
    assert!(expired.is_empty(), "{expired:#?}");
    assert!(looks > 100, "only {looks} expiry checks");
    assert!(outage.down_for > LIFETIME / 2, "{outage:?}");
    assert!(outage.primary_again_after.is_some(), "{outage:?}");
    for agent in [&mesh.frontend, &mesh.backend] {
        assert!(signed_by(agent, "embedded").await >= 1.0);
        // Back on the primary: the fallback gauge is zero and the primary is active.
        assert_eq!(metric(agent, "sds_agent_ca_fallback_seconds").await, 0.0);
        assert_eq!(
            metric(agent, "sds_agent_ca_active_backend{backend=\"vault\"}").await,
            1.0
        );
        assert!(
            metric(
                agent,
                "sds_agent_ca_probe_failures_total{backend=\"vault\"}"
            )
            .await
                >= 1.0
        );
        let log = std::fs::read_to_string(agent.process().log_path()).unwrap();
        assert!(
            log.contains("certificates now come from a fallback CA"),
            "{log}"
        );
        assert!(log.contains("the primary CA signs again"), "{log}");
    }
}
