//! The Vault backend: the PKI secrets engine of HashiCorp Vault or OpenBao signs the agent's
//! CSR.
//!
//! A sign is `POST /v1/<mount>/sign/<role>` (or `sign-verbatim/<role>`, or
//! `issuer/<ref>/sign/<role>`) with the PEM CSR. The SPIFFE ID travels as the CSR's only URI
//! SAN, and is also sent as `uri_sans` so that roles with `use_csr_sans=false` see it; the
//! role's `allowed_uri_sans` decides. No common name is sent or needed (`require_cn=false`).
//! The chain is the leaf plus `ca_chain`. The trust bundle is every root of the mount's
//! issuers (`LIST <mount>/issuers`, both unauthenticated in Vault), so that during a root
//! rotation the old and the new root are both trusted; it falls back to `<mount>/ca_chain`,
//! or is pinned with a PEM file.
//!
//! Auth (token, Kubernetes, AppRole) and the token's lifecycle live in [`auth`]. Login,
//! renewal and lookup go through `vaultrs`; sign and the CA reads go through the same HTTP
//! client by hand, because `vaultrs`' sign requires a common name, has no issuer path, and
//! drops Vault's `warnings`, which we must log (a TTL capped at the role's `max_ttl` is only
//! reported there).
//!
//! Errors are sorted for the secret manager: 429 is throttling, 5xx (sealed, standby) and
//! transport failures are unavailability, timeouts are timeouts; 400, 403 (after one fresh
//! login) and 404 are not retryable and say which role, mount or policy to fix.

mod auth;
pub mod settings;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use url::Url;
use zeroize::Zeroizing;

use crate::chain::{roots_of, split_roots};
use crate::pem::decode_certificates;
use crate::{CaError, CertificateAuthority, IssuedChain, SignRequest, TrustBundle};

pub use auth::{TokenSource, VaultAuth};

/// Where and how to reach Vault's PKI secrets engine.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Vault's address, `https://vault.example:8200`.
    pub addr: Url,
    /// Enterprise namespace, sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// PEM file of the CA(s) that signed Vault's TLS certificate.
    pub ca_cert: Option<PathBuf>,
    /// Mount path of the PKI secrets engine, `pki`.
    pub pki_mount: String,
    /// The PKI role that signs.
    pub role: String,
    /// Sign with this issuer (`issuer/<ref>/sign/<role>`) rather than the mount's default.
    pub issuer: Option<String>,
    /// Use `sign-verbatim/<role>`.
    pub sign_verbatim: bool,
    /// Pinned roots; when absent the bundle is read from the mount.
    pub trust_bundle: Option<TrustBundle>,
    /// How the agent logs in.
    pub auth: VaultAuth,
    /// Time limit of one HTTP request to Vault.
    pub request_timeout: Duration,
}

/// Why a [`VaultConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VaultConfigError(String);

/// The Vault backend. Cheap to share; a background task renews the token and ends when the
/// backend is dropped.
pub struct VaultCa {
    inner: Arc<Inner>,
    renewer: tokio::task::JoinHandle<()>,
}

struct Inner {
    http: reqwest::Client,
    addr: Url,
    namespace: Option<String>,
    mount: String,
    role: String,
    issuer: Option<String>,
    sign_verbatim: bool,
    pinned: Option<TrustBundle>,
    /// The client's per-request time limit (set on it by vaultrs), for timeout errors.
    timeout: Duration,
    tokens: auth::Tokens,
}

/// A failed HTTP exchange with Vault, before it is sorted into a [`CaError`].
#[derive(Debug)]
enum CallError {
    /// No answer: connection refused, reset, TLS failure, or timeout.
    Transport(reqwest::Error),
    /// Vault answered with a status other than 2xx; `errors` is its `errors` list, or the
    /// start of the body when that is not Vault's JSON.
    Status { status: StatusCode, errors: String },
}

impl VaultConfig {
    /// Checks what can be checked without Vault: the URL scheme, names that go into URL paths
    /// and headers, and the TLS CA file.
    pub fn check(&self) -> Result<(), VaultConfigError> {
        if !matches!(self.addr.scheme(), "http" | "https") {
            return Err(VaultConfigError(format!(
                "vault address {} must be http:// or https://",
                self.addr
            )));
        }
        for (what, value) in [("pki mount", &self.pki_mount), ("role", &self.role)] {
            check_path(what, value)?;
        }
        if let Some(issuer) = &self.issuer {
            check_path("issuer", issuer)?;
        }
        if let Some(ns) = self.namespace.as_ref().filter(|ns| !is_header_safe(ns)) {
            return Err(VaultConfigError(format!(
                "vault namespace {ns:?} holds characters an HTTP header cannot carry"
            )));
        }
        self.auth.check()?;
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                VaultConfigError(format!(
                    "reading the vault TLS CA file {}: {e}",
                    path.display()
                ))
            })?;
            decode_certificates(&pem).map_err(|e| {
                VaultConfigError(format!("vault TLS CA file {}: {e}", path.display()))
            })?;
        }
        if self.request_timeout.is_zero() {
            return Err(VaultConfigError(
                "vault request timeout must be above 0".into(),
            ));
        }
        Ok(())
    }
}

