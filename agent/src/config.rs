//! Command line, environment and config file, merged into one validated [`Config`].
//!
//! Precedence is flag > environment (`SDS_AGENT_<FLAG>`) > config file (`--config`, TOML,
//! keys named like the flags) > default. clap reads flags and the environment; the file is
//! read here and fills only what neither gave. Every value goes through one parser whatever
//! its source, so an error names the flag, its variable and its file key alike.
//!
//! This module reads files but never creates anything, and it knows nothing of what the
//! values are used for.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sds_backends::{KeyType, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

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
    /// Print the version and the CA backends built in.
    Version(VersionArgs),
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
    /// CA backend that signs the workload certificates. [default: embedded]
    #[arg(long, env = "SDS_AGENT_CA", value_name = "BACKEND")]
    pub ca: Option<String>,
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
    /// Embedded CA: PEM signing certificate followed by its chain up to the root. Without
    /// it, an ephemeral root is generated at start-up.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_CA_CERT", value_name = "PEM")]
    pub embedded_ca_cert: Option<PathBuf>,
    /// Embedded CA: PEM private key (PKCS#8) of the signing certificate.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_CA_KEY", value_name = "PEM")]
    pub embedded_ca_key: Option<PathBuf>,
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
    /// Vault: address, e.g. https://vault.example:8200. Falls back to VAULT_ADDR.
    #[arg(long, env = "SDS_AGENT_VAULT_ADDR", value_name = "URL")]
    pub vault_addr: Option<String>,
    /// Vault: enterprise namespace, sent as X-Vault-Namespace. Falls back to VAULT_NAMESPACE.
    #[arg(long, env = "SDS_AGENT_VAULT_NAMESPACE", value_name = "NS")]
    pub vault_namespace: Option<String>,
    /// Vault: PEM CA bundle that signed Vault's TLS certificate. Falls back to VAULT_CACERT.
    #[arg(long, env = "SDS_AGENT_VAULT_CA_CERT", value_name = "PEM")]
    pub vault_ca_cert: Option<PathBuf>,
    /// Vault: mount path of the PKI secrets engine. [default: pki]
    #[arg(long, env = "SDS_AGENT_VAULT_PKI_MOUNT", value_name = "PATH")]
    pub vault_pki_mount: Option<String>,
    /// Vault: the PKI role that signs (required with --ca vault).
    #[arg(long, env = "SDS_AGENT_VAULT_ROLE", value_name = "ROLE")]
    pub vault_role: Option<String>,
    /// Vault: sign with this issuer (issuer/<ref>/sign/<role>) instead of the mount's default.
    #[arg(long, env = "SDS_AGENT_VAULT_ISSUER", value_name = "REF")]
    pub vault_issuer: Option<String>,
    /// Vault: use sign-verbatim/<role> instead of sign/<role>. [default: false]
    #[arg(
        long,
        env = "SDS_AGENT_VAULT_SIGN_VERBATIM",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub vault_sign_verbatim: Option<bool>,
    /// Vault: pin the trust bundle to these PEM roots instead of reading the mount's issuers.
    #[arg(long, env = "SDS_AGENT_VAULT_TRUST_BUNDLE", value_name = "PEM")]
    pub vault_trust_bundle: Option<PathBuf>,
    /// Vault: auth method, token, kubernetes or approle. [default: token]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH", value_name = "METHOD")]
    pub vault_auth: Option<String>,
    /// Vault token auth: the token (prefer --vault-token-file: flags show in `ps`). Falls
    /// back to VAULT_TOKEN.
    #[arg(
        long,
        env = "SDS_AGENT_VAULT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub vault_token: Option<String>,
    /// Vault token auth: file holding the token, re-read when it changes.
    #[arg(long, env = "SDS_AGENT_VAULT_TOKEN_FILE", value_name = "FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// Vault kubernetes/approle auth: mount path of the auth method.
    /// [default: kubernetes or approle]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH_MOUNT", value_name = "PATH")]
    pub vault_auth_mount: Option<String>,
    /// Vault kubernetes auth: the auth method's role. [default: the value of --vault-role]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH_ROLE", value_name = "ROLE")]
    pub vault_auth_role: Option<String>,
    /// Vault kubernetes auth: service-account JWT file, re-read at every login.
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/token]
    #[arg(long, env = "SDS_AGENT_VAULT_JWT_FILE", value_name = "FILE")]
    pub vault_jwt_file: Option<PathBuf>,
    /// Vault approle auth: the role ID.
    #[arg(long, env = "SDS_AGENT_VAULT_ROLE_ID", value_name = "ID")]
    pub vault_role_id: Option<String>,
    /// Vault approle auth: file holding the secret ID, re-read at every login.
    #[arg(long, env = "SDS_AGENT_VAULT_SECRET_ID_FILE", value_name = "FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// Vault: time limit of one HTTP request to Vault. [default: 10s]
    #[arg(long, env = "SDS_AGENT_VAULT_TIMEOUT", value_name = "DURATION")]
    pub vault_timeout: Option<String>,
    /// ACM PCA: ARN of the private CA that signs (required with --ca acm-pca).
    #[arg(long, env = "SDS_AGENT_ACM_PCA_ARN", value_name = "ARN")]
    pub acm_pca_arn: Option<String>,
    /// ACM PCA: signing algorithm, e.g. SHA256WITHECDSA. [default: derived from the CA's key]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_SIGNING_ALGORITHM", value_name = "ALG")]
    pub acm_pca_signing_algorithm: Option<String>,
    /// ACM PCA: certificate template ARN.
    /// [default: arn:aws:acm-pca:::template/EndEntityCertificate/V1]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TEMPLATE_ARN", value_name = "ARN")]
    pub acm_pca_template_arn: Option<String>,
    /// ACM PCA: endpoint URL instead of the region's (VPC endpoints, tests). Falls back to
    /// AWS_ENDPOINT_URL_ACM_PCA.
    #[arg(long, env = "SDS_AGENT_ACM_PCA_ENDPOINT", value_name = "URL")]
    pub acm_pca_endpoint: Option<String>,
    /// ACM PCA: pin the trust bundle to these PEM roots instead of reading the CA's chain.
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TRUST_BUNDLE", value_name = "PEM")]
    pub acm_pca_trust_bundle: Option<PathBuf>,
    /// ACM PCA: time limit of one HTTP request to AWS. [default: 10s]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TIMEOUT", value_name = "DURATION")]
    pub acm_pca_timeout: Option<String>,
    /// AWS region to call. [default: the region in --acm-pca-arn]
    #[arg(long, env = "SDS_AGENT_AWS_REGION", value_name = "REGION")]
    pub aws_region: Option<String>,
    /// istiod: address of the Istio CA (istiod or istio-csr), host:port, over TLS.
    /// [default: istiod.istio-system.svc:15012]
    #[arg(long, env = "SDS_AGENT_CA_ADDR", value_name = "HOST:PORT")]
    pub ca_addr: Option<String>,
    /// istiod: PEM roots that signed the CA's TLS certificate, re-read at every reconnect.
    /// [default: the system's roots]
    #[arg(long, env = "SDS_AGENT_CA_ROOT_CERT", value_name = "PEM")]
    pub ca_root_cert: Option<PathBuf>,
    /// istiod: name to expect in the CA's TLS certificate, and to send as SNI.
    /// [default: the host of --ca-addr]
    #[arg(long, env = "SDS_AGENT_CA_SERVER_NAME", value_name = "NAME")]
    pub ca_server_name: Option<String>,
    /// istiod: file holding the service-account token sent as the bearer token, re-read at
    /// every call. [default: ./var/run/secrets/tokens/istio-token]
    #[arg(long, env = "SDS_AGENT_CA_TOKEN_FILE", value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// istiod: cluster ID sent as ClusterID metadata (istiod picks the cluster that checks
    /// the token by it).
    #[arg(long, env = "SDS_AGENT_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// istiod: extra header sent with every call, KEY=VALUE; repeatable.
    #[arg(
        long = "ca-header",
        env = "SDS_AGENT_CA_HEADER",
        value_name = "KEY=VALUE",
        hide_env_values = true
    )]
    pub ca_headers: Vec<String>,
    /// istiod: pin the trust bundle to these PEM roots instead of the root each answer ends
    /// with.
    #[arg(long, env = "SDS_AGENT_CA_TRUST_BUNDLE", value_name = "PEM")]
    pub ca_trust_bundle: Option<PathBuf>,
    /// istiod: time limit of one call to the CA. [default: 10s]
    #[arg(long, env = "SDS_AGENT_CA_TIMEOUT", value_name = "DURATION")]
    pub ca_timeout: Option<String>,
    /// cert-manager: namespace the CertificateRequests are created in.
    /// [default: --namespace, the pod's]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_NAMESPACE", value_name = "NS")]
    pub cert_manager_namespace: Option<String>,
    /// cert-manager: name of the Issuer or ClusterIssuer that signs (required with
    /// --ca cert-manager).
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_ISSUER_NAME", value_name = "NAME")]
    pub cert_manager_issuer_name: Option<String>,
    /// cert-manager: kind of the issuer: Issuer or ClusterIssuer (any kind for an external
    /// issuer's group). [default: Issuer]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_ISSUER_KIND", value_name = "KIND")]
    pub cert_manager_issuer_kind: Option<String>,
    /// cert-manager: API group of the issuer. [default: cert-manager.io]
    #[arg(
        long,
        env = "SDS_AGENT_CERT_MANAGER_ISSUER_GROUP",
        value_name = "GROUP"
    )]
    pub cert_manager_issuer_group: Option<String>,
    /// cert-manager: longest wait for a CertificateRequest to be approved and issued.
    /// [default: 60s]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_TIMEOUT", value_name = "DURATION")]
    pub cert_manager_timeout: Option<String>,
    /// cert-manager: keep the last CertificateRequest instead of deleting it once read.
    /// [default: false]
    #[arg(
        long,
        env = "SDS_AGENT_CERT_MANAGER_KEEP_REQUESTS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub cert_manager_keep_requests: Option<bool>,
    /// cert-manager: pin the trust bundle to these PEM roots, for issuers that leave
    /// status.ca empty (ACME, some external issuers).
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_TRUST_BUNDLE", value_name = "PEM")]
    pub cert_manager_trust_bundle: Option<PathBuf>,
    /// cert-manager: kubeconfig to use instead of the pod's service account.
    #[arg(long, env = "SDS_AGENT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of the pod served (Downward API metadata.name): with --pod-uid, requests are
    /// owned by the pod, so Kubernetes deletes them with it.
    #[arg(long, env = "SDS_AGENT_POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,
    /// UID of the pod served (Downward API metadata.uid).
    #[arg(long, env = "SDS_AGENT_POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,
}

