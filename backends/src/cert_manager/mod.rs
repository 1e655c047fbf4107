//! cert-manager: the CSR goes to the Kubernetes API as a `cert-manager.io/v1`
//! `CertificateRequest`, and whichever issuer it names (CA, Vault, Venafi, ACM PCA, step,
//! an external issuer) signs it once an approver has approved it.
//!
//! One signature is one request object:
//! 1. **Create** it in the configured namespace (in node mode: the namespace of the pod, the
//!    `ns/<namespace>` of its SPIFFE ID) with a generated name, the PEM CSR (one URI
//!    SAN, nothing else), the issuer reference, `duration` = the TTL asked for, `isCA: false`
//!    and the usages of a workload certificate (digital signature, key encipherment, server
//!    auth, client auth). It is labelled `app.kubernetes.io/managed-by: sds-agent` and with a
//!    hash of the SPIFFE ID (and the pod's UID when known), annotated with the SPIFFE ID
//!    itself, and owned by the pod when the pod's name and UID are known, so the garbage
//!    collector removes what a dead pod left.
//! 2. **Watch** it (a watch on its name, not a poll) until cert-manager decides, within an
//!    overall time limit. `Approved` then `Ready=True` gives `status.certificate` (and
//!    `status.ca`, the trust bundle); `Denied`, `InvalidRequest` and `Ready=False` with reason
//!    `Failed` end the attempt with cert-manager's message. A request nobody approves is
//!    waited for until the time limit. A watch that breaks or ends is resumed from the last
//!    resourceVersion seen (after a fresh `get` when the server says it is too old).
//! 3. **Delete** it once read, whatever the outcome, or with `keep_requests` keep the last
//!    one and delete the one kept before. A delete that fails is retried at the next
//!    signature. At the first signature of each identity, requests of this identity left by
//!    a crashed run are found by label in its namespace and deleted (this needs `list`;
//!    without it, they are left to the garbage collector, with a warning).
//!
//! Every call names the namespace it is about, and so does every error and log line: in node
//! mode one agent works in the namespace of each pod it serves.
//!
//! Errors: API server unreachable, 429, 5xx, a broken watch and the request vanishing are
//! retryable; 401/403 (with the RBAC rule that is missing), 404 (cert-manager's CRDs not
//! installed, or no such namespace), an admission webhook's refusal and cert-manager's own
//! verdicts are not. kube's built-in retry of 429/503 is turned off: the secret manager owns
//! retries and backoff, and sees every failure.

mod resource;
pub mod settings;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use resource::{
    CertificateRequest, CertificateRequestSpec, CertificateRequestStatus, Condition, GROUP,
    IssuerRef, KIND, PLURAL, VERSION,
};

use crate::chain::{LearnedRoots, split_roots};
use crate::pem::decode_certificates;
use crate::{
    CaError, CertificateAuthority, IssuedChain, SignRequest, SpiffeId, TrustBundle, error_chain,
};

/// Longest wait for cert-manager's verdict, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The issuer group of cert-manager's own issuers.
pub const DEFAULT_ISSUER_GROUP: &str = "cert-manager.io";
/// Label every request carries.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "sds-agent";
/// Label with a hash of the SPIFFE ID (a label value cannot hold the ID itself).
pub const IDENTITY_LABEL: &str = "sds-agent.io/identity";
/// Label with the UID of the pod the agent serves, when known.
pub const POD_UID_LABEL: &str = "sds-agent.io/pod-uid";
/// Annotation with the SPIFFE ID, for people.
pub const SPIFFE_ID_ANNOTATION: &str = "sds-agent.io/spiffe-id";
/// The key usages of a workload certificate, in cert-manager's spelling.
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];
/// Longest time one API call (not a watch) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to open a connection to the API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before a broken watch is resumed; doubled up to `RESUME_MAX`.
const RESUME_FIRST: Duration = Duration::from_millis(100);
const RESUME_MAX: Duration = Duration::from_secs(2);
/// Longest server message quoted in an error.
const MAX_QUOTED: usize = 400;

/// Where the agent's Kubernetes credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The pod's service account: `KUBERNETES_SERVICE_HOST`/`_PORT` and the token and CA
    /// mounted at `/var/run/secrets/kubernetes.io/serviceaccount`, the token re-read as
    /// kubelet rotates it.
    InCluster,
    /// A kubeconfig file, its current context.
    Kubeconfig(PathBuf),
}

