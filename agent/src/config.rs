//! Command line, environment and config file, merged into one validated [`Config`].
//!
//! Precedence is flag > environment (`SDS_AGENT_<FLAG>`) > config file (`--config`, TOML,
//! keys named like the flags) > default. clap reads flags and the environment; the file is
//! read here and fills only what neither gave. Every value goes through one parser whatever
//! its source, so an error names the flag, its variable and its file key alike.
//!
//! The CA backends' flags are not here: each backend owns its flags, their checks and their
//! file keys (`sds_backends::settings`), and [`RunArgs`] flattens them all ([`CaArgs`]). This
//! module picks the backend `--ca` names, and hands it the file's keys and the environment.
//!
//! This module reads files but never creates anything, and it knows nothing of what the
//! values are used for.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use std::sync::OnceLock;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sds_backends::settings::{FileSource, ResolveContext, SettingsError, humanized, setting_name};
use sds_backends::{KeyType, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::federation::{BundleSource, FederationSource};

pub use sds_backends::settings::{CaArgs, CaConfig, Redacted};

/// The SDS socket path istio-agent uses, relative to the working directory.
pub const DEFAULT_SOCKET: &str = "./var/run/secrets/workload-spiffe-uds/socket";
const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15020";
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_RENEW_AT: f64 = 0.5;
const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Shortest certificate lifetime accepted; anything shorter cannot be rotated sensibly.
const MIN_TTL: Duration = Duration::from_secs(5);

/// sds-agent: workload certificates for Envoy over SDS, signed by your CA, rotated for you.
#[derive(Debug, Parser)]
#[command(name = "sds-agent", version, about, rename_all = "kebab-case")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[command(rename_all = "kebab-case")]
pub enum Command {
    /// Serve SDS on the Unix socket until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Check the configuration and print it resolved, as JSON, without serving anything.
    Validate(RunArgs),
    /// Show what a running agent serves: its secrets, and each connected proxy's state.
    /// Exit 0 when ready and no proxy rejects its secrets, 3 when not ready, 4 when a proxy
    /// NACKed, 1 when the agent cannot be reached.
    Status(ClientArgs),
    /// Make a running agent renew its certificate now (POST /rotate). Exit 0 once asked (or,
    /// with --wait, once the new certificate is served), 1 on failure.
    Rotate(RotateArgs),
    /// Act on the running agent's CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the version and the CA backends built in.
    Version(VersionArgs),
}

/// `sds-agent ca ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CaCommand {
    /// Begin a staged root rotation of the running agent's embedded CA (POST /ca/rotate): a
    /// new root is prepared (made, for an ephemeral root; read from --embedded-next-ca-cert
    /// and --embedded-next-ca-key, for one from files) and goes through the four phases
    /// `sds-agent status` shows. Exit 0 once begun, 1 when refused or unreachable.
    Rotate(ClientArgs),
}

/// Output format of the client commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Text,
    /// One JSON document for scripts.
    Json,
}

/// Flags of the commands that talk to a running agent's admin endpoint.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "kebab-case")]
pub struct ClientArgs {
    /// The agent's admin address.
    #[arg(long, env = "SDS_AGENT_ADMIN_ADDR", value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// How long to wait for the agent.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_client_timeout)]
    pub timeout: Duration,
}

/// Flags of `rotate`.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "kebab-case")]
pub struct RotateArgs {
    /// Where the agent is, and how to print.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Wait until the new certificate is served (within --timeout) and print its serial.
    #[arg(long)]
    pub wait: bool,
}

/// Flags of `version`.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "kebab-case")]
pub struct VersionArgs {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn parse_client_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flags of `run` and `validate`. Each is also `SDS_AGENT_<FLAG>` in the environment and
/// `<flag>` in the config file.
#[derive(Debug, Default, Clone, Args)]
#[command(rename_all = "kebab-case")]
pub struct RunArgs {
    /// Config file (TOML); its keys are the flag names, e.g. `trust-domain = "example.org"`.
    #[arg(long, env = "SDS_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// SDS Unix socket path. [default: ./var/run/secrets/workload-spiffe-uds/socket]
    #[arg(long, env = "SDS_AGENT_SOCKET", value_name = "PATH")]
    pub socket: Option<String>,
    /// Permissions of the socket files (SDS and Workload API), octal. [default: 0600]
    #[arg(long, env = "SDS_AGENT_SOCKET_MODE", value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Also serve the SPIFFE Workload API (X.509-SVIDs, for non-Envoy workloads) on this Unix
    /// socket, e.g. /tmp/spire-agent/public/api.sock. [default: off]
    #[arg(long, env = "SDS_AGENT_WORKLOAD_API_SOCKET", value_name = "PATH")]
    pub workload_api_socket: Option<String>,
    /// User IDs allowed to fetch secrets (SO_PEERCRED of the caller), comma-separated.
    /// [default: the agent's own, unless --allowed-gids is given]
    #[arg(long, env = "SDS_AGENT_ALLOWED_UIDS", value_name = "UIDS")]
    pub allowed_uids: Option<String>,
    /// Group IDs allowed to fetch secrets (the caller's primary group), comma-separated.
    /// [default: none]
    #[arg(long, env = "SDS_AGENT_ALLOWED_GIDS", value_name = "GIDS")]
    pub allowed_gids: Option<String>,
    /// Most SDS streams open at once; more are refused with RESOURCE_EXHAUSTED.
    /// [default: 16384]
    #[arg(long, env = "SDS_AGENT_MAX_STREAMS", value_name = "N")]
    pub max_streams: Option<String>,
    /// Largest SDS request accepted, in bytes. [default: 262144]
    #[arg(long, env = "SDS_AGENT_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<String>,
    /// Most requests one SDS stream may send per second (a burst of as many is allowed);
    /// a stream going faster is ended with RESOURCE_EXHAUSTED. [default: 50]
    #[arg(long, env = "SDS_AGENT_MAX_REQUESTS_PER_SECOND", value_name = "N")]
    pub max_requests_per_second: Option<String>,
    /// SPIFFE trust domain. [default: cluster.local]
    #[arg(long, env = "SDS_AGENT_TRUST_DOMAIN", value_name = "TD")]
    pub trust_domain: Option<String>,
    /// Kubernetes namespace of the workload. [default: default]
    #[arg(long, env = "SDS_AGENT_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,
    /// Kubernetes service account of the workload. [default: default]
    #[arg(long, env = "SDS_AGENT_SERVICE_ACCOUNT", value_name = "SA")]
    pub service_account: Option<String>,
    /// CA backend that signs the workload certificates; or several, comma-separated, in
    /// order (e.g. vault,embedded): the first signs, and the next signs only while every one
    /// before it has failed with retryable errors for --ca-failover-after. [default: embedded]
    #[arg(long, env = "SDS_AGENT_CA", value_name = "BACKENDS")]
    pub ca: Option<String>,
    /// With several --ca backends: how long a backend must keep failing with retryable
    /// errors (unavailable, throttled, timeout) before the next one signs. [default: a
    /// quarter of the current certificate's lifetime]
    #[arg(long, env = "SDS_AGENT_CA_FAILOVER_AFTER", value_name = "DURATION")]
    pub ca_failover_after: Option<String>,
    /// Certificate lifetime to ask for, e.g. 30s, 90m, 24h. [default: 24h]
    #[arg(long, env = "SDS_AGENT_CERT_TTL", value_name = "DURATION")]
    pub cert_ttl: Option<String>,
    /// Fraction of the certificate's actual lifetime after which it is renewed (0 < f < 1),
    /// less a small random jitter. [default: 0.5]
    #[arg(long, env = "SDS_AGENT_RENEW_AT", value_name = "FRACTION")]
    pub renew_at: Option<String>,
    /// Private key type: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096.
    /// [default: ecdsa-p256]
    #[arg(long, env = "SDS_AGENT_KEY_TYPE", value_name = "TYPE")]
    pub key_type: Option<String>,
    /// Admin HTTP address (/healthz, /readyz, /secrets, /metrics, POST /rotate).
    /// [default: 127.0.0.1:15020]
    #[arg(long, env = "SDS_AGENT_ADMIN_ADDR", value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// Status HTTP address serving only /healthz, /readyz and /metrics, for kubelet probes
    /// and Prometheus, e.g. 0.0.0.0:15021. [default: none]
    #[arg(long, env = "SDS_AGENT_STATUS_ADDR", value_name = "ADDR")]
    pub status_addr: Option<String>,
    /// Log filter, e.g. info or sds_agent=debug; RUST_LOG is used when this is unset.
    /// [default: info]
    #[arg(long, env = "SDS_AGENT_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text, or json (one object per line). [default: text]
    #[arg(long, env = "SDS_AGENT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Also write cert-chain.pem, key.pem (0600) and root-cert.pem into this directory,
    /// replaced together at every rotation (for applications without a proxy).
    #[arg(long, env = "SDS_AGENT_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Federate with another trust domain: TD=FILE (a SPIFFE bundle or PEM roots, re-read
    /// when it changes) or TD=https://... (a SPIFFE bundle endpoint, fetched again at its
    /// refresh hint), served on the Workload API and over SDS (ALL, spiffe://TD).
    /// Repeatable; comma-separated in the environment. [default: none]
    #[arg(
        long,
        env = "SDS_AGENT_FEDERATE_WITH",
        value_name = "TD=SOURCE",
        value_delimiter = ','
    )]
    pub federate_with: Vec<String>,
    /// How often the federated bundle files and --federation-dir are checked for changes.
    /// [default: 5s]
    #[arg(
        long,
        env = "SDS_AGENT_FEDERATION_POLL_INTERVAL",
        value_name = "DURATION"
    )]
    pub federation_poll_interval: Option<String>,
    /// Roots (PEM) that bundle endpoints' TLS certificates must chain to, instead of the
    /// system's. [default: the system's]
    #[arg(long, env = "SDS_AGENT_FEDERATION_ENDPOINT_CA", value_name = "PEM")]
    pub federation_endpoint_ca: Option<PathBuf>,
    /// Staged root rotation: how long phase 1 waits at most for every proxy to ACK the new
    /// root, and how long the old root is still served once no certificate of this agent
    /// chains to it (for other agents' peers). [default: --cert-ttl]
    #[arg(long, env = "SDS_AGENT_ROOT_OVERLAP", value_name = "DURATION")]
    pub root_overlap: Option<String>,
    /// How often the CA's roots are read again (a new root, a root dropped), besides when a
    /// certificate names a root the bundle lacks. [default: 5m]
    #[arg(long, env = "SDS_AGENT_TRUST_BUNDLE_REFRESH", value_name = "DURATION")]
    pub trust_bundle_refresh: Option<String>,
    /// A directory of federated bundles, one file per trust domain: <TD>.json (SPIFFE
    /// bundle) or <TD>.pem, as a ConfigMap is mounted. A new file adds its domain, a changed
    /// one updates it, a removed one removes it; checked every --federation-poll-interval.
    /// [default: none]
    #[arg(long, env = "SDS_AGENT_FEDERATION_DIR", value_name = "DIR")]
    pub federation_dir: Option<PathBuf>,
    /// Serve the trust bundles over SDS (ROOTCA, ALL, spiffe://<TD>) as a plain trusted_ca
    /// instead of Envoy's SPIFFE certificate validator, for proxies without it. A proxy can
    /// ask for this alone with the node metadata disable_spiffe_cert_validation: true.
    /// [default: false]
    #[arg(
        long,
        env = "SDS_AGENT_SDS_PLAIN_ROOTS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub sds_plain_roots: Option<String>,
    /// The CA backends' flags, each owned by its backend (`sds_backends::settings`).
    #[command(flatten)]
    pub backends: CaArgs,
    /// Node mode and the scheduler's limits.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// How many identities the agent serves, and, in node mode, how it learns each caller's.
