//! The Vault backend against a real Vault API: an OpenBao dev server (or the external Vault
//! of `SDS_TEST_VAULT_ADDR`, see `integration/compose/`), set up as docs/backends/vault.md
//! tells an operator to.
//!
//! - With each auth method (token, AppRole, Kubernetes), two agents get their certificates
//!   from OpenBao's root and two real Envoys do mTLS through at least two rotations with
//!   not one failed request.
//! - Faults: a sealed Vault, a revoked token, a role that forbids the URI, a TTL above the
//!   role's `max_ttl`.
//!
//! Without `bao` (or Envoy, for the mTLS tests) these tests print a line and pass, unless
//! `SDS_AGENT_REQUIRE_BAO=1` / `SDS_AGENT_REQUIRE_ENVOY=1` (set by `scripts/test.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::mesh::{
    AgentArgs, Mesh, MeshCa, NAMESPACE, TRUST_DOMAIN, check_rotation_under_traffic, rotation_paths,
    spiffe_id,
};
use sds_integration::pki::serial_of_pem;
use sds_integration::process::{ChildGuard, agent_bin, envoy_bin};
use sds_integration::vault::{TokenReviewServer, Vault};
use sds_integration::{free_port, http, test_dir, wait_until};
use serde_json::Value;

const MOUNT: &str = "pki";
const ROLE: &str = "sds";
const POLICY: &str = "sds-agent";
/// With `--cert-ttl 20s` a certificate is renewed about every 10 s: 26 s of traffic sees
/// the first certificate and at least two rotations.
const TRAFFIC: Duration = Duration::from_secs(26);

