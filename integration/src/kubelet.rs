//! A loopback fake of the kubelet's pod listing, for the agent's node mode. There is no
//! kubelet to run here, so this reproduces what the agent's kubelet client relies on:
//!
//! - **The path.** `GET /pods` answers the pods bound to the node as a core/v1 `PodList`
//!   (`kind: PodList`, `apiVersion: v1`, `metadata: {}`, `items`, `null` when there are
//!   none, as Go marshals an empty slice); any other path is `404 page not found`, any
//!   other method on `/pods` `405`.
//! - **The secure port** (HTTPS, its serving certificate from a root of its own, for
//!   `localhost` and `127.0.0.1`), with the kubelet's authentication and authorization as
//!   a hardened kubelet runs them (`--anonymous-auth=false`, `--authorization-mode=Webhook`):
//!   authentication comes first and applies to every path, so a request without
//!   `Authorization: Bearer <token>` or with a token the API server would not accept is
//!   `401` with the body `Unauthorized`; a token whose service account is not granted `get`
//!   on `nodes/proxy` is `403` with the kubelet's
//!   `Forbidden (user=..., verb=get, resource=nodes, subresource=proxy)` message.
//! - **The read-only port** (plain HTTP, no authentication) as `--read-only-port` serves it.
//! - **The JSON shape** of each pod: `metadata` (name, namespace, uid, resourceVersion,
//!   creationTimestamp, labels), `spec` (serviceAccountName and its deprecated twin
//!   serviceAccount, omitted when the test leaves it unset, nodeName, containers,
//!   initContainers, ephemeralContainers), `status` (phase, podIP, and a status per
//!   container in `containerStatuses`, `initContainerStatuses`, `ephemeralContainerStatuses`
//!   with name, image, ready, restartCount, state, and `containerID` as
//!   `<runtime>://<64 hex>` for containerd, cri-o and docker, absent while the container
//!   is being created).
//!
//! Not reproduced: the rest of the kubelet API (`/stats`, `/logs`, `/exec`, ...), client
//! certificate authentication, anonymous requests being authorized, the fine-grained
//! `nodes/pods` authorization of newer kubelets, HTTP/2, and the many pod fields no client
//! here reads. Tokens are a fixture, not TokenReviews.
//!
//! The test's handle adds, removes and replaces pods while it serves, counts and timestamps
//! the requests, delays answers, answers garbage, and rotates the token.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::{Error, io_error};

/// The token the agent is given, granted `nodes/proxy`.
pub const TOKEN: &str = "sds-agent-kubelet-test-token";
/// A token the API server accepts, for a service account without `nodes/proxy`.
pub const FORBIDDEN_TOKEN: &str = "no-nodes-proxy-test-token";
/// The user [`TOKEN`] authenticates as.
pub const USER: &str = "system:serviceaccount:sds-system:sds-agent";
/// The user [`FORBIDDEN_TOKEN`] authenticates as.
pub const FORBIDDEN_USER: &str = "system:serviceaccount:sds-system:no-proxy";
/// The node the fake kubelet runs on (`spec.nodeName` of its pods).
pub const NODE_NAME: &str = "node-1";

/// The container runtime that reports a container, which sets its `containerID` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `containerd://`
    Containerd,
    /// `cri-o://`
    CriO,
    /// `docker://` (cri-dockerd)
    Docker,
}

impl Runtime {
    fn prefix(self) -> &'static str {
        match self {
            Self::Containerd => "containerd://",
            Self::CriO => "cri-o://",
            Self::Docker => "docker://",
        }
    }
}

/// One container of a [`FakePod`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContainer {
    /// Its name in the pod spec.
    pub name: String,
    /// The runtime's 64-hex ID; `None` while the runtime is still creating it (the status
    /// then has no `containerID`).
    pub id: Option<String>,
    /// The runtime reporting it.
    pub runtime: Runtime,
}

impl FakeContainer {
    /// A container named `name` with a fresh ID, run by containerd.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            id: Some(fresh_container_id()),
            runtime: Runtime::Containerd,
        }
    }

    /// The same container reported by `runtime`.
    pub fn on(mut self, runtime: Runtime) -> Self {
        self.runtime = runtime;
        self
    }

    /// The ID, or an empty string while the container is being created.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }
}

/// A pod on the fake node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`; `None` leaves the field out.
    pub service_account: Option<String>,
    /// Regular containers.
    pub containers: Vec<FakeContainer>,
    /// Init containers (listed as finished).
    pub init_containers: Vec<FakeContainer>,
    /// Ephemeral (debug) containers.
    pub ephemeral_containers: Vec<FakeContainer>,
}