#[derive(Debug, Default, Clone, Args)]
#[command(rename_all = "kebab-case")]
pub struct NodeArgs {
    /// pod: serve one workload identity (--namespace, --service-account) to the callers
    /// --allowed-uids admits. node: one agent per node serves every pod on it, each caller
    /// proven from its process (SO_PEERCRED, /proc/<pid>/cgroup) and the kubelet's pod list,
    /// and given its own pod's identity only. [default: pod]
    #[arg(long, env = "SDS_AGENT_MODE", value_name = "MODE")]
    pub mode: Option<String>,
    /// Most CA calls (issuances and trust bundle reads) at once, over every identity.
    /// [default: 8]
    #[arg(long, env = "SDS_AGENT_CA_CONCURRENCY", value_name = "N")]
    pub ca_concurrency: Option<String>,
    /// Node mode: an identity nobody has asked for this long is dropped with its key.
    /// [default: 1h]
    #[arg(long, env = "SDS_AGENT_IDENTITY_IDLE_TIMEOUT", value_name = "DURATION")]
    pub identity_idle_timeout: Option<String>,
    /// Node mode: this node's name (the Downward API's spec.nodeName), the kubelet's
    /// default host. [default: none]
    #[arg(long, env = "SDS_AGENT_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Node mode: the kubelet's host (status.hostIP, or the node name). [default: the node
    /// name, else 127.0.0.1]
    #[arg(long, env = "SDS_AGENT_KUBELET_HOST", value_name = "HOST")]
    pub kubelet_host: Option<String>,
    /// Node mode: the kubelet's HTTPS port. [default: 10250]
    #[arg(long, env = "SDS_AGENT_KUBELET_PORT", value_name = "PORT")]
    pub kubelet_port: Option<String>,
    /// Node mode: ask the kubelet's read-only HTTP port instead (no TLS, no token), e.g.
    /// 10255. [default: off]
    #[arg(long, env = "SDS_AGENT_KUBELET_READ_ONLY_PORT", value_name = "PORT")]
    pub kubelet_read_only_port: Option<String>,
    /// Node mode: the CA that signed the kubelet's serving certificate.
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt]
    #[arg(long, env = "SDS_AGENT_KUBELET_CA", value_name = "PEM")]
    pub kubelet_ca: Option<PathBuf>,
    /// Node mode: the bearer token for the kubelet (re-read at every request).
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/token]
    #[arg(long, env = "SDS_AGENT_KUBELET_TOKEN_FILE", value_name = "FILE")]
    pub kubelet_token_file: Option<PathBuf>,
    /// Node mode: do not verify the kubelet's certificate (kubelets with self-signed
    /// serving certificates). Dangerous: anyone who can answer on the kubelet's address
    /// decides every pod's identity. [default: false]
    #[arg(long, env = "SDS_AGENT_KUBELET_SKIP_TLS_VERIFY", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub kubelet_skip_tls_verify: Option<String>,
    /// Node mode: kubelet pod list requests start at least this far apart. [default: 500ms]
    #[arg(long, env = "SDS_AGENT_KUBELET_POLL_INTERVAL", value_name = "DURATION")]
    pub kubelet_poll_interval: Option<String>,
    /// Node mode: pod list requests made for one caller before its pod is declared not
    /// found (UNAVAILABLE). [default: 10]
    #[arg(long, env = "SDS_AGENT_KUBELET_MAX_ATTEMPTS", value_name = "N")]
    pub kubelet_max_attempts: Option<String>,
    /// Node mode: where the processes' /proc is (the host's, with hostPID). Another
    /// directory of the same layout serves tests. [default: /proc]
    #[arg(long, env = "SDS_AGENT_PROC_ROOT", value_name = "DIR")]
    pub proc_root: Option<PathBuf>,
}

/// One agent per pod, or one per node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One workload identity.
    #[default]
    Pod,
    /// Every pod on the node, each caller attested.
    Node,
}

/// Node mode's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeSettings {
    /// This node's name, if given.
    pub node_name: Option<String>,
    /// The kubelet's host.
    pub kubelet_host: String,
    /// The kubelet's HTTPS port, or (read-only) HTTP port.
    pub kubelet_port: u16,
    /// Whether `kubelet_port` is the read-only HTTP port.
    pub kubelet_read_only: bool,
    /// The kubelet's CA; `None` with the read-only port or when verification is skipped.
    pub kubelet_ca: Option<PathBuf>,
    /// The kubelet bearer token file (HTTPS only).
    pub kubelet_token_file: PathBuf,
    /// Verification of the kubelet's certificate skipped.
    pub kubelet_skip_tls_verify: bool,
    /// Least time between two pod list requests.
    #[serde(serialize_with = "humanized")]
    pub kubelet_poll_interval: Duration,
    /// Pod list requests for one caller.
    pub kubelet_max_attempts: u32,
    /// Where /proc is.
    pub proc_root: PathBuf,
}

/// A list of user or group IDs in the config file: `[1337, 0]`, or `"1337,0"` as on the
/// command line.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IdList {
    Numbers(Vec<u32>),
    Text(String),
}

