//! One running `sds-agent run`, with the embedded CA or any other, and what its admin
//! endpoint reports.
//!
//! [`Agent::start`] returns only once `GET /readyz` answers `200`, or fails early if the agent
//! exits. The agent logs at `info`, with the SDS module at `debug` so that pushes, ACKs and
//! NACKs appear in the log tail printed when a test fails.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pki::SharedCa;
use crate::process::ChildGuard;
use crate::{Error, Serial, free_port, http};

/// How long an agent may take to become ready.
pub const READY_LIMIT: Duration = Duration::from_secs(20);

/// What an agent serves: SPIFFE `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`.
#[derive(Debug, Clone)]
pub struct AgentConfig<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// The Kubernetes namespace.
    pub namespace: &'a str,
    /// The Kubernetes service account.
    pub service_account: &'a str,
    /// `--cert-ttl`, e.g. `20s`.
    pub cert_ttl: &'a str,
}

/// A ready agent, killed when dropped.
#[derive(Debug)]
pub struct Agent {
    proc: ChildGuard,
    socket: PathBuf,
    admin: SocketAddr,
    spiffe_id: String,
}

/// One entry of the agent's `GET /secrets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    /// The SDS resource name: `default` or `ROOTCA`.
    pub name: String,
    /// The identity (for `ROOTCA`, the trust domain).
    pub spiffe_id: String,
    /// The certificate's serial number.
    pub serial: Serial,
}