impl FakePod {
    /// A pod with a fresh UID and one running container, `app`.
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: fresh_pod_uid(),
            service_account: Some(service_account.to_owned()),
            containers: vec![FakeContainer::new("app")],
            init_containers: Vec::new(),
            ephemeral_containers: Vec::new(),
        }
    }

    /// The SPIFFE ID a node agent of `trust_domain` must give this pod:
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>` (`default` when it names none).
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace,
            self.service_account.as_deref().unwrap_or("default")
        )
    }

    /// The ID of regular container `index` (empty if it has none yet).
    pub fn container_id(&self, index: usize) -> &str {
        self.containers.get(index).map_or("", FakeContainer::id)
    }

    /// The pod as the kubelet lists it.
    pub fn to_json(&self) -> Value {
        let specs = |containers: &[FakeContainer]| -> Vec<Value> {
            containers
                .iter()
                .map(|c| json!({"name": c.name, "image": image(&c.name), "resources": {}}))
                .collect()
        };
        let mut spec = json!({
            "nodeName": NODE_NAME,
            "restartPolicy": "Always",
            "containers": specs(&self.containers),
        });
        if !self.init_containers.is_empty() {
            spec["initContainers"] = specs(&self.init_containers).into();
        }
        if !self.ephemeral_containers.is_empty() {
            spec["ephemeralContainers"] = specs(&self.ephemeral_containers).into();
        }
        if let Some(sa) = &self.service_account {
            spec["serviceAccountName"] = sa.as_str().into();
            spec["serviceAccount"] = sa.as_str().into();
        }
        let mut status = json!({
            "phase": "Running",
            "hostIP": "10.0.0.11",
            "podIP": "10.244.1.7",
            "qosClass": "BestEffort",
            "startTime": "2025-01-01T00:00:00Z",
            "containerStatuses": self.containers.iter().map(|c| container_status(c, "running")).collect::<Vec<_>>(),
        });
        if !self.init_containers.is_empty() {
            status["initContainerStatuses"] = self
                .init_containers
                .iter()
                .map(|c| container_status(c, "terminated"))
                .collect::<Vec<_>>()
                .into();
        }
        if !self.ephemeral_containers.is_empty() {
            status["ephemeralContainerStatuses"] = self
                .ephemeral_containers
                .iter()
                .map(|c| container_status(c, "running"))
                .collect::<Vec<_>>()
                .into();
        }
        json!({
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": "4711",
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"app": self.name},
                "annotations": {"kubernetes.io/config.source": "api"},
            },
            "spec": spec,
            "status": status,
        })
    }
}

fn image(container: &str) -> String {
    format!("registry.test/{container}:1.0")
}

/// A container's status: `state` is `running` or `terminated` (a finished init container);
/// one without an ID is `waiting` in `ContainerCreating`, with no `containerID`.
fn container_status(c: &FakeContainer, state: &str) -> Value {
    let Some(id) = &c.id else {
        return json!({
            "name": c.name, "image": image(&c.name), "imageID": "", "ready": false,
            "restartCount": 0, "started": false,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        });
    };
    let state = if state == "terminated" {
        json!({"terminated": {"exitCode": 0, "reason": "Completed",
            "startedAt": "2025-01-01T00:00:01Z", "finishedAt": "2025-01-01T00:00:02Z",
            "containerID": format!("{}{id}", c.runtime.prefix())}})
    } else {
        json!({"running": {"startedAt": "2025-01-01T00:00:03Z"}})
    };
    json!({
        "name": c.name,
        "image": image(&c.name),
        "imageID": format!("{}@sha256:{}", image(&c.name), "0".repeat(64)),
        "containerID": format!("{}{id}", c.runtime.prefix()),
        "ready": state.get("running").is_some(),
        "restartCount": 0,
        "started": state.get("running").is_some(),
        "state": state,
    })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A UID no other fake pod in this process has (a version-4 shaped UUID).
pub fn fresh_pod_uid() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        0x05d5_0000 + (n & 0xffff),
        std::process::id() & 0xffff,
        n & 0xfff,
        (n >> 12) & 0xfff,
        n
    )
}

/// A container ID (64 hex) no other fake container in this process has.
pub fn fresh_container_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}{:048x}",
        0x00c0_ffee_0000_0000 + u64::from(std::process::id()),
        n
    )
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived (before any delay).
    pub at: Instant,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Status answered.
    pub status: u16,
}

#[derive(Debug)]
struct Behaviour {
    pods: Vec<FakePod>,
    /// Pods listed only from the `GET /pods` after the given number of them on.
    later: Vec<(usize, FakePod)>,
    /// `GET /pods` received.
    lists: usize,
    delay: Duration,
    token: String,
    /// Answered with `200` instead of the list, if set.
    body_override: Option<String>,
}

#[derive(Debug)]
struct State {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Request>>,
    /// Checks tokens (false on the read-only port).
    secure: bool,
}

/// A running fake kubelet; stops when dropped.
pub struct FakeKubelet {
    addr: SocketAddr,
    secure: bool,
    ca_pem: String,
    ca_path: PathBuf,
    token_file: PathBuf,
    state: Arc<State>,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<JoinSet<()>>>,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// The secure port: HTTPS on a free loopback port, its TLS root written to
    /// `dir/kubelet-ca.pem` and [`TOKEN`] to `dir/kubelet-token`.
    pub async fn start(dir: &Path) -> Result<Self, Error> {
        Self::start_with(dir, true).await
    }

    /// The read-only port: plain HTTP on a free loopback port, no authentication. The CA
    /// and token files are written all the same (a client in this mode ignores them).
    pub async fn start_read_only(dir: &Path) -> Result<Self, Error> {
        Self::start_with(dir, false).await
    }

    async fn start_with(dir: &Path, secure: bool) -> Result<Self, Error> {
        let (ca_pem, tls) = serving_tls()?;
        let ca_path = dir.join("kubelet-ca.pem");
        std::fs::write(&ca_path, &ca_pem)
            .map_err(io_error(format!("writing {}", ca_path.display())))?;
        let token_file = dir.join("kubelet-token");
        std::fs::write(&token_file, format!("{TOKEN}\n"))
            .map_err(io_error(format!("writing {}", token_file.display())))?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("binding the fake kubelet on 127.0.0.1:0"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("reading the fake kubelet's address"))?;
        let state = Arc::new(State {
            behaviour: Mutex::new(Behaviour {
                pods: Vec::new(),
                later: Vec::new(),
                lists: 0,
                delay: Duration::ZERO,
                token: TOKEN.to_owned(),
                body_override: None,
            }),
            requests: Mutex::new(Vec::new()),
            secure,
        });
        let app = Router::new().fallback(answer).with_state(state.clone());
        let acceptor = secure.then(|| tokio_rustls::TlsAcceptor::from(tls));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let conns = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let mut set = conns.lock();
                // Reap finished connections as new ones come.
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(tls), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            secure,
            ca_pem,
            ca_path,
            token_file,
            state,
            accept,
            connections,
        })
    }

    /// The address it listens on (always 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1`, the host its certificate names (with `localhost`).
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The `/pods` URL.
    pub fn url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}/pods", self.addr)
    }

    /// The root its serving certificate chains to, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The file holding [`FakeKubelet::ca_pem`].
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The file holding the token it accepts ([`TOKEN`] until rotated).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Adds a pod to the node.
    pub fn add_pod(&self, pod: FakePod) {
        self.state.behaviour.lock().pods.push(pod);
    }

    /// Adds a pod that the first `answers` lists leave out and every later one has, as a
    /// pod the kubelet learns of while a client polls.
    pub fn add_pod_after(&self, pod: FakePod, answers: usize) {
        self.state.behaviour.lock().later.push((answers, pod));
    }

    /// Removes the pod with UID `uid`; whether there was one.
    pub fn remove_pod(&self, uid: &str) -> bool {
        let mut b = self.state.behaviour.lock();
        let before = b.pods.len();
        b.pods.retain(|p| p.uid != uid);
        b.pods.len() != before
    }

    /// Replaces the pod with `pod.uid` (or adds it): a container started, say.
    pub fn replace_pod(&self, pod: FakePod) {
        let mut b = self.state.behaviour.lock();
        match b.pods.iter_mut().find(|p| p.uid == pod.uid) {
            Some(slot) => *slot = pod,
            None => b.pods.push(pod),
        }
    }

    /// Replaces every pod.
    pub fn set_pods(&self, pods: Vec<FakePod>) {
        self.state.behaviour.lock().pods = pods;
    }

    /// The pods on the node now.
    pub fn pods(&self) -> Vec<FakePod> {
        self.state.behaviour.lock().pods.clone()
    }

    /// Every answer waits `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.state.behaviour.lock().delay = delay;
    }

    /// `/pods` answers `200` with `body` instead of the list (`None`: the list again).
    pub fn set_body_override(&self, body: Option<String>) {
        self.state.behaviour.lock().body_override = body;
    }

    /// From now on only `token` is accepted (and [`FORBIDDEN_TOKEN`], refused with `403`);
    /// it is written to [`FakeKubelet::token_file`] as a projected token is rotated.
    pub fn rotate_token(&self, token: &str) -> Result<(), Error> {
        let tmp = self.token_file.with_extension("new");
        std::fs::write(&tmp, format!("{token}\n"))
            .and_then(|()| std::fs::rename(&tmp, &self.token_file))
            .map_err(io_error(format!("writing {}", self.token_file.display())))?;
        self.state.behaviour.lock().token = token.to_owned();
        Ok(())
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().clone()
    }

    /// How many `GET /pods` it has received (answered or still delayed).
    pub fn pods_requests(&self) -> usize {
        self.state
            .requests
            .lock()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/pods")
            .count()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.state.requests.lock().clear();
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.accept.abort();
        self.connections.lock().abort_all();
    }
}

