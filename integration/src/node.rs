//! A node-mode agent for the tests: `sds-agent run --mode node` on `<dir>/agent.sock` (SDS)
//! and `<dir>/workload.sock` (Workload API), on the embedded CA, asking a
//! [`FakeKubelet`] which pod a caller is in; and what its admin endpoint says.
//!
//! Which process is in which pod is [`crate::pods`]' business: the agent reads the real
//! SO_PEERCRED, and the real `/proc` or, where the pods are in a fake one, that directory
//! (`--proc-root`, from [`Pods::agent_args`]), so this harness only starts the agent.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::agent::{SecretInfo, parse_secrets};
use crate::kubelet::{FakeKubelet, FakePod};
use crate::pods::Pods;
use crate::process::{ChildGuard, agent_bin};
use crate::{Error, free_port, http, python};

/// The SDS methods `node_probe.py` asks with, as its JSON names them.
pub const SDS_METHODS: [&str; 3] = ["stream", "fetch", "delta"];

/// How long one `node_probe.py` run may take (each question has 5 s).
const PROBE_LIMIT: Duration = Duration::from_secs(90);

/// How long a node agent may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// A running node-mode agent, killed when dropped.
#[derive(Debug)]
pub struct NodeAgent {
    proc: ChildGuard,
    admin: SocketAddr,
    dir: PathBuf,
    trust_domain: String,
}

impl NodeAgent {
    /// Starts the agent in `dir` for `trust_domain`, asking `kubelet` (its CA and token file),
    /// seeing the processes of `pods` (`--proc-root` for a fake `/proc`), with `extra` flags
    /// appended (a CA, `--cert-ttl`, ...), and waits until `/readyz` answers `200`: the trust
    /// bundle is read at start, before any pod has asked.
    pub async fn start(
        dir: &Path,
        trust_domain: &str,
        kubelet: &FakeKubelet,
        pods: &Pods,
        extra: &[OsString],
    ) -> Result<Self, Error> {
        Self::start_with_env(dir, trust_domain, kubelet, pods, extra, &[]).await
    }

    /// [`NodeAgent::start`] with `env` added to the agent's environment (a CA's
    /// credentials).
    pub async fn start_with_env(
        dir: &Path,
        trust_domain: &str,
        kubelet: &FakeKubelet,
        pods: &Pods,
        extra: &[OsString],
        env: &[(String, String)],
    ) -> Result<Self, Error> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(agent_bin()?);
        cmd.arg("run")
            .args(["--mode", "node", "--trust-domain", trust_domain])
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--workload-api-socket")
            .arg(dir.join("workload.sock"))
            .args(["--admin-addr", &admin.to_string()])
            .args(["--kubelet-host", &kubelet.host()])
            .args(["--kubelet-port", &kubelet.port().to_string()])
            .arg("--kubelet-ca")
            .arg(kubelet.ca_path())
            .arg("--kubelet-token-file")
            .arg(kubelet.token_file())
            .args([
                "--kubelet-poll-interval",
                "50ms",
                "--kubelet-max-attempts",
                "4",
            ])
            .args(["--log-level", "info,sds_agent::attest=debug"])
            .args(pods.agent_args())
            .args(extra)
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut proc = ChildGuard::spawn("node agent", cmd, &dir.join("agent.log"))?;
        proc.wait_ready("GET /readyz = 200", READY_LIMIT, || async move {
            http::get(admin, "/readyz")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;
        Ok(Self {
            proc,
            admin,
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The SDS socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The Workload API socket.
    pub fn workload_socket(&self) -> PathBuf {
        self.dir.join("workload.sock")
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The process, for its log.
    pub fn process(&self) -> &ChildGuard {
        &self.proc
    }

    /// The SPIFFE ID the agent must give `pod`.
    pub fn spiffe_id(&self, pod: &FakePod) -> String {
        pod.spiffe_id(&self.trust_domain)
    }

    /// `GET path` on the admin endpoint: status and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String), Error> {
        let r = http::get(self.admin, path).await?;
        Ok((r.status, r.body))
    }

    /// The sum of the `/metrics` lines that start with `prefix` (a name and a space, or a
    /// name and `{` for every series of a family, or a name with its labels), 0 if none does.
    pub async fn metric(&self, prefix: &str) -> Result<f64, Error> {
        let (_, text) = self.get("/metrics").await?;
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|line| {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| Error::Malformed {
                        what: "agent /metrics",
                        detail: line.to_owned(),
                    })
            })
            .sum()
    }

    /// `GET /secrets`, parsed: a `default` entry per identity served, and the roots.
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>, Error> {
        let (_, body) = self.get("/secrets").await?;
        parse_secrets(&body)
    }

    /// `cmd` (a Python interpreter with grpcio, wrapped into a pod or not) with
    /// `integration/python/node_probe.py` and its arguments appended: it asks this agent for
    /// `default,ROOTCA`, for `own` and for each of `others` over the three SDS methods, and
    /// for the caller's SVID over the Workload API, and prints one JSON object.
    pub fn probe_command(&self, mut cmd: Command, own: &str, others: &[String]) -> Command {
        cmd.arg(python::script("node_probe.py"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--workload-socket")
            .arg(self.workload_socket())
            .args(["--own", own, "--timeout", "5"]);
        for o in others {
            cmd.args(["--other", o]);
        }
        cmd
    }

    /// Runs [`NodeAgent::probe_command`] and returns its JSON.
    pub async fn probe(&self, cmd: Command, own: &str, others: &[String]) -> Result<Value, Error> {
        python::run_json_command(
            self.probe_command(cmd, own, others),
            "node_probe.py",
            PROBE_LIMIT,
        )
        .await
    }

    /// Whether the agent's log holds `needle` now.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.proc.log_path()).is_ok_and(|log| log.contains(needle))
    }
}
