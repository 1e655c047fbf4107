//! sds-agent: serves Envoy's Secret Discovery Service (SDS v3) on a Unix socket, with a
//! workload certificate whose key is generated here, signed by a pluggable CA, validated,
//! and rotated well before it expires.
//!
//! Data flows one way: [`config`] → [`identity`] → [`secrets`] (keys → CSR → CA → validate →
//! publish) → [`sds`] streams → Envoy, and [`workload_api`] streams → other workloads. [`admin`] and [`metrics`] observe; nothing below the
//! secret manager knows about SDS, and no backend knows about rotation.

#![forbid(unsafe_code)]

pub mod admin;
pub mod attest;
pub mod client;
pub mod config;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod output;
pub mod sds;
pub mod secrets;
pub mod socket;
pub mod workload_api;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sds_backends::CertificateAuthority;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{CaConfig, Config};
use crate::metrics::Metrics;
use crate::sds::SdsService;
use crate::secrets::{Policy, SecretManager};
use crate::workload_api::WorkloadApiService;

/// The CA backends this binary was built with, as `--ca` names them.
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "embedded")]
    "embedded",
    #[cfg(feature = "istiod")]
    "istiod",
    #[cfg(feature = "vault")]
    "vault",
    #[cfg(feature = "acm-pca")]
    "acm-pca",
    #[cfg(feature = "cert-manager")]
    "cert-manager",
];

/// How long shutdown may take before the remaining tasks are abandoned (the process must
/// exit within 5 s of SIGTERM).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A started agent: the manager, the SDS server and the admin server, all running.
#[derive(Debug)]
pub struct RunningAgent {
    manager: Arc<SecretManager>,
    metrics: Arc<Metrics>,
    sds: SdsService,
    admin_addr: SocketAddr,
    status_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Policy {
    /// The policy a configuration asks for, with the agent's default timeouts and backoff.
    pub fn from_config(config: &Config) -> Self {
        Self {
            ttl: config.cert_ttl,
            renew_at: config.renew_at,
            key_type: config.key_type,
            ca_timeout: ca_timeout(&config.ca),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            bundle_refresh: Duration::from_secs(300),
        }
    }
}

/// The secret manager's limit on one CA call: 30 s, or longer for a backend whose own
/// limit is longer (cert-manager waits for an approver and an issuer).
fn ca_timeout(ca: &CaConfig) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(30);
    match ca {
        CaConfig::CertManager(settings) => DEFAULT.max(settings.timeout + Duration::from_secs(15)),
        _ => DEFAULT,
    }
}

/// Builds the CA backend a configuration names.
pub fn build_ca(config: &Config) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    match &config.ca {
        CaConfig::Embedded {
            cert: Some(cert),
            key: Some(key),
        } => {
            let cert_pem = std::fs::read(cert)
                .with_context(|| format!("cannot read --embedded-ca-cert {}", cert.display()))?;
            let key_pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(key)
                    .with_context(|| format!("cannot read --embedded-ca-key {}", key.display()))?,
            );
            let ca = sds_backends::embedded::EmbeddedCa::from_pem(&cert_pem, &key_pem)
                .with_context(|| {
                    format!(
                        "--embedded-ca-cert {} / --embedded-ca-key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            info!(cert = %cert.display(), "embedded CA loaded");
            // Its only caller is this process's secret manager, which checks every leaf
            // against its own key.
            Ok(Arc::new(ca.local_requests_only()))
        }
        CaConfig::Embedded { .. } => {
            let ca = sds_backends::embedded::EmbeddedCa::generate(config.spiffe_id.trust_domain())?;
            warn!(
                "embedded CA: generated an ephemeral self-signed root for this process; only proxies served by this \
                 agent will trust its certificates. Give --embedded-ca-cert and --embedded-ca-key to share a trust domain"
            );
            Ok(Arc::new(ca.local_requests_only()))
        }
        CaConfig::Vault(settings) => build_vault(settings),
        CaConfig::AcmPca(settings) => build_acm_pca(settings),
        CaConfig::Istiod(settings) => build_istiod(settings),
        CaConfig::CertManager(settings) => build_cert_manager(settings),
    }
}

/// Reads a PEM bundle of pinned roots named by `flag`.
#[cfg(any(
    feature = "vault",
    feature = "acm-pca",
    feature = "istiod",
    feature = "cert-manager"
))]
fn read_pinned_roots(
    flag: &str,
    path: &std::path::Path,
) -> anyhow::Result<sds_backends::TrustBundle> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    let roots = sds_backends::pem::decode_certificates(&pem)
        .with_context(|| format!("{flag} {}", path.display()))?;
    Ok(sds_backends::TrustBundle::new(roots)?)
}