/// A list of user or group IDs in the config file: `[1337, 0]`, or `"1337,0"` as on the
/// command line.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IdList {
    Numbers(Vec<u32>),
    Text(String),
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
}

impl ResolvedCallers {
    /// Whether a caller with this uid and gid may fetch secrets.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
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

/// The config file: the same keys as the flags, all optional, nothing else allowed.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
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
    ca: Option<String>,
    cert_ttl: Option<String>,
    renew_at: Option<f64>,
    key_type: Option<String>,
    embedded_ca_cert: Option<PathBuf>,
    embedded_ca_key: Option<PathBuf>,
    admin_addr: Option<String>,
    status_addr: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    output_dir: Option<PathBuf>,
    vault_addr: Option<String>,
    vault_namespace: Option<String>,
    vault_ca_cert: Option<PathBuf>,
    vault_pki_mount: Option<String>,
    vault_role: Option<String>,
    vault_issuer: Option<String>,
    vault_sign_verbatim: Option<bool>,
    vault_trust_bundle: Option<PathBuf>,
    vault_auth: Option<String>,
    vault_token: Option<String>,
    vault_token_file: Option<PathBuf>,
    vault_auth_mount: Option<String>,
    vault_auth_role: Option<String>,
    vault_jwt_file: Option<PathBuf>,
    vault_role_id: Option<String>,
    vault_secret_id_file: Option<PathBuf>,
    vault_timeout: Option<String>,
    acm_pca_arn: Option<String>,
    acm_pca_signing_algorithm: Option<String>,
    acm_pca_template_arn: Option<String>,
    acm_pca_endpoint: Option<String>,
    acm_pca_trust_bundle: Option<PathBuf>,
    acm_pca_timeout: Option<String>,
    aws_region: Option<String>,
    ca_addr: Option<String>,
    ca_root_cert: Option<PathBuf>,
    ca_server_name: Option<String>,
    ca_token_file: Option<PathBuf>,
    cluster_id: Option<String>,
    ca_header: Option<Vec<String>>,
    ca_trust_bundle: Option<PathBuf>,
    ca_timeout: Option<String>,
    cert_manager_namespace: Option<String>,
    cert_manager_issuer_name: Option<String>,
    cert_manager_issuer_kind: Option<String>,
    cert_manager_issuer_group: Option<String>,
    cert_manager_timeout: Option<String>,
    cert_manager_keep_requests: Option<bool>,
    cert_manager_trust_bundle: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    pod_name: Option<String>,
    pod_uid: Option<String>,
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
    /// The CA backend.
    pub ca: CaConfig,
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
}