impl VaultCa {
    /// A backend for `config`. Does not contact Vault (a Vault that is down at start-up is
    /// retried like any outage), but checks the configuration. Must be called within a tokio
    /// runtime: it starts the token renewer.
    pub fn new(config: VaultConfig) -> Result<Self, VaultConfigError> {
        config.check()?;
        let mut settings = vaultrs::client::VaultClientSettingsBuilder::default();
        settings
            .address(config.addr.as_str())
            .token(String::new())
            .timeout(Some(config.request_timeout))
            .verify(true)
            .identity(None)
            .ca_certs(
                config
                    .ca_cert
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect(),
            );
        if let Some(ns) = &config.namespace {
            settings.set_namespace(ns.clone());
        }
        let settings = settings
            .build()
            .map_err(|e| VaultConfigError(format!("vault client settings: {e}")))?;
        let client = vaultrs::client::VaultClient::new(settings)
            .map_err(|e| VaultConfigError(format!("building the vault client: {e}")))?;
        let http = client.http.http.clone();
        let tokens = auth::Tokens::new(client, config.auth);
        let inner = Arc::new(Inner {
            http,
            addr: config.addr,
            namespace: config.namespace,
            mount: config.pki_mount,
            role: config.role,
            issuer: config.issuer,
            sign_verbatim: config.sign_verbatim,
            pinned: config.trust_bundle,
            timeout: config.request_timeout,
            tokens,
        });
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            VaultConfigError("the vault backend must be created within a tokio runtime".into())
        })?;
        let renewer = handle.spawn(auth::renew_in_background(Arc::clone(&inner)));
        Ok(Self { inner, renewer })
    }
}

impl Drop for VaultCa {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl fmt::Debug for VaultCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultCa")
            .field("addr", &self.inner.addr.as_str())
            .field("mount", &self.inner.mount)
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl CertificateAuthority for VaultCa {
    fn name(&self) -> &'static str {
        "vault"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.inner.sign(req).await
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        if let Some(pinned) = &self.inner.pinned {
            return Ok(pinned.clone());
        }
        self.inner.read_bundle().await
    }
}