/// The `ca` key of the config file: `"vault,embedded"` as on the command line, or
/// `["vault", "embedded"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum CaList {
    Names(Vec<String>),
    Text(String),
}

impl CaList {
    fn into_text(self) -> String {
        match self {
            CaList::Names(names) => names.join(","),
            CaList::Text(text) => text,
        }
    }
}

impl IdList {
    fn into_text(self) -> String {
        match self {
            IdList::Numbers(ids) => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            IdList::Text(text) => text,
        }
    }
}

/// Who may fetch secrets: a caller whose uid or primary gid is listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallerPolicy {
    /// Allowed user IDs; `None` until [`CallerPolicy::resolve`]: the agent's own.
    #[serde(rename = "allowed-uids")]
    pub uids: Option<BTreeSet<u32>>,
    /// Allowed group IDs.
    #[serde(rename = "allowed-gids")]
    pub gids: BTreeSet<u32>,
}

impl CallerPolicy {
    /// Fills in the default, the agent's own uid, when neither list was given.
    pub fn resolve(&self, own_uid: u32) -> ResolvedCallers {
        ResolvedCallers {
            uids: self
                .uids
                .clone()
                .unwrap_or_else(|| BTreeSet::from([own_uid])),
            gids: self.gids.clone(),
            any: false,
        }
    }

    /// Node mode's reading: every pod's uid may connect (attestation decides what it gets)
    /// unless lists were given, which then narrow who may.
    pub fn resolve_for_node(&self) -> ResolvedCallers {
        match &self.uids {
            None => ResolvedCallers {
                uids: BTreeSet::new(),
                gids: BTreeSet::new(),
                any: true,
            },
            Some(uids) => ResolvedCallers {
                uids: uids.clone(),
                gids: self.gids.clone(),
                any: false,
            },
        }
    }
}

/// [`CallerPolicy`] with its default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedCallers {
    /// Allowed user IDs.
    pub uids: BTreeSet<u32>,
    /// Allowed group IDs.
    pub gids: BTreeSet<u32>,
    /// Any uid and gid (node mode without lists: attestation decides).
    pub any: bool,
}

impl ResolvedCallers {
    /// Whether a caller with this uid and gid may fetch secrets.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.any || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// What the SDS server grants its clients, so that a broken or hostile one cannot take the
/// agent's memory or CPU from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SdsLimits {
    /// Streams open at once.
    pub max_streams: usize,
    /// Largest request, bytes.
    pub max_message_size: usize,
    /// Requests per second on one stream, and the burst allowed.
    pub max_requests_per_second: u32,
}

impl Default for SdsLimits {
    fn default() -> Self {
        Self {
            max_streams: 16_384,
            // Envoy's SDS requests are a few hundred bytes (a node and two names); a node with
            // much metadata, or thousands of names, stays well under this.
            max_message_size: 256 * 1024,
            // Envoy sends one request per response (its ACK) and one per subscription change.
            max_requests_per_second: 50,
        }
    }
}

/// An integer setting between `min` and `max`, from a flag, env or file value.
fn bounded(key: &str, raw: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n: u64 = raw
        .trim()
        .parse()
        .map_err(|_| invalid(key, raw, "expected a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(invalid(key, raw, format!("must be from {min} to {max}")));
    }
    Ok(n)
}

/// At most this many IDs in one list: a policy, not a user database.
const MAX_IDS: usize = 256;

/// `1337,0` into a set of IDs.
fn parse_ids(text: &str) -> Result<BTreeSet<u32>, String> {
    let mut ids = BTreeSet::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err("expected numeric IDs separated by commas, e.g. 1337,0".into());
        }
        let id: u32 = part
            .parse()
            .map_err(|_| format!("{part:?} is not a numeric ID (names are not resolved)"))?;
        if id == u32::MAX {
            return Err(format!("{id} is the invalid ID (-1)"));
        }
        ids.insert(id);
    }
    if ids.len() > MAX_IDS {
        return Err(format!("more than {MAX_IDS} IDs"));
    }
    Ok(ids)
}

/// The agent's own keys of the config file: the same names as its flags, all optional.
/// The backends read theirs ([`CaArgs::from_file`]); [`KnownKeys`] refuses any other.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<String>,
    socket_mode: Option<String>,
    workload_api_socket: Option<String>,
    allowed_uids: Option<IdList>,
    allowed_gids: Option<IdList>,
    max_streams: Option<u64>,
    max_message_size: Option<u64>,
    max_requests_per_second: Option<u64>,
    trust_domain: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    ca: Option<CaList>,
    ca_failover_after: Option<String>,
    cert_ttl: Option<String>,
    renew_at: Option<f64>,
    key_type: Option<String>,
    admin_addr: Option<String>,
    status_addr: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    output_dir: Option<PathBuf>,
    federate_with: Option<Vec<String>>,
    federation_poll_interval: Option<String>,
    federation_endpoint_ca: Option<PathBuf>,
    root_overlap: Option<String>,
    trust_bundle_refresh: Option<String>,
    federation_dir: Option<PathBuf>,
    sds_plain_roots: Option<bool>,
    mode: Option<String>,
    ca_concurrency: Option<u64>,
    identity_idle_timeout: Option<String>,
    node_name: Option<String>,
    kubelet_host: Option<String>,
    kubelet_port: Option<u64>,
    kubelet_read_only_port: Option<u64>,
    kubelet_ca: Option<PathBuf>,
    kubelet_token_file: Option<PathBuf>,
    kubelet_skip_tls_verify: Option<bool>,
    kubelet_poll_interval: Option<String>,
    kubelet_max_attempts: Option<u64>,
    proc_root: Option<PathBuf>,
}

/// The validated configuration of a running agent.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// SDS socket path.
    pub socket: PathBuf,
    /// Socket file permission bits.
    #[serde(serialize_with = "octal")]
    pub socket_mode: u32,
    /// SPIFFE Workload API socket path, if that API is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_api_socket: Option<PathBuf>,
    /// Who may fetch secrets.
    #[serde(flatten)]
    pub callers: CallerPolicy,
    /// What one client may take of the SDS server.
    #[serde(flatten)]
    pub limits: SdsLimits,
    /// The workload identity served as `default`.
    pub spiffe_id: SpiffeId,
    /// The CA backend; with `--ca a,b`, the primary.
    pub ca: CaConfig,
    /// With `--ca a,b,...`, the backends after the first, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ca_fallbacks: Vec<CaConfig>,
    /// `--ca-failover-after`, when given (else a quarter of the certificate's lifetime).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humanized_option"
    )]
    pub ca_failover_after: Option<Duration>,
    /// Lifetime asked of the CA.
    #[serde(serialize_with = "humanized")]
    pub cert_ttl: Duration,
    /// Renewal point as a fraction of the actual lifetime.
    pub renew_at: RenewAt,
    /// Key type of workload keys.
    #[serde(serialize_with = "display")]
    pub key_type: KeyType,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
    /// Status HTTP address (probes and metrics only), if any.
    pub status_addr: Option<SocketAddr>,
    /// Log filter, if set by flag, env or file.
    pub log_level: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Where to write the certificate files, if anywhere.
    pub output_dir: Option<PathBuf>,
    /// Per-pod or per-node.
    pub mode: Mode,
    /// Node mode's settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeSettings>,
    /// Most CA calls at once.
    pub ca_concurrency: usize,
    /// How long an identity nobody asks for is kept (node mode).
    #[serde(serialize_with = "humanized")]
    pub identity_idle_timeout: Duration,
    /// The federated trust domains and their bundle files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub federate_with: Vec<FederationSource>,
    /// How often the federated bundle files are checked.
    #[serde(serialize_with = "humanized")]
    pub federation_poll_interval: Duration,
    /// The roots bundle endpoints are verified with, if not the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation_endpoint_ca: Option<PathBuf>,
    /// Root rotation: phase 1's longest wait for ACKs, and phase 3's overlap.
    #[serde(serialize_with = "humanized")]
    pub root_overlap: Duration,
    /// How often the CA's roots are read again.
    #[serde(serialize_with = "humanized")]
    pub trust_bundle_refresh: Duration,
    /// The directory of federated bundle files, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation_dir: Option<PathBuf>,
    /// Bundles over SDS as plain `trusted_ca`, not the SPIFFE validator.
    pub sds_plain_roots: bool,
}

