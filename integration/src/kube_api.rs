//! A loopback fake of the Kubernetes API for cert-manager's `CertificateRequest`s, and a
//! signer in it that plays cert-manager. There is no kube-apiserver binary to install here,
//! so this reproduces, over HTTPS with bearer tokens, what the agent's cert-manager backend
//! relies on:
//!
//! **The API server** (`/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests`):
//! - `POST` creates: `generateName` gets five random characters from the API server's
//!   alphabet, `metadata.uid`, `resourceVersion`, `creationTimestamp` and `generation` are
//!   set, a taken name is `409 AlreadyExists`, a missing namespace `404` with
//!   `details.kind: namespaces`. cert-manager's webhooks are played too: `spec.username`
//!   and `spec.groups` are set from the caller, and a request without an issuer name or
//!   with a CSR that does not parse is refused as the webhook refuses it (`403`,
//!   `admission webhook "webhook.cert-manager.io" denied the request: ...`).
//! - `GET` on a name, `GET` of the collection (list, with `labelSelector` and
//!   `fieldSelector=metadata.name=`), and `DELETE` on a name (answering the deleted object).
//! - `GET ...?watch=true`: a chunked stream of `{"type":"ADDED|MODIFIED|DELETED","object":..}`
//!   lines. Without a `resourceVersion` (or with `0`) it starts with an `ADDED` per matching
//!   object; with one, it replays every change after it; one older than the event history
//!   kept (the last 1000 changes) gets an `ERROR` event with a `410 Expired` Status, as
//!   etcd compaction gives. `timeoutSeconds` ends the stream cleanly.
//! - Errors are `Status` objects with the API server's messages: `401 Unauthorized` for an
//!   unknown token, `403 Forbidden` naming the user, verb, resource, group and namespace
//!   when the test RBAC does not grant the verb, or grants it in other namespaces only (the
//!   verbs are granted cluster-wide, as by a ClusterRoleBinding, or in chosen namespaces,
//!   as by RoleBindings), `404` "the server could not find the requested resource" when the
//!   CRD is "not installed".
//! - Namespaces: [`NAMESPACE`] and `default` exist, tests add others
//!   ([`KubeApi::add_namespace`]). As on a real API server, only a create needs its
//!   namespace to exist; a list or a watch in a missing one finds nothing, a get or a delete
//!   gets the object's `404`.
//!
//! **The signer**, as cert-manager's controllers set the conditions:
//! - the approver (cert-manager's internal approver, or approver-policy) adds
//!   `Approved=True` (reason `cert-manager.io`) or `Denied=True` (reason
//!   `policy.cert-manager.io`), or does nothing when no approver runs;
//! - on `Denied`, the issuer controller sets `Ready=False` reason `Denied`, "The
//!   CertificateRequest was denied by an approval controller", and `status.failureTime`;
//! - once approved, a CA issuer signs (the CSR's URI SAN, `spec.duration` as the lifetime)
//!   and sets `status.certificate` (leaf, then the issuing intermediate), `status.ca` (the
//!   root) and `Ready=True` reason `Issued`; or fails it (`Ready=False` reason `Failed`,
//!   `failureTime`); or finds it invalid (`InvalidRequest=True`, then `Ready=False` reason
//!   `Failed`); or leaves it pending (`Ready=False` reason `Pending`); an issuer that does
//!   not exist leaves it `Pending` with cert-manager's "Referenced ... not found" message.
//!   Each controller's change is its own update, so a watcher sees each step.
//!
//! Not reproduced: other resources, discovery, server-side apply and patches, finalizers
//! and the garbage collector, field selectors other than `metadata.name`, set-based label
//! selectors, bookmarks, HTTP/2, and real authentication (tokens are a fixture).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, KeyType, SignRequest};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::{Error, Serial, free_port, io_error};

/// The namespace tests create requests in.
pub const NAMESPACE: &str = "mesh";
/// The issuer that exists in the fake (an `Issuer` in every namespace, and a
/// `ClusterIssuer`).
pub const ISSUER: &str = "mesh-ca";
/// The token the agent is given, and the user it maps to.
pub const TOKEN: &str = "sds-agent-test-token";
/// The user [`TOKEN`] authenticates as.
pub const USER: &str = "system:serviceaccount:mesh:sds-agent";
/// Changes kept for watches to resume from.
const HISTORY: usize = 1000;
/// The characters the API server draws generated name suffixes from.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// What the approver does with a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Approve it (cert-manager's internal approver).
    Approve,
    /// Deny it with this message (approver-policy).
    Deny(String),
    /// Nothing: no approver runs.
    Ignore,
}