impl Inner {
    fn sign_path(&self) -> String {
        let verb = if self.sign_verbatim {
            "sign-verbatim"
        } else {
            "sign"
        };
        match &self.issuer {
            Some(issuer) => format!("{}/issuer/{issuer}/{verb}/{}", self.mount, self.role),
            None => format!("{}/{verb}/{}", self.mount, self.role),
        }
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let path = self.sign_path();
        let csr = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone()));
        let mut body = json!({
            "csr": csr,
            "ttl": format!("{}s", req.ttl.as_secs().max(1)),
            "format": "pem",
        });
        if !self.sign_verbatim {
            body["uri_sans"] = json!(req.identity.to_string());
            body["exclude_cn_from_sans"] = json!(true);
        }
        let token = self.tokens.token().await?;
        let answer = match self
            .call(Method::POST, &path, Some(token.as_str()), Some(&body))
            .await
        {
            answer_403 @ Err(CallError::Status {
                status: StatusCode::FORBIDDEN,
                ..
            }) => {
                // The token may have been revoked or expired early: log in once more, then
                // give up with what Vault says.
                tracing::info!(
                    backend = "vault",
                    path = %path,
                    "vault refused the token (403); trying a fresh one"
                );
                match self.tokens.relogin(&token).await? {
                    Some(fresh) => {
                        self.call(Method::POST, &path, Some(fresh.as_str()), Some(&body))
                            .await
                    }
                    None => answer_403,
                }
            }
            other => other,
        };
        let answer = answer.map_err(|e| self.classify_sign(e, &path, req))?;
        let (chain, warnings) = parse_sign_response(&answer)
            .map_err(|e| CaError::BadResponse(format!("vault {path}: {e}")))?;
        for warning in warnings {
            tracing::warn!(
                backend = "vault",
                mount = %self.mount,
                role = %self.role,
                warning = %warning,
                "vault signed with a warning"
            );
        }
        Ok(chain)
    }

    async fn read_bundle(&self) -> Result<TrustBundle, CaError> {
        let token = self.tokens.token().await.ok();
        let token = token.as_ref().map(|t| t.as_str());
        // Every issuer of the mount, so that a new root is trusted as soon as it is added and
        // an old one until it is removed. Older Vaults (before 1.11) have no issuers API.
        let list_path = format!("{}/issuers", self.mount);
        let chains = match self
            .call(
                Method::from_bytes(b"LIST").unwrap_or(Method::GET),
                &list_path,
                token,
                None,
            )
            .await
        {
            Ok(answer) => {
                let mut chains = Vec::new();
                for id in issuer_ids(&answer) {
                    let path = format!("{}/issuer/{id}/json", self.mount);
                    let answer = self
                        .call(Method::GET, &path, token, None)
                        .await
                        .map_err(|e| self.classify_read(e, &path))?;
                    chains.push(
                        parse_issuer(&answer)
                            .map_err(|e| CaError::BadResponse(format!("vault {path}: {e}")))?,
                    );
                }
                chains
            }
            Err(CallError::Status {
                status:
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::FORBIDDEN,
                ..
            }) => Vec::new(),
            Err(e) => return Err(self.classify_read(e, &list_path)),
        };
        let chains = if chains.is_empty() {
            let path = format!("{}/ca_chain", self.mount);
            let answer = self
                .call(Method::GET, &path, token, None)
                .await
                .map_err(|e| self.classify_read(e, &path))?;
            vec![decode_certificates(&answer).map_err(|e| {
                CaError::BadResponse(format!("vault {path} returned no usable PEM chain: {e}"))
            })?]
        } else {
            chains
        };
        let roots = roots_of("vault", &chains);
        TrustBundle::new(roots).map_err(|_| {
            CaError::BadResponse(format!(
                "vault PKI mount {} has no CA certificate: generate or import a root",
                self.mount
            ))
        })
    }

    /// One HTTP exchange with Vault's API under `/v1/`. A 2xx answer gives its body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, CallError> {
        let url = format!("{}/v1/{path}", self.addr.as_str().trim_end_matches('/'));
        let mut request = self
            .http
            .request(method, url)
            .header("X-Vault-Request", "true");
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            request = request.header("X-Vault-Token", token);
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(CallError::Transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(CallError::Transport)?;
        if status.is_success() {
            Ok(bytes.to_vec())
        } else {
            Err(CallError::Status {
                status,
                errors: vault_errors(&bytes),
            })
        }
    }

    fn classify_sign(&self, e: CallError, path: &str, req: &SignRequest) -> CaError {
        let (mount, role, addr) = (&self.mount, &self.role, self.addr.as_str());
        match e {
            CallError::Status { status, errors } => match status.as_u16() {
                400 if errors.contains("unknown role") => CaError::Misconfigured(format!(
                    "vault PKI mount {mount} has no role {role}: create it, or fix \
                     --vault-role (vault said: {errors})"
                )),
                400 => CaError::Denied(format!(
                    "vault role {role} on mount {mount} refused to sign {id}: {errors}; \
                     the role's allowed_uri_sans must match the SPIFFE ID and \
                     require_cn must be false",
                    id = req.identity
                )),
                403 => CaError::Denied(format!(
                    "vault denied {path} (403) with a fresh token: the token's policy must \
                     grant [\"update\"] on {path}, and role {role} must exist on mount \
                     {mount} (vault said: {errors})"
                )),
                404 => CaError::Misconfigured(format!(
                    "vault has no PKI secrets engine at mount {mount} (404 on {path}): enable \
                     it, or fix --vault-pki-mount (vault said: {errors})"
                )),
                _ => self.classify_common(status, errors, path),
            },
            CallError::Transport(e) => self.transport(e, addr),
        }
    }

    fn classify_read(&self, e: CallError, path: &str) -> CaError {
        match e {
            CallError::Status { status, errors } if status == StatusCode::NOT_FOUND => {
                CaError::Misconfigured(format!(
                    "vault has no PKI secrets engine at mount {} (404 on {path}): enable it, \
                     or fix --vault-pki-mount (vault said: {errors})",
                    self.mount
                ))
            }
            CallError::Status { status, errors } => self.classify_common(status, errors, path),
            CallError::Transport(e) => self.transport(e, self.addr.as_str()),
        }
    }

    /// Statuses whose meaning does not depend on the call.
    fn classify_common(&self, status: StatusCode, errors: String, path: &str) -> CaError {
        let code = status.as_u16();
        match code {
            429 => CaError::Throttled(format!("vault rate-limited {path} (429): {errors}")),
            // 503 is a sealed Vault or a standby without forwarding, 412 a performance
            // standby that has not caught up; both pass.
            412 | 500..=599 => CaError::Unavailable(format!(
                "vault answered {code} on {path}: {errors}{hint}",
                hint = if errors.contains("sealed") {
                    " (unseal vault)"
                } else {
                    ""
                }
            )),
            403 => CaError::Denied(format!(
                "vault denied {path} (403): check the token's policy, and that PKI mount {} \
                 exists (vault said: {errors})",
                self.mount
            )),
            _ => CaError::Misconfigured(format!("vault answered {code} on {path}: {errors}")),
        }
    }

    fn transport(&self, e: reqwest::Error, addr: &str) -> CaError {
        if e.is_timeout() {
            CaError::Timeout(self.timeout)
        } else {
            CaError::Unavailable(format!("cannot reach vault at {addr}: {}", error_chain(&e)))
        }
    }
}