/// Which CA signs, and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum CaConfig {
    /// The in-process CA.
    Embedded {
        /// Signing certificate and chain, PEM; `None` for an ephemeral root.
        cert: Option<PathBuf>,
        /// Its key, PEM.
        key: Option<PathBuf>,
    },
    /// Vault's (or OpenBao's) PKI secrets engine.
    Vault(Box<VaultSettings>),
    /// AWS Private CA.
    AcmPca(Box<AcmPcaSettings>),
    /// The Istio CA API: istiod or cert-manager istio-csr.
    Istiod(Box<IstiodSettings>),
    /// cert-manager CertificateRequests.
    CertManager(Box<CertManagerSettings>),
}

/// Settings of the cert-manager backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CertManagerSettings {
    /// Namespace of the requests.
    pub namespace: String,
    /// Issuer name.
    pub issuer_name: String,
    /// Issuer kind.
    pub issuer_kind: String,
    /// Issuer group.
    pub issuer_group: String,
    /// Longest wait for a verdict.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
    /// Keep the last request.
    pub keep_requests: bool,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Kubeconfig instead of in-cluster credentials.
    pub kubeconfig: Option<PathBuf>,
    /// The pod's name, for the ownerReference.
    pub pod_name: Option<String>,
    /// The pod's UID.
    pub pod_uid: Option<String>,
}

/// Settings of the istiod backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IstiodSettings {
    /// The CA's address, host:port.
    pub addr: String,
    /// Roots for the CA's TLS certificate, PEM file; the system's when `None`.
    pub root_cert: Option<PathBuf>,
    /// Name expected in the CA's TLS certificate.
    pub server_name: Option<String>,
    /// File holding the bearer token.
    pub token_file: PathBuf,
    /// Sent as ClusterID metadata.
    pub cluster_id: Option<String>,
    /// Extra headers, `KEY=VALUE` (values printed redacted).
    #[serde(serialize_with = "header_names")]
    pub headers: Vec<String>,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Time limit of one call.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

/// Settings of the ACM PCA backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AcmPcaSettings {
    /// The CA's ARN.
    pub arn: String,
    /// The region to call.
    pub region: String,
    /// Endpoint URL instead of the region's.
    pub endpoint: Option<String>,
    /// Signing algorithm; `None` to derive it from the CA's key.
    pub signing_algorithm: Option<String>,
    /// Certificate template ARN.
    pub template_arn: String,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Time limit of one request.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

/// Settings of the Vault backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VaultSettings {
    /// Vault's address.
    pub addr: String,
    /// Enterprise namespace.
    pub namespace: Option<String>,
    /// CA bundle for TLS to Vault.
    pub ca_cert: Option<PathBuf>,
    /// PKI mount path.
    pub pki_mount: String,
    /// PKI role.
    pub role: String,
    /// Issuer reference, if not the default issuer.
    pub issuer: Option<String>,
    /// Use sign-verbatim.
    pub sign_verbatim: bool,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// How to log in.
    pub auth: VaultAuthSettings,
    /// Time limit of one request.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

/// The Vault auth method and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum VaultAuthSettings {
    /// A token, given or in a file.
    Token {
        /// The token itself (printed redacted).
        token: Option<Redacted>,
        /// A file holding it.
        token_file: Option<PathBuf>,
    },
    /// Kubernetes service-account JWT login.
    Kubernetes {
        /// Auth mount path.
        mount: String,
        /// Auth role.
        role: String,
        /// JWT file.
        jwt_file: PathBuf,
    },
    /// AppRole login.
    Approle {
        /// Auth mount path.
        mount: String,
        /// Role ID.
        role_id: String,
        /// File holding the secret ID.
        secret_id_file: PathBuf,
    },
}

/// A secret setting: kept, but never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(zeroize::Zeroizing<String>);

impl Redacted {
    /// The secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Backend names `--ca` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CaKind {
    Embedded,
    Vault,
    AcmPca,
    Istiod,
    CertManager,
}

/// Vault auth method names `--vault-auth` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VaultAuthKind {
    Token,
    Kubernetes,
    Approle,
}