/// How often the CA's roots are read again, unless `--trust-bundle-refresh` says.
const DEFAULT_TRUST_BUNDLE_REFRESH: Duration = Duration::from_secs(300);

/// A renewal fraction strictly between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RenewAt(f64);

/// A configuration that cannot be used, with the setting at fault named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A setting has a value that cannot be used.
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        /// The setting, as `--flag (SDS_AGENT_FLAG, file key flag)`.
        setting: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two settings that only make sense together, or never together.
    #[error("{0}")]
    Conflict(String),
    /// The CA backend's settings, checked by the backend.
    #[error(transparent)]
    Backend(#[from] SettingsError),
}

impl RunArgs {
    /// Merges flags and environment (already in `self`) with the config file and the
    /// defaults, and validates the result.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        self.resolve_with_env(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`RunArgs::resolve`] with the process environment given as a function, for the
    /// fallbacks (`VAULT_ADDR`, ...) that clap does not read.
    pub fn resolve_with_env(
        &self,
        std_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (file, file_backends) = match &self.config {
            Some(path) => read_file(path)?,
            None => Default::default(),
        };
        let pick =
            |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());

        let socket = pick(&self.socket, &file.socket).unwrap_or_else(|| DEFAULT_SOCKET.into());
        if socket.is_empty() {
            return Err(invalid("socket", "", "must not be empty"));
        }
        let socket_mode = match pick(&self.socket_mode, &file.socket_mode) {
            Some(v) => parse_mode(&v).map_err(|r| invalid("socket-mode", &v, r))?,
            None => DEFAULT_SOCKET_MODE,
        };
        let workload_api_socket = pick(&self.workload_api_socket, &file.workload_api_socket)
            .map(|raw| {
                // Clients name it as a `unix:` URI (SPIFFE_ENDPOINT_SOCKET: `unix:///p` or
                // `unix:/p`); take that too.
                let path = raw
                    .strip_prefix("unix://")
                    .or_else(|| raw.strip_prefix("unix:"))
                    .unwrap_or(&raw);
                if path.is_empty() {
                    return Err(invalid("workload-api-socket", &raw, "must not be empty"));
                }
                if path.len() > 107 {
                    return Err(invalid(
                        "workload-api-socket",
                        &raw,
                        "longer than the 107 bytes a Unix socket path may have",
                    ));
                }
                Ok(PathBuf::from(path))
            })
            .transpose()?;
        if workload_api_socket
            .as_deref()
            .is_some_and(|p| same_path(p, Path::new(&socket)))
        {
            return Err(ConfigError::Conflict(format!(
                "--workload-api-socket and --socket must be different paths (both are {socket})"
            )));
        }
        let ids = |key: &str, flag: &Option<String>, file: &Option<IdList>| {
            flag.clone()
                .or_else(|| file.clone().map(IdList::into_text))
                .map(|v| parse_ids(&v).map_err(|r| invalid(key, &v, r)))
                .transpose()
        };
        let uids = ids("allowed-uids", &self.allowed_uids, &file.allowed_uids)?;
        let gids = ids("allowed-gids", &self.allowed_gids, &file.allowed_gids)?;
        // Naming groups alone means exactly those groups: the own-uid default applies only
        // when neither list is given.
        let callers = CallerPolicy {
            uids: match (&uids, &gids) {
                (None, Some(_)) => Some(BTreeSet::new()),
                _ => uids,
            },
            gids: gids.unwrap_or_default(),
        };
        let defaults = SdsLimits::default();
        let limit = |key: &str, flag: &Option<String>, file: Option<u64>, min, max, default| match (
            flag, file,
        ) {
            (Some(raw), _) => bounded(key, raw, min, max),
            (None, Some(n)) => bounded(key, &n.to_string(), min, max),
            (None, None) => Ok(default),
        };
        let limits = SdsLimits {
            max_streams: limit(
                "max-streams",
                &self.max_streams,
                file.max_streams,
                1,
                1 << 20,
                defaults.max_streams as u64,
            )? as usize,
            max_message_size: limit(
                "max-message-size",
                &self.max_message_size,
                file.max_message_size,
                1024,
                16 << 20,
                defaults.max_message_size as u64,
            )? as usize,
            max_requests_per_second: limit(
                "max-requests-per-second",
                &self.max_requests_per_second,
                file.max_requests_per_second,
                1,
                100_000,
                u64::from(defaults.max_requests_per_second),
            )? as u32,
        };
        let td_raw =
            pick(&self.trust_domain, &file.trust_domain).unwrap_or_else(|| "cluster.local".into());
        let trust_domain =
            TrustDomain::from_str(&td_raw).map_err(|e| invalid("trust-domain", &td_raw, e))?;
        let ns = pick(&self.namespace, &file.namespace).unwrap_or_else(|| "default".into());
        let sa =
            pick(&self.service_account, &file.service_account).unwrap_or_else(|| "default".into());
        let spiffe_id = SpiffeId::for_service_account(trust_domain, &ns, &sa).map_err(|e| {
            let (setting, value) = match &e {
                sds_backends::IdentityError::EmptySegment { what }
                | sds_backends::IdentityError::DotSegment { what, .. }
                | sds_backends::IdentityError::BadSegmentChar { what, .. }
                    if *what == "service account" =>
                {
                    ("service-account", sa.as_str())
                }
                _ => ("namespace", ns.as_str()),
            };
            invalid(setting, value, e)
        })?;

        // The mode first: a backend refuses, in node mode, what names one workload's
        // resources.
        let (mode, node, ca_concurrency, identity_idle_timeout) = self.node.resolve(&file)?;
        let ca_raw = self
            .ca
            .clone()
            .or_else(|| file.ca.clone().map(CaList::into_text))
            .unwrap_or_else(|| "embedded".into());
        let ctx = ResolveContext {
            namespace: &ns,
            node_mode: mode == Mode::Node,
            std_env,
        };
        let ca_failover_after = pick(&self.ca_failover_after, &file.ca_failover_after)
            .map(|raw| parse_failover_after(&raw))
            .transpose()?;
        let mut cas = Vec::new();
        for name in parse_ca_list(&ca_raw)? {
            cas.push(self.backends.resolve(name, &file_backends, &ctx)?);
        }
        // `parse_ca_list` returns at least one name.
        let ca = cas.remove(0);
        let ca_fallbacks = cas;
        if ca_failover_after.is_some() && ca_fallbacks.is_empty() {
            return Err(ConfigError::Conflict(format!(
                "--ca-failover-after needs --ca to list two or more backends, e.g. vault,embedded (--ca is {ca_raw:?})"
            )));
        }