/// OpenBao with a PKI root, the role (`max_ttl`) and the agent's policy; the root's PEM.
async fn vault_with_pki(dir: &Path, max_ttl: &str) -> Option<(Vault, String)> {
    let vault = Vault::start(dir).await.unwrap()?;
    let root = vault
        .pki_with_root(MOUNT, "sds-agent test root")
        .await
        .unwrap();
    vault
        .role(MOUNT, ROLE, &format!("spiffe://{TRUST_DOMAIN}/*"), max_ttl)
        .await
        .unwrap();
    vault.sign_policy(POLICY, MOUNT, ROLE).await.unwrap();
    Some((vault, root))
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

fn base_args(vault: &Vault) -> Vec<OsString> {
    role_args(vault, ROLE)
}

fn role_args(vault: &Vault, role: &str) -> Vec<OsString> {
    args(&[
        "--ca",
        "vault",
        "--vault-addr",
        vault.addr(),
        "--vault-role",
        role,
    ])
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn mesh_rotation(dir: &Path, root: &str, agent_args: AgentArgs) -> Mesh {
    let envoy = envoy_bin().unwrap().expect("checked by the caller");
    let ca = MeshCa {
        agent_env: Vec::new(),
        agent_args,
        roots: vec![serial_of_pem(root).unwrap()],
    };
    let mesh = Mesh::start(&envoy, dir, "20s", &rotation_paths(), &ca)
        .await
        .unwrap();
    match check_rotation_under_traffic(&mesh, TRAFFIC, 3).await {
        Ok(summary) => eprintln!("vault rotation: {summary}"),
        Err(report) => panic!("{report}"),
    }
    mesh
}

fn log_of(agent: &Agent) -> String {
    std::fs::read_to_string(agent.process().log_path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_mtls_and_rotation_through_openbao() {
    if envoy_bin().unwrap().is_none() {
        return;
    }
    let dir = test_dir().unwrap();
    let Some((vault, root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    let base = base_args(&vault);
    let agent_args = Box::new(move |_: &str| {
        let mut a = base.clone();
        a.extend([
            OsString::from("--vault-token-file"),
            token_file.clone().into(),
        ]);
        a
    });
    let mesh = mesh_rotation(dir.path(), &root, agent_args).await;
    // The certificates came from OpenBao: their issuer is its root.
    let log = log_of(&mesh.frontend);
    assert!(log.contains("vault CA configured"), "{log}");
    assert!(!log.contains(&token), "the token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_auth_mtls_rotation_and_token_renewal() {
    if envoy_bin().unwrap().is_none() {
        return;
    }
    let dir = test_dir().unwrap();
    let Some((vault, root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    // Short tokens: renewed at two thirds of 6 s, and replaced by a new login once the
    // 15 s maximum caps them, all during the traffic.
    let (role_id, secret_id) = vault
        .approle("sds-agent", POLICY, "6s", "15s")
        .await
        .unwrap();
    let secret_file = write(dir.path(), "secret-id", &secret_id);
    let base = base_args(&vault);
    let agent_args = Box::new(move |_: &str| {
        let mut a = base.clone();
        a.extend(args(&[
            "--vault-auth",
            "approle",
            "--vault-role-id",
            &role_id,
        ]));
        a.extend([
            OsString::from("--vault-secret-id-file"),
            secret_file.clone().into(),
        ]);
        a
    });
    let mesh = mesh_rotation(dir.path(), &root, agent_args).await;
    for agent in [&mesh.frontend, &mesh.backend] {
        let log = log_of(agent);
        let logins = log.matches("logged in to vault").count();
        let renewals = log.matches("vault token renewed").count();
        eprintln!(
            "{}: {logins} logins, {renewals} renewals",
            agent.process().name()
        );
        assert!(renewals >= 1, "no token renewal:\n{log}");
        assert!(logins >= 2, "no fresh login after the max TTL:\n{log}");
        assert!(!log.contains(&secret_id), "the secret ID reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_auth_mtls_and_rotation() {
    if envoy_bin().unwrap().is_none() {
        return;
    }
    let dir = test_dir().unwrap();
    let Some((vault, root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let reviewer = TokenReviewServer::start().await.unwrap();
    vault
        .kubernetes(
            &reviewer,
            "sds-agent",
            NAMESPACE,
            &["frontend", "backend"],
            POLICY,
            "8s",
        )
        .await
        .unwrap();
    let mut jwts = Vec::new();
    for sa in ["frontend", "backend"] {
        let jwt = reviewer.mint(NAMESPACE, sa).await;
        jwts.push((sa, write(dir.path(), &format!("{sa}.jwt"), &jwt)));
    }
    let base = base_args(&vault);
    let agent_args = Box::new(move |sa: &str| {
        let jwt_file = jwts
            .iter()
            .find(|(s, _)| *s == sa)
            .map(|(_, p)| p.clone())
            .unwrap();
        let mut a = base.clone();
        a.extend(args(&[
            "--vault-auth",
            "kubernetes",
            "--vault-auth-role",
            "sds-agent",
        ]));
        a.extend([OsString::from("--vault-jwt-file"), jwt_file.into()]);
        a
    });
    let _mesh = mesh_rotation(dir.path(), &root, agent_args).await;
    // Each agent logged in at least twice (8 s tokens over ~30 s), each login one review.
    assert!(
        reviewer.reviews() >= 4,
        "only {} token reviews",
        reviewer.reviews()
    );
}

/// A single agent on OpenBao, started without waiting for readiness.
struct Solo {
    proc: ChildGuard,
    admin: SocketAddr,
}

impl Solo {
    fn start(dir: &Path, cert_ttl: &str, ca_args: &[OsString]) -> Self {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let mut cmd = Command::new(agent_bin().unwrap());
        cmd.arg("run")
            .arg("--socket")
            .arg(dir.join("solo.sock"))
            .args(["--admin-addr", &admin.to_string()])
            .args(["--trust-domain", TRUST_DOMAIN, "--service-account", "solo"])
            .args(["--cert-ttl", cert_ttl])
            .args(["--log-level", "info,sds_backends=debug"])
            .args(ca_args)
            .env("NO_COLOR", "1");
        let proc = ChildGuard::spawn("agent solo", cmd, &dir.join("agent-solo.log")).unwrap();
        Self { proc, admin }
    }

    async fn secrets(&self) -> Value {
        let body = http::get(self.admin, "/secrets").await.unwrap().body;
        serde_json::from_str(&body).unwrap()
    }

    async fn serial(&self) -> Option<String> {
        let secrets = self.secrets().await;
        secrets
            .as_array()?
            .iter()
            .find(|s| s["name"] == "default")
            .and_then(|s| s["serial"].as_str().map(str::to_owned))
    }

    async fn ready(&self) -> bool {
        http::get(self.admin, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    }

    async fn metrics(&self) -> String {
        http::get(self.admin, "/metrics").await.unwrap().body
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log_path()).unwrap()
    }

    async fn wait_serial(&self, limit: Duration) -> String {
        let admin = self.admin;
        wait_until("a certificate from vault", limit, || async move {
            http::get(admin, "/readyz")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        self.serial().await.unwrap()
    }

    /// Waits until it serves a certificate other than `first`.
    async fn wait_replaced(&self, first: &str, what: &str, limit: Duration) {
        wait_until(what, limit, || async move {
            self.serial().await.is_some_and(|serial| serial != first)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_vault_keeps_the_last_certificate_and_the_agent_recovers_alone() {
    let dir = test_dir().unwrap();
    let Some((vault, _root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    let mut ca_args = base_args(&vault);
    ca_args.extend([OsString::from("--vault-token-file"), token_file.into()]);
    let agent = Solo::start(dir.path(), "20s", &ca_args);
    let first = agent.wait_serial(Duration::from_secs(20)).await;

    vault.seal().await.unwrap();
    // Past the renewal point (~10 s): renewals fail, the certificate stays. Waited for by the
    // error count, well inside the 20 s lifetime; the log line follows the count.
    let counted = wait_until("a CA error counted", Duration::from_secs(15), || async {
        metric(&agent.metrics().await, "sds_agent_ca_errors_total") >= 1.0
    })
    .await;
    assert!(
        counted.is_ok(),
        "no CA error counted:\n{}",
        agent.metrics().await
    );
    let logged = wait_until("the failure logged", Duration::from_secs(5), || async {
        agent.log().contains("retryable=true")
    })
    .await;
    assert!(logged.is_ok(), "{}", agent.log());
    assert_eq!(agent.serial().await.as_deref(), Some(first.as_str()));
    assert!(
        agent.ready().await,
        "not ready while the certificate is valid"
    );
    let log = agent.log();
    assert!(
        log.contains("sealed"),
        "the log does not say vault is sealed:\n{log}"
    );
    assert!(log.contains("retryable=true"), "{log}");

    vault.unseal().await.unwrap();
    agent
        .wait_replaced(
            &first,
            "a new certificate after unseal",
            Duration::from_secs(10),
        )
        .await;
    assert!(agent.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_leads_to_a_fresh_login() {
    let dir = test_dir().unwrap();
    let Some((vault, _root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let (role_id, secret_id) = vault
        .approle("sds-agent", POLICY, "1h", "2h")
        .await
        .unwrap();
    let secret_file = write(dir.path(), "secret-id", &secret_id);
    let mut ca_args = base_args(&vault);
    ca_args.extend(args(&[
        "--vault-auth",
        "approle",
        "--vault-role-id",
        &role_id,
    ]));
    ca_args.extend([OsString::from("--vault-secret-id-file"), secret_file.into()]);
    let agent = Solo::start(dir.path(), "1h", &ca_args);
    let first = agent.wait_serial(Duration::from_secs(20)).await;

    // Revoke every token AppRole has handed out: the agent's is among them.
    vault
        .root("PUT", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await
        .unwrap();
    let r = http::request(agent.admin, "POST", "/rotate").await.unwrap();
    assert!(r.status < 300, "POST /rotate: {r:?}");
    agent
        .wait_replaced(
            &first,
            "a certificate after the revocation",
            Duration::from_secs(10),
        )
        .await;
    let log = agent.log();
    assert!(log.contains("vault refused the token (403)"), "{log}");
    assert_eq!(log.matches("logged in to vault").count(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_forbids_the_uri_gives_a_clear_error_and_no_certificate() {
    let dir = test_dir().unwrap();
    let Some((vault, _root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    vault
        .role(MOUNT, "elsewhere", "spiffe://other.example/*", "1h")
        .await
        .unwrap();
    vault.sign_policy(POLICY, MOUNT, "elsewhere").await.unwrap();
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    let mut ca_args = role_args(&vault, "elsewhere");
    ca_args.extend([OsString::from("--vault-token-file"), token_file.into()]);
    let agent = Solo::start(dir.path(), "1h", &ca_args);
    let proc_log = agent.proc.log_path().to_owned();
    wait_until("the refusal in the log", Duration::from_secs(15), || {
        let proc_log = proc_log.clone();
        async move {
            std::fs::read_to_string(&proc_log).is_ok_and(|l| l.contains("refused to sign"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let log = agent.log();
    assert!(log.contains("role elsewhere on mount pki"), "{log}");
    assert!(log.contains("allowed_uri_sans"), "{log}");
    assert!(log.contains("retryable=false"), "{log}");
    assert!(!agent.ready().await);
    assert_eq!(agent.serial().await, None);
    let metrics = agent.metrics().await;
    assert!(
        metric(&metrics, "sds_agent_ca_errors_total{") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_above_max_ttl_is_capped_and_the_real_expiry_drives_rotation() {
    let dir = test_dir().unwrap();
    // The role allows 20 s; the agent asks for an hour.
    let Some((vault, _root)) = vault_with_pki(dir.path(), "20s").await else {
        return;
    };
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    let mut ca_args = base_args(&vault);
    ca_args.extend([OsString::from("--vault-token-file"), token_file.into()]);
    let agent = Solo::start(dir.path(), "1h", &ca_args);
    let first = agent.wait_serial(Duration::from_secs(20)).await;
    let log = agent.log();
    assert!(log.contains("vault signed with a warning"), "{log}");
    assert!(log.contains("maxTTL"), "{log}");
    // Renewed from the certificate's 20 s, not the hour asked for.
    agent
        .wait_replaced(
            &first,
            "a rotation of the capped certificate",
            Duration::from_secs(20),
        )
        .await;
}

/// `--vault-issuer` (`issuer/<ref>/sign/<role>`) and `--vault-sign-verbatim`
/// (`sign-verbatim/<role>`) each give a certificate that passes the agent's validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_issuer_and_sign_verbatim_paths_sign() {
    let dir = test_dir().unwrap();
    let Some((vault, _root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    for (i, extra) in [
        ["--vault-issuer", "root-1"],
        ["--vault-sign-verbatim", "true"],
    ]
    .iter()
    .enumerate()
    {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).unwrap();
        let mut ca_args = base_args(&vault);
        ca_args.extend([
            OsString::from("--vault-token-file"),
            token_file.clone().into(),
        ]);
        ca_args.extend(args(extra));
        let agent = Solo::start(&sub, "1h", &ca_args);
        agent.wait_serial(Duration::from_secs(20)).await;
    }
}

/// The harness's `Agent` (which waits for `/readyz`) works with a Vault CA: the agent serves
/// `default` with its identity and `ROOTCA`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_helper_starts_a_vault_agent() {
    let dir = test_dir().unwrap();
    let Some((vault, _root)) = vault_with_pki(dir.path(), "1h").await else {
        return;
    };
    let token = vault.token(POLICY, "1h", true).await.unwrap();
    let token_file = write(dir.path(), "vault-token", &token);
    let mut ca_args = base_args(&vault);
    ca_args.extend([OsString::from("--vault-token-file"), token_file.into()]);
    let agent = Agent::start_with(
        &agent_bin().unwrap(),
        dir.path(),
        &AgentConfig {
            trust_domain: TRUST_DOMAIN,
            namespace: NAMESPACE,
            service_account: "helper",
            cert_ttl: "1h",
        },
        &ca_args,
    )
    .await
    .unwrap();
    let secrets = agent.secrets().await.unwrap();
    assert!(
        secrets
            .iter()
            .any(|s| s.name == "default" && s.spiffe_id == spiffe_id("helper"))
    );
    assert!(secrets.iter().any(|s| s.name == "ROOTCA"));
}