const DEFAULT_VAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const DEFAULT_VAULT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
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

        let ca_raw = pick(&self.ca, &file.ca).unwrap_or_else(|| "embedded".into());
        let ca_kind = CaKind::from_str(&ca_raw, false).map_err(|_| {
            invalid(
                "ca",
                &ca_raw,
                "the backends are: embedded, istiod, vault, acm-pca, cert-manager",
            )
        })?;
        let ca = match ca_kind {
            CaKind::Embedded => {
                let cert = self.embedded_ca_cert.clone().or(file.embedded_ca_cert);
                let key = self.embedded_ca_key.clone().or(file.embedded_ca_key);
                if cert.is_some() != key.is_some() {
                    return Err(ConfigError::Conflict(
                        "--embedded-ca-cert and --embedded-ca-key go together: give both or neither".into(),
                    ));
                }
                CaConfig::Embedded { cert, key }
            }
            CaKind::Vault => CaConfig::Vault(Box::new(self.resolve_vault(&file, std_env)?)),
            CaKind::AcmPca => CaConfig::AcmPca(Box::new(self.resolve_acm_pca(&file, std_env)?)),
            CaKind::Istiod => CaConfig::Istiod(Box::new(self.resolve_istiod(&file)?)),
            CaKind::CertManager => {
                CaConfig::CertManager(Box::new(self.resolve_cert_manager(&file, &ns)?))
            }
        };

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
        let output_dir = self.output_dir.clone().or(file.output_dir);
        if output_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("output-dir", "", "must not be empty"));
        }
        Ok(Config {
            socket: PathBuf::from(socket),
            socket_mode,
            workload_api_socket,
            callers,
            limits,
            spiffe_id,
            ca,
            cert_ttl,
            renew_at,
            key_type,
            admin_addr,
            status_addr,
            log_level: pick(&self.log_level, &file.log_level),
            log_format,
            output_dir,
        })
    }
}

impl RunArgs {
    fn resolve_vault(
        &self,
        file: &FileConfig,
        std_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<VaultSettings, ConfigError> {
        let pick = |flag: &Option<String>, file: &Option<String>, fallback: &str| {
            flag.clone()
                .or_else(|| file.clone())
                .or_else(|| std_env(fallback))
        };
        let pick_path =
            |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or_else(|| file.clone());
        let addr = pick(&self.vault_addr, &file.vault_addr, "VAULT_ADDR").ok_or_else(|| {
            ConfigError::Conflict(
                "--ca vault needs --vault-addr (SDS_AGENT_VAULT_ADDR, file key vault-addr, or \
                 VAULT_ADDR)"
                    .into(),
            )
        })?;
        match url::Url::parse(&addr) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(invalid(
                    "vault-addr",
                    &addr,
                    "expected an http:// or https:// URL, e.g. https://vault.example:8200",
                ));
            }
        }
        let role = pick(&self.vault_role, &file.vault_role, "").ok_or_else(|| {
            ConfigError::Conflict("--ca vault needs --vault-role, the PKI role that signs".into())
        })?;
        let ca_cert = pick_path(&self.vault_ca_cert, &file.vault_ca_cert)
            .or_else(|| std_env("VAULT_CACERT").map(PathBuf::from));
        let timeout = match pick(&self.vault_timeout, &file.vault_timeout, "") {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| invalid("vault-timeout", &v, "expected a duration, e.g. 10s"))?,
            None => DEFAULT_VAULT_TIMEOUT,
        };
        let auth_raw =
            pick(&self.vault_auth, &file.vault_auth, "").unwrap_or_else(|| "token".into());
        let auth_kind = VaultAuthKind::from_str(&auth_raw, false).map_err(|_| {
            invalid(
                "vault-auth",
                &auth_raw,
                "expected token, kubernetes or approle",
            )
        })?;
        let auth_mount = pick(&self.vault_auth_mount, &file.vault_auth_mount, "");
        let auth = match auth_kind {
            VaultAuthKind::Token => {
                let token_file = pick_path(&self.vault_token_file, &file.vault_token_file);
                let token = pick(&self.vault_token, &file.vault_token, "");
                let token = match (&token, &token_file) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Conflict(
                            "--vault-token and --vault-token-file are exclusive: give one".into(),
                        ));
                    }
                    (None, None) => std_env("VAULT_TOKEN"),
                    _ => token,
                };
                if token.is_none() && token_file.is_none() {
                    return Err(ConfigError::Conflict(
                        "--vault-auth token needs --vault-token-file, --vault-token or VAULT_TOKEN"
                            .into(),
                    ));
                }
                VaultAuthSettings::Token {
                    token: token.map(|t| Redacted(zeroize::Zeroizing::new(t))),
                    token_file,
                }
            }
            VaultAuthKind::Kubernetes => VaultAuthSettings::Kubernetes {
                mount: auth_mount.unwrap_or_else(|| "kubernetes".into()),
                role: pick(&self.vault_auth_role, &file.vault_auth_role, "")
                    .unwrap_or_else(|| role.clone()),
                jwt_file: pick_path(&self.vault_jwt_file, &file.vault_jwt_file)
                    .unwrap_or_else(|| DEFAULT_VAULT_JWT_FILE.into()),
            },
            VaultAuthKind::Approle => VaultAuthSettings::Approle {
                mount: auth_mount.unwrap_or_else(|| "approle".into()),
                role_id: pick(&self.vault_role_id, &file.vault_role_id, "").ok_or_else(|| {
                    ConfigError::Conflict("--vault-auth approle needs --vault-role-id".into())
                })?,
                secret_id_file: pick_path(&self.vault_secret_id_file, &file.vault_secret_id_file)
                    .ok_or_else(|| {
                    ConfigError::Conflict(
                        "--vault-auth approle needs --vault-secret-id-file".into(),
                    )
                })?,
            },
        };
        Ok(VaultSettings {
            addr,
            namespace: pick(
                &self.vault_namespace,
                &file.vault_namespace,
                "VAULT_NAMESPACE",
            ),
            ca_cert,
            pki_mount: pick(&self.vault_pki_mount, &file.vault_pki_mount, "")
                .unwrap_or_else(|| "pki".into()),
            role,
            issuer: pick(&self.vault_issuer, &file.vault_issuer, ""),
            sign_verbatim: self
                .vault_sign_verbatim
                .or(file.vault_sign_verbatim)
                .unwrap_or(false),
            trust_bundle: pick_path(&self.vault_trust_bundle, &file.vault_trust_bundle),
            auth,
            timeout,
        })
    }
}

