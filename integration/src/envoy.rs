//! Envoy for the tests: bootstraps that take their certificates from an agent over SDS, a
//! running Envoy, and what its admin endpoint says.
//!
//! Bootstraps are built as JSON values from small pieces ([`sds_cluster`],
//! [`common_tls_context`], [`http_listener`], [`static_cluster`], ...) so a test states its
//! topology and nothing else. Every TLS context asks the agent for `default` (the workload
//! certificate) and `ROOTCA` (the trust bundle), exactly as an istio-agent or SPIRE bootstrap
//! does, and pins the peer's SPIFFE ID with `match_typed_subject_alt_names`.
//!
//! [`Envoy::start`] returns once `GET /ready` answers `200`, which for static listeners and
//! clusters means their SDS secrets have arrived. Its admin endpoint is read through
//! [`Envoy::certs`] (`/certs`) and [`Envoy::counter`] (`/stats`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::pki::serial_of_pem;
use crate::process::ChildGuard;
use crate::{Error, Serial, free_port, http, io_error};

/// Name of the cluster through which Envoy reaches the agent's SDS socket.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// SDS resource name of the workload certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// SDS resource name of the trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";
/// SDS resource name of every trusted domain's bundle (the agent's and the federated ones).
pub const ALL_SECRET: &str = "ALL";
/// How long an Envoy may take to become ready.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// Envoys started by this process so far; with the process ID it makes `--base-id` unique.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// A bootstrap and the admin address it configures.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Where Envoy's admin listener will be.
    pub admin: SocketAddr,
    /// The bootstrap document (`envoy.config.bootstrap.v3.Bootstrap` as JSON).
    pub config: Value,
}

/// A ready Envoy, killed when dropped.
#[derive(Debug)]
pub struct Envoy {
    proc: ChildGuard,
    admin: SocketAddr,
    /// What [`Envoy::restart`] starts again: the command, the bootstrap file, the name.
    launcher: Launcher,
    bootstrap: PathBuf,
    name: String,
    /// How many times it was restarted, for the log file of the next start.
    restarts: u32,
}

/// The certificates of one TLS context, from admin `/certs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsContextCerts {
    /// The trusted roots (`ca_cert`).
    pub ca: Vec<CertInfo>,
    /// The certificate chain presented to peers (`cert_chain`), leaf first.
    pub chain: Vec<CertInfo>,
}

/// One certificate as Envoy describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Its serial number.
    pub serial: Serial,
    /// Its URI subject alternative names.
    pub uri_sans: Vec<String>,
}

impl Bootstrap {
    /// A bootstrap for node `node_id` in cluster `node_cluster` (SDS needs both) with an
    /// admin listener on a free port of 127.0.0.1.
    pub fn new(
        node_id: &str,
        node_cluster: &str,
        listeners: Vec<Value>,
        clusters: Vec<Value>,
    ) -> Result<Self, Error> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let config = json!({
            "node": { "id": node_id, "cluster": node_cluster },
            "admin": { "address": socket_address(admin) },
            "static_resources": { "listeners": listeners, "clusters": clusters },
        });
        Ok(Self { admin, config })
    }
}