/// The pod whose workload the agent serves, for the ownerReference and the pod label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// `metadata.name` of the pod.
    pub name: String,
    /// `metadata.uid` of the pod.
    pub uid: String,
}

/// How to reach the Kubernetes API and which issuer to ask.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// Where the credentials come from.
    pub credentials: Credentials,
    /// Namespace the requests are created in; not used with `per_pod_namespace`.
    pub namespace: String,
    /// Node mode: each identity's requests go in the namespace its SPIFFE ID names
    /// (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`), the pod's.
    pub per_pod_namespace: bool,
    /// The issuer that signs.
    pub issuer: IssuerRef,
    /// Longest wait for cert-manager's verdict on one request, creation included.
    pub timeout: Duration,
    /// Keep the last request (delete only the one kept before it).
    pub keep_requests: bool,
    /// The pod served, if known.
    pub pod: Option<PodRef>,
    /// Roots to trust instead of `status.ca`.
    pub trust_bundle: Option<TrustBundle>,
}

impl CertManagerConfig {
    /// Defaults for this namespace and issuer: in-cluster credentials, 60 s, requests
    /// deleted, no pod, roots from `status.ca`.
    pub fn new(namespace: impl Into<String>, issuer: IssuerRef) -> Self {
        Self {
            credentials: Credentials::InCluster,
            namespace: namespace.into(),
            per_pod_namespace: false,
            issuer,
            timeout: DEFAULT_TIMEOUT,
            keep_requests: false,
            pod: None,
            trust_bundle: None,
        }
    }

    /// The same defaults for node mode: each identity's requests in its own namespace.
    pub fn per_pod_namespace(issuer: IssuerRef) -> Self {
        Self {
            per_pod_namespace: true,
            ..Self::new(String::new(), issuer)
        }
    }
}

/// The cert-manager backend.
pub struct CertManagerCa {
    config: CertManagerConfig,
    /// The kubeconfig, parsed at construction so a bad file stops the agent at start-up.
    kubeconfig: Option<Kubeconfig>,
    client: tokio::sync::OnceCell<kube::Client>,
    /// The roots of the last `status.ca` seen.
    roots: LearnedRoots,
    /// Requests to delete at the next chance: ones whose delete failed, and the kept one.
    to_delete: Mutex<Vec<RequestRef>>,
    /// The request kept with `keep_requests`, per identity.
    kept: Mutex<HashMap<String, RequestRef>>,
    /// Identities whose leftovers from an earlier run have been looked for.
    swept: Mutex<HashSet<String>>,
}

/// One namespace's CertificateRequests: the API bound to it, and its name for messages.
struct Requests {
    api: Api<CertificateRequest>,
    namespace: String,
}

/// A request by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestRef {
    namespace: String,
    name: String,
}

/// Which API call failed: names the RBAC verb in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Create,
    Get,
    Watch,
    List,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Get => "get",
            Verb::Watch => "watch",
            Verb::List => "list",
            Verb::Delete => "delete",
        }
    }
}

/// What a request's status says.
enum Verdict {
    /// Nothing decided yet; the text says what is awaited.
    Waiting(String),
    /// Issued.
    Issued(IssuedChain),
}

impl CertManagerCa {
    /// A client for `config`. Reads and parses the kubeconfig (or checks that this is a
    /// pod) now; connects to nothing until the first signature.
    pub fn new(config: CertManagerConfig) -> Result<Self, CaError> {
        if config.issuer.name.is_empty() {
            return Err(CaError::Misconfigured(
                "the issuer name is empty: give --cert-manager-issuer-name".into(),
            ));
        }
        if config.namespace.is_empty() && !config.per_pod_namespace {
            return Err(CaError::Misconfigured(
                "the namespace for CertificateRequests is empty".into(),
            ));
        }
        if config.timeout < Duration::from_secs(1) {
            return Err(CaError::Misconfigured(
                "the cert-manager timeout must be at least 1s".into(),
            ));
        }
        let kubeconfig = match &config.credentials {
            Credentials::Kubeconfig(path) => Some(Kubeconfig::read_from(path).map_err(|e| {
                CaError::Misconfigured(format!(
                    "--kubeconfig {}: {}",
                    path.display(),
                    error_chain(&e)
                ))
            })?),
            Credentials::InCluster => {
                kube::Config::incluster().map_err(|e| {
                    CaError::Misconfigured(format!(
                        "no in-cluster Kubernetes credentials ({}): run in a pod with a \
                         service-account token mounted, or give --kubeconfig",
                        error_chain(&e)
                    ))
                })?;
                None
            }
        };
        Ok(Self {
            config,
            kubeconfig,
            client: tokio::sync::OnceCell::new(),
            roots: LearnedRoots::default(),
            to_delete: Mutex::new(Vec::new()),
            kept: Mutex::new(HashMap::new()),
            swept: Mutex::new(HashSet::new()),
        })
    }