/// Every request: logged, delayed, authenticated, authorized, then routed, in the
/// kubelet's order (its auth filter wraps every path).
async fn answer(
    AxumState(state): AxumState<Arc<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Infallible> {
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let index = {
        let mut requests = state.requests.lock();
        requests.push(Request {
            at: Instant::now(),
            method: method.to_string(),
            path: path.clone(),
            status: 0,
        });
        requests.len() - 1
    };
    let delay = state.behaviour.lock().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, content_type, body) = route(&state, &method, uri.path(), &headers);
    if let Some(r) = state.requests.lock().get_mut(index) {
        r.status = status.as_u16();
    }
    let response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()));
    Ok(response)
}

const TEXT: &str = "text/plain; charset=utf-8";

fn route(
    state: &State,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> (StatusCode, &'static str, String) {
    let mut b = state.behaviour.lock();
    if state.secure {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token {
            Some(t) if t == b.token => {}
            Some(FORBIDDEN_TOKEN) => {
                return (
                    StatusCode::FORBIDDEN,
                    TEXT,
                    format!(
                        "Forbidden (user={FORBIDDEN_USER}, verb={}, resource=nodes, subresource=proxy)\n",
                        if method == Method::GET {
                            "get"
                        } else {
                            "create"
                        }
                    ),
                );
            }
            _ => return (StatusCode::UNAUTHORIZED, TEXT, "Unauthorized\n".to_owned()),
        }
    }
    if path != "/pods" && path != "/pods/" {
        return (
            StatusCode::NOT_FOUND,
            TEXT,
            "404 page not found\n".to_owned(),
        );
    }
    if method != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "405: Method Not Allowed".to_owned(),
        );
    }
    b.lists += 1;
    if let Some(body) = &b.body_override {
        return (StatusCode::OK, "application/json", body.clone());
    }
    let lists = b.lists;
    let pods: Vec<Value> = b
        .pods
        .iter()
        .chain(
            b.later
                .iter()
                .filter(|(after, _)| lists > *after)
                .map(|(_, p)| p),
        )
        .map(FakePod::to_json)
        .collect();
    let items = if pods.is_empty() {
        Value::Null
    } else {
        pods.into()
    };
    let list = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    (StatusCode::OK, "application/json", list.to_string())
}

