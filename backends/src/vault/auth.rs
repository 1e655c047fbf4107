//! How the Vault backend gets, keeps and replaces its token.
//!
//! - `token`: a literal token, or a file re-read on every use so that a token rotated on disk
//!   is picked up. Its lease is learnt from `lookup-self`; a renewable one is renewed.
//! - `kubernetes` and `approle`: a login (`auth/<mount>/login`) gives a token with a lease.
//!
//! Lifecycle, the same for all: a lease of 0 never expires; a renewable token is renewed at
//! two thirds of its lease; when a renewal comes back shorter than the lease before it (the
//! token reached its `max_ttl`), or the token is not renewable, the next refresh is a fresh
//! login, still at two thirds of the lease. A background task does this on time, so a token
//! does not lapse between two signs hours apart. A 403 on sign triggers one fresh login
//! ([`Tokens::relogin`]).
//!
//! Tokens, JWTs and secret IDs are held in zeroizing strings and never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use vaultrs::client::{Client as _, VaultClient};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::{Inner, Secret, VaultConfigError, check_path, is_header_safe};
use crate::CaError;

/// Retry interval of the background renewer after a failed refresh while the token is still
/// valid.
const REFRESH_RETRY: Duration = Duration::from_secs(10);

/// How the agent authenticates to Vault.
#[derive(Clone)]
#[non_exhaustive]
pub enum VaultAuth {
    /// A Vault token.
    Token(TokenSource),
    /// Kubernetes auth: the pod's service-account JWT for a Vault token.
    Kubernetes {
        /// Mount path of the auth method, `kubernetes`.
        mount: String,
        /// The Vault role of the Kubernetes auth method.
        role: String,
        /// The JWT file, re-read on every login.
        jwt_file: PathBuf,
    },
    /// AppRole auth: a role ID and a secret ID for a Vault token.
    AppRole {
        /// Mount path of the auth method, `approle`.
        mount: String,
        /// The role ID.
        role_id: String,
        /// The file holding the secret ID, re-read on every login.
        secret_id_file: PathBuf,
    },
}

/// Where a Vault token comes from.
#[derive(Clone)]
#[non_exhaustive]
pub enum TokenSource {
    /// The token itself.
    Literal(Zeroizing<String>),
    /// A file holding the token, re-read on every use.
    File(PathBuf),
}