        let cert_ttl = match pick(&self.cert_ttl, &file.cert_ttl) {
            Some(v) => parse_ttl(&v).map_err(|r| invalid("cert-ttl", &v, r))?,
            None => DEFAULT_TTL,
        };
        let renew_at = match (&self.renew_at, file.renew_at) {
            (Some(v), _) => v.parse().map_err(|r| invalid("renew-at", v, r))?,
            (None, Some(f)) => {
                RenewAt::new(f).map_err(|r| invalid("renew-at", &f.to_string(), r))?
            }
            (None, None) => RenewAt(DEFAULT_RENEW_AT),
        };
        let key_type = match pick(&self.key_type, &file.key_type) {
            Some(v) => v.parse().map_err(|e| invalid("key-type", &v, e))?,
            None => KeyType::default(),
        };
        let admin_raw =
            pick(&self.admin_addr, &file.admin_addr).unwrap_or_else(|| DEFAULT_ADMIN_ADDR.into());
        let admin_addr = admin_raw.parse().map_err(|_| {
            invalid(
                "admin-addr",
                &admin_raw,
                "expected IP:PORT, e.g. 127.0.0.1:15020",
            )
        })?;
        let status_addr = pick(&self.status_addr, &file.status_addr)
            .map(|raw| {
                raw.parse().map_err(|_| {
                    invalid("status-addr", &raw, "expected IP:PORT, e.g. 0.0.0.0:15021")
                })
            })
            .transpose()?;
        let log_format = match pick(&self.log_format, &file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("log-format", other, "expected text or json")),
        };
        let output_dir = self.output_dir.clone().or_else(|| file.output_dir.clone());
        if output_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("output-dir", "", "must not be empty"));
        }
        if mode == Mode::Node && output_dir.is_some() {
            return Err(ConfigError::Conflict(
                "--output-dir writes one workload's files; it cannot be used with --mode node"
                    .into(),
            ));
        }
        let (federate_with, federation_poll_interval) =
            self.federation(&file, spiffe_id.trust_domain())?;
        let second = Duration::from_secs(1);
        let root_overlap = match pick(&self.root_overlap, &file.root_overlap) {
            Some(raw) => min_duration("root-overlap", &raw, second, "30m, 24h")?,
            None => cert_ttl,
        };
        let trust_bundle_refresh =
            match pick(&self.trust_bundle_refresh, &file.trust_bundle_refresh) {
                Some(raw) => min_duration("trust-bundle-refresh", &raw, second, "30s, 5m")?,
                None => DEFAULT_TRUST_BUNDLE_REFRESH,
            };
        let federation_dir = self
            .federation_dir
            .clone()
            .or_else(|| file.federation_dir.clone());
        if federation_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("federation-dir", "", "must not be empty"));
        }
        let sds_plain_roots = match (&self.sds_plain_roots, file.sds_plain_roots) {
            (Some(raw), _) => match raw.trim() {
                "true" | "1" => true,
                "false" | "0" | "" => false,
                other => {
                    return Err(invalid("sds-plain-roots", other, "expected true or false"));
                }
            },
            (None, Some(b)) => b,
            (None, None) => false,
        };
        Ok(Config {
            mode,
            node,
            ca_concurrency,
            identity_idle_timeout,
            socket: PathBuf::from(socket),
            socket_mode,
            workload_api_socket,
            callers,
            limits,
            spiffe_id,
            ca,
            ca_fallbacks,
            ca_failover_after,
            cert_ttl,
            renew_at,
            key_type,
            admin_addr,
            status_addr,
            log_level: pick(&self.log_level, &file.log_level),
            log_format,
            output_dir,
            federate_with,
            federation_poll_interval,
            federation_endpoint_ca: self
                .federation_endpoint_ca
                .clone()
                .or_else(|| file.federation_endpoint_ca.clone()),
            root_overlap,
            trust_bundle_refresh,
            federation_dir,
            sds_plain_roots,
        })
    }

    /// `--federate-with` (flags and environment, else the file's list) and
    /// `--federation-poll-interval`.
    fn federation(
        &self,
        file: &FileConfig,
        own: &TrustDomain,
    ) -> Result<(Vec<FederationSource>, Duration), ConfigError> {
        let raw: Vec<String> = if self.federate_with.is_empty() {
            file.federate_with.clone().unwrap_or_default()
        } else {
            self.federate_with.clone()
        };
        let mut sources: Vec<FederationSource> = Vec::new();
        for entry in &raw {
            let bad = |reason: &str| invalid("federate-with", entry, reason);
            let Some((td, source)) = entry.split_once('=') else {
                return Err(bad(
                    "expected TD=FILE, e.g. partner.example=/etc/sds-agent/partner-bundle.json",
                ));
            };
            let trust_domain = TrustDomain::from_str(td.trim()).map_err(|e| bad(&e.to_string()))?;
            let source = source.trim();
            if source.is_empty() {
                return Err(bad("the bundle file is empty: expected TD=FILE"));
            }
            let source = if source.starts_with("https://") {
                let url = url::Url::parse(source).map_err(|e| bad(&format!("not a URL: {e}")))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("the endpoint URL has no host"));
                }
                BundleSource::Endpoint(url)
            } else if source.starts_with("http://") {
                return Err(bad(
                    "a bundle endpoint must be https:// (the https_web profile); plain http would let anyone on the path choose the roots",
                ));
            } else {
                BundleSource::File(PathBuf::from(source))
            };
            if &trust_domain == own {
                return Err(bad("that is the agent's own trust domain (--trust-domain)"));
            }
            if sources.iter().any(|s| s.trust_domain == trust_domain) {
                return Err(bad("that trust domain is given twice"));
            }
            sources.push(FederationSource {
                trust_domain,
                source,
            });
        }
        let raw_every = self
            .federation_poll_interval
            .clone()
            .or_else(|| file.federation_poll_interval.clone());
        let every = match raw_every {
            Some(raw) => min_duration(
                "federation-poll-interval",
                &raw,
                MIN_FEDERATION_POLL_INTERVAL,
                "1s, 30s",
            )?,
            None => DEFAULT_FEDERATION_POLL_INTERVAL,
        };
        Ok((sources, every))
    }
}

/// How often federated bundle files are checked, unless set.
const DEFAULT_FEDERATION_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest `--federation-poll-interval`.
const MIN_FEDERATION_POLL_INTERVAL: Duration = Duration::from_millis(100);

impl RenewAt {
    /// A fraction strictly between 0 and 1.
    pub fn new(f: f64) -> Result<Self, &'static str> {
        if f.is_finite() && f > 0.0 && f < 1.0 {
            Ok(Self(f))
        } else {
            Err("must be a fraction strictly between 0 and 1, e.g. 0.5")
        }
    }

    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for RenewAt {
    fn default() -> Self {
        Self(DEFAULT_RENEW_AT)
    }
}

impl FromStr for RenewAt {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let f: f64 = s.trim().parse().map_err(|_| "must be a number, e.g. 0.5")?;
        Self::new(f)
    }
}

/// Where the service account's token and CA are mounted in a pod.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl NodeArgs {
    /// The mode, node mode's settings, the CA concurrency and the idle timeout, from these
    /// flags (and environment) over `file` over the defaults.
    fn resolve(
        &self,
        file: &FileConfig,
    ) -> Result<(Mode, Option<NodeSettings>, usize, Duration), ConfigError> {
        let pick =
            |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());
        let number = |key: &str, flag: &Option<String>, file: Option<u64>, min, max, default| match (
            flag, file,
        ) {
            (Some(raw), _) => bounded(key, raw, min, max),
            (None, Some(n)) => bounded(key, &n.to_string(), min, max),
            (None, None) => Ok(default),
        };
        let duration =
            |key: &str, flag: &Option<String>, file: &Option<String>, min: Duration, default| {
                match pick(flag, file) {
                    Some(raw) => min_duration(key, &raw, min, "500ms, 30s, 1h"),
                    None => Ok(default),
                }
            };
        let mode = match pick(&self.mode, &file.mode).as_deref() {
            None | Some("pod") => Mode::Pod,
            Some("node") => Mode::Node,
            Some(other) => return Err(invalid("mode", other, "expected pod or node")),
        };
        let ca_concurrency = number(
            "ca-concurrency",
            &self.ca_concurrency,
            file.ca_concurrency,
            1,
            1024,
            8,
        )? as usize;
        let idle = duration(
            "identity-idle-timeout",
            &self.identity_idle_timeout,
            &file.identity_idle_timeout,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        if mode == Mode::Pod {
            return Ok((mode, None, ca_concurrency, idle));
        }
        let node_name = pick(&self.node_name, &file.node_name).filter(|n| !n.is_empty());
        let kubelet_host = pick(&self.kubelet_host, &file.kubelet_host)
            .filter(|h| !h.is_empty())
            .or_else(|| node_name.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        if kubelet_host.contains(['/', ' ', '@', '?', '#']) {
            return Err(invalid(
                "kubelet-host",
                &kubelet_host,
                "expected a host name or an IP address",
            ));
        }
        let read_only = self
            .kubelet_read_only_port
            .clone()
            .or_else(|| file.kubelet_read_only_port.map(|p| p.to_string()))
            .map(|raw| bounded("kubelet-read-only-port", &raw, 1, 65535))
            .transpose()?;
        let secure_port = number(
            "kubelet-port",
            &self.kubelet_port,
            file.kubelet_port,
            1,
            65535,
            10250,
        )?;
        let skip_verify = match (&self.kubelet_skip_tls_verify, file.kubelet_skip_tls_verify) {
            (Some(raw), _) => match raw.trim() {
                "true" | "1" => true,
                "false" | "0" | "" => false,
                other => {
                    return Err(invalid(
                        "kubelet-skip-tls-verify",
                        other,
                        "expected true or false",
                    ));
                }
            },
            (None, Some(b)) => b,
            (None, None) => false,
        };
        let ca_given = self.kubelet_ca.clone().or_else(|| file.kubelet_ca.clone());
        if skip_verify && ca_given.is_some() {
            return Err(ConfigError::Conflict(
                "--kubelet-ca and --kubelet-skip-tls-verify: give one (a CA to verify the kubelet with, or none)".into(),
            ));
        }
        let kubelet_ca = match (read_only, skip_verify) {
            (Some(_), _) | (None, true) => None,
            (None, false) => {
                Some(ca_given.unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt")))
            }
        };
        let kubelet_token_file = self
            .kubelet_token_file
            .clone()
            .or_else(|| file.kubelet_token_file.clone())
            .unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("token"));
        let kubelet_poll_interval = duration(
            "kubelet-poll-interval",
            &self.kubelet_poll_interval,
            &file.kubelet_poll_interval,
            Duration::from_millis(10),
            Duration::from_millis(500),
        )?;
        let kubelet_max_attempts = number(
            "kubelet-max-attempts",
            &self.kubelet_max_attempts,
            file.kubelet_max_attempts,
            1,
            1000,
            10,
        )? as u32;
        let proc_root = self
            .proc_root
            .clone()
            .or_else(|| file.proc_root.clone())
            .unwrap_or_else(|| PathBuf::from("/proc"));
        if proc_root.as_os_str().is_empty() {
            return Err(invalid("proc-root", "", "must not be empty"));
        }
        let node = NodeSettings {
            node_name,
            kubelet_host,
            kubelet_port: read_only.unwrap_or(secure_port) as u16,
            kubelet_read_only: read_only.is_some(),
            kubelet_ca,
            kubelet_token_file,
            kubelet_skip_tls_verify: skip_verify && read_only.is_none(),
            kubelet_poll_interval,
            kubelet_max_attempts,
            proc_root,
        };
        Ok((mode, Some(node), ca_concurrency, idle))
    }
}