fn serving_tls() -> Result<(String, Arc<rustls::ServerConfig>), Error> {
    crate::pki::serving_tls(
        "fake kubelet",
        "sds-agent node mode test",
        "fake kubelet serving root",
        &["localhost"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_have_the_kubelet_shapes_and_differ() {
        let a = fresh_pod_uid();
        let b = fresh_pod_uid();
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        let c = fresh_container_id();
        assert_eq!(c.len(), 64);
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(c, fresh_container_id());
    }

    #[test]
    fn a_pod_renders_as_the_kubelet_lists_it() {
        let mut pod = FakePod::new("shop", "web-0", "web");
        pod.init_containers
            .push(FakeContainer::new("setup").on(Runtime::CriO));
        pod.containers.push(FakeContainer {
            name: "envoy".into(),
            id: None,
            runtime: Runtime::Containerd,
        });
        let v = pod.to_json();
        assert_eq!(v["metadata"]["uid"], pod.uid.as_str());
        assert_eq!(v["spec"]["serviceAccountName"], "web");
        assert_eq!(v["spec"]["nodeName"], NODE_NAME);
        let statuses = v["status"]["containerStatuses"].as_array().unwrap();
        assert_eq!(
            statuses[0]["containerID"],
            format!("containerd://{}", pod.container_id(0)).as_str()
        );
        assert!(statuses[1].get("containerID").is_none());
        assert_eq!(
            statuses[1]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        let init = &v["status"]["initContainerStatuses"][0];
        assert!(
            init["containerID"]
                .as_str()
                .unwrap()
                .starts_with("cri-o://")
        );
        assert!(init["state"]["terminated"].is_object());
        pod.service_account = None;
        assert!(pod.to_json()["spec"].get("serviceAccountName").is_none());
    }
}