impl Envoy {
    /// Writes `bootstrap` to `dir/<name>.json`, starts `bin` on it (log `dir/<name>.log`),
    /// and waits until its admin `/ready` answers `200`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        bootstrap: &Bootstrap,
    ) -> Result<Self, Error> {
        let bin = bin.to_owned();
        let launcher = Launcher(Arc::new(move || Ok(Command::new(&bin))));
        Self::start_with_launcher(launcher, dir, name, bootstrap).await
    }

    /// Like [`Envoy::start`], with Envoy started by the command `launch` returns (Envoy's own
    /// arguments are appended to it): e.g. a shell that moves itself into a pod's cgroup and
    /// then execs Envoy ([`crate::pods::Pods::command_in`]). Restarts use it again.
    pub async fn start_in(
        launch: impl Fn() -> Result<Command, Error> + Send + Sync + 'static,
        dir: &Path,
        name: &str,
        bootstrap: &Bootstrap,
    ) -> Result<Self, Error> {
        Self::start_with_launcher(Launcher(Arc::new(launch)), dir, name, bootstrap).await
    }

    async fn start_with_launcher(
        launcher: Launcher,
        dir: &Path,
        name: &str,
        bootstrap: &Bootstrap,
    ) -> Result<Self, Error> {
        let file = dir.join(format!("{name}.json"));
        let text =
            serde_json::to_string_pretty(&bootstrap.config).map_err(|e| Error::Malformed {
                what: "bootstrap",
                detail: e.to_string(),
            })?;
        std::fs::write(&file, text).map_err(io_error(format!("writing {}", file.display())))?;
        let proc = launch(
            &launcher,
            &file,
            name,
            &dir.join(format!("{name}.log")),
            bootstrap.admin,
        )
        .await?;
        Ok(Self {
            proc,
            admin: bootstrap.admin,
            launcher,
            bootstrap: file,
            name: name.to_owned(),
            restarts: 0,
        })
    }

    /// Kills it with SIGKILL, then starts it again on the same bootstrap file (same admin
    /// port, listeners and SDS socket), with its log in `<name>-restart<n>.log` beside the
    /// first, and waits until `/ready` answers `200` as [`Envoy::start`] does.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.proc.kill_hard()?;
        self.restarts += 1;
        let log = self
            .bootstrap
            .with_file_name(format!("{}-restart{}.log", self.name, self.restarts));
        self.proc = launch(
            &self.launcher,
            &self.bootstrap,
            &self.name,
            &log,
            self.admin,
        )
        .await?;
        Ok(())
    }

    /// Like [`Envoy::restart`], with the bootstrap file first rewritten by `edit`, which
    /// receives the document as JSON; the change stays for later restarts.
    pub async fn restart_with(&mut self, edit: impl FnOnce(&mut Value)) -> Result<(), Error> {
        let file = &self.bootstrap;
        let text = std::fs::read_to_string(file)
            .map_err(io_error(format!("reading {}", file.display())))?;
        let mut config: Value = serde_json::from_str(&text).map_err(|e| Error::Malformed {
            what: "bootstrap",
            detail: e.to_string(),
        })?;
        edit(&mut config);
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Malformed {
            what: "bootstrap",
            detail: e.to_string(),
        })?;
        std::fs::write(file, text).map_err(io_error(format!("writing {}", file.display())))?;
        self.restart().await
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The process, for its log.
    pub fn process(&self) -> &ChildGuard {
        &self.proc
    }

    /// The certificates of every TLS context, from `GET /certs`. A context whose secrets
    /// have not arrived yet has empty lists.
    pub async fn certs(&self) -> Result<Vec<TlsContextCerts>, Error> {
        let body = http::get(self.admin, "/certs").await?.body;
        parse_certs(&body)
    }

    /// The secret `name` as Envoy holds it now (`/config_dump`'s `dynamic_active_secrets`):
    /// `{"name", "version_info", "secret": {...}}`, the key material redacted by Envoy.
    /// `None` until it has arrived.
    pub async fn active_secret(&self, name: &str) -> Result<Option<Value>, Error> {
        let body = http::get(self.admin, "/config_dump?resource=dynamic_active_secrets")
            .await?
            .body;
        let dump: Value = serde_json::from_str(&body).map_err(|e| Error::Malformed {
            what: "Envoy /config_dump",
            detail: format!("{e}: {body}"),
        })?;
        Ok(dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .cloned())
    }

    /// The value of counter or gauge `name` (e.g. `cluster.backend.ssl.fail_verify_san`),
    /// from `GET /stats`. A name Envoy does not have is an error, not zero.
    pub async fn counter(&self, name: &str) -> Result<u64, Error> {
        let body = http::get(self.admin, &format!("/stats?filter={name}"))
            .await?
            .body;
        body.lines()
            .filter_map(|line| line.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| Error::Malformed {
                what: "Envoy /stats",
                detail: format!("no counter {name:?} in:\n{body}"),
            })
    }
}

/// How an Envoy is started: a command to which Envoy's arguments are appended.
#[derive(Clone)]
struct Launcher(Arc<dyn Fn() -> Result<Command, Error> + Send + Sync>);

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0)() {
            Ok(cmd) => write!(f, "{:?}", cmd.get_program()),
            Err(e) => write!(f, "<{e}>"),
        }
    }
}