impl RunArgs {
    fn resolve_acm_pca(
        &self,
        file: &FileConfig,
        std_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AcmPcaSettings, ConfigError> {
        let pick =
            |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());
        let arn = pick(&self.acm_pca_arn, &file.acm_pca_arn).ok_or_else(|| {
            ConfigError::Conflict(
                "--ca acm-pca needs --acm-pca-arn, the ARN of the private CA that signs".into(),
            )
        })?;
        let arn_region = parse_ca_arn(&arn).map_err(|e| invalid("acm-pca-arn", &arn, e))?;
        let region = match pick(&self.aws_region, &file.aws_region) {
            Some(r) => {
                if r.is_empty()
                    || !r
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(invalid(
                        "aws-region",
                        &r,
                        "expected a region name, e.g. us-east-1",
                    ));
                }
                r
            }
            None => arn_region,
        };
        let endpoint = pick(&self.acm_pca_endpoint, &file.acm_pca_endpoint)
            .or_else(|| std_env("AWS_ENDPOINT_URL_ACM_PCA"));
        if let Some(e) = &endpoint {
            match url::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(invalid(
                        "acm-pca-endpoint",
                        e,
                        "expected an http:// or https:// URL",
                    ));
                }
            }
        }
        let signing_algorithm = pick(
            &self.acm_pca_signing_algorithm,
            &file.acm_pca_signing_algorithm,
        );
        if let Some(alg) = &signing_algorithm {
            check_signing_algorithm(alg)
                .map_err(|e| invalid("acm-pca-signing-algorithm", alg, e))?;
        }
        let template_arn = pick(&self.acm_pca_template_arn, &file.acm_pca_template_arn)
            .unwrap_or_else(|| DEFAULT_ACM_PCA_TEMPLATE.into());
        if !template_arn.starts_with("arn:") || !template_arn.contains(":acm-pca:::template/") {
            return Err(invalid(
                "acm-pca-template-arn",
                &template_arn,
                format!(
                    "expected arn:<partition>:acm-pca:::template/<name>/V<n>, e.g. {DEFAULT_ACM_PCA_TEMPLATE}"
                ),
            ));
        }
        let timeout = match pick(&self.acm_pca_timeout, &file.acm_pca_timeout) {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| invalid("acm-pca-timeout", &v, "expected a duration, e.g. 10s"))?,
            None => DEFAULT_ACM_PCA_TIMEOUT,
        };
        Ok(AcmPcaSettings {
            arn,
            region,
            endpoint,
            signing_algorithm,
            template_arn,
            trust_bundle: self
                .acm_pca_trust_bundle
                .clone()
                .or_else(|| file.acm_pca_trust_bundle.clone()),
            timeout,
        })
    }
}

impl RunArgs {
    fn resolve_istiod(&self, file: &FileConfig) -> Result<IstiodSettings, ConfigError> {
        let pick =
            |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());
        let pick_path =
            |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or_else(|| file.clone());
        let addr = pick(&self.ca_addr, &file.ca_addr).unwrap_or_else(|| DEFAULT_ISTIOD_ADDR.into());
        check_ca_addr(&addr).map_err(|e| invalid("ca-addr", &addr, e))?;
        let server_name = pick(&self.ca_server_name, &file.ca_server_name);
        if let Some(name) = &server_name
            && (name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/'))
        {
            return Err(invalid(
                "ca-server-name",
                name,
                "expected a DNS name or IP address, e.g. istiod.istio-system.svc",
            ));
        }
        let cluster_id = pick(&self.cluster_id, &file.cluster_id);
        if let Some(id) = &cluster_id
            && (id.is_empty() || !id.bytes().all(|b| (0x21..0x7f).contains(&b)))
        {
            return Err(invalid(
                "cluster-id",
                id,
                "expected visible ASCII without spaces, e.g. Kubernetes",
            ));
        }
        let headers = if self.ca_headers.is_empty() {
            file.ca_header.clone().unwrap_or_default()
        } else {
            self.ca_headers.clone()
        };
        for h in &headers {
            let name = h.split_once('=').map_or(h.as_str(), |(k, _)| k);
            check_ca_header(h).map_err(|e| invalid("ca-header", &format!("{name}=..."), e))?;
        }
        let timeout = match pick(&self.ca_timeout, &file.ca_timeout) {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| invalid("ca-timeout", &v, "expected a duration, e.g. 10s"))?,
            None => DEFAULT_ISTIOD_TIMEOUT,
        };
        Ok(IstiodSettings {
            addr,
            root_cert: pick_path(&self.ca_root_cert, &file.ca_root_cert),
            server_name,
            token_file: pick_path(&self.ca_token_file, &file.ca_token_file)
                .unwrap_or_else(|| DEFAULT_ISTIOD_TOKEN_FILE.into()),
            cluster_id,
            headers,
            trust_bundle: pick_path(&self.ca_trust_bundle, &file.ca_trust_bundle),
            timeout,
        })
    }
}