/// The ACM PCA backend. Calls nothing at start-up: credentials are resolved and the CA is
/// described at the first signature, so an AWS outage at start-up is retried like any other.
#[cfg(feature = "acm-pca")]
fn build_acm_pca(
    settings: &crate::config::AcmPcaSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    use sds_backends::acm_pca::{AcmPcaCa, AcmPcaConfig, CaArn};

    let arn: CaArn = settings
        .arn
        .parse()
        .with_context(|| format!("--acm-pca-arn {}", settings.arn))?;
    let mut config = AcmPcaConfig::new(arn);
    config.region = Some(settings.region.clone());
    config.endpoint = settings.endpoint.clone();
    config.signing_algorithm = settings.signing_algorithm.clone();
    config.template_arn = settings.template_arn.clone();
    config.request_timeout = settings.timeout;
    config.trust_bundle = settings
        .trust_bundle
        .as_deref()
        .map(|p| read_pinned_roots("--acm-pca-trust-bundle", p))
        .transpose()?;
    let ca = AcmPcaCa::new(config)?;
    info!(
        arn = %settings.arn,
        region = %settings.region,
        endpoint = settings.endpoint.as_deref().unwrap_or("(the region's)"),
        template = %settings.template_arn,
        "acm-pca CA configured"
    );
    Ok(Arc::new(ca))
}

/// The istiod backend. Connects to nothing and reads no token at start-up: a CA that is not
/// up yet is retried like any outage, and the agent is ready once it answers.
#[cfg(feature = "istiod")]
fn build_istiod(
    settings: &crate::config::IstiodSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    use sds_backends::istiod::{CaAddr, ExtraHeader, IstiodCa, IstiodConfig};

    let addr: CaAddr = settings
        .addr
        .parse()
        .with_context(|| format!("--ca-addr {}", settings.addr))?;
    let mut config = IstiodConfig::new(addr);
    config.root_cert = settings.root_cert.clone();
    config.server_name = settings.server_name.clone();
    config.token_file = settings.token_file.clone();
    config.cluster_id = settings.cluster_id.clone();
    config.headers = settings
        .headers
        .iter()
        .map(|h| h.parse::<ExtraHeader>())
        .collect::<Result<_, _>>()
        .context("--ca-header")?;
    config.request_timeout = settings.timeout;
    config.trust_bundle = settings
        .trust_bundle
        .as_deref()
        .map(|p| read_pinned_roots("--ca-trust-bundle", p))
        .transpose()?;
    let pinned = config.trust_bundle.is_some();
    let ca = IstiodCa::new(config)?;
    info!(
        addr = %settings.addr,
        tls_roots = settings
            .root_cert
            .as_deref()
            .map_or_else(|| "(the system's)".to_owned(), |p| p.display().to_string()),
        token_file = %settings.token_file.display(),
        cluster_id = settings.cluster_id.as_deref().unwrap_or("(none)"),
        trust_bundle = if pinned { "pinned" } else { "the root each answer ends with" },
        "istiod CA configured"
    );
    Ok(Arc::new(ca))
}