/// Reads the config file: the agent's own keys, and each backend's. A key nobody knows is
/// refused before any value is looked at; otherwise the first bad value in the file is the
/// one reported, whoever owns it.
fn read_file(path: &Path) -> Result<(FileConfig, CaArgs), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |e: toml::de::Error| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    };
    toml::from_str::<KnownKeys>(&text).map_err(parse_error)?;
    match (
        toml::from_str::<FileConfig>(&text),
        CaArgs::from_file(&TomlText(&text)),
    ) {
        (Ok(own), Ok(backends)) => Ok((own, backends)),
        (own, backends) => {
            let errors = own
                .err()
                .into_iter()
                .chain(backends.err().into_iter().flatten());
            let first = errors.min_by_key(|e| e.span().map_or(0, |span| span.start));
            // One of the two failed, so there is an error to report.
            Err(first.map_or_else(
                || ConfigError::ParseFile {
                    path: path.to_owned(),
                    message: "unreadable".into(),
                },
                parse_error,
            ))
        }
    }
}

/// The config file's text, from which each backend reads its keys.
struct TomlText<'a>(&'a str);

impl FileSource for TomlText<'_> {
    type Error = toml::de::Error;

    fn read<T: serde::de::DeserializeOwned>(&self) -> Result<T, toml::de::Error> {
        toml::from_str(self.0)
    }
}

/// Every key the config file may have: the flags of `run` but `--config`, in their order.
fn file_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        RunArgs::augment_args(clap::Command::new("run"))
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| *long != "config")
            // Once per process, for serde's `&'static` list of expected keys.
            .map(|long| &*Box::leak(long.to_owned().into_boxed_str()))
            .collect()
    })
}

/// Checks that every key of the config file is one of [`file_keys`], as serde's
/// `deny_unknown_fields` would: the error names the key, its position, and the keys known.
struct KnownKeys;

impl<'de> Deserialize<'de> for KnownKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        struct Key;
        struct KeyName;

        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KnownKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct FileConfig")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KnownKeys, A::Error> {
                while map.next_key_seed(Key)?.is_some() {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(KnownKeys)
            }
        }

        impl<'de> serde::de::DeserializeSeed<'de> for Key {
            type Value = ();

            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_identifier(KeyName)
            }
        }

        impl serde::de::Visitor<'_> for KeyName {
            type Value = ();

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("field identifier")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<(), E> {
                if file_keys().contains(&key) {
                    Ok(())
                } else {
                    Err(E::unknown_field(key, file_keys()))
                }
            }
        }

        d.deserialize_struct("FileConfig", file_keys(), Keys)
    }
}

/// The names of `--ca`, in order: `vault,embedded`. Refuses an empty name, an unknown one
/// and a name given twice.
fn parse_ca_list(raw: &str) -> Result<Vec<&str>, ConfigError> {
    let names: Vec<&str> = raw.split(',').map(str::trim).collect();
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(invalid(
                "ca",
                raw,
                "an empty backend name; expected one backend, or several separated by commas, e.g. vault,embedded",
            ));
        }
        if !sds_backends::settings::NAMES.contains(name) {
            // Every name is checked before any backend's settings are, so a misspelt name is
            // what the error says, not a fallback's missing flag.
            return Err(invalid(
                "ca",
                name,
                format!(
                    "the backends are: {}",
                    sds_backends::settings::NAMES.join(", ")
                ),
            ));
        }
        if names[..i].contains(name) {
            return Err(invalid(
                "ca",
                raw,
                format!("{name} is listed twice; each backend may appear once"),
            ));
        }
    }
    Ok(names)
}

/// `--ca-failover-after`: a duration of at least a second.
fn parse_failover_after(raw: &str) -> Result<Duration, ConfigError> {
    min_duration(
        "ca-failover-after",
        raw,
        Duration::from_secs(1),
        "30s, 15m, 6h",
    )
}

/// The duration setting `key` = `raw`, at least `min`; `examples` go in the error of one that
/// does not parse.
fn min_duration(
    key: &str,
    raw: &str,
    min: Duration,
    examples: &str,
) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|e| invalid(key, raw, format!("{e}; expected e.g. {examples}")))?;
    if d < min {
        return Err(invalid(
            key,
            raw,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(d)
}

/// Serializes an optional duration as people write it.
fn humanized_option<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => humanized(d, s),
        None => s.serialize_none(),
    }
}

/// `30s`, `90m`, `24h`, `1h30m`: humantime's syntax, at least 5 s.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected e.g. 30s, 90m, 24h"))?;
    if d < MIN_TTL {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(MIN_TTL)
        ));
    }
    Ok(d)
}

/// Octal permission bits: `0600`, `600` or `0o600`.
/// Whether two socket paths name the same file, as far as can be told before either exists:
/// equal once made absolute (relative to the working directory) and `.` components are
/// dropped.
fn same_path(a: &Path, b: &Path) -> bool {
    let cwd = std::env::current_dir().unwrap_or_default();
    let absolute = |p: &Path| -> PathBuf {
        cwd.join(p)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    absolute(a) == absolute(b)
}

fn parse_mode(s: &str) -> Result<u32, &'static str> {
    let digits = s.trim().trim_start_matches("0o");
    let mode =
        u32::from_str_radix(digits, 8).map_err(|_| "expected octal permission bits, e.g. 0600")?;
    if mode > 0o777 {
        return Err("only permission bits (at most 0777) may be set");
    }
    if mode & 0o600 != 0o600 {
        return Err("the owner must keep read and write permission (0600)");
    }
    Ok(mode)
}