/// `e` and its causes on one line: reqwest's own message is often just "error sending
/// request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Vault's `{"errors": [...]}` joined, or the start of a body that is not that.
fn vault_errors(body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let listed = parsed
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(Value::as_array)
        .map(|errs| {
            errs.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        });
    match listed.map(|text| one_line(&text)) {
        Some(text) if !text.is_empty() => text,
        Some(_) => "(no error message)".into(),
        None => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(200).collect();
            if text.trim().is_empty() {
                "(empty body)".into()
            } else {
                text.trim().to_owned()
            }
        }
    }
}

/// Vault's multi-error text (`1 error occurred:\n\t* permission denied\n\n`) as one line.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("* ").trim())
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.ends_with("error occurred:") || l.ends_with("errors occurred:")))
        .collect();
    lines.join("; ")
}

/// The chain and warnings of a `sign` answer.
fn parse_sign_response(body: &[u8]) -> Result<(IssuedChain, Vec<String>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let data = v.get("data").ok_or("no data in the answer")?;
    let leaf_pem = data
        .get("certificate")
        .and_then(Value::as_str)
        .ok_or("no data.certificate in the answer")?;
    let mut leaf =
        decode_certificates(leaf_pem.as_bytes()).map_err(|e| format!("data.certificate: {e}"))?;
    if leaf.len() != 1 {
        return Err(format!(
            "data.certificate holds {} certificates, expected 1",
            leaf.len()
        ));
    }
    // ca_chain is the issuer and its parents. Older Vaults only return issuing_ca.
    let chain_pems: Vec<&str> = match data.get("ca_chain").and_then(Value::as_array) {
        Some(list) => list.iter().filter_map(Value::as_str).collect(),
        None => data
            .get("issuing_ca")
            .and_then(Value::as_str)
            .into_iter()
            .collect(),
    };
    let mut chain = Vec::new();
    for pem in chain_pems {
        chain.extend(
            decode_certificates(pem.as_bytes()).map_err(|e| format!("data.ca_chain: {e}"))?,
        );
    }
    let (intermediates, roots_hint) = split_roots(chain);
    let warnings = v
        .get("warnings")
        .and_then(Value::as_array)
        .map(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let leaf = leaf.remove(0);
    Ok((
        IssuedChain {
            leaf,
            intermediates,
            roots_hint,
        },
        warnings,
    ))
}

/// The issuer IDs of a `LIST <mount>/issuers` answer.
fn issuer_ids(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("data")?.get("keys")?.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .filter(|k| check_path("issuer", k).is_ok())
        .collect()
}

/// The chain of one `GET <mount>/issuer/<id>/json` answer: its certificate and `ca_chain`.
fn parse_issuer(body: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let data = v.get("data").ok_or("no data in the answer")?;
    let mut pems: Vec<&str> = data
        .get("certificate")
        .and_then(Value::as_str)
        .into_iter()
        .collect();
    if let Some(list) = data.get("ca_chain").and_then(Value::as_array) {
        pems.extend(list.iter().filter_map(Value::as_str));
    }
    let mut certs = Vec::new();
    for pem in pems {
        certs.extend(decode_certificates(pem.as_bytes()).map_err(|e| e.to_string())?);
    }
    Ok(certs)
}

/// A name that becomes one or more URL path segments: no empty segments, no `.`/`..`, and
/// only characters Vault allows in mount, role and issuer names.
fn check_path(what: &str, value: &str) -> Result<(), VaultConfigError> {
    let ok = !value.is_empty()
        && value.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(VaultConfigError(format!(
            "vault {what} {value:?} must be path segments of letters, digits, '-', '_' and '.'"
        )))
    }
}

/// Whether `value` can be sent as an HTTP header value: visible ASCII and spaces.
fn is_header_safe(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A secret string whose `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Zeroizing<String>);

impl Secret {
    pub(crate) fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests;