/// What the issuer does with an approved request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issuance {
    /// Sign it.
    Sign,
    /// Fail it with this message.
    Fail(String),
    /// Find it invalid, with this message.
    Invalid(String),
    /// Leave it pending for ever.
    Pend,
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Status code answered.
    pub status: u16,
}

struct Store {
    objects: BTreeMap<(String, String), Value>,
    resource_version: u64,
    /// Changes, oldest first: (resourceVersion, type, object).
    history: VecDeque<(u64, &'static str, Value)>,
    created: usize,
    uid_counter: u64,
}

struct Behaviour {
    approval: Approval,
    issuance: Issuance,
    send_ca: bool,
    crd_installed: bool,
    /// Longest life of a watch stream, whatever `timeoutSeconds` asks.
    watch_lifetime: Option<Duration>,
    allowed_verbs: HashSet<&'static str>,
    /// The namespaces the verbs are granted in; `None`: all of them (a ClusterRoleBinding).
    granted_in: Option<HashSet<String>>,
    namespaces: HashSet<String>,
    tokens: HashMap<String, String>,
}

struct State {
    store: Mutex<Store>,
    behaviour: Mutex<Behaviour>,
    /// The last resourceVersion, for watches and the signer to wake on; bumped without a
    /// change when the behaviour changes, so the signer looks again.
    changed: watch::Sender<u64>,
    calls: Mutex<Vec<Call>>,
    ca: EmbeddedCa,
    root_pem: String,
    intermediate_pem: String,
}

/// The fake API server and its signer. Serves between [`KubeApi::serve`] and
/// [`KubeApi::stop`], always on the same port.
pub struct KubeApi {
    addr: SocketAddr,
    tls_root_pem: String,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    running: Option<Running>,
    signer: JoinHandle<()>,
}

struct Running {
    accept: JoinHandle<()>,
    connections: Arc<Mutex<JoinSet<()>>>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("addr", &self.addr)
            .field("serving", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// Generates the TLS and issuer PKI, starts the signer (approving and signing) and
    /// serves on a free loopback port.
    pub async fn start() -> Result<Self, Error> {
        let (tls_root_pem, tls) = serving_tls()?;
        let (ca, root_pem, intermediate_pem) = issuer_ca()?;
        let (changed, _) = watch::channel(0);
        let state = Arc::new(State {
            store: Mutex::new(Store {
                objects: BTreeMap::new(),
                resource_version: 1000,
                history: VecDeque::new(),
                created: 0,
                uid_counter: 0,
            }),
            behaviour: Mutex::new(Behaviour {
                approval: Approval::Approve,
                issuance: Issuance::Sign,
                send_ca: true,
                crd_installed: true,
                watch_lifetime: None,
                allowed_verbs: ["create", "get", "list", "watch", "delete"].into(),
                granted_in: None,
                namespaces: [NAMESPACE.to_owned(), "default".to_owned()].into(),
                tokens: [(TOKEN.to_owned(), USER.to_owned())].into(),
            }),
            changed,
            calls: Mutex::new(Vec::new()),
            ca,
            root_pem,
            intermediate_pem,
        });
        let signer = tokio::spawn(run_signer(state.clone()));
        let mut api = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            tls_root_pem,
            tls,
            state,
            running: None,
            signer,
        };
        api.serve().await?;
        Ok(api)
    }

    /// Serves (again, after [`KubeApi::stop`]) on its port.
    pub async fn serve(&mut self) -> Result<(), Error> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(io_error(format!(
                "binding the fake API server on {}",
                self.addr
            )))?;
        let app = router(self.state.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let conns = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                let mut set = conns.lock();
                // Reap finished connections as new ones come.
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        self.running = Some(Running {
            accept,
            connections,
        });
        Ok(())
    }

