//! sds-agent: serves Envoy's Secret Discovery Service (SDS v3) on a Unix socket, with a
//! workload certificate whose key is generated here, signed by a pluggable CA, validated,
//! and rotated well before it expires.
//!
//! Data flows one way: [`config`] → [`identity`] → [`secrets`] (keys → CSR → CA → validate →
//! publish) → [`sds`] streams → Envoy, and [`workload_api`] streams → other workloads. [`admin`] and [`metrics`] observe; nothing below the
//! secret manager knows about SDS, and no backend knows about rotation. With several CA
//! backends, [`failover`] stands in front of them as one CA.

#![forbid(unsafe_code)]

pub mod admin;
pub mod attest;
pub mod client;
pub mod config;
pub mod failover;
pub mod federation;
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
use sds_backends::settings::BuildContext;
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
pub const BACKENDS: &[&str] = sds_backends::settings::BUILT_IN;

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
            // One call of a `--ca` list may ask each backend in turn.
            ca_timeout: std::iter::once(&config.ca)
                .chain(&config.ca_fallbacks)
                .map(ca_timeout)
                .sum(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            bundle_refresh: config.trust_bundle_refresh,
            ca_concurrency: config.ca_concurrency,
            idle_timeout: config.identity_idle_timeout,
            root_overlap: config.root_overlap,
        }
    }
}

/// The secret manager's limit on one CA call: 30 s, or longer for a backend whose own
/// limit is longer (cert-manager waits for an approver and an issuer).
fn ca_timeout(ca: &CaConfig) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(30);
    ca.call_timeout().map_or(DEFAULT, |t| DEFAULT.max(t))
}

/// Builds the CA backend a configuration names (the backend builds itself); with several
/// (`--ca a,b`), builds every one and returns their [`failover::Failover`], with metrics of
/// its own (use [`build_failover`] to share the agent's).
pub fn build_ca(config: &Config) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    match build_failover(config, Arc::new(Metrics::new()))? {
        Some(failover) => Ok(failover),
        None => Ok(config.ca.build(&build_context(config))?),
    }
}

/// With several `--ca` backends, builds each (in order, naming the one that fails) and the
/// [`failover::Failover`] over them, writing to `metrics`; `None` with one backend.
pub fn build_failover(
    config: &Config,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<failover::Failover>>> {
    if config.ca_fallbacks.is_empty() {
        return Ok(None);
    }
    let ctx = build_context(config);
    let listed: Vec<&CaConfig> = std::iter::once(&config.ca)
        .chain(&config.ca_fallbacks)
        .collect();
    let mut backends = Vec::with_capacity(listed.len());
    for ca in &listed {
        backends.push(
            ca.build(&ctx)
                .with_context(|| format!("--ca backend {}", ca.name()))?,
        );
    }
    Ok(Some(failover::Failover::new(
        backends,
        listed.iter().map(|ca| ca_timeout(ca)).collect(),
        config.ca_failover_after,
        Policy::from_config(config),
        metrics,
    )))
}

fn build_context(config: &Config) -> BuildContext<'_> {
    BuildContext {
        trust_domain: config.spiffe_id.trust_domain(),
        node_mode: config.mode == config::Mode::Node,
    }
}

/// In node mode, builds the kubelet client as `run` would (reads `--kubelet-ca`, checks the
/// token file can be read), so `validate` catches a bad file before deployment; nothing is
/// fetched from the kubelet. Nothing to check in pod mode.
pub fn check_node(config: &Config) -> anyhow::Result<()> {
    match &config.node {
        Some(node) => kubelet_client(node).map(drop),
        None => Ok(()),
    }
}

/// Reads every `--federate-with` bundle file as `run` does at start (and the endpoints' CA),
/// and lists `--federation-dir`, so `validate` catches a missing or bad one before
/// deployment. Endpoints are not fetched.
pub fn check_federation(config: &Config) -> anyhow::Result<()> {
    start_federation(config, Arc::new(Metrics::new())).map(drop)
}