impl RunArgs {
    fn resolve_cert_manager(
        &self,
        file: &FileConfig,
        pod_namespace: &str,
    ) -> Result<CertManagerSettings, ConfigError> {
        let pick =
            |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());
        let pick_path =
            |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or_else(|| file.clone());
        let namespace = pick(&self.cert_manager_namespace, &file.cert_manager_namespace)
            .unwrap_or_else(|| pod_namespace.to_owned());
        if !is_dns_label(&namespace) {
            return Err(invalid(
                "cert-manager-namespace",
                &namespace,
                "expected a Kubernetes namespace name (lowercase letters, digits and '-')",
            ));
        }
        let issuer_name = pick(&self.cert_manager_issuer_name, &file.cert_manager_issuer_name)
            .ok_or_else(|| {
                ConfigError::Conflict(
                    "--ca cert-manager needs --cert-manager-issuer-name                      (SDS_AGENT_CERT_MANAGER_ISSUER_NAME, file key cert-manager-issuer-name): the                      Issuer or ClusterIssuer that signs"
                        .into(),
                )
            })?;
        if !is_dns_subdomain(&issuer_name) {
            return Err(invalid(
                "cert-manager-issuer-name",
                &issuer_name,
                "expected a Kubernetes object name (lowercase letters, digits, '-' and '.')",
            ));
        }
        let issuer_group = pick(
            &self.cert_manager_issuer_group,
            &file.cert_manager_issuer_group,
        )
        .unwrap_or_else(|| DEFAULT_CERT_MANAGER_GROUP.into());
        if !is_dns_subdomain(&issuer_group) {
            return Err(invalid(
                "cert-manager-issuer-group",
                &issuer_group,
                "expected an API group, e.g. cert-manager.io or awspca.cert-manager.io",
            ));
        }
        let issuer_kind = pick(
            &self.cert_manager_issuer_kind,
            &file.cert_manager_issuer_kind,
        )
        .unwrap_or_else(|| "Issuer".into());
        let kind_ok = if issuer_group == DEFAULT_CERT_MANAGER_GROUP {
            matches!(issuer_kind.as_str(), "Issuer" | "ClusterIssuer")
        } else {
            issuer_kind.starts_with(|c: char| c.is_ascii_uppercase())
                && issuer_kind.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if !kind_ok {
            return Err(invalid(
                "cert-manager-issuer-kind",
                &issuer_kind,
                "expected Issuer or ClusterIssuer (an external issuer's own kind, e.g.                  AWSPCAClusterIssuer, goes with its --cert-manager-issuer-group)",
            ));
        }
        let timeout = match pick(&self.cert_manager_timeout, &file.cert_manager_timeout) {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| {
                    invalid(
                        "cert-manager-timeout",
                        &v,
                        "expected a duration of at least 1s, e.g. 60s",
                    )
                })?,
            None => DEFAULT_CERT_MANAGER_TIMEOUT,
        };
        let pod_name = pick(&self.pod_name, &file.pod_name);
        let pod_uid = pick(&self.pod_uid, &file.pod_uid);
        if pod_name.is_some() != pod_uid.is_some() {
            return Err(ConfigError::Conflict(
                "--pod-name and --pod-uid go together (both from the Downward API:                  metadata.name and metadata.uid): give both or neither"
                    .into(),
            ));
        }
        if let Some(uid) = &pod_uid
            && (uid.is_empty()
                || uid.len() > 63
                || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(invalid(
                "pod-uid",
                uid,
                "expected a UID, e.g. 0d3c2b1a-...-6666",
            ));
        }
        if let Some(name) = &pod_name
            && !is_dns_subdomain(name)
        {
            return Err(invalid("pod-name", name, "expected a pod name"));
        }
        Ok(CertManagerSettings {
            namespace,
            issuer_name,
            issuer_kind,
            issuer_group,
            timeout,
            keep_requests: self
                .cert_manager_keep_requests
                .or(file.cert_manager_keep_requests)
                .unwrap_or(false),
            trust_bundle: pick_path(
                &self.cert_manager_trust_bundle,
                &file.cert_manager_trust_bundle,
            ),
            kubeconfig: pick_path(&self.kubeconfig, &file.kubeconfig),
            pod_name,
            pod_uid,
        })
    }
}

const DEFAULT_CERT_MANAGER_GROUP: &str = "cert-manager.io";
const DEFAULT_CERT_MANAGER_TIMEOUT: Duration = Duration::from_secs(60);

/// An RFC 1123 label: what a namespace name must be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain: what most object names and API groups must be.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

const DEFAULT_ISTIOD_ADDR: &str = "istiod.istio-system.svc:15012";
const DEFAULT_ISTIOD_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
const DEFAULT_ISTIOD_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(feature = "istiod")]
fn check_ca_addr(addr: &str) -> Result<(), String> {
    addr.parse::<sds_backends::istiod::CaAddr>()
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "istiod"))]
fn check_ca_addr(_addr: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(feature = "istiod")]
fn check_ca_header(header: &str) -> Result<(), String> {
    header
        .parse::<sds_backends::istiod::ExtraHeader>()
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "istiod"))]
fn check_ca_header(_header: &str) -> Result<(), String> {
    Ok(())
}

const DEFAULT_ACM_PCA_TEMPLATE: &str = "arn:aws:acm-pca:::template/EndEntityCertificate/V1";
const DEFAULT_ACM_PCA_TIMEOUT: Duration = Duration::from_secs(10);

/// The region of a private CA's ARN, or why it is not one.
#[cfg(feature = "acm-pca")]
fn parse_ca_arn(arn: &str) -> Result<String, String> {
    arn.parse::<sds_backends::acm_pca::CaArn>()
        .map(|a| a.region().to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "acm-pca"))]
fn parse_ca_arn(arn: &str) -> Result<String, String> {
    arn.split(':')
        .nth(3)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "not an ACM PCA certificate authority ARN".to_owned())
}

#[cfg(feature = "acm-pca")]
fn check_signing_algorithm(alg: &str) -> Result<(), String> {
    sds_backends::acm_pca::parse_signing_algorithm(alg)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "acm-pca"))]