fn invalid(flag: &str, value: &str, reason: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        setting: setting_name(flag),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

pub(crate) fn display<S: serde::Serializer, T: fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sds_backends::acm_pca::settings::AcmPcaSettings;
    use sds_backends::cert_manager::settings::{CertManagerArgs, CertManagerSettings};
    use sds_backends::embedded::settings::{EmbeddedArgs, EmbeddedSettings};
    use sds_backends::istiod::settings::{IstiodArgs, IstiodSettings};
    use sds_backends::vault::settings::{VaultAuthSettings, VaultSettings};
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults() {
        let c = RunArgs::default().resolve().unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(
            c.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(
            c.ca,
            CaConfig::Embedded(Box::new(EmbeddedSettings {
                cert: None,
                key: None,
                next_cert: None,
                next_key: None,
            }))
        );
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.renew_at.get(), 0.5);
        assert_eq!(c.key_type, KeyType::EcdsaP256);
        assert_eq!(c.admin_addr, "127.0.0.1:15020".parse().unwrap());
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let f = file(
            "trust-domain = \"file.org\"\nnamespace = \"from-file\"\ncert-ttl = \"90m\"\nrenew-at = 0.7\n",
        );
        let args = RunArgs {
            config: Some(f.path().to_owned()),
            trust_domain: Some("flag.org".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(
            c.spiffe_id.to_string(),
            "spiffe://flag.org/ns/from-file/sa/default"
        );
        assert_eq!(c.cert_ttl, Duration::from_secs(90 * 60));
        assert_eq!(c.renew_at.get(), 0.7);
    }

    #[test]
    fn federation_dir_and_plain_roots_come_from_flags_or_the_file() {
        let f = file("federation-dir = \"/etc/bundles\"\nsds-plain-roots = true\n");
        let from_file = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            from_file.federation_dir,
            Some(PathBuf::from("/etc/bundles"))
        );
        assert!(from_file.sds_plain_roots);
        let flags = RunArgs {
            config: Some(f.path().to_owned()),
            federation_dir: Some("/run/bundles".into()),
            sds_plain_roots: Some("false".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(flags.federation_dir, Some(PathBuf::from("/run/bundles")));
        assert!(!flags.sds_plain_roots);
        let none = RunArgs::default().resolve().unwrap();
        assert_eq!(none.federation_dir, None);
        assert!(!none.sds_plain_roots, "the SPIFFE validator unless asked");
        for (args, setting) in [
            (
                RunArgs {
                    sds_plain_roots: Some("maybe".into()),
                    ..Default::default()
                },
                "sds-plain-roots",
            ),
            (
                RunArgs {
                    federation_dir: Some(PathBuf::new()),
                    ..Default::default()
                },
                "federation-dir",
            ),
        ] {
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(setting), "{err}");
        }
    }

    #[test]
    fn federated_domains_come_from_flags_or_else_the_file_whole() {
        let f = file(
            "federate-with = [\"a.example=/etc/a.json\", \"b.example=https://bundle.b.example/\"]\nfederation-poll-interval = \"30s\"\n",
        );
        let from_file = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let domains: Vec<(String, BundleSource)> = from_file
            .federate_with
            .iter()
            .map(|s| (s.trust_domain.to_string(), s.source.clone()))
            .collect();
        assert_eq!(
            domains,
            [
                (
                    "a.example".to_owned(),
                    BundleSource::File("/etc/a.json".into())
                ),
                (
                    "b.example".to_owned(),
                    BundleSource::Endpoint("https://bundle.b.example/".parse().unwrap())
                ),
            ]
        );
        assert_eq!(from_file.federation_poll_interval, Duration::from_secs(30));
        // Flags replace the file's list; they do not add to it.
        let flags = RunArgs {
            config: Some(f.path().to_owned()),
            federate_with: vec!["c.example=/etc/c.pem".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(flags.federate_with.len(), 1);
        assert_eq!(flags.federate_with[0].trust_domain.as_str(), "c.example");
        let none = RunArgs::default().resolve().unwrap();
        assert!(none.federate_with.is_empty());
        assert_eq!(none.federation_poll_interval, Duration::from_secs(5));
    }

    #[test]
    fn malformed_files_are_refused_with_their_position() {
        let f = file("trust-domain = \n");
        let err = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err}");
        assert!(err.to_string().contains("line 1"), "{err}");

        let f = file("trust_domain = \"x\"\n");
        let err = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");

        let f = file("renew-at = \"half\"\n");
        assert!(
            RunArgs {
                config: Some(f.path().to_owned()),
                ..Default::default()
            }
            .resolve()
            .is_err()
        );

        let err = RunArgs {
            config: Some("/nonexistent/sds.toml".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases: Vec<(RunArgs, &str)> = vec![
            (
                RunArgs {
                    trust_domain: Some("Bad.Domain".into()),
                    ..Default::default()
                },
                "--trust-domain (SDS_AGENT_TRUST_DOMAIN",
            ),
            (
                RunArgs {
                    namespace: Some("a/b".into()),
                    ..Default::default()
                },
                "--namespace",
            ),
            (
                RunArgs {
                    service_account: Some("".into()),
                    ..Default::default()
                },
                "--service-account",
            ),
            (
                RunArgs {
                    cert_ttl: Some("soon".into()),
                    ..Default::default()
                },
                "--cert-ttl",
            ),
            (
                RunArgs {
                    cert_ttl: Some("1s".into()),
                    ..Default::default()
                },
                "at least 5s",
            ),
            (
                RunArgs {
                    renew_at: Some("1.0".into()),
                    ..Default::default()
                },
                "--renew-at",
            ),
            (
                RunArgs {
                    renew_at: Some("0".into()),
                    ..Default::default()
                },
                "--renew-at",
            ),
            (
                RunArgs {
                    key_type: Some("ed25519".into()),
                    ..Default::default()
                },
                "--key-type",
            ),
            (
                RunArgs {
                    ca: Some("acme".into()),
                    ..Default::default()
                },
                "--ca",
            ),
            (
                RunArgs {
                    admin_addr: Some("localhost".into()),
                    ..Default::default()
                },
                "--admin-addr",
            ),
            (
                RunArgs {
                    socket_mode: Some("0999".into()),
                    ..Default::default()
                },
                "--socket-mode",
            ),
            (
                RunArgs {
                    socket_mode: Some("0200".into()),
                    ..Default::default()
                },
                "owner",
            ),
            (
                RunArgs {
                    backends: CaArgs {
                        embedded: EmbeddedArgs {
                            embedded_ca_cert: Some("ca.pem".into()),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "go together",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn the_file_refuses_unknown_keys_first_then_reports_its_first_bad_value() {
        let err_of = |text: &str| {
            let f = file(text);
            RunArgs {
                config: Some(f.path().to_owned()),
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string()
        };
        // An unknown key wins over a bad value before it, as serde's deny_unknown_fields did.
        let err = err_of("vault-addr = 3\nbogus = 1\n");
        assert!(err.contains("unknown field `bogus`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(
            err.contains("`vault-addr`") && err.contains("`socket`"),
            "{err}"
        );
        // Bad values: the first in the file, whichever owner (agent or backend) reads it.
        let err = err_of("vault-sign-verbatim = \"yes\"\nrenew-at = \"x\"\n");
        assert!(err.contains("line 1") && err.contains("a boolean"), "{err}");
        let err = err_of("renew-at = \"x\"\nvault-sign-verbatim = \"yes\"\n");
        assert!(
            err.contains("line 1") && !err.contains("a boolean"),
            "{err}"
        );
    }

    #[test]
    fn every_flag_of_run_but_config_is_a_file_key() {
        let longs: Vec<String> = RunArgs::augment_args(clap::Command::new("run"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        assert_eq!(file_keys().len(), longs.len() - 1);
        for key in [
            "socket",
            "embedded-ca-cert",
            "vault-addr",
            "ca-header",
            "pod-uid",
        ] {
            assert!(file_keys().contains(&key), "{key}");
        }
        assert!(!file_keys().contains(&"config"));
    }

    #[test]
    fn durations_and_modes_parse() {
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        assert!(parse_mode("rw").is_err());
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn vault_of(c: Config) -> VaultSettings {
        match c.ca {
            CaConfig::Vault(v) => *v,
            other => panic!("not vault: {other:?}"),
        }
    }

    #[test]
    fn vault_settings_come_from_the_file_too() {
        let f = file(
            "ca = \"vault\"\nvault-addr = \"https://v.example\"\nvault-role = \"r\"\n\
             vault-auth = \"kubernetes\"\nvault-auth-role = \"k8s-role\"\n\
             vault-sign-verbatim = true\nvault-issuer = \"next\"\n",
        );
        let v = vault_of(
            RunArgs {
                config: Some(f.path().to_owned()),
                ..Default::default()
            }
            .resolve_with_env(&no_env)
            .unwrap(),
        );
        assert!(v.sign_verbatim);
        assert_eq!(v.issuer.as_deref(), Some("next"));
        assert!(
            matches!(v.auth, VaultAuthSettings::Kubernetes { ref role, .. } if role == "k8s-role")
        );
    }

    #[test]
    fn a_ca_list_comes_from_the_file_as_a_list_or_a_string_and_flags_win() {
        let vault_keys = "vault-addr = \"https://v.example\"\nvault-role = \"r\"\n\
                          vault-auth = \"kubernetes\"\nvault-auth-role = \"k8s-role\"\n";
        let names = |c: &Config| -> Vec<&'static str> {
            std::iter::once(&c.ca)
                .chain(&c.ca_fallbacks)
                .map(CaConfig::name)
                .collect()
        };
        let f = file(&format!(
            "ca = [\"vault\", \"embedded\"]\nca-failover-after = \"2m\"\n{vault_keys}"
        ));
        let from_file = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        };
        let c = from_file.resolve_with_env(&no_env).unwrap();
        assert_eq!(names(&c), ["vault", "embedded"]);
        assert_eq!(c.ca_failover_after, Some(Duration::from_secs(120)));
        // Each listed backend got its own settings from the same file.
        assert!(matches!(&c.ca, CaConfig::Vault(v) if v.role == "r"));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["ca-fallbacks"][0]["backend"], "embedded");
        assert_eq!(json["ca-failover-after"], "2m");
        // One call may ask both: the manager's limit covers both backends' limits.
        assert_eq!(
            crate::Policy::from_config(&c).ca_timeout,
            Duration::from_secs(60)
        );

        let f = file(&format!("ca = \"embedded , vault\"\n{vault_keys}"));
        let c = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        }
        .resolve_with_env(&no_env)
        .unwrap();
        assert_eq!(names(&c), ["embedded", "vault"]);
        assert_eq!(c.ca_failover_after, None);

        // The flag replaces the file's whole list.
        let c = RunArgs {
            ca: Some("embedded".into()),
            ca_failover_after: None,
            ..from_file
        };
        let err = c.resolve_with_env(&no_env).unwrap_err().to_string();
        assert!(err.contains("--ca-failover-after needs"), "{err}");
        let c = RunArgs {
            config: None,
            ca: Some("embedded".into()),
            ..Default::default()
        }
        .resolve_with_env(&no_env)
        .unwrap();
        assert_eq!(names(&c), ["embedded"]);
        assert!(c.ca_fallbacks.is_empty());
    }

    #[test]
    fn a_bad_ca_list_in_the_file_is_refused_like_the_flag() {
        for (text, needle) in [
            (
                "ca = [\"embedded\", \"embedded\"]\n",
                "embedded is listed twice",
            ),
            ("ca = [\"embedded\", \"\"]\n", "empty backend name"),
            ("ca = \"embedded,acme\"\n", "the backends are"),
            ("ca = [\"embedded\", \"vault\"]\n", "--vault-addr"),
            (
                "ca = \"embedded\"\nca-failover-after = \"1h\"\n",
                "two or more backends",
            ),
            (
                "ca = [\"vault\", \"embedded\"]\nca-failover-after = \"0s\"\n",
                "--ca-failover-after",
            ),
            ("ca = 3\n", "line 1"),
        ] {
            let f = file(text);
            let err = RunArgs {
                config: Some(f.path().to_owned()),
                ..Default::default()
            }
            .resolve_with_env(&no_env)
            .unwrap_err()
            .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    const PCA_ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b-2c3d";

    fn pca_of(c: Config) -> AcmPcaSettings {
        match c.ca {
            CaConfig::AcmPca(v) => *v,
            other => panic!("not acm-pca: {other:?}"),
        }
    }

    #[test]
    fn acm_pca_settings_come_from_the_file_too() {
        let f = file(&format!(
            "ca = \"acm-pca\"\nacm-pca-arn = \"{PCA_ARN}\"\naws-region = \"eu-central-1\"\n\
             acm-pca-template-arn = \"arn:aws:acm-pca:::template/EndEntityClientAuthCertificate/V1\"\n"
        ));
        let v = pca_of(
            RunArgs {
                config: Some(f.path().to_owned()),
                ..Default::default()
            }
            .resolve_with_env(&no_env)
            .unwrap(),
        );
        assert_eq!(v.region, "eu-central-1");
        assert!(v.template_arn.contains("EndEntityClientAuthCertificate"));
    }

    fn istiod_of(c: Config) -> IstiodSettings {
        match c.ca {
            CaConfig::Istiod(v) => *v,
            other => panic!("not istiod: {other:?}"),
        }
    }

    #[test]
    fn istiod_settings_from_flags_and_file_and_header_values_never_printed() {
        let f = file(
            "ca = \"istiod\"\nca-addr = \"cert-manager-istio-csr.cert-manager.svc:443\"\n\
             cluster-id = \"file-cluster\"\nca-header = [\"x-tenant=blue\", \"x-api-key=s3cret\"]\n\
             ca-root-cert = \"/etc/istio-csr/ca.pem\"\nca-timeout = \"3s\"\n",
        );
        let from_file = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        };
        let v = istiod_of(from_file.resolve_with_env(&no_env).unwrap());
        assert_eq!(v.addr, "cert-manager-istio-csr.cert-manager.svc:443");
        assert_eq!(v.cluster_id.as_deref(), Some("file-cluster"));
        assert_eq!(v.headers, ["x-tenant=blue", "x-api-key=s3cret"]);
        assert_eq!(v.root_cert, Some(PathBuf::from("/etc/istio-csr/ca.pem")));
        assert_eq!(v.timeout, Duration::from_secs(3));

        // Flags win, the repeated header flag replaces the file's list.
        let args = RunArgs {
            backends: CaArgs {
                istiod: IstiodArgs {
                    cluster_id: Some("Kubernetes".into()),
                    ca_headers: vec!["x-tenant=red".into()],
                    ca_server_name: Some("istiod.istio-system.svc".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..from_file
        };
        let config = args.resolve_with_env(&no_env).unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("x-tenant=<redacted>"), "{json}");
        assert!(!json.contains("red\""), "{json}");
        let v = istiod_of(config);
        assert_eq!(v.cluster_id.as_deref(), Some("Kubernetes"));
        assert_eq!(v.headers, ["x-tenant=red"]);
        assert_eq!(v.server_name.as_deref(), Some("istiod.istio-system.svc"));
    }

    fn cert_manager_of(c: Config) -> CertManagerSettings {
        match c.ca {
            CaConfig::CertManager(v) => *v,
            other => panic!("not cert-manager: {other:?}"),
        }
    }

    #[test]
    fn cert_manager_defaults_follow_the_pod() {
        let args = RunArgs {
            ca: Some("cert-manager".into()),
            namespace: Some("shop".into()),
            backends: CaArgs {
                cert_manager: CertManagerArgs {
                    cert_manager_issuer_name: Some("mesh-ca".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let config = args.resolve_with_env(&no_env).unwrap();
        let v = cert_manager_of(config);
        assert_eq!(v.namespace, "shop", "the pod's namespace");
        assert_eq!(
            (v.issuer_kind.as_str(), v.issuer_group.as_str()),
            ("Issuer", "cert-manager.io")
        );
        assert_eq!(v.timeout, Duration::from_secs(60));
        assert!(!v.keep_requests);
        assert_eq!(
            (v.kubeconfig, v.pod_name, v.trust_bundle),
            (None, None, None)
        );
        let config = args.resolve_with_env(&no_env).unwrap();
        assert_eq!(
            crate::Policy::from_config(&config).ca_timeout,
            Duration::from_secs(75),
            "the manager waits longer than the backend"
        );
    }

    #[test]
    fn cert_manager_settings_from_file_and_flags() {
        let f = file(
            "ca = \"cert-manager\"\ncert-manager-issuer-name = \"pca\"\n\
             cert-manager-issuer-kind = \"AWSPCAClusterIssuer\"\n\
             cert-manager-issuer-group = \"awspca.cert-manager.io\"\n\
             cert-manager-namespace = \"istio-system\"\ncert-manager-timeout = \"2m\"\n\
             cert-manager-keep-requests = true\nkubeconfig = \"/etc/kube/config\"\n\
             pod-name = \"web-0\"\npod-uid = \"0d3c2b1a-1111-4222-8333-444455556666\"\n",
        );
        let from_file = RunArgs {
            config: Some(f.path().to_owned()),
            ..Default::default()
        };
        let v = cert_manager_of(from_file.resolve_with_env(&no_env).unwrap());
        assert_eq!(v.issuer_kind, "AWSPCAClusterIssuer");
        assert_eq!(v.issuer_group, "awspca.cert-manager.io");
        assert_eq!(v.namespace, "istio-system");
        assert_eq!(v.timeout, Duration::from_secs(120));
        assert!(v.keep_requests);
        assert_eq!(v.kubeconfig, Some(PathBuf::from("/etc/kube/config")));
        assert_eq!(v.pod_name.as_deref(), Some("web-0"));
        let args = RunArgs {
            backends: CaArgs {
                cert_manager: CertManagerArgs {
                    cert_manager_keep_requests: Some(false),
                    cert_manager_issuer_name: Some("other".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..from_file
        };
        let v = cert_manager_of(args.resolve_with_env(&no_env).unwrap());
        assert!(!v.keep_requests, "the flag wins");
        assert_eq!(v.issuer_name, "other");
    }
}