/// The federation of `config` (`--federate-with`, `--federation-dir`), read once; `None`
/// when the agent federates with nobody.
fn start_federation(
    config: &Config,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<federation::Federation>> {
    if config.federate_with.is_empty() && config.federation_dir.is_none() {
        return Ok(None);
    }
    let mut f = federation::Federation::start(
        config.federate_with.clone(),
        config.federation_endpoint_ca.as_deref(),
        metrics,
    )?;
    if let Some(dir) = &config.federation_dir {
        f = f.with_dir(dir, config.spiffe_id.trust_domain())?;
    }
    Ok(Some(f))
}

impl RunningAgent {
    /// Starts the secret manager, binds the socket and the admin address, and serves.
    pub async fn start(
        config: &Config,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
    ) -> anyhow::Result<Self> {
        Self::start_inner(config, policy, ca, None, Arc::new(Metrics::new())).await
    }

    /// [`RunningAgent::start`] on several CA backends (`--ca a,b`): `failover` signs, and its
    /// probe task runs with the agent.
    pub async fn start_failover(
        config: &Config,
        policy: Policy,
        failover: Arc<failover::Failover>,
    ) -> anyhow::Result<Self> {
        let metrics = failover.metrics().clone();
        Self::start_inner(config, policy, failover.clone(), Some(failover), metrics).await
    }

    async fn start_inner(
        config: &Config,
        policy: Policy,
        ca: Arc<dyn CertificateAuthority>,
        failover: Option<Arc<failover::Failover>>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        metrics.prime(
            ca.name(),
            config.output_dir.is_some(),
            config.workload_api_socket.is_some(),
        );
        let shutdown = CancellationToken::new();
        let (manager, identify) = match &config.node {
            None => (
                SecretManager::new(
                    config.spiffe_id.clone(),
                    policy,
                    ca.clone(),
                    metrics.clone(),
                ),
                sds::Identify::Workload(config.spiffe_id.clone()),
            ),
            Some(node) => {
                let trust_domain = config.spiffe_id.trust_domain().clone();
                let attestor = attest::node::NodeAttestor::new(
                    attest::process::ProcRoot::from_setting(&node.proc_root),
                    kubelet_client(node)?,
                    trust_domain.clone(),
                );
                (
                    SecretManager::for_node(trust_domain, policy, ca.clone(), metrics.clone()),
                    sds::Identify::Node(attestor),
                )
            }
        };
        // Every federated bundle must be good at start, as CA files must.
        let federation = start_federation(config, metrics.clone())?.map(Arc::new);
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
        let callers = match config.mode {
            config::Mode::Pod => config.callers.resolve(own_uid),
            config::Mode::Node => config.callers.resolve_for_node(),
        };
        let sds = SdsService::new(
            manager.clone(),
            identify,
            metrics.clone(),
            callers.clone(),
            config.limits,
            shutdown.clone(),
            sds::TrustOptions {
                federated: federation.as_ref().map(|f| f.subscribe()),
                plain_roots: config.sds_plain_roots,
            },
        );

        // Every listener is bound: say so before the first certificate can be served.
        info!(
            socket = %config.socket.display(),
            workload_api_socket = config.workload_api_socket.as_deref().map(|p| tracing::field::display(p.display())),
            admin = %admin_addr,
            status = status_addr.map(tracing::field::display),
            allowed_uids = ?callers.uids,
            allowed_gids = ?callers.gids,
            any_uid = callers.any,
            mode = ?config.mode,
            id = manager.workload_identity().map(tracing::field::display),
            trust_domain = %manager.trust_domain(),
            ca_concurrency = config.ca_concurrency,
            backend = ca.name(),
            sds_plain_roots = config.sds_plain_roots,
            fallbacks = ?config.ca_fallbacks.iter().map(CaConfig::name).collect::<Vec<_>>(),
            "serving SDS"
        );
        let span = info_span!(
            "secret_manager",
            id = manager.workload_identity().map(tracing::field::display),
            backend = ca.name()
        );
        let mut tasks = vec![tokio::spawn(
            manager.clone().run(shutdown.clone()).instrument(span),
        )];
        if let Some(f) = failover {
            tasks.push(tokio::spawn(
                f.run(shutdown.clone())
                    .instrument(info_span!("ca_failover")),
            ));
        }
        if let Some(f) = &federation {
            tasks.push(tokio::spawn(
                f.clone()
                    .run(config.federation_poll_interval, shutdown.clone())
                    .instrument(info_span!("federation")),
            ));
        }
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
            let mut service = WorkloadApiService::new(sds.clone());
            if let Some(f) = &federation {
                service = service.with_federation(f.subscribe());
            }
            let service = service.into_server();
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

/// Node mode's kubelet client, from its settings.
fn kubelet_client(node: &config::NodeSettings) -> anyhow::Result<attest::kubelet::KubeletClient> {
    use attest::kubelet::{KubeletClient, KubeletConfig, KubeletEndpoint};
    let endpoint = if node.kubelet_read_only {
        KubeletEndpoint::ReadOnly {
            host: node.kubelet_host.clone(),
            port: node.kubelet_port,
        }
    } else {
        KubeletEndpoint::Secure {
            host: node.kubelet_host.clone(),
            port: node.kubelet_port,
            ca: node.kubelet_ca.clone(),
            token_file: node.kubelet_token_file.clone(),
        }
    };
    let mut config = KubeletConfig::new(endpoint);
    config.poll_interval = node.kubelet_poll_interval;
    config.max_attempts = node.kubelet_max_attempts;
    KubeletClient::new(config).context("kubelet client (--kubelet-*)")
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
    let policy = Policy::from_config(&config);
    let agent = match build_failover(&config, Arc::new(Metrics::new()))? {
        Some(failover) => RunningAgent::start_failover(&config, policy, failover).await?,
        None => RunningAgent::start(&config, policy, build_ca(&config)?).await?,
    };
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