/// Starts Envoy with `launcher` on the bootstrap `file` and waits until its admin `/ready`
/// answers `200`.
async fn launch(
    launcher: &Launcher,
    file: &Path,
    name: &str,
    log: &Path,
    admin: SocketAddr,
) -> Result<ChildGuard, Error> {
    let mut cmd = (launcher.0)()?;
    cmd.arg("-c")
        .arg(file)
        .args(["--base-id", &unique_base_id().to_string()])
        .args(["--disable-hot-restart", "--concurrency", "1"])
        .args(["--log-level", "warn"]);
    let mut proc = ChildGuard::spawn(name, cmd, log)?;
    proc.wait_ready("GET /ready = 200", READY_LIMIT, || async move {
        http::get(admin, "/ready")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;
    Ok(proc)
}

/// The `sds_config` of every secret: the agent, over gRPC through [`SDS_CLUSTER`].
pub fn sds_config() -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [ { "envoy_grpc": { "cluster_name": SDS_CLUSTER } } ],
        },
    })
}

/// The `sds_config` of a secret fetched with Envoy's other gRPC client, `google_grpc` (gRPC's
/// C-core inside Envoy), straight from the agent's socket `socket` with no cluster: the client
/// sends the percent-encoded socket path as `:authority`, where `envoy_grpc` sends the
/// cluster's name.
pub fn sds_config_google_grpc(socket: &Path) -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [ { "google_grpc": {
                "target_uri": format!("unix://{}", socket.display()),
                "stat_prefix": GOOGLE_GRPC_STAT_PREFIX,
            } } ],
        },
    })
}

/// The `stat_prefix` of [`sds_config_google_grpc`]: its client's counters are
/// `grpc.<prefix>.streams_total`, `grpc.<prefix>.streams_closed_<status>`, ...
pub const GOOGLE_GRPC_STAT_PREFIX: &str = "sds";

/// Rewrites `bootstrap` to take every secret with [`sds_config_google_grpc`] from `socket`
/// instead of through [`SDS_CLUSTER`], which it removes, so nothing is left that uses
/// `envoy_grpc`.
pub fn use_google_grpc(bootstrap: &mut Bootstrap, socket: &Path) {
    fn rewrite(value: &mut Value, sds: &Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if k == "sds_config" {
                        *v = sds.clone();
                    } else {
                        rewrite(v, sds);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, sds)),
            _ => {}
        }
    }
    rewrite(&mut bootstrap.config, &sds_config_google_grpc(socket));
    if let Some(clusters) = bootstrap.config["static_resources"]["clusters"].as_array_mut() {
        clusters.retain(|c| c["name"] != SDS_CLUSTER);
    }
}

/// The [`SDS_CLUSTER`]: HTTP/2 to the agent's Unix socket.
pub fn sds_cluster(socket: &Path) -> Value {
    json!({
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} },
            },
        },
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [ { "lb_endpoints": [ {
                "endpoint": { "address": { "pipe": { "path": socket.display().to_string() } } },
            } ] } ],
        },
    })
}

/// A `CommonTlsContext` presenting the agent's `default` certificate and accepting a peer
/// that chains to `ROOTCA` and has exactly the URI SAN `peer_spiffe_id`.
pub fn common_tls_context(peer_spiffe_id: &str) -> Value {
    common_tls_context_any(&[peer_spiffe_id])
}

/// A `CommonTlsContext` like [`common_tls_context`] that accepts a peer with any one of the
/// URI SANs `peer_spiffe_ids`.
pub fn common_tls_context_any(peer_spiffe_ids: &[&str]) -> Value {
    common_tls_context_validated_by(ROOT_SECRET, peer_spiffe_ids)
}

/// A `CommonTlsContext` presenting the agent's `default` certificate and validating the peer
/// with the bundle `validation_secret` (`ROOTCA`, `ALL`, `spiffe://<td>`); with
/// `peer_spiffe_ids`, the peer must also have one of those URI SANs.
pub fn common_tls_context_validated_by(validation_secret: &str, peer_spiffe_ids: &[&str]) -> Value {
    let matchers: Vec<Value> = peer_spiffe_ids
        .iter()
        .map(|id| json!({ "san_type": "URI", "matcher": { "exact": id } }))
        .collect();
    json!({
        "tls_certificate_sds_secret_configs": [
            { "name": WORKLOAD_SECRET, "sds_config": sds_config() },
        ],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": matchers,
            },
            "validation_context_sds_secret_config": { "name": validation_secret, "sds_config": sds_config() },
        },
    })
}