    /// The namespace `identity`'s requests go in: the configured one, or in node mode the
    /// one its SPIFFE ID names. An ID without a namespace cannot come from node mode's
    /// attestation; it is refused, not retried.
    fn namespace_of(&self, identity: &SpiffeId) -> Result<String, CaError> {
        if !self.config.per_pod_namespace {
            return Ok(self.config.namespace.clone());
        }
        let segments: Vec<&str> = identity.path().split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", ns, "sa", _] if settings::is_dns_label(ns) => Ok((*ns).to_owned()),
            ["ns", ns, "sa", _] => Err(CaError::Misconfigured(format!(
                "{identity} names the namespace {ns:?}, which is not a Kubernetes namespace \
                 name: in node mode each pod's CertificateRequest goes in the namespace of its \
                 SPIFFE ID"
            ))),
            _ => Err(CaError::Misconfigured(format!(
                "{identity} names no namespace: in node mode each pod's CertificateRequest \
                 goes in the namespace of its SPIFFE ID, which must be \
                 spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
            ))),
        }
    }

    /// The requests of namespace `ns`; the client is built at first use.
    async fn requests(&self, ns: &str) -> Result<Requests, CaError> {
        Ok(Requests {
            api: Api::namespaced(self.client().await?, ns),
            namespace: ns.to_owned(),
        })
    }

    /// The client, built at first use.
    async fn client(&self) -> Result<kube::Client, CaError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let mut config = match &self.kubeconfig {
                    Some(kubeconfig) => kube::Config::from_custom_kubeconfig(
                        kubeconfig.clone(),
                        &KubeConfigOptions::default(),
                    )
                    .await
                    .map_err(|e| {
                        CaError::Misconfigured(format!("kubeconfig: {}", error_chain(&e)))
                    })?,
                    None => kube::Config::incluster().map_err(|e| {
                        CaError::Misconfigured(format!(
                            "in-cluster credentials: {}",
                            error_chain(&e)
                        ))
                    })?,
                };
                // The secret manager retries, with backoff and metrics; kube must not retry
                // underneath it (its default retries 429/503 up to 15 times).
                config.default_retry = false;
                config.connect_timeout = Some(CONNECT_TIMEOUT);
                kube::Client::try_from(config).map_err(|e| {
                    CaError::Misconfigured(format!("Kubernetes client: {}", error_chain(&e)))
                })
            })
            .await?;
        Ok(client.clone())
    }

    /// The object to create for `req`, in namespace `ns`.
    fn request_object(&self, req: &SignRequest, ns: &str) -> CertificateRequest {
        let hash = identity_hash(&req.identity);
        let mut labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            (IDENTITY_LABEL.to_owned(), hash),
        ]);
        let mut owner_references = None;
        if let Some(pod) = &self.config.pod {
            labels.insert(POD_UID_LABEL.to_owned(), pod.uid.clone());
            owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                // Not a controller, and no blockOwnerDeletion: that would need update on
                // pods/finalizers under the OwnerReferencesPermissionEnforcement plugin.
                controller: None,
                block_owner_deletion: None,
            }]);
        }
        let csr = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone()));
        CertificateRequest {
            api_version: format!("{}/{}", resource::GROUP, resource::VERSION),
            kind: resource::KIND.into(),
            metadata: ObjectMeta {
                generate_name: Some(generate_name(&req.identity)),
                namespace: Some(ns.to_owned()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    SPIFFE_ID_ANNOTATION.to_owned(),
                    req.identity.to_string(),
                )])),
                owner_references,
                ..ObjectMeta::default()
            },
            spec: CertificateRequestSpec {
                request: ByteString(csr.into_bytes()),
                issuer_ref: self.config.issuer.clone(),
                duration: Some(format!("{}s", req.ttl.as_secs().max(1))),
                is_ca: false,
                usages: USAGES.iter().map(|u| (*u).to_owned()).collect(),
                username: None,
            },
            status: None,
        }
    }

    /// Reads what `cr`'s status says: still waiting (and for what), issued, or failed.
    fn verdict(&self, cr: &CertificateRequest) -> Result<Verdict, CaError> {
        let name = self.describe(cr);
        let Some(status) = &cr.status else {
            return Ok(Verdict::Waiting("no status yet: not approved".into()));
        };
        if let Some(c) = status.true_condition("Denied") {
            return Err(CaError::Denied(format!(
                "{name} was denied{}: an approver (cert-manager's own, or approver-policy's \
                 CertificateRequestPolicies) refused it; allow issuer {} to sign URI SAN \
                 {} for this service account",
                said(c),
                self.issuer_text(),
                annotation(cr, SPIFFE_ID_ANNOTATION).unwrap_or("(unknown)"),
            )));
        }
        if let Some(c) = status.true_condition("InvalidRequest") {
            return Err(CaError::Misconfigured(format!(
                "{name} is invalid for issuer {}{}",
                self.issuer_text(),
                said(c)
            )));
        }
        let approved = status.true_condition("Approved").is_some();
        match status.condition("Ready") {
            Some(c) if c.status == "False" && c.reason.as_deref() == Some("Failed") => {
                Err(CaError::Misconfigured(format!(
                    "issuer {} failed {name}{}",
                    self.issuer_text(),
                    said(c)
                )))
            }
            Some(c) if c.status == "True" => {
                if !approved {
                    return Err(CaError::BadResponse(format!(
                        "{name} is Ready but was never approved: refusing a certificate \
                         issued without approval"
                    )));
                }
                self.issued(cr, status).map(Verdict::Issued)
            }
            Some(c) if approved => Ok(Verdict::Waiting(format!(
                "approved, not issued yet: Ready={}{}",
                c.status,
                said(c)
            ))),
            _ if approved => Ok(Verdict::Waiting("approved, not issued yet".into())),
            _ => Ok(Verdict::Waiting(
                "not approved yet: is an approver running (cert-manager's internal approver \
                 for cert-manager.io issuers, or approver-policy with a \
                 CertificateRequestPolicy that matches)?"
                    .into(),
            )),
        }
    }

    /// The chain of an issued request.
    fn issued(
        &self,
        cr: &CertificateRequest,
        status: &CertificateRequestStatus,
    ) -> Result<IssuedChain, CaError> {
        let name = self.describe(cr);
        let bad = |what: String| CaError::BadResponse(format!("{name}: {what}"));
        let pem = status
            .certificate
            .as_ref()
            .filter(|b| !b.0.is_empty())
            .ok_or_else(|| bad("Ready=True but status.certificate is empty".into()))?;
        let mut certs = decode_certificates(&pem.0)
            .map_err(|e| bad(format!("status.certificate: {e}")))?
            .into_iter();
        let leaf = certs
            .next()
            .ok_or_else(|| bad("status.certificate holds no certificate".into()))?;
        let (intermediates, mut roots_hint) = split_roots(certs);
        if let Some(ca) = status.ca.as_ref().filter(|b| !b.0.is_empty()) {
            let ca_roots =
                decode_certificates(&ca.0).map_err(|e| bad(format!("status.ca: {e}")))?;
            self.remember_roots(&ca_roots);
            for root in ca_roots {
                if !roots_hint.contains(&root) {
                    roots_hint.push(root);
                }
            }
        } else if self.config.trust_bundle.is_none() {
            if roots_hint.is_empty() {
                return Err(bad(format!(
                    "issuer {} fills no status.ca and sent no root with the certificate: pin \
                     the roots with --cert-manager-trust-bundle",
                    self.issuer_text()
                )));
            }
            self.remember_roots(&roots_hint);
        }
        Ok(IssuedChain {
            leaf,
            intermediates,
            roots_hint,
        })
    }

    /// Keeps the roots of an answer, saying so when they change.
    fn remember_roots(&self, roots: &[CertificateDer<'static>]) {
        if self.roots.learn(roots) {
            info!(
                roots = roots.len(),
                issuer = %self.issuer_text(),
                "cert-manager: the issuer's CA changed"
            );
        }
    }

    /// Waits for cert-manager's verdict on `created`, until `deadline`.
    async fn wait(
        &self,
        requests: &Requests,
        created: CertificateRequest,
        deadline: Instant,
    ) -> Result<IssuedChain, CaError> {
        let Requests { api, namespace: ns } = requests;
        let name = created.metadata.name.clone().unwrap_or_default();
        let mut waiting = match self.verdict(&created)? {
            Verdict::Issued(chain) => return Ok(chain),
            Verdict::Waiting(what) => what,
        };
        let mut version = created
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let mut pause = RESUME_FIRST;
        let mut last_break: Option<CaError> = None;
        let mut ended_early = false;
        loop {
            // Watch from `version`: events after the object as last seen.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let params = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                // A server-side limit just past ours, so the server does not end the watch
                // early; ours ends it (290 s is below kube's client read timeout).
                .timeout(u32::try_from((remaining.as_secs() + 1).min(290)).unwrap_or(290));
            match tokio::time::timeout_at(deadline, api.watch(&params, &version)).await {
                Err(_) => return Err(self.timed_out(ns, &name, &waiting)),
                Ok(Err(e)) => {
                    let error = self.classify(ns, &e, Verb::Watch);
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    debug!(%name, error = %error, "cert-manager: watch could not start");
                    last_break = Some(error);
                }
                Ok(Ok(stream)) => {
                    let started = Instant::now();
                    let mut stream = stream.boxed();
                    loop {
                        let event = match tokio::time::timeout_at(deadline, stream.try_next()).await
                        {
                            Err(_) => return Err(self.timed_out(ns, &name, &waiting)),
                            Ok(event) => event,
                        };
                        match event {
                            Ok(Some(WatchEvent::Added(cr) | WatchEvent::Modified(cr))) => {
                                version = cr.metadata.resource_version.clone().unwrap_or_default();
                                pause = RESUME_FIRST;
                                match self.verdict(&cr)? {
                                    Verdict::Issued(chain) => return Ok(chain),
                                    Verdict::Waiting(what) => waiting = what,
                                }
                            }
                            Ok(Some(WatchEvent::Deleted(_))) => {
                                return Err(self.vanished(ns, &name));
                            }
                            Ok(Some(WatchEvent::Bookmark(b))) => {
                                version = b.metadata.resource_version;
                            }
                            Ok(Some(WatchEvent::Error(status))) => {
                                if status.code == 410 {
                                    // Too old: read the object anew below and watch from it.
                                    version.clear();
                                } else {
                                    let error =
                                        self.classify(ns, &kube::Error::Api(status), Verb::Watch);
                                    if !error.is_retryable() {
                                        return Err(error);
                                    }
                                    last_break = Some(error);
                                }
                                break;
                            }
                            // The server ended the watch (its timeout): resume it. One
                            // that ends soon and empty is paced like a failure, so a proxy
                            // that closes every watch at once is not hammered.
                            Ok(None) => {
                                if started.elapsed() < RESUME_MAX {
                                    ended_early = true;
                                }
                                break;
                            }
                            Err(e) => {
                                let error = self.classify(ns, &e, Verb::Watch);
                                debug!(%name, error = %error, "cert-manager: watch broke");
                                last_break = Some(error);
                                break;
                            }
                        }
                    }
                }
            }
            if let Some(error) = &last_break {
                // Something broke: pause a little, then catch up with a get.
                if Instant::now() + pause >= deadline {
                    return Err(error.clone());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RESUME_MAX);
            } else if std::mem::take(&mut ended_early) {
                if Instant::now() + pause >= deadline {
                    return Err(self.timed_out(ns, &name, &waiting));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RESUME_MAX);
            }
            if last_break.take().is_some() || version.is_empty() {
                let got = match self.call_raw(deadline, api.get(&name)).await {
                    Ok(Ok(cr)) => Ok(cr),
                    Ok(Err(e)) if is_not_found(&e) => return Err(self.vanished(ns, &name)),
                    Ok(Err(e)) => Err(self.classify(ns, &e, Verb::Get)),
                    Err(timeout) => Err(timeout),
                };
                match got {
                    Ok(cr) => {
                        version = cr.metadata.resource_version.clone().unwrap_or_default();
                        match self.verdict(&cr)? {
                            Verdict::Issued(chain) => return Ok(chain),
                            Verdict::Waiting(what) => waiting = what,
                        }
                    }
                    Err(error) if error.is_retryable() => last_break = Some(error),
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// One API call in namespace `ns`, within `CALL_TIMEOUT` and `deadline`, its error
    /// sorted.
    async fn call<T>(
        &self,
        ns: &str,
        deadline: Instant,
        verb: Verb,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CaError> {
        self.call_raw(deadline, call)
            .await?
            .map_err(|e| self.classify(ns, &e, verb))
    }

    /// One API call, within `CALL_TIMEOUT` and `deadline`; the outer error is the time
    /// limit, the inner kube's, for callers that look at it.
    async fn call_raw<T>(
        &self,
        deadline: Instant,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, CaError> {
        let now = Instant::now();
        let limit = deadline.saturating_duration_since(now).min(CALL_TIMEOUT);
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| CaError::Timeout(limit))
    }

    /// Someone deleted the request while the agent waited on it: retryable, with a new one.
    fn vanished(&self, ns: &str, name: &str) -> CaError {
        CaError::Unavailable(format!(
            "CertificateRequest {ns}/{name} was deleted before it was issued"
        ))
    }

    fn timed_out(&self, ns: &str, name: &str, waiting: &str) -> CaError {
        warn!(
            request = %format!("{ns}/{name}"),
            issuer = %self.issuer_text(),
            timeout = ?self.config.timeout,
            "cert-manager: no verdict in time: {waiting}"
        );
        CaError::Timeout(self.config.timeout)
    }

    /// Sorts a failed API call in namespace `ns` into the trait's error kinds, with what to
    /// do about it.
    fn classify(&self, ns: &str, error: &kube::Error, verb: Verb) -> CaError {
        let kube::Error::Api(status) = error else {
            let detail = error_chain(error);
            return match error {
                kube::Error::SerdeError(_) => CaError::BadResponse(format!(
                    "the API server's answer to {} certificaterequests did not parse: {detail}",
                    verb.as_str()
                )),
                kube::Error::Auth(_) | kube::Error::InferConfig(_) => {
                    CaError::Misconfigured(format!("Kubernetes credentials: {detail}"))
                }
                _ => CaError::Unavailable(format!(
                    "Kubernetes API server ({} certificaterequests): {detail}",
                    verb.as_str()
                )),
            };
        };
        let said = quote(&status.message);
        let detail = format!(
            "{} {} from the API server on {} certificaterequests in {ns}: {said}",
            status.code,
            if status.reason.is_empty() {
                "(no reason)"
            } else {
                &status.reason
            },
            verb.as_str(),
        );
        if status.message.contains("admission webhook") {
            return CaError::Denied(format!(
                "{detail}; an admission webhook refused the request"
            ));
        }
        match status.code {
            401 => CaError::Denied(format!(
                "{detail}; the API server did not accept the agent's credentials (an expired \
                 or revoked service-account token?)"
            )),
            403 if self.config.per_pod_namespace => CaError::Denied(format!(
                "{detail}; RBAC is missing: in node mode each pod's CertificateRequest goes in \
                 the pod's namespace (here {ns}), so the agent's service account needs a \
                 ClusterRole, bound by a ClusterRoleBinding, with apiGroups \
                 [\"cert-manager.io\"], resources [\"certificaterequests\"], verbs [\"{}\"] \
                 (deploy/cert-manager/rbac.yaml has the full rules; the Helm chart's node mode \
                 grants them)",
                verb.as_str()
            )),
            403 => CaError::Denied(format!(
                "{detail}; RBAC is missing: the agent's service account needs a Role in \
                 namespace {ns} with apiGroups [\"cert-manager.io\"], resources \
                 [\"certificaterequests\"], verbs [\"{}\"] (deploy/cert-manager/rbac.yaml has \
                 the full Role)",
                verb.as_str()
            )),
            404 if status
                .details
                .as_ref()
                .is_some_and(|d| d.kind == "namespaces") =>
            {
                CaError::Misconfigured(if self.config.per_pod_namespace {
                    format!(
                        "{detail}; namespace {ns}, the pod's (from its SPIFFE ID), does not exist"
                    )
                } else {
                    format!(
                        "{detail}; namespace {ns} does not exist: check --cert-manager-namespace"
                    )
                })
            }
            404 if matches!(verb, Verb::Get | Verb::Delete) => {
                CaError::Unavailable(format!("{detail}; the CertificateRequest is gone"))
            }
            404 => CaError::Misconfigured(format!(
                "{detail}; the API server does not serve certificaterequests.cert-manager.io/v1: \
                 is cert-manager installed (its CRDs) in this cluster?"
            )),
            409 => CaError::Unavailable(detail),
            429 => CaError::Throttled(detail),
            500..=599 => CaError::Unavailable(detail),
            400 | 422 => CaError::Misconfigured(format!(
                "{detail}; the API server refused the CertificateRequest as invalid (check the \
                 issuer settings)"
            )),
            _ => CaError::Other {
                error: std::sync::Arc::new(std::io::Error::other(detail)),
                retryable: true,
            },
        }
    }

    /// Deletes what should go: earlier failures to delete and the request kept before,
    /// whatever their namespace, and at the first signature of `identity`, what a crashed
    /// run left in its namespace (`requests`). So each namespace is swept when it is first
    /// used, for each identity that uses it.
    async fn clean_up(&self, requests: &Requests, identity: &SpiffeId) {
        if self.swept.lock().insert(identity.to_string()) {
            self.sweep(requests, identity).await;
        }
        let pending: Vec<RequestRef> = std::mem::take(&mut *self.to_delete.lock());
        for request in pending {
            self.delete_anywhere(requests, request).await;
        }
    }

    /// Deletes `request`, through `near` when it is in that namespace.
    async fn delete_anywhere(&self, near: &Requests, request: RequestRef) {
        if request.namespace == near.namespace {
            return self.delete(near, &request.name).await;
        }
        match self.requests(&request.namespace).await {
            Ok(elsewhere) => self.delete(&elsewhere, &request.name).await,
            // Only building the client can fail, and it was built for `near`; keep it anyway.
            Err(_) => self.to_delete.lock().push(request),
        }
    }

    /// Deletes one request; on failure, remembers it for next time.
    async fn delete(&self, requests: &Requests, name: &str) {
        let Requests { api, namespace: ns } = requests;
        let deadline = Instant::now() + CALL_TIMEOUT;
        let outcome = match self
            .call_raw(deadline, api.delete(name, &DeleteParams::default()))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(self.classify(ns, &e, Verb::Delete)),
            Err(timeout) => Err(timeout),
        };
        match outcome {
            Ok(()) => {
                debug!(request = %format!("{ns}/{name}"), "cert-manager: CertificateRequest deleted")
            }
            Err(error) => {
                warn!(
                    request = %format!("{ns}/{name}"),
                    %error,
                    "cert-manager: could not delete the CertificateRequest; will try again at the next renewal"
                );
                let request = RequestRef {
                    namespace: ns.clone(),
                    name: name.to_owned(),
                };
                let mut pending = self.to_delete.lock();
                if !pending.contains(&request) {
                    pending.push(request);
                }
            }
        }
    }

    /// Finds this identity's requests left by an earlier run of this agent (same pod, when
    /// the pod is known) in its namespace, and deletes the ones no one can be waiting for.
    async fn sweep(&self, requests: &Requests, identity: &SpiffeId) {
        let Requests { api, namespace: ns } = requests;
        let mut selector = format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{IDENTITY_LABEL}={}",
            identity_hash(identity)
        );
        if let Some(pod) = &self.config.pod {
            selector.push_str(&format!(",{POD_UID_LABEL}={}", pod.uid));
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        let list = match self
            .call(
                ns,
                deadline,
                Verb::List,
                api.list(&ListParams::default().labels(&selector)),
            )
            .await
        {
            Ok(list) => list,
            Err(error) => {
                warn!(
                    namespace = %ns,
                    %error,
                    "cert-manager: cannot look for CertificateRequests left by an earlier run; \
                     they are left to the garbage collector (ownerReference to the pod)"
                );
                // Look again at the next signature.
                self.swept.lock().remove(&identity.to_string());
                return;
            }
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let in_flight = k8s_openapi::jiff::SignedDuration::try_from(self.config.timeout * 2)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        for cr in list.items {
            let Some(name) = cr.metadata.name.clone() else {
                continue;
            };
            // Another agent of the same identity may be waiting on a young, undecided one
            // (only possible when the pod is not known, so the selector is wider).
            let young = cr
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| now.duration_since(t.0) < in_flight);
            let undecided = matches!(self.verdict(&cr), Ok(Verdict::Waiting(_)));
            if self.config.pod.is_none() && young && undecided {
                continue;
            }
            info!(request = %format!("{ns}/{name}"), "cert-manager: deleting a CertificateRequest left by an earlier run");
            self.delete(requests, &name).await;
        }
    }

    /// `CertificateRequest <namespace>/<name>`, the namespace the object's own (the API
    /// server sets it), else the configured one.
    fn describe(&self, cr: &CertificateRequest) -> String {
        let ns = match cr.metadata.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ if !self.config.namespace.is_empty() => &self.config.namespace,
            _ => "?",
        };
        format!(
            "CertificateRequest {ns}/{}",
            cr.metadata.name.as_deref().unwrap_or("?")
        )
    }

    fn issuer_text(&self) -> String {
        let i = &self.config.issuer;
        format!("{}/{} ({})", i.kind, i.name, i.group)
    }
}

/// `generateName` for `identity`: `sds-agent-<service account>-`, cut to leave room for the
/// five random characters the API server adds.
fn generate_name(identity: &SpiffeId) -> String {
    let sa = identity
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    let sa = sa.trim_matches(|c| c == '-' || c == '.');
    if sa.is_empty() {
        "sds-agent-".into()
    } else {
        format!("sds-agent-{sa}-")
    }
}

/// 32 hex digits of SHA-256 of the SPIFFE ID: fits a label value, never collides in practice.
pub fn identity_hash(identity: &SpiffeId) -> String {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, identity.to_string().as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

fn annotation<'a>(cr: &'a CertificateRequest, key: &str) -> Option<&'a str> {
    cr.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// `: <reason>: <message>` of a condition, quoted.
fn said(c: &Condition) -> String {
    let mut out = String::new();
    if let Some(reason) = c.reason.as_deref().filter(|r| !r.is_empty()) {
        out.push_str(&format!(" ({reason})"));
    }
    if let Some(message) = c.message.as_deref().filter(|m| !m.is_empty()) {
        out.push_str(&format!(": {}", quote(message)));
    }
    out
}

fn quote(message: &str) -> String {
    crate::quote(message, MAX_QUOTED)
}

#[async_trait::async_trait]
impl CertificateAuthority for CertManagerCa {
    fn name(&self) -> &'static str {
        "cert-manager"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let deadline = Instant::now() + self.config.timeout;
        let ns = self.namespace_of(&req.identity)?;
        let requests = self.requests(&ns).await?;
        self.clean_up(&requests, &req.identity).await;
        let created = self
            .call(
                &ns,
                deadline,
                Verb::Create,
                requests
                    .api
                    .create(&PostParams::default(), &self.request_object(req, &ns)),
            )
            .await?;
        let name = created.metadata.name.clone().unwrap_or_default();
        debug!(request = %format!("{ns}/{name}"), "cert-manager: CertificateRequest created");
        let result = self.wait(&requests, created, deadline).await;
        if self.config.keep_requests {
            let kept = RequestRef {
                namespace: ns,
                name,
            };
            let previous = self.kept.lock().insert(req.identity.to_string(), kept);
            if let Some(previous) = previous {
                self.delete_anywhere(&requests, previous).await;
            }
        } else {
            self.delete(&requests, &name).await;
        }
        result
    }

    fn roots_come_with_certificates(&self) -> bool {
        self.config.trust_bundle.is_none()
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        if let Some(pinned) = &self.config.trust_bundle {
            return Ok(pinned.clone());
        }
        self.roots.get(
            "the issuer's CA is not known yet: it comes in status.ca with the first certificate",
        )
    }
}

impl fmt::Debug for CertManagerCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManagerCa")
            .field("namespace", &self.config.namespace)
            .field("per_pod_namespace", &self.config.per_pod_namespace)
            .field("issuer", &self.config.issuer)
            .field("credentials", &self.config.credentials)
            .field("timeout", &self.config.timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