impl fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaultAuth::Token(source) => f.debug_tuple("Token").field(source).finish(),
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_file", jwt_file)
                .finish(),
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id_file", secret_id_file)
                .finish(),
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            TokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl VaultAuth {
    /// The method's name, as `--vault-auth` spells it.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token(_) => "token",
            VaultAuth::Kubernetes { .. } => "kubernetes",
            VaultAuth::AppRole { .. } => "approle",
        }
    }

    pub(super) fn check(&self) -> Result<(), VaultConfigError> {
        match self {
            VaultAuth::Token(TokenSource::Literal(token)) => {
                if is_header_safe(token.trim()) {
                    Ok(())
                } else {
                    Err(VaultConfigError(
                        "vault token is empty or holds characters an HTTP header cannot carry"
                            .into(),
                    ))
                }
            }
            VaultAuth::Token(TokenSource::File(_)) => Ok(()),
            VaultAuth::Kubernetes { mount, role, .. } => {
                check_path("auth mount", mount)?;
                check_path("kubernetes auth role", role)
            }
            VaultAuth::AppRole { mount, role_id, .. } => {
                check_path("auth mount", mount)?;
                if role_id.trim().is_empty() {
                    Err(VaultConfigError("vault AppRole role ID is empty".into()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The current token and when to refresh it.
pub(super) struct Tokens {
    auth: VaultAuth,
    state: Mutex<State>,
    /// Woken when `state.refresh_at` changes, for the background renewer.
    changed: Notify,
}

struct State {
    /// vaultrs' client; its token is set before each call, under this lock.
    client: VaultClient,
    token: Option<Secret>,
    /// When to renew or log in again. `None`: never (lease 0), or not known.
    refresh_at: Option<Instant>,
    /// When the token stops working. `None`: never, or not known.
    expires_at: Option<Instant>,
    /// Whether the next refresh may be a renewal (else a login).
    renewable: bool,
    /// The last lease granted, to notice a renewal capped by the token's max TTL.
    lease: Duration,
}

/// A token's lease as Vault reported it.
#[derive(Debug, Clone, Copy)]
struct Lease {
    duration: Duration,
    renewable: bool,
}

impl Tokens {
    pub(super) fn new(client: VaultClient, auth: VaultAuth) -> Self {
        Self {
            auth,
            state: Mutex::new(State {
                client,
                token: None,
                refresh_at: None,
                expires_at: None,
                renewable: false,
                lease: Duration::ZERO,
            }),
            changed: Notify::new(),
        }
    }

    /// A token to use now: the current one, refreshed first if it is due, or a new login.
    pub(super) async fn token(&self) -> Result<Secret, CaError> {
        let mut st = self.state.lock().await;
        match &self.auth {
            VaultAuth::Token(source) => {
                let current = read_token(source)?;
                if st.token.as_ref() != Some(&current) {
                    if st.token.is_some() {
                        tracing::info!(backend = "vault", "vault token file changed; using it");
                    }
                    st.token = Some(current.clone());
                    self.learn_lease(&mut st).await;
                } else if is_due(st.refresh_at) {
                    self.refresh(&mut st).await?;
                }
                Ok(current)
            }
            VaultAuth::Kubernetes { .. } | VaultAuth::AppRole { .. } => {
                let usable = st.token.is_some() && !is_due(st.expires_at);
                if !usable {
                    self.login(&mut st).await?;
                } else if is_due(st.refresh_at) {
                    self.refresh(&mut st).await?;
                }
                st.token
                    .clone()
                    .ok_or_else(|| CaError::Misconfigured("vault login gave no token".into()))
            }
        }
    }

    /// After a 403 with `rejected`: a fresh token if there is a way to get one (a login, or a
    /// token file that now holds another token), else `None`.
    pub(super) async fn relogin(&self, rejected: &Secret) -> Result<Option<Secret>, CaError> {
        let mut st = self.state.lock().await;
        if st.token.as_ref().is_some_and(|t| t != rejected) {
            // Another call already replaced it.
            return Ok(st.token.clone());
        }
        match &self.auth {
            VaultAuth::Token(TokenSource::Literal(_)) => Ok(None),
            VaultAuth::Token(source @ TokenSource::File(_)) => {
                let current = read_token(source)?;
                if &current == rejected {
                    return Ok(None);
                }
                st.token = Some(current.clone());
                self.learn_lease(&mut st).await;
                Ok(Some(current))
            }
            VaultAuth::Kubernetes { .. } | VaultAuth::AppRole { .. } => {
                self.login(&mut st).await?;
                Ok(st.token.clone())
            }
        }
    }

    /// Renews a renewable token, or logs in again; on failure keeps a token that still
    /// works and retries soon.
    async fn refresh(&self, st: &mut State) -> Result<(), CaError> {
        let can_login = !matches!(self.auth, VaultAuth::Token(_));
        let result = if st.renewable {
            match self.renew(st).await {
                Ok(()) => Ok(()),
                Err(e) if can_login => {
                    tracing::info!(
                        backend = "vault",
                        error = %e,
                        "vault token renewal failed; logging in again"
                    );
                    self.login(st).await
                }
                Err(e) => Err(e),
            }
        } else if can_login {
            self.login(st).await
        } else {
            // A token we can neither renew nor replace: nothing to do until it changes.
            st.refresh_at = None;
            Ok(())
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if !is_due(st.expires_at) && st.token.is_some() => {
                tracing::warn!(
                    backend = "vault",
                    error = %e,
                    "vault token refresh failed; the current token is still valid, retrying"
                );
                st.refresh_at = Some(Instant::now() + REFRESH_RETRY);
                self.changed.notify_one();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn renew(&self, st: &mut State) -> Result<(), CaError> {
        let token = st
            .token
            .clone()
            .ok_or_else(|| CaError::Misconfigured("vault token renewal without a token".into()))?;
        st.client.set_token(token.as_str());
        let info = vaultrs::token::renew_self(&st.client, None)
            .await
            .map_err(|e| {
                classify_client_error(e, "renewing the vault token (auth/token/renew-self)")
            });
        st.client.set_token("");
        let info = info?;
        let lease = Lease {
            duration: Duration::from_secs(info.lease_duration),
            renewable: info.renewable,
        };
        let capped = lease.duration < st.lease;
        tracing::info!(
            backend = "vault",
            lease = %humanize(lease.duration),
            "vault token renewed"
        );
        self.set_lease(st, lease);
        if capped {
            // It reached its max TTL: it will not grow again, so replace it next time.
            st.renewable = false;
        }
        Ok(())
    }

    async fn login(&self, st: &mut State) -> Result<(), CaError> {
        st.client.set_token("");
        let info = match &self.auth {
            VaultAuth::Token(_) => {
                return Err(CaError::Misconfigured(
                    "vault token auth cannot log in".into(),
                ));
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file, "service-account JWT")?;
                vaultrs::auth::kubernetes::login(&st.client, mount, role, jwt.as_str())
                    .await
                    .map_err(|e| {
                        classify_login_error(
                            e,
                            &format!(
                                "vault kubernetes login (auth/{mount}/login, role {role}); \
                                 check the role's bound_service_account_names and \
                                 bound_service_account_namespaces, the JWT in {}, and the \
                                 auth method's kubernetes_host",
                                jwt_file.display()
                            ),
                        )
                    })?
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret_file(secret_id_file, "AppRole secret ID")?;
                vaultrs::auth::approle::login(&st.client, mount, role_id, secret_id.as_str())
                    .await
                    .map_err(|e| {
                        classify_login_error(
                            e,
                            &format!(
                                "vault AppRole login (auth/{mount}/login); check the role ID \
                                 and the secret ID in {} (secret IDs can expire or run out \
                                 of uses)",
                                secret_id_file.display()
                            ),
                        )
                    })?
            }
        };
        if !is_header_safe(&info.client_token) {
            return Err(CaError::BadResponse(
                "vault login returned an unusable token".into(),
            ));
        }
        st.token = Some(Secret::new(info.client_token.clone()));
        let lease = Lease {
            duration: Duration::from_secs(info.lease_duration),
            renewable: info.renewable,
        };
        tracing::info!(
            backend = "vault",
            method = self.auth.method(),
            lease = %humanize(lease.duration),
            renewable = lease.renewable,
            "logged in to vault"
        );
        self.set_lease(st, lease);
        Ok(())
    }

    /// Learns a token's lease from `lookup-self`. Failure only costs renewal, so it is
    /// logged, not returned: the token may lack the `lookup-self` capability.
    async fn learn_lease(&self, st: &mut State) {
        let Some(token) = st.token.clone() else {
            return;
        };
        st.client.set_token(token.as_str());
        let looked = vaultrs::token::lookup_self(&st.client).await;
        st.client.set_token("");
        match looked {
            Ok(info) => {
                let lease = Lease {
                    duration: Duration::from_secs(info.ttl),
                    renewable: info.renewable.unwrap_or(false),
                };
                if !lease.duration.is_zero() && !lease.renewable {
                    tracing::warn!(
                        backend = "vault",
                        expires_in = %humanize(lease.duration),
                        "the vault token is not renewable; replace it before it expires"
                    );
                }
                self.set_lease(st, lease);
            }
            Err(e) => {
                tracing::warn!(
                    backend = "vault",
                    error = %classify_client_error(e, "auth/token/lookup-self"),
                    "cannot look up the vault token's lease; it will not be renewed"
                );
                st.refresh_at = None;
                st.expires_at = None;
                st.renewable = false;
            }
        }
    }

    fn set_lease(&self, st: &mut State, lease: Lease) {
        let now = Instant::now();
        st.lease = lease.duration;
        st.renewable = lease.renewable;
        if lease.duration.is_zero() {
            // A lease of 0: a root or periodic-less token that never expires.
            st.refresh_at = None;
            st.expires_at = None;
        } else {
            st.refresh_at = Some(now + lease.duration * 2 / 3);
            st.expires_at = Some(now + lease.duration);
        }
        self.changed.notify_one();
    }

    async fn refresh_at(&self) -> Option<Instant> {
        self.state.lock().await.refresh_at
    }
}

/// Renews or replaces the token when it is due, so it does not lapse between signs.
pub(super) async fn renew_in_background(ca: Arc<Inner>) {
    loop {
        let changed = ca.tokens.changed.notified();
        tokio::pin!(changed);
        // Register before reading, so a change in between is not missed.
        changed.as_mut().enable();
        match ca.tokens.refresh_at().await {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        if let Err(e) = ca.tokens.token().await {
                            tracing::warn!(
                                backend = "vault",
                                error = %e,
                                "vault token refresh failed; the next sign will log in"
                            );
                            // Do not spin on a schedule that stays in the past.
                            tokio::time::sleep(REFRESH_RETRY).await;
                        }
                    }
                    () = &mut changed => {}
                }
            }
            None => changed.await,
        }
    }
}

fn is_due(at: Option<Instant>) -> bool {
    at.is_some_and(|at| Instant::now() >= at)
}

fn read_token(source: &TokenSource) -> Result<Secret, CaError> {
    let token = match source {
        TokenSource::Literal(token) => Secret::new(token.trim().to_owned()),
        TokenSource::File(path) => read_secret_file(path, "vault token")?,
    };
    if is_header_safe(token.as_str()) {
        Ok(token)
    } else {
        Err(CaError::Misconfigured(
            "the vault token is empty or holds characters an HTTP header cannot carry".into(),
        ))
    }
}

/// A small secret file, trimmed. A missing or empty file is a configuration error.
fn read_secret_file(path: &Path, what: &str) -> Result<Secret, CaError> {
    let text = std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| {
            CaError::Misconfigured(format!("reading the {what} file {}: {e}", path.display()))
        })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(CaError::Misconfigured(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(trimmed.to_owned()))
}

/// A login failure: a 400/403 means the credentials or role are wrong; the rest is
/// [`classify_client_error`].
fn classify_login_error(e: ClientError, what: &str) -> CaError {
    match &e {
        ClientError::APIError { code, errors } if matches!(code, 400 | 401 | 403) => {
            CaError::Denied(format!(
                "{what}: vault answered {code}: {}",
                super::one_line(&errors.join("\n"))
            ))
        }
        ClientError::APIError { code: 404, errors } => CaError::Misconfigured(format!(
            "{what}: no such auth method or role (404): {}",
            super::one_line(&errors.join("\n"))
        )),
        _ => classify_client_error(e, what),
    }
}

/// A `vaultrs` failure sorted like the backend's own calls.
fn classify_client_error(e: ClientError, what: &str) -> CaError {
    match &e {
        ClientError::APIError { code, errors } => {
            let text = format!(
                "{what}: vault answered {code}: {}",
                super::one_line(&errors.join("\n"))
            );
            match code {
                429 => CaError::Throttled(text),
                412 | 500..=599 => CaError::Unavailable(text),
                403 => CaError::Denied(text),
                _ => CaError::Misconfigured(text),
            }
        }
        _ => {
            let text = super::error_chain(&e);
            let timed_out =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| {
                    e.downcast_ref::<reqwest::Error>()
                        .is_some_and(reqwest::Error::is_timeout)
                });
            if timed_out {
                CaError::Unavailable(format!("{what}: timed out: {text}"))
            } else {
                CaError::Unavailable(format!("{what}: {text}"))
            }
        }
    }
}

/// `1h2m3s` style, without pulling humantime into this crate for one log field.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}