    /// The API server goes down: the port refuses connections, open ones (watches
    /// included) are cut.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.accept.abort();
            running.connections.lock().abort_all();
        }
    }

    /// Cuts every open connection (watch streams end mid-stream, without their last
    /// chunk), as a load balancer or an API server restart does; new ones are accepted.
    pub fn cut_connections(&self) {
        if let Some(running) = &self.running {
            running.connections.lock().abort_all();
        }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes a kubeconfig for it into `dir` (the API server's TLS root inline, `token` as
    /// the user's token, `namespace` as the context's) and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, token: &str) -> Result<PathBuf, Error> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\nusers:\n- name: sds-agent\n  user:\n    token: {token}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: sds-agent\n    \
             namespace: {NAMESPACE}\ncurrent-context: fake\n",
            self.url(),
            BASE64.encode(&self.tls_root_pem),
        );
        std::fs::write(&path, text).map_err(io_error(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// What the approver does from now on.
    pub fn set_approval(&self, approval: Approval) {
        self.state.behaviour.lock().approval = approval;
        self.state.changed.send_modify(|_| {});
    }

    /// What the issuer does from now on.
    pub fn set_issuance(&self, issuance: Issuance) {
        self.state.behaviour.lock().issuance = issuance;
        self.state.changed.send_modify(|_| {});
    }

    /// Whether the issuer fills `status.ca` (ACME issuers do not).
    pub fn set_send_ca(&self, send: bool) {
        self.state.behaviour.lock().send_ca = send;
    }

    /// Installs or removes cert-manager's CRD.
    pub fn set_crd_installed(&self, installed: bool) {
        self.state.behaviour.lock().crd_installed = installed;
    }

    /// Ends every watch stream after `lifetime` (cleanly, as at a server-side timeout), as a
    /// proxy with a short idle timeout does; `None` for the API server's own behaviour.
    pub fn set_watch_lifetime(&self, lifetime: Option<Duration>) {
        self.state.behaviour.lock().watch_lifetime = lifetime;
    }

    /// Grants or revokes one RBAC verb on certificaterequests to every user.
    pub fn set_allowed(&self, verb: &'static str, allowed: bool) {
        let mut b = self.state.behaviour.lock();
        if allowed {
            b.allowed_verbs.insert(verb);
        } else {
            b.allowed_verbs.remove(verb);
        }
    }

    /// Grants the verbs of [`KubeApi::set_allowed`] in these namespaces only, as RoleBindings
    /// do (`Some`), or in every namespace, as a ClusterRoleBinding does (`None`, the
    /// default).
    pub fn set_granted_in(&self, namespaces: Option<&[&str]>) {
        self.state.behaviour.lock().granted_in =
            namespaces.map(|list| list.iter().map(|ns| (*ns).to_owned()).collect());
    }

    /// Creates namespace `ns` (nothing happens if it exists).
    pub fn add_namespace(&self, ns: &str) {
        self.state.behaviour.lock().namespaces.insert(ns.to_owned());
    }

    /// Every request answered so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().clone()
    }

    /// The CertificateRequests that exist now, in every namespace.
    pub fn requests(&self) -> Vec<Value> {
        self.state.store.lock().objects.values().cloned().collect()
    }

    /// How many CertificateRequests were created so far.
    pub fn created(&self) -> usize {
        self.state.store.lock().created
    }

    /// Puts a CertificateRequest in as another client (or a crashed run) would have.
    pub fn insert(&self, mut object: Value) -> Result<String, Error> {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(NAMESPACE)
            .to_owned();
        let created = create(&self.state, &ns, &mut object, USER).map_err(|s| Error::Api {
            call: "inserting a CertificateRequest".into(),
            detail: format!("answered {}: {}", s.code, s.body),
        })?;
        Ok(created["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The issuer's root, PEM (what `status.ca` carries).
    pub fn root_pem(&self) -> &str {
        &self.state.root_pem
    }

    /// The serial of the issuer's root.
    pub fn root_serial(&self) -> Result<Serial, Error> {
        crate::pki::serial_of_pem(&self.state.root_pem)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
        self.signer.abort();
    }
}

type Answer = Result<Response, ApiStatus>;

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route(
            "/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests",
            get(list_or_watch).post(create_handler),
        )
        .route(
            "/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests/{name}",
            get(get_handler).delete(delete_handler),
        )
        .fallback(|| async {
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Records every exchange, for the tests to count calls by kind.
async fn record(
    AxumState(state): AxumState<Arc<State>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let response = next.run(request).await;
    state.calls.lock().push(Call {
        method,
        uri,
        status: response.status().as_u16(),
    });
    response
}

/// A `Status` failure as the API server sends it.
#[derive(Debug)]
struct ApiStatus {
    code: u16,
    body: Value,
}

impl IntoResponse for ApiStatus {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            self.body.to_string(),
        )
            .into_response()
    }
}

fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> ApiStatus {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    ApiStatus { code, body }
}

fn ok_json(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Authentication, the CRD, and RBAC for `verb`, in the API server's order.
fn admit(
    state: &State,
    headers: &HeaderMap,
    verb: &'static str,
    ns: &str,
    name: Option<&str>,
) -> Result<String, ApiStatus> {
    let b = state.behaviour.lock();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| b.tokens.get(t)) else {
        return Err(status(401, "Unauthorized", "Unauthorized", None));
    };
    if !b.crd_installed {
        return Err(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ));
    }
    let granted_here = b.granted_in.as_ref().is_none_or(|list| list.contains(ns));
    if !b.allowed_verbs.contains(verb) || !granted_here {
        let subject = match name {
            Some(n) => format!("certificaterequests.cert-manager.io \"{n}\""),
            None => "certificaterequests.cert-manager.io".to_owned(),
        };
        let mut details = json!({"group": "cert-manager.io", "kind": "certificaterequests"});
        if let Some(n) = name {
            details["name"] = json!(n);
        }
        return Err(status(
            403,
            "Forbidden",
            &format!(
                "{subject} is forbidden: User \"{user}\" cannot {verb} resource \
                 \"certificaterequests\" in API group \"cert-manager.io\" in the namespace \"{ns}\""
            ),
            Some(details),
        ));
    }
    Ok(user.clone())
}

async fn create_handler(
    AxumState(state): AxumState<Arc<State>>,
    UrlPath(ns): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let user = admit(&state, &headers, "create", &ns, None)?;
    let mut object: Value = serde_json::from_slice(&body).map_err(|e| {
        status(
            400,
            "BadRequest",
            &format!("the body of the request was in an unknown format: {e}"),
            None,
        )
    })?;
    let created = create(&state, &ns, &mut object, &user)?;
    Ok(ok_json(StatusCode::CREATED, &created))
}

/// Creation, shared by the handler and [`KubeApi::insert`].
fn create(state: &State, ns: &str, object: &mut Value, user: &str) -> Result<Value, ApiStatus> {
    if !state.behaviour.lock().namespaces.contains(ns) {
        return Err(status(
            404,
            "NotFound",
            &format!("namespaces \"{ns}\" not found"),
            Some(json!({"name": ns, "kind": "namespaces"})),
        ));
    }
    if object["apiVersion"] != "cert-manager.io/v1" || object["kind"] != "CertificateRequest" {
        return Err(status(
            400,
            "BadRequest",
            "the API version in the data does not match the expected API version",
            None,
        ));
    }
    webhook(object)?;
    // cert-manager's mutating webhook records who asked.
    object["spec"]["username"] = json!(user);
    object["spec"]["groups"] = json!(["system:serviceaccounts", "system:authenticated"]);

    let mut store = state.store.lock();
    let name = match object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        Some(n) => n.to_owned(),
        None => {
            let prefix = object["metadata"]["generateName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if prefix.is_empty() {
                return Err(status(
                    422,
                    "Invalid",
                    "CertificateRequest.cert-manager.io \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    None,
                ));
            }
            format!("{prefix}{}", random_suffix(store.uid_counter))
        }
    };
    if store.objects.contains_key(&(ns.to_owned(), name.clone())) {
        return Err(status(
            409,
            "AlreadyExists",
            &format!("certificaterequests.cert-manager.io \"{name}\" already exists"),
            Some(json!({"name": name, "group": "cert-manager.io", "kind": "certificaterequests"})),
        ));
    }
    store.uid_counter += 1;
    store.created += 1;
    let uid = format!("6b1d2c3e-0000-4000-8000-{:012x}", store.uid_counter);
    let meta = &mut object["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(uid);
    meta["generation"] = json!(1);
    meta["creationTimestamp"] =
        json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    if object.get("status").is_none() {
        object["status"] = json!({});
    }
    Ok(commit(
        state,
        &mut store,
        ns,
        &name,
        "ADDED",
        Some(object.clone()),
    ))
}

/// cert-manager's validating webhook, the parts a client can get wrong.
fn webhook(object: &Value) -> Result<(), ApiStatus> {
    let deny = |why: String| {
        status(
            403,
            "Forbidden",
            &format!("admission webhook \"webhook.cert-manager.io\" denied the request: {why}"),
            None,
        )
    };
    if object["spec"]["issuerRef"]["name"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(deny(
            "spec.issuerRef.name: Required value: must be specified".into(),
        ));
    }
    let request = object["spec"]["request"].as_str().unwrap_or_default();
    let pem = BASE64
        .decode(request)
        .map_err(|e| deny(format!("spec.request: Invalid value: not base64: {e}")))?;
    CertificateSigningRequestDer::from_pem_slice(&pem).map_err(|e| {
        deny(format!(
            "spec.request: Invalid value: failed to decode csr: {e}"
        ))
    })?;
    Ok(())
}

/// Stores (or, with `None`, removes) an object at a new resourceVersion, records the change
/// and wakes watchers. Returns the object as stored.
fn commit(
    state: &State,
    store: &mut Store,
    ns: &str,
    name: &str,
    kind: &'static str,
    object: Option<Value>,
) -> Value {
    store.resource_version += 1;
    let rv = store.resource_version;
    let key = (ns.to_owned(), name.to_owned());
    let stored = match object {
        Some(mut o) => {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            store.objects.insert(key, o.clone());
            o
        }
        None => {
            let mut o = store.objects.remove(&key).unwrap_or(Value::Null);
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            o
        }
    };
    store.history.push_back((rv, kind, stored.clone()));
    while store.history.len() > HISTORY {
        store.history.pop_front();
    }
    state.changed.send_replace(rv);
    stored
}

fn random_suffix(seed: u64) -> String {
    // Distinct per call without a random-number crate: time and a counter, mixed.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..5)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            NAME_ALPHABET[(x % NAME_ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

async fn get_handler(
    AxumState(state): AxumState<Arc<State>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    admit(&state, &headers, "get", &ns, Some(&name))?;
    let store = state.store.lock();
    match store.objects.get(&(ns, name.clone())) {
        Some(o) => Ok(ok_json(StatusCode::OK, o)),
        None => Err(not_found(&name)),
    }
}

fn not_found(name: &str) -> ApiStatus {
    status(
        404,
        "NotFound",
        &format!("certificaterequests.cert-manager.io \"{name}\" not found"),
        Some(json!({"name": name, "group": "cert-manager.io", "kind": "certificaterequests"})),
    )
}

async fn delete_handler(
    AxumState(state): AxumState<Arc<State>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    admit(&state, &headers, "delete", &ns, Some(&name))?;
    let mut store = state.store.lock();
    if !store.objects.contains_key(&(ns.clone(), name.clone())) {
        return Err(not_found(&name));
    }
    let gone = commit(&state, &mut store, &ns, &name, "DELETED", None);
    Ok(ok_json(StatusCode::OK, &gone))
}

/// Which objects a list or watch selects.
#[derive(Debug, Default)]
struct Selector {
    name: Option<String>,
    labels: Vec<(String, String)>,
}

impl Selector {
    fn parse(query: &HashMap<String, String>) -> Result<Self, ApiStatus> {
        let mut selector = Selector::default();
        if let Some(fields) = query.get("fieldSelector").filter(|f| !f.is_empty()) {
            for term in fields.split(',') {
                match term.split_once('=') {
                    Some(("metadata.name", v)) => selector.name = Some(v.to_owned()),
                    _ => {
                        return Err(status(
                            400,
                            "BadRequest",
                            &format!(
                                "\"{term}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                            ),
                            None,
                        ));
                    }
                }
            }
        }
        if let Some(labels) = query.get("labelSelector").filter(|l| !l.is_empty()) {
            for term in labels.split(',') {
                let (k, v) = term.split_once('=').ok_or_else(|| {
                    status(
                        400,
                        "BadRequest",
                        &format!("unable to parse requirement: {term}"),
                        None,
                    )
                })?;
                selector
                    .labels
                    .push((k.to_owned(), v.trim_start_matches('=').to_owned()));
            }
        }
        Ok(selector)
    }

    fn matches(&self, ns: &str, object: &Value) -> bool {
        object["metadata"]["namespace"] == ns
            && self
                .name
                .as_ref()
                .is_none_or(|n| object["metadata"]["name"] == n.as_str())
            && self
                .labels
                .iter()
                .all(|(k, v)| object["metadata"]["labels"][k] == v.as_str())
    }
}

async fn list_or_watch(
    AxumState(state): AxumState<Arc<State>>,
    UrlPath(ns): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    admit(
        &state,
        &headers,
        if watching { "watch" } else { "list" },
        &ns,
        None,
    )?;
    let selector = Selector::parse(&query)?;
    if !watching {
        let store = state.store.lock();
        let items: Vec<&Value> = store
            .objects
            .values()
            .filter(|o| selector.matches(&ns, o))
            .collect();
        let body = json!({
            "kind": "CertificateRequestList", "apiVersion": "cert-manager.io/v1",
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        });
        return Ok(ok_json(StatusCode::OK, &body));
    }

    let since: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => Some(v.parse().map_err(|_| {
            status(
                400,
                "BadRequest",
                &format!("invalid resource version \"{v}\""),
                None,
            )
        })?),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let timeout = match state.behaviour.lock().watch_lifetime {
        Some(lifetime) => timeout.min(lifetime),
        None => timeout,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut wake = state.changed.subscribe();
    let line = |kind: &str, object: &Value| {
        Ok(Bytes::from(format!(
            "{}\n",
            json!({"type": kind, "object": object})
        )))
    };

    // What to send first, and the version to go on from.
    let (first, mut cursor): (Vec<Result<Bytes, Infallible>>, u64) = {
        let store = state.store.lock();
        match since {
            None => (
                store
                    .objects
                    .values()
                    .filter(|o| selector.matches(&ns, o))
                    .map(|o| line("ADDED", o))
                    .collect(),
                store.resource_version,
            ),
            Some(v) => {
                let oldest = store
                    .history
                    .front()
                    .map_or(store.resource_version, |e| e.0);
                if v + 1 < oldest {
                    let expired = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {v} ({})", oldest - 1),
                    });
                    (vec![line("ERROR", &expired)], u64::MAX)
                } else {
                    (Vec::new(), v)
                }
            }
        }
    };
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        for item in first {
            if tx.send(item).await.is_err() {
                return;
            }
        }
        if cursor == u64::MAX {
            return;
        }
        loop {
            let due: Vec<Result<Bytes, Infallible>> = {
                let store = state.store.lock();
                let due = store
                    .history
                    .iter()
                    .filter(|(rv, _, o)| *rv > cursor && selector.matches(&ns, o))
                    .map(|(_, kind, o)| line(kind, o))
                    .collect();
                cursor = store.resource_version;
                due
            };
            for item in due {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The signer: looks at every request whenever anything changes, and moves each one step
/// as cert-manager's approver and issuer controllers would.
async fn run_signer(state: Arc<State>) {
    let mut wake = state.changed.subscribe();
    loop {
        let keys: Vec<(String, String)> = state.store.lock().objects.keys().cloned().collect();
        for key in keys {
            reconcile(&state, &key).await;
        }
        if wake.changed().await.is_err() {
            return;
        }
    }
}

fn condition(object: &Value, type_: &str) -> Option<Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn is_true(object: &Value, type_: &str) -> bool {
    condition(object, type_).is_some_and(|c| c["status"] == "True")
}

/// Sets a condition (replacing one of its type), as cert-manager's helpers do.
fn set_condition(object: &mut Value, type_: &str, status: &str, reason: &str, message: &str) {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let entry = json!({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": now,
    });
    if !object["status"]["conditions"].is_array() {
        object["status"]["conditions"] = json!([]);
    }
    if let Some(list) = object["status"]["conditions"].as_array_mut() {
        list.retain(|c| c["type"] != type_);
        list.push(entry);
    }
}

fn set_failure_time(object: &mut Value) {
    if object["status"]["failureTime"].is_null() {
        object["status"]["failureTime"] =
            json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    }
}

/// One controller step on one request, stored as its own update.
async fn reconcile(state: &State, key: &(String, String)) {
    let Some(mut object) = state.store.lock().objects.get(key).cloned() else {
        return;
    };
    let (approval, issuance, send_ca) = {
        let b = state.behaviour.lock();
        (b.approval.clone(), b.issuance.clone(), b.send_ca)
    };
    let ready = condition(&object, "Ready");
    let ready_final = ready.as_ref().is_some_and(|c| {
        c["status"] == "True" || matches!(c["reason"].as_str(), Some("Failed" | "Denied"))
    });
    if ready_final {
        return;
    }
    let approved = is_true(&object, "Approved");
    let denied = is_true(&object, "Denied");
    if denied {
        set_condition(
            &mut object,
            "Ready",
            "False",
            "Denied",
            "The CertificateRequest was denied by an approval controller",
        );
        set_failure_time(&mut object);
    } else if !approved {
        match approval {
            Approval::Approve => set_condition(
                &mut object,
                "Approved",
                "True",
                "cert-manager.io",
                "Certificate request has been approved by cert-manager.io",
            ),
            Approval::Deny(message) => set_condition(
                &mut object,
                "Denied",
                "True",
                "policy.cert-manager.io",
                &message,
            ),
            Approval::Ignore => return,
        }
    } else {
        let issuer = object["spec"]["issuerRef"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = object["spec"]["issuerRef"]["kind"]
            .as_str()
            .unwrap_or("Issuer")
            .to_owned();
        if issuer != ISSUER {
            let message = format!(
                "Referenced \"{kind}\" not found: {}.cert-manager.io \"{issuer}\" not found",
                kind.to_ascii_lowercase()
            );
            if ready
                .as_ref()
                .is_some_and(|c| c["message"] == message.as_str())
            {
                return;
            }
            set_condition(&mut object, "Ready", "False", "Pending", &message);
        } else {
            match issuance {
                Issuance::Sign => match sign(state, &object).await {
                    Ok(certificate) => {
                        object["status"]["certificate"] = json!(BASE64.encode(certificate));
                        if send_ca {
                            object["status"]["ca"] = json!(BASE64.encode(&state.root_pem));
                        }
                        set_condition(
                            &mut object,
                            "Ready",
                            "True",
                            "Issued",
                            "Certificate fetched from issuer successfully",
                        );
                    }
                    Err(why) => {
                        set_condition(
                            &mut object,
                            "InvalidRequest",
                            "True",
                            "RequestParsingError",
                            &why,
                        );
                        set_condition(&mut object, "Ready", "False", "Failed", &why);
                        set_failure_time(&mut object);
                    }
                },
                Issuance::Fail(message) => {
                    set_condition(&mut object, "Ready", "False", "Failed", &message);
                    set_failure_time(&mut object);
                }
                Issuance::Invalid(message) => {
                    set_condition(
                        &mut object,
                        "InvalidRequest",
                        "True",
                        "InvalidRequest",
                        &message,
                    );
                    set_condition(&mut object, "Ready", "False", "Failed", &message);
                    set_failure_time(&mut object);
                }
                Issuance::Pend => {
                    if ready.is_some() {
                        return;
                    }
                    set_condition(
                        &mut object,
                        "Ready",
                        "False",
                        "Pending",
                        "Waiting on certificate issuance from the issuer",
                    );
                }
            }
        }
    }
    let mut store = state.store.lock();
    // Write only if nobody changed or deleted it meanwhile (the API server's optimistic
    // concurrency on resourceVersion).
    if store
        .objects
        .get(key)
        .map(|o| &o["metadata"]["resourceVersion"])
        != Some(&object["metadata"]["resourceVersion"])
    {
        return;
    }
    commit(state, &mut store, &key.0, &key.1, "MODIFIED", Some(object));
}

/// The CA issuer: signs the CSR's URI SAN for `spec.duration`; answers the chain, PEM.
async fn sign(state: &State, object: &Value) -> Result<String, String> {
    let pem = BASE64
        .decode(object["spec"]["request"].as_str().unwrap_or_default())
        .map_err(|e| format!("Failed to decode CSR in spec.request: {e}"))?;
    let csr = CertificateSigningRequestDer::from_pem_slice(&pem)
        .map_err(|e| format!("Failed to decode CSR in spec.request: {e}"))?;
    let (_, parsed) = X509CertificationRequest::from_der(csr.as_ref())
        .map_err(|e| format!("Failed to decode CSR in spec.request: {e}"))?;
    let uris: Vec<String> = parsed
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(
                san.general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "expected exactly one URI SAN in the CSR, found {}",
            uris.len()
        ));
    };
    let identity = uri.parse().map_err(|e| format!("URI SAN {uri}: {e}"))?;
    let ttl = parse_go_duration(object["spec"]["duration"].as_str().unwrap_or("2160h"))
        .ok_or_else(|| "spec.duration is not a duration".to_owned())?;
    let key_type = if parsed
        .certification_request_info
        .subject_pki
        .algorithm
        .algorithm
        == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    {
        KeyType::Rsa2048
    } else {
        KeyType::default()
    };
    let chain = state
        .ca
        .sign(&SignRequest {
            identity,
            csr_der: csr.as_ref().to_vec(),
            ttl,
            key_type,
        })
        .await
        .map_err(|e| format!("Failed to sign certificate: {e}"))?;
    let leaf = pem_of(&chain.leaf);
    Ok(format!("{leaf}{}", state.intermediate_pem))
}

/// PEM with LF line endings, as Go's `encoding/pem` writes it.
fn pem_of(der: &CertificateDer<'_>) -> String {
    let block = ::pem::Pem::new("CERTIFICATE", der.to_vec());
    ::pem::encode_config(
        &block,
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// Go's `time.ParseDuration`, for the units cert-manager users write (h, m, s).
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    number.is_empty().then_some(Duration::from_secs(total))
}

/// A TLS root and the API server's serving certificate for 127.0.0.1 and localhost.
fn serving_tls() -> Result<(String, Arc<rustls::ServerConfig>), Error> {
    crate::pki::serving_tls(
        "fake API server",
        "sds-agent cert-manager test",
        "fake kube-apiserver TLS root",
        &["localhost", "kubernetes.default.svc"],
    )
}

/// The CA issuer's PKI: a root (status.ca) and an intermediate that signs.
fn issuer_ca() -> Result<(EmbeddedCa, String, String), Error> {
    let root_key = KeyPair::generate().map_err(Error::Ca)?;
    let root = ca_params("fake cert-manager CA issuer root", None);
    let root_cert = root.self_signed(&root_key).map_err(Error::Ca)?;
    let root_issuer = Issuer::new(root, root_key);
    let int_key = KeyPair::generate().map_err(Error::Ca)?;
    let int = ca_params(
        "fake cert-manager CA issuer",
        Some(BasicConstraints::Constrained(0)),
    );
    let int_cert = int.signed_by(&int_key, &root_issuer).map_err(Error::Ca)?;
    let chain = format!("{}{}", int_cert.pem(), root_cert.pem());
    let ca = EmbeddedCa::from_pem(chain.as_bytes(), &int_key.serialize_pem()).map_err(|e| {
        Error::Api {
            call: "loading the fake cert-manager issuer".into(),
            detail: e.to_string(),
        }
    })?;
    Ok((ca, root_cert.pem(), int_cert.pem()))
}

fn ca_params(common_name: &str, constraint: Option<BasicConstraints>) -> CertificateParams {
    crate::pki::ca_params("sds-agent cert-manager test", common_name, constraint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_does_for_whole_units() {
        assert_eq!(
            parse_go_duration("86400s"),
            Some(Duration::from_secs(86400))
        );
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(
            parse_go_duration("2160h0m0s"),
            Some(Duration::from_secs(2160 * 3600))
        );
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("1d"), None);
    }

    #[test]
    fn generated_names_use_the_api_servers_alphabet() {
        let a = random_suffix(1);
        let b = random_suffix(2);
        assert_eq!(a.len(), 5);
        assert!(a.bytes().all(|c| NAME_ALPHABET.contains(&c)), "{a}");
        assert_ne!(a, b);
    }
}