fn check_signing_algorithm(_alg: &str) -> Result<(), String> {
    Ok(())
}

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

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
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
    let var = format!("SDS_AGENT_{}", flag.to_uppercase().replace('-', "_"));
    ConfigError::Invalid {
        setting: format!("--{flag} ({var}, file key {flag})"),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

fn humanized<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Extra headers as `name=<redacted>`: their values may be credentials.
fn header_names<S: serde::Serializer>(headers: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|h| {
        format!(
            "{}=<redacted>",
            h.split_once('=').map_or(h.as_str(), |(k, _)| k)
        )
    }))
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;
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
            CaConfig::Embedded {
                cert: None,
                key: None
            }
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
                    embedded_ca_cert: Some("ca.pem".into()),
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

    fn vault_args() -> RunArgs {
        RunArgs {
            ca: Some("vault".into()),
            vault_addr: Some("https://vault.example:8200".into()),
            vault_role: Some("sds".into()),
            vault_token_file: Some("/run/vault-token".into()),
            ..Default::default()
        }
    }

    fn vault_of(c: Config) -> VaultSettings {
        match c.ca {
            CaConfig::Vault(v) => *v,
            other => panic!("not vault: {other:?}"),
        }
    }

    #[test]
    fn vault_defaults_and_auth_methods() {
        let v = vault_of(vault_args().resolve_with_env(&no_env).unwrap());
        assert_eq!(v.pki_mount, "pki");
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert!(!v.sign_verbatim);
        assert_eq!(
            v.auth,
            VaultAuthSettings::Token {
                token: None,
                token_file: Some("/run/vault-token".into())
            }
        );

        let v = vault_of(
            RunArgs {
                vault_auth: Some("kubernetes".into()),
                vault_token_file: None,
                ..vault_args()
            }
            .resolve_with_env(&no_env)
            .unwrap(),
        );
        assert_eq!(
            v.auth,
            VaultAuthSettings::Kubernetes {
                mount: "kubernetes".into(),
                role: "sds".into(),
                jwt_file: DEFAULT_VAULT_JWT_FILE.into(),
            }
        );

        let v = vault_of(
            RunArgs {
                vault_auth: Some("approle".into()),
                vault_role_id: Some("rid".into()),
                vault_secret_id_file: Some("/run/sid".into()),
                vault_auth_mount: Some("approle-mesh".into()),
                ..vault_args()
            }
            .resolve_with_env(&no_env)
            .unwrap(),
        );
        assert_eq!(
            v.auth,
            VaultAuthSettings::Approle {
                mount: "approle-mesh".into(),
                role_id: "rid".into(),
                secret_id_file: "/run/sid".into(),
            }
        );
    }

    #[test]
    fn vault_falls_back_to_the_usual_vault_variables() {
        let env = |name: &str| match name {
            "VAULT_ADDR" => Some("http://127.0.0.1:8200".to_owned()),
            "VAULT_TOKEN" => Some("hvs.secret-token".to_owned()),
            "VAULT_CACERT" => Some("/etc/vault-ca.pem".to_owned()),
            "VAULT_NAMESPACE" => Some("team-a".to_owned()),
            _ => None,
        };
        let args = RunArgs {
            ca: Some("vault".into()),
            vault_role: Some("sds".into()),
            ..Default::default()
        };
        let c = args.resolve_with_env(&env).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("hvs.secret-token"), "{json}");
        assert!(json.contains("<redacted>"), "{json}");
        assert!(!format!("{c:?}").contains("hvs.secret-token"));
        let v = vault_of(c);
        assert_eq!(v.addr, "http://127.0.0.1:8200");
        assert_eq!(v.ca_cert, Some("/etc/vault-ca.pem".into()));
        assert_eq!(v.namespace.as_deref(), Some("team-a"));
        let VaultAuthSettings::Token { token: Some(t), .. } = v.auth else {
            panic!("token auth expected")
        };
        assert_eq!(t.expose(), "hvs.secret-token");

        // Flags win over the fallbacks.
        let v = vault_of(
            RunArgs {
                vault_addr: Some("https://flag.example".into()),
                ..args
            }
            .resolve_with_env(&env)
            .unwrap(),
        );
        assert_eq!(v.addr, "https://flag.example");
    }

    #[test]
    fn vault_settings_are_checked() {
        let cases: Vec<(RunArgs, &str)> = vec![
            (
                RunArgs {
                    vault_addr: None,
                    ..vault_args()
                },
                "needs --vault-addr",
            ),
            (
                RunArgs {
                    vault_addr: Some("vault:8200".into()),
                    ..vault_args()
                },
                "--vault-addr",
            ),
            (
                RunArgs {
                    vault_role: None,
                    ..vault_args()
                },
                "needs --vault-role",
            ),
            (
                RunArgs {
                    vault_auth: Some("ldap".into()),
                    ..vault_args()
                },
                "--vault-auth",
            ),
            (
                RunArgs {
                    vault_token: Some("t".into()),
                    ..vault_args()
                },
                "exclusive",
            ),
            (
                RunArgs {
                    vault_token_file: None,
                    ..vault_args()
                },
                "needs --vault-token-file",
            ),
            (
                RunArgs {
                    vault_auth: Some("approle".into()),
                    vault_secret_id_file: Some("/run/sid".into()),
                    ..vault_args()
                },
                "needs --vault-role-id",
            ),
            (
                RunArgs {
                    vault_auth: Some("approle".into()),
                    vault_role_id: Some("rid".into()),
                    ..vault_args()
                },
                "needs --vault-secret-id-file",
            ),
            (
                RunArgs {
                    vault_timeout: Some("0s".into()),
                    ..vault_args()
                },
                "--vault-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve_with_env(&no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
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

    const PCA_ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b-2c3d";

    fn pca_of(c: Config) -> AcmPcaSettings {
        match c.ca {
            CaConfig::AcmPca(v) => *v,
            other => panic!("not acm-pca: {other:?}"),
        }
    }

    #[test]
    fn acm_pca_defaults_region_from_the_arn_and_endpoint_fallback() {
        let args = RunArgs {
            ca: Some("acm-pca".into()),
            acm_pca_arn: Some(PCA_ARN.into()),
            ..Default::default()
        };
        let v = pca_of(args.resolve_with_env(&no_env).unwrap());
        assert_eq!(v.region, "eu-west-1");
        assert_eq!(v.template_arn, DEFAULT_ACM_PCA_TEMPLATE);
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert_eq!(v.signing_algorithm, None);
        assert_eq!(v.endpoint, None);

        let env = |name: &str| {
            (name == "AWS_ENDPOINT_URL_ACM_PCA").then(|| "http://127.0.0.1:5000".to_owned())
        };
        let v = pca_of(args.resolve_with_env(&env).unwrap());
        assert_eq!(v.endpoint.as_deref(), Some("http://127.0.0.1:5000"));

        let args = RunArgs {
            aws_region: Some("us-gov-west-1".into()),
            acm_pca_endpoint: Some("https://vpce-1.acm-pca.eu-west-1.vpce.amazonaws.com".into()),
            acm_pca_signing_algorithm: Some("SHA384WITHECDSA".into()),
            acm_pca_timeout: Some("3s".into()),
            ..args
        };
        let v = pca_of(args.resolve_with_env(&env).unwrap());
        assert_eq!(v.region, "us-gov-west-1");
        assert!(v.endpoint.unwrap().starts_with("https://vpce-1"));
        assert_eq!(v.signing_algorithm.as_deref(), Some("SHA384WITHECDSA"));
        assert_eq!(v.timeout, Duration::from_secs(3));
    }

    #[test]
    fn acm_pca_settings_that_cannot_work_name_their_flag() {
        let base = || RunArgs {
            ca: Some("acm-pca".into()),
            acm_pca_arn: Some(PCA_ARN.into()),
            ..Default::default()
        };
        let cases = [
            (
                RunArgs {
                    acm_pca_arn: None,
                    ..base()
                },
                "needs --acm-pca-arn",
            ),
            (
                RunArgs {
                    acm_pca_arn: Some("arn:aws:acm:eu-west-1:123456789012:certificate/x".into()),
                    ..base()
                },
                "--acm-pca-arn",
            ),
            (
                RunArgs {
                    aws_region: Some("EU West".into()),
                    ..base()
                },
                "--aws-region",
            ),
            (
                RunArgs {
                    acm_pca_endpoint: Some("vpce.example".into()),
                    ..base()
                },
                "--acm-pca-endpoint",
            ),
            (
                RunArgs {
                    acm_pca_signing_algorithm: Some("SHA1WITHRSA".into()),
                    ..base()
                },
                "--acm-pca-signing-algorithm",
            ),
            (
                RunArgs {
                    acm_pca_template_arn: Some("EndEntityCertificate/V1".into()),
                    ..base()
                },
                "--acm-pca-template-arn",
            ),
            (
                RunArgs {
                    acm_pca_timeout: Some("0s".into()),
                    ..base()
                },
                "--acm-pca-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve_with_env(&no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
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
    fn istiod_defaults_are_istio_agents() {
        let args = RunArgs {
            ca: Some("istiod".into()),
            ..Default::default()
        };
        let v = istiod_of(args.resolve_with_env(&no_env).unwrap());
        assert_eq!(v.addr, "istiod.istio-system.svc:15012");
        assert_eq!(
            v.token_file,
            PathBuf::from("./var/run/secrets/tokens/istio-token")
        );
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert_eq!(
            (v.root_cert, v.server_name, v.cluster_id, v.trust_bundle),
            (None, None, None, None)
        );
        assert!(v.headers.is_empty());
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
            cluster_id: Some("Kubernetes".into()),
            ca_headers: vec!["x-tenant=red".into()],
            ca_server_name: Some("istiod.istio-system.svc".into()),
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

    #[test]
    fn istiod_settings_that_cannot_work_name_their_flag() {
        let base = || RunArgs {
            ca: Some("istiod".into()),
            ..Default::default()
        };
        let cases = [
            (
                RunArgs {
                    ca_addr: Some("http://istiod.istio-system.svc:15010".into()),
                    ..base()
                },
                "TLS only",
            ),
            (
                RunArgs {
                    ca_addr: Some("istiod.istio-system.svc".into()),
                    ..base()
                },
                "--ca-addr",
            ),
            (
                RunArgs {
                    ca_headers: vec!["authorization=Bearer abc".into()],
                    ..base()
                },
                "--ca-header",
            ),
            (
                RunArgs {
                    ca_headers: vec!["x-tenant".into()],
                    ..base()
                },
                "KEY=VALUE",
            ),
            (
                RunArgs {
                    cluster_id: Some("two words".into()),
                    ..base()
                },
                "--cluster-id",
            ),
            (
                RunArgs {
                    ca_server_name: Some("".into()),
                    ..base()
                },
                "--ca-server-name",
            ),
            (
                RunArgs {
                    ca_timeout: Some("soon".into()),
                    ..base()
                },
                "--ca-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve_with_env(&no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(!err.contains("abc"), "a header value was printed: {err}");
        }
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
            cert_manager_issuer_name: Some("mesh-ca".into()),
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
            cert_manager_keep_requests: Some(false),
            cert_manager_issuer_name: Some("other".into()),
            ..from_file
        };
        let v = cert_manager_of(args.resolve_with_env(&no_env).unwrap());
        assert!(!v.keep_requests, "the flag wins");
        assert_eq!(v.issuer_name, "other");
    }

    #[test]
    fn cert_manager_settings_that_cannot_work_name_their_flag() {
        let base = || RunArgs {
            ca: Some("cert-manager".into()),
            cert_manager_issuer_name: Some("mesh-ca".into()),
            ..Default::default()
        };
        let cases = [
            (
                RunArgs {
                    cert_manager_issuer_name: None,
                    ..base()
                },
                "needs --cert-manager-issuer-name",
            ),
            (
                RunArgs {
                    cert_manager_issuer_kind: Some("AWSPCAIssuer".into()),
                    ..base()
                },
                "--cert-manager-issuer-kind",
            ),
            (
                RunArgs {
                    cert_manager_issuer_name: Some("Mesh CA".into()),
                    ..base()
                },
                "--cert-manager-issuer-name",
            ),
            (
                RunArgs {
                    cert_manager_namespace: Some("Team_A".into()),
                    ..base()
                },
                "--cert-manager-namespace",
            ),
            (
                RunArgs {
                    cert_manager_timeout: Some("0s".into()),
                    ..base()
                },
                "--cert-manager-timeout",
            ),
            (
                RunArgs {
                    pod_name: Some("web-0".into()),
                    ..base()
                },
                "--pod-name and --pod-uid go together",
            ),
            (
                RunArgs {
                    pod_name: Some("web-0".into()),
                    pod_uid: Some("not a uid".into()),
                    ..base()
                },
                "--pod-uid",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve_with_env(&no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