/// The cert-manager backend. Reads the kubeconfig (or checks for in-cluster credentials)
/// now, so a missing file stops the agent at start-up; the API server is first called at
/// the first signature, and an API server that is down is retried like any outage.
#[cfg(feature = "cert-manager")]
fn build_cert_manager(
    settings: &crate::config::CertManagerSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    use sds_backends::cert_manager::{
        CertManagerCa, CertManagerConfig, Credentials, IssuerRef, PodRef,
    };

    let issuer = IssuerRef {
        name: settings.issuer_name.clone(),
        kind: settings.issuer_kind.clone(),
        group: settings.issuer_group.clone(),
    };
    let mut config = CertManagerConfig::new(settings.namespace.clone(), issuer);
    config.credentials = match &settings.kubeconfig {
        Some(path) => Credentials::Kubeconfig(path.clone()),
        None => Credentials::InCluster,
    };
    config.timeout = settings.timeout;
    config.keep_requests = settings.keep_requests;
    config.pod = match (&settings.pod_name, &settings.pod_uid) {
        (Some(name), Some(uid)) => Some(PodRef {
            name: name.clone(),
            uid: uid.clone(),
        }),
        _ => None,
    };
    config.trust_bundle = settings
        .trust_bundle
        .as_deref()
        .map(|p| read_pinned_roots("--cert-manager-trust-bundle", p))
        .transpose()?;
    let pinned = config.trust_bundle.is_some();
    let owned = config.pod.is_some();
    let ca = CertManagerCa::new(config)?;
    info!(
        namespace = %settings.namespace,
        issuer = %format!("{}/{} ({})", settings.issuer_kind, settings.issuer_name, settings.issuer_group),
        credentials = settings
            .kubeconfig
            .as_deref()
            .map_or_else(|| "in-cluster".to_owned(), |p| p.display().to_string()),
        timeout = ?settings.timeout,
        owned_by_pod = owned,
        trust_bundle = if pinned { "pinned" } else { "status.ca" },
        "cert-manager CA configured"
    );
    if !owned {
        warn!(
            "cert-manager: --pod-name/--pod-uid not given: CertificateRequests are not owned \
             by the pod, so requests left by a pod that dies mid-issuance are not garbage-collected"
        );
    }
    Ok(Arc::new(ca))
}

#[cfg(not(feature = "cert-manager"))]
fn build_cert_manager(
    _settings: &crate::config::CertManagerSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    anyhow::bail!("this sds-agent was built without the cert-manager feature")
}

#[cfg(not(feature = "istiod"))]
fn build_istiod(
    _settings: &crate::config::IstiodSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    anyhow::bail!("this sds-agent was built without the istiod feature")
}

#[cfg(not(feature = "acm-pca"))]
fn build_acm_pca(
    _settings: &crate::config::AcmPcaSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    anyhow::bail!("this sds-agent was built without the acm-pca feature")
}

/// The Vault backend. Needs a tokio runtime (it starts its token renewer), but not Vault:
/// a Vault that is down at start-up is retried like any outage.
#[cfg(feature = "vault")]
fn build_vault(
    settings: &crate::config::VaultSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    use crate::config::VaultAuthSettings;
    use sds_backends::vault::{TokenSource, VaultAuth, VaultCa, VaultConfig};

    let trust_bundle = settings
        .trust_bundle
        .as_deref()
        .map(|p| read_pinned_roots("--vault-trust-bundle", p))
        .transpose()?;
    let auth = match &settings.auth {
        VaultAuthSettings::Token {
            token: Some(token), ..
        } => VaultAuth::Token(TokenSource::Literal(zeroize::Zeroizing::new(
            token.expose().to_owned(),
        ))),
        VaultAuthSettings::Token {
            token_file: Some(file),
            ..
        } => VaultAuth::Token(TokenSource::File(file.clone())),
        VaultAuthSettings::Token { .. } => anyhow::bail!("vault token auth without a token"),
        VaultAuthSettings::Kubernetes {
            mount,
            role,
            jwt_file,
        } => VaultAuth::Kubernetes {
            mount: mount.clone(),
            role: role.clone(),
            jwt_file: jwt_file.clone(),
        },
        VaultAuthSettings::Approle {
            mount,
            role_id,
            secret_id_file,
        } => VaultAuth::AppRole {
            mount: mount.clone(),
            role_id: role_id.clone(),
            secret_id_file: secret_id_file.clone(),
        },
    };
    let config = VaultConfig {
        addr: url::Url::parse(&settings.addr)
            .with_context(|| format!("--vault-addr {}", settings.addr))?,
        namespace: settings.namespace.clone(),
        ca_cert: settings.ca_cert.clone(),
        pki_mount: settings.pki_mount.clone(),
        role: settings.role.clone(),
        issuer: settings.issuer.clone(),
        sign_verbatim: settings.sign_verbatim,
        trust_bundle,
        auth,
        request_timeout: settings.timeout,
    };
    let ca = VaultCa::new(config)?;
    info!(
        addr = %settings.addr,
        mount = %settings.pki_mount,
        role = %settings.role,
        auth = ca_auth_name(&settings.auth),
        "vault CA configured"
    );
    Ok(Arc::new(ca))
}