impl Agent {
    /// Starts `bin run` in `dir` (socket `<service_account>.sock`, log
    /// `agent-<service_account>.log`) with the embedded CA `ca`, and waits until it is ready.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        config: &AgentConfig<'_>,
        ca: &SharedCa,
    ) -> Result<Self, Error> {
        let args: Vec<OsString> = vec![
            "--embedded-ca-cert".into(),
            ca.cert.clone().into(),
            "--embedded-ca-key".into(),
            ca.key.clone().into(),
        ];
        Self::start_with(bin, dir, config, &args).await
    }

    /// Like [`Agent::start`], with `ca_args` choosing and configuring the CA backend, e.g.
    /// `--ca vault --vault-addr ...`.
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        config: &AgentConfig<'_>,
        ca_args: &[OsString],
    ) -> Result<Self, Error> {
        Self::start_with_env(bin, dir, config, ca_args, &[]).await
    }

    /// Like [`Agent::start_with`], with these variables added to the agent's environment
    /// (credentials for a CA, ...).
    pub async fn start_with_env(
        bin: &Path,
        dir: &Path,
        config: &AgentConfig<'_>,
        ca_args: &[OsString],
        env: &[(String, String)],
    ) -> Result<Self, Error> {
        let mut agent = Self::spawn(bin, dir, config, ca_args, env)?;
        agent.wait_ready(READY_LIMIT).await?;
        Ok(agent)
    }

    /// Starts the agent like [`Agent::start_with_env`] without waiting for it to be ready:
    /// for tests of an agent that cannot get a certificate yet.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        config: &AgentConfig<'_>,
        ca_args: &[OsString],
        env: &[(String, String)],
    ) -> Result<Self, Error> {
        let sa = config.service_account;
        let socket = dir.join(format!("{sa}.sock"));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--trust-domain", config.trust_domain])
            .args(["--namespace", config.namespace])
            .args(["--service-account", sa])
            .args(["--cert-ttl", config.cert_ttl])
            .args(ca_args)
            .args(["--log-level", "info,sds_agent::sds=debug"])
            // Plain text in the log file, without colour escapes.
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let proc = ChildGuard::spawn(
            &format!("agent {sa}"),
            cmd,
            &dir.join(format!("agent-{sa}.log")),
        )?;
        Ok(Self {
            proc,
            socket,
            admin,
            spiffe_id: format!(
                "spiffe://{}/ns/{}/sa/{sa}",
                config.trust_domain, config.namespace
            ),
        })
    }

    /// Waits until `GET /readyz` answers `200`, or fails early if the agent exits.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<(), Error> {
        let admin = self.admin;
        self.proc
            .wait_ready("GET /readyz = 200", limit, || async move {
                http::get(admin, "/readyz")
                    .await
                    .is_ok_and(|r| r.status == 200)
            })
            .await
    }

    /// The `/metrics` sample lines whose name and labels start with `prefix`, e.g.
    /// `sds_agent_ca_errors_total{backend="acm-pca"`.
    pub async fn metric_lines(&self, prefix: &str) -> Result<Vec<String>, Error> {
        Ok(http::get(self.admin, "/metrics")
            .await?
            .body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect())
    }

    /// The sum of the values of the metric lines that start with `prefix` (0 when none).
    pub async fn metric_total(&self, prefix: &str) -> Result<u64, Error> {
        Ok(self
            .metric_lines(prefix)
            .await?
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// The SDS Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The admin HTTP address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The SPIFFE ID it serves.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// SIGKILLs the agent (see [`ChildGuard::kill_hard`]); its socket file stays behind, as
    /// after a crash. A new agent started on the same directory and service account replaces
    /// it.
    pub fn kill_hard(&mut self) -> Result<(), Error> {
        self.proc.kill_hard().map(drop)
    }

    /// The process, for its log.
    pub fn process(&self) -> &ChildGuard {
        &self.proc
    }

    /// `GET /secrets`, as the agent wrote it, for failure reports.
    pub async fn secrets_json(&self) -> Result<String, Error> {
        Ok(http::get(self.admin, "/secrets").await?.body)
    }

    /// `GET /secrets`, parsed: an array of `{name, spiffe_id, serial, ...}`.
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>, Error> {
        let body = self.secrets_json().await?;
        parse_secrets(&body)
    }

    /// Waits until the agent's log holds `needle`; the error carries the log's tail.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> Result<(), Error> {
        let path = self.proc.log_path().to_owned();
        crate::wait_until(&format!("{needle:?} in the agent's log"), limit, || {
            let path = path.clone();
            async move { std::fs::read_to_string(&path).is_ok_and(|log| log.contains(needle)) }
        })
        .await
        .map_err(|e| Error::NotReady {
            name: self.proc.name().to_owned(),
            reason: e.to_string(),
            log_tail: self.proc.tail(40),
        })
    }

    /// Whether `GET /readyz` answers `200` now.
    pub async fn is_ready(&self) -> bool {
        http::get(self.admin, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    }

    /// The serial of the workload certificate (`default`) it serves now, if any.
    pub async fn current_serial(&self) -> Result<Option<Serial>, Error> {
        Ok(self
            .secrets()
            .await?
            .into_iter()
            .find(|s| s.name == "default")
            .map(|s| s.serial))
    }

    /// Waits until it serves a workload certificate other than `previous`, and returns that
    /// one's serial. Renewals are counted just before the certificate is published, so this,
    /// not a counter, says a new one is served.
    pub async fn next_serial(&self, previous: &Serial, limit: Duration) -> Result<Serial, Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(serial)) = self.current_serial().await
                && serial != *previous
            {
                return Ok(serial);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{} to serve a certificate other than {previous}; its log ends:\n{}",
                        self.proc.name(),
                        self.proc.tail(40)
                    ),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn parse_secrets(body: &str) -> Result<Vec<SecretInfo>, Error> {
    let malformed = |detail: String| Error::Malformed {
        what: "agent /secrets",
        detail,
    };
    let json: serde_json::Value =
        serde_json::from_str(body).map_err(|e| malformed(format!("{e}: {body}")))?;
    let entries = json
        .as_array()
        .ok_or_else(|| malformed(format!("not an array: {body}")))?;
    entries
        .iter()
        .map(|e| {
            let field = |k: &str| {
                e[k].as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(format!("no string {k:?} in {e}")))
            };
            Ok(SecretInfo {
                name: field("name")?,
                spiffe_id: field("spiffe_id")?,
                serial: field("serial")?.parse()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse_as_the_agent_writes_them() {
        let body = r#"[{"name":"default","spiffe_id":"spiffe://example.org/ns/default/sa/backend","serial":"4f3df2c88ece5c3a","not_before":"2026-11-23T03:20:44Z","not_after":"2026-11-23T03:21:09Z","next_renewal":"2026-11-23T03:20:55Z","version":1},{"name":"ROOTCA","spiffe_id":"spiffe://example.org","serial":"00938a56","not_before":"2026-11-23T03:20:49Z","not_after":"2026-11-24T03:20:49Z","next_renewal":null,"version":1}]"#;
        let s = parse_secrets(body).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "default");
        assert_eq!(s[0].serial.to_string(), "4f3df2c88ece5c3a");
        assert_eq!(s[1].serial.to_string(), "938a56");
    }

    #[test]
    fn malformed_secrets_are_errors() {
        assert!(parse_secrets("{}").is_err());
        assert!(parse_secrets("[{\"name\":1}]").is_err());
        assert!(parse_secrets("not json").is_err());
    }
}