/// A listener's TLS transport socket that requires a client certificate and validates it
/// with `common_tls_context`.
pub fn downstream_tls_with(common_tls_context: Value) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": common_tls_context,
        },
    })
}

/// A cluster's TLS transport socket with `common_tls_context`.
pub fn upstream_tls_with(common_tls_context: Value) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context,
        },
    })
}

/// A listener's TLS transport socket that requires a client certificate of `peer_spiffe_id`.
pub fn downstream_tls(peer_spiffe_id: &str) -> Value {
    downstream_tls_any(&[peer_spiffe_id])
}

/// A listener's TLS transport socket that requires a client certificate of any one of
/// `peer_spiffe_ids`.
pub fn downstream_tls_any(peer_spiffe_ids: &[&str]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": common_tls_context_any(peer_spiffe_ids),
        },
    })
}

/// A cluster's TLS transport socket that presents the workload certificate and requires the
/// server to be `peer_spiffe_id`.
pub fn upstream_tls(peer_spiffe_id: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context(peer_spiffe_id),
        },
    })
}

/// A route sending paths that start with `prefix` to `cluster`.
pub fn route(prefix: &str, cluster: &str) -> Value {
    json!({ "match": { "prefix": prefix }, "route": { "cluster": cluster } })
}

/// An HTTP listener on 127.0.0.1:`port` named `name`, with `transport_socket` (TLS) if
/// given, `routes` in order, and `response_headers` added to every response; header values
/// may use Envoy's substitution formatters (`%DOWNSTREAM_PEER_SERIAL%`, ...).
pub fn http_listener(
    name: &str,
    port: u16,
    transport_socket: Option<Value>,
    routes: Vec<Value>,
    response_headers: &[(&str, &str)],
) -> Value {
    let headers: Vec<Value> = response_headers
        .iter()
        .map(|(k, v)| json!({ "header": { "key": k, "value": v } }))
        .collect();
    let mut chain = json!({
        "filters": [ {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {
                    "response_headers_to_add": headers,
                    "virtual_hosts": [ { "name": "all", "domains": ["*"], "routes": routes } ],
                },
                "http_filters": [ {
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                } ],
            },
        } ],
    });
    if let Some(ts) = transport_socket {
        chain["transport_socket"] = ts;
    }
    json!({
        "name": name,
        "address": socket_address(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        "filter_chains": [chain],
    })
}

/// A static HTTP/1.1 cluster of one endpoint, with `transport_socket` (TLS) if given. With
/// `one_request_per_connection`, every request opens a new connection (and so does a new
/// TLS handshake with whatever certificates are current); otherwise connections are reused.
pub fn static_cluster(
    name: &str,
    endpoint: SocketAddr,
    transport_socket: Option<Value>,
    one_request_per_connection: bool,
) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [ { "lb_endpoints": [ {
                "endpoint": { "address": socket_address(endpoint) },
            } ] } ],
        },
    });
    if one_request_per_connection {
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": { "max_requests_per_connection": 1 },
                "explicit_http_config": { "http_protocol_options": {} },
            },
        });
    }
    if let Some(ts) = transport_socket {
        cluster["transport_socket"] = ts;
    }
    cluster
}