#[cfg(not(feature = "vault"))]
fn build_vault(
    _settings: &crate::config::VaultSettings,
) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    anyhow::bail!("this sds-agent was built without the vault feature")
}

#[cfg(feature = "vault")]
fn ca_auth_name(auth: &crate::config::VaultAuthSettings) -> &'static str {
    use crate::config::VaultAuthSettings;
    match auth {
        VaultAuthSettings::Token { .. } => "token",
        VaultAuthSettings::Kubernetes { .. } => "kubernetes",
        VaultAuthSettings::Approle { .. } => "approle",
    }
}

impl RunningAgent {
    /// Starts the secret manager, binds the socket and the admin address, and serves.
    pub async fn start(
        config: &Config,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        metrics.prime(
            ca.name(),
            config.output_dir.is_some(),
            config.workload_api_socket.is_some(),
        );
        let shutdown = CancellationToken::new();
        let manager = SecretManager::new(
            config.spiffe_id.clone(),
            policy,
            ca.clone(),
            metrics.clone(),
        );
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on --admin-addr {}", config.admin_addr))?;
        let admin_addr = admin.local_addr()?;
        if !admin_addr.ip().is_loopback() {
            warn!(%admin_addr, "the admin endpoint is not on loopback; anyone who reaches it can force rotations (--status-addr serves probes and metrics alone)");
        }
        let status = match config.status_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on --status-addr {addr}"))?,
            ),
            None => None,
        };
        let status_addr = status.as_ref().map(TcpListener::local_addr).transpose()?;
        let file_output = config
            .output_dir
            .as_deref()
            .map(|dir| {
                output::FileOutput::new(dir)
                    .with_context(|| format!("cannot use --output-dir {}", dir.display()))
            })
            .transpose()?;
        let (listener, socket) = socket::bind(&config.socket, config.socket_mode)?;
        let workload_api = config
            .workload_api_socket
            .as_deref()
            .map(|path| socket::bind(path, config.socket_mode).map(|bound| (path, bound)))
            .transpose()?;
        // The socket file belongs to the agent's effective uid: the default allowed caller.
        let own_uid = std::fs::symlink_metadata(&config.socket)
            .with_context(|| format!("cannot stat {}", config.socket.display()))?
            .uid();
        let callers = config.callers.resolve(own_uid);
        let sds = SdsService::new(
            manager.clone(),
            metrics.clone(),
            callers.clone(),
            config.limits,
            shutdown.clone(),
        );

        // Every listener is bound: say so before the first certificate can be served.
        info!(
            socket = %config.socket.display(),
            workload_api_socket = config.workload_api_socket.as_deref().map(|p| tracing::field::display(p.display())),
            admin = %admin_addr,
            status = status_addr.map(tracing::field::display),
            allowed_uids = ?callers.uids,
            allowed_gids = ?callers.gids,
            id = %config.spiffe_id,
            backend = ca.name(),
            "serving SDS"
        );
        let span = info_span!("secret_manager", id = %config.spiffe_id, backend = ca.name());
        let mut tasks = vec![tokio::spawn(
            manager.clone().run(shutdown.clone()).instrument(span),
        )];
        if let Some(out) = file_output {
            info!(dir = %out.dir().display(), "writing certificate files");
            tasks.push(tokio::spawn(
                out.run(manager.clone(), metrics.clone(), shutdown.clone())
                    .instrument(info_span!("file_output")),
            ));
        }
        let state = admin::AdminState {
            manager: manager.clone(),
            metrics: metrics.clone(),
            sds: sds.clone(),
        };
        if let Some(status) = status {
            let (routes, token) = (admin::status_router(state.clone()), shutdown.clone());
            tasks.push(tokio::spawn(
                async move {
                    if let Err(error) = admin::serve(status, routes, token).await {
                        warn!(%error, "status server failed");
                    }
                }
                .instrument(info_span!("status")),
            ));
        }
        let (routes, token) = (admin::router(state), shutdown.clone());
        tasks.push(tokio::spawn(
            async move {
                if let Err(error) = admin::serve(admin, routes, token).await {
                    warn!(%error, "admin server failed");
                }
            }
            .instrument(info_span!("admin")),
        ));
        tasks.extend(serve_socket(
            "SDS",
            &config.socket,
            config.socket_mode,
            (listener, socket),
            tonic::transport::Server::builder().add_service(sds.clone().into_server()),
            &metrics,
            &shutdown,
        ));
        if let Some((path, bound)) = workload_api {
            let service = WorkloadApiService::new(sds.clone()).into_server();
            tasks.extend(serve_socket(
                "Workload API",
                path,
                config.socket_mode,
                bound,
                tonic::transport::Server::builder().add_service(service),
                &metrics,
                &shutdown,
            ));
        }
        Ok(Self {
            manager,
            metrics,
            sds,
            admin_addr,
            status_addr,
            shutdown,
            tasks,
        })
    }

    /// The secret manager.
    pub fn manager(&self) -> &Arc<SecretManager> {
        &self.manager
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The SDS service (for its proxy list).
    pub fn sds(&self) -> &SdsService {
        &self.sds
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound status address, if `--status-addr` was given.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// Stops accepting, ends every stream, stops the manager, and removes the socket.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            warn!("shutdown grace period over; abandoning remaining connections");
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves `router` on the bound Unix socket at `path` until `shutdown`, as two tasks: the
/// socket keeper, which accepts and re-creates the socket (with `mode`) if it is deleted or
/// replaced while the agent runs, and the gRPC server it feeds. `name` is how logs name it.
fn serve_socket(
    name: &'static str,
    path: &Path,
    mode: u32,
    (listener, guard): (tokio::net::UnixListener, socket::SocketGuard),
    router: tonic::transport::server::Router,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> [JoinHandle<()>; 2] {
    let (conns_tx, conns) = tokio::sync::mpsc::channel(64);
    let keeper = tokio::spawn(
        socket::keep(
            name,
            path.to_owned(),
            mode,
            listener,
            guard,
            conns_tx,
            metrics.clone(),
            shutdown.clone(),
        )
        .instrument(info_span!("socket", socket = name)),
    );
    let server = router.serve_with_incoming_shutdown(
        ReceiverStream::new(conns),
        shutdown.clone().cancelled_owned(),
    );
    let server = tokio::spawn(
        async move {
            if let Err(error) = server.await {
                warn!(%error, "{name} server failed");
            }
        }
        .instrument(info_span!("grpc", socket = name)),
    );
    [keeper, server]
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before the socket exists: a SIGTERM sent the moment it appears (a quick
    // restart, a probe that gives up) must shut down cleanly, not kill the process and leave
    // the socket behind.
    let signals = Signals::install()?;
    let ca = build_ca(&config)?;
    let agent = RunningAgent::start(&config, Policy::from_config(&config), ca).await?;
    signals.wait().await;
    info!("shutting down");
    agent.shutdown().await;
    info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    /// Waits for the first of them (including one that came before this call).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!(signal = "SIGTERM", "signal received"),
            _ = self.int.recv() => info!(signal = "SIGINT", "signal received"),
        }
    }
}