/// The serial number of a certificate as Envoy's `%UPSTREAM_PEER_CERT%` or
/// `%DOWNSTREAM_PEER_CERT%` formats it in a header: URL-encoded PEM.
pub fn serial_of_peer_cert(url_encoded_pem: &str) -> Result<Serial, Error> {
    let pem = percent_decode(url_encoded_pem).ok_or_else(|| Error::Malformed {
        what: "URL-encoded PEM",
        detail: url_encoded_pem.to_owned(),
    })?;
    serial_of_pem(&pem)
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({ "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() } })
}

/// A `--base-id` no other Envoy of this or another test process uses at the same time.
fn unique_base_id() -> u32 {
    let n = STARTED.fetch_add(1, Ordering::Relaxed) % 100;
    (std::process::id() % 100_000) * 100 + n
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn parse_certs(body: &str) -> Result<Vec<TlsContextCerts>, Error> {
    let malformed = |detail: String| Error::Malformed {
        what: "Envoy /certs",
        detail,
    };
    let json: Value = serde_json::from_str(body).map_err(|e| malformed(format!("{e}: {body}")))?;
    let contexts = json["certificates"]
        .as_array()
        .ok_or_else(|| malformed(format!("no \"certificates\" array: {body}")))?;
    let certs = |list: &Value| -> Result<Vec<CertInfo>, Error> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["serial_number"].as_str().is_some_and(|s| !s.is_empty()))
            .map(|c| {
                Ok(CertInfo {
                    serial: c["serial_number"].as_str().unwrap_or_default().parse()?,
                    uri_sans: c["subject_alt_names"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|san| san["uri"].as_str().map(str::to_owned))
                        .collect(),
                })
            })
            .collect()
    };
    contexts
        .iter()
        .map(|c| {
            Ok(TlsContextCerts {
                ca: certs(&c["ca_cert"])?,
                chain: certs(&c["cert_chain"])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from Envoy 1.40's `/certs` for a listener fed by the agent.
    const CERTS: &str = r#"{
 "certificates": [
  {
   "ca_cert": [ { "path": "\u003cinline\u003e", "serial_number": "938a56e046ffd53677a8bb0ba7ddb670aaef64",
     "subject_alt_names": [], "days_until_expiration": "0" } ],
   "cert_chain": [ { "path": "\u003cinline\u003e", "serial_number": "157726c7a92a7fd0b89f9cc6b4ef23a1",
     "subject_alt_names": [ { "uri": "spiffe://example.org/ns/default/sa/backend" } ] } ]
  },
  { "ca_cert": [], "cert_chain": [] }
 ]
}"#;

    #[test]
    fn certs_parse_as_envoy_writes_them() {
        let contexts = parse_certs(CERTS).unwrap();
        assert_eq!(contexts.len(), 2);
        assert_eq!(
            contexts[0].ca[0].serial.to_string(),
            "938a56e046ffd53677a8bb0ba7ddb670aaef64"
        );
        assert_eq!(
            contexts[0].chain[0].uri_sans,
            ["spiffe://example.org/ns/default/sa/backend"]
        );
        assert!(contexts[1].chain.is_empty());
        assert!(parse_certs("{}").is_err());
        assert!(parse_certs("<html>").is_err());
    }

    #[test]
    fn peer_cert_headers_decode_to_a_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::SharedCa::write(dir.path()).unwrap();
        let pem = std::fs::read_to_string(&ca.cert).unwrap();
        let encoded = pem
            .replace('%', "%25")
            .replace('\n', "%0A")
            .replace(' ', "%20")
            .replace('+', "%2B")
            .replace('/', "%2F");
        assert_eq!(serial_of_peer_cert(&encoded).unwrap(), ca.serial);
        assert!(serial_of_peer_cert("%zz").is_err());
        assert!(serial_of_peer_cert("%4").is_err());
        assert!(serial_of_peer_cert("-").is_err());
    }

    #[test]
    fn google_grpc_replaces_every_sds_config_and_the_sds_cluster() {
        let socket = Path::new("/tmp/x/agent.sock");
        let mut bootstrap = Bootstrap::new(
            "n",
            "c",
            vec![http_listener(
                "in",
                1,
                Some(downstream_tls("spiffe://td/ns/a/sa/b")),
                vec![],
                &[],
            )],
            vec![
                sds_cluster(socket),
                static_cluster(
                    "up",
                    SocketAddr::from((Ipv4Addr::LOCALHOST, 2)),
                    Some(upstream_tls("spiffe://td/ns/a/sa/c")),
                    false,
                ),
            ],
        )
        .unwrap();
        use_google_grpc(&mut bootstrap, socket);
        let text = bootstrap.config.to_string();
        assert!(!text.contains("envoy_grpc"), "{text}");
        assert!(!text.contains(SDS_CLUSTER), "{text}");
        // Two secrets on the listener, two on the cluster.
        assert_eq!(
            text.matches("\"target_uri\":\"unix:///tmp/x/agent.sock\"")
                .count(),
            4
        );
        assert_eq!(
            bootstrap.config["static_resources"]["clusters"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn base_ids_differ_within_a_process() {
        assert_ne!(unique_base_id(), unique_base_id());
    }
}
