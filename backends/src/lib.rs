//! The CA side of sds-agent: the [`CertificateAuthority`] trait that every backend implements,
//! the types that cross it, and one module per backend, each behind a cargo feature.
//!
//! A backend turns a locally built CSR into a certificate chain and says which roots that chain
//! should verify to. It knows nothing of SDS, rotation, retries or metrics: the agent's secret
//! manager owns those, and it validates every answer a backend gives before it is used. A
//! backend's only duty beyond talking to its CA is to sort its failures into
//! [`CaError`] kinds, so the manager knows whether to back off and retry or to alert.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

// A backend's module holds its CA client behind its cargo feature, and its `settings`
// (flags, checks, construction) always: without the feature only the settings are compiled,
// so the flags and their errors never depend on the build.
#[cfg(feature = "acm-pca")]
pub mod acm_pca;
#[cfg(not(feature = "acm-pca"))]
pub mod acm_pca {
    //! AWS Private CA: not in this build, only its settings.
    pub mod settings;
}
#[cfg(feature = "cert-manager")]
pub mod cert_manager;
#[cfg(not(feature = "cert-manager"))]
pub mod cert_manager {
    //! cert-manager: not in this build, only its settings.
    pub mod settings;
}
pub mod chain;
#[cfg(feature = "embedded")]
pub mod embedded;
#[cfg(not(feature = "embedded"))]
pub mod embedded {
    //! The embedded CA: not in this build, only its settings.
    pub mod settings;
}
pub mod identity;
#[cfg(feature = "istiod")]
pub mod istiod;
#[cfg(not(feature = "istiod"))]
pub mod istiod {
    //! The Istio CA API: not in this build, only its settings.
    pub mod settings;
}
pub mod pem;
pub mod settings;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(feature = "vault")]
pub mod vault;
#[cfg(not(feature = "vault"))]
pub mod vault {
    //! Vault: not in this build, only its settings.
    pub mod settings;
}

pub use identity::{IdentityError, KeyType, SpiffeId, TrustDomain, UnknownKeyType};

/// A certificate authority that signs workload CSRs.
#[async_trait::async_trait]
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Short stable name for logs and metrics: "embedded", "vault", "acm-pca", ...
    fn name(&self) -> &'static str;

    /// Signs a locally built CSR for `req.identity`, asking for `req.ttl`. The CA may shorten
    /// (or, for some CAs, lengthen) the lifetime; the caller reads it from the certificate.
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError>;

    /// The roots that workload certificates chain to. It may change over time; the caller
    /// re-reads it periodically.
    async fn trust_bundle(&self) -> Result<TrustBundle, CaError>;

    /// Whether the roots come only with a signed certificate: the CA has no call that returns
    /// them (istiod, cert-manager's `status.ca`), so [`CertificateAuthority::trust_bundle`]
    /// fails until a first [`CertificateAuthority::sign`]. A node agent, which signs nothing
    /// until a pod asks, does not wait for the bundle to call itself ready on such a CA.
    fn roots_come_with_certificates(&self) -> bool {
        false
    }

    /// The handle through which the agent rotates this CA's root itself, for a CA that signs
    /// in process (the embedded CA). `None` for CAs that announce their own roots (istiod,
    /// Vault issuers, cert-manager): the agent follows what they announce.
    fn root_control(&self) -> Option<&dyn RootControl> {
        None
    }
}

/// A CA whose signing root the agent moves, in the steps of a staged root rotation: a next
/// root is prepared and joins [`CertificateAuthority::trust_bundle`] next to the current one,
/// then it is activated and signs from then on, and the old root leaves the CA's bundle (the
/// agent keeps serving it until nothing chains to it).
pub trait RootControl: Send + Sync {
    /// The prepared root that does not sign yet, if there is one.
    fn next_root(&self) -> Option<CertificateDer<'static>>;

    /// Prepares a next root (made now, or read from where the operator put it). Refused while
    /// one is prepared already, or when this CA cannot make one; the message says why.
    fn prepare_next(&self) -> Result<CertificateDer<'static>, String>;

    /// Signs under the prepared root from now on and drops the old root from the CA's bundle.
    /// False when no root was prepared.
    fn activate_next(&self) -> bool;
}

/// What the secret manager asks a CA to sign.
#[derive(Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The identity the CSR carries as its only URI SAN.
    pub identity: SpiffeId,
    /// The PKCS#10 CSR, DER.
    pub csr_der: Vec<u8>,
    /// The lifetime asked for.
    pub ttl: Duration,
    /// The type of the key inside the CSR.
    pub key_type: KeyType,
}

/// A CA's answer: the leaf and the certificates between it and a root, all DER.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedChain {
    /// The workload certificate.
    pub leaf: CertificateDer<'static>,
    /// Intermediates, nearest the leaf first. Roots the CA sent in the chain are moved to
    /// `roots_hint`, never left here.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Roots the CA said the chain ends in, if it said. Only a hint: the chain is verified
    /// against the trust bundle, never against this.
    pub roots_hint: Vec<CertificateDer<'static>>,
}

/// A non-empty set of trusted root certificates, DER.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

/// Why a CA call failed. [`CaError::is_retryable`] sorts the variants into "back off and try
/// again" and "a person must fix something".
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA could not be reached or said it cannot serve now (connection refused, 5xx,
    /// sealed, standby). Retryable.
    #[error("ca unavailable: {0}")]
    Unavailable(String),
    /// The CA asked us to slow down (429, throttling). Retryable.
    #[error("ca throttled the request: {0}")]
    Throttled(String),
    /// The call did not finish in time. Retryable.
    #[error("ca call timed out after {0:?}")]
    Timeout(Duration),
    /// The CA refused to sign this identity or this caller (403, policy). Not retryable.
    #[error("ca denied the request: {0}")]
    Denied(String),
    /// The backend is set up wrongly (missing mount, bad role, unreadable file). Not
    /// retryable.
    #[error("ca backend misconfigured: {0}")]
    Misconfigured(String),
    /// The CA answered with something that is not a usable certificate chain. Not retryable
    /// by itself; the secret manager still retries on its own schedule, since a CA can
    /// recover.
    #[error("ca returned a bad response: {0}")]
    BadResponse(String),
    /// An error from a plugin or library that fits no other kind; `retryable` says how to
    /// treat it.
    #[error("{error}")]
    Other {
        /// The underlying error.
        #[source]
        error: Arc<dyn std::error::Error + Send + Sync>,
        /// Whether the call is worth retrying.
        retryable: bool,
    },
}

/// A trust bundle with no roots in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("trust bundle is empty")]
pub struct EmptyTrustBundle;

impl fmt::Debug for SignRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignRequest")
            .field("identity", &self.identity)
            .field("csr_der_len", &self.csr_der.len())
            .field("ttl", &self.ttl)
            .field("key_type", &self.key_type)
            .finish()
    }
}

impl fmt::Debug for IssuedChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedChain")
            .field("leaf_len", &self.leaf.len())
            .field("intermediates", &self.intermediates.len())
            .field("roots_hint", &self.roots_hint.len())
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of these roots; refuses an empty list.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, EmptyTrustBundle> {
        if roots.is_empty() {
            return Err(EmptyTrustBundle);
        }
        Ok(Self { roots })
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl CaError {
    /// Whether the secret manager should back off and try again, rather than alert that a
    /// person must act.
    pub fn is_retryable(&self) -> bool {
        match self {
            CaError::Unavailable(_) | CaError::Throttled(_) | CaError::Timeout(_) => true,
            CaError::Denied(_) | CaError::Misconfigured(_) | CaError::BadResponse(_) => false,
            CaError::Other { retryable, .. } => *retryable,
        }
    }

    /// Every [`CaError::kind`] with its retryability, except `other`, whose retryability
    /// depends on the error: the label values metrics are created with before any error.
    pub const KINDS: [(&'static str, bool); 6] = [
        ("unavailable", true),
        ("throttled", true),
        ("timeout", true),
        ("denied", false),
        ("misconfigured", false),
        ("bad_response", false),
    ];

    /// A short stable label for metrics: "unavailable", "throttled", ...
    pub fn kind(&self) -> &'static str {
        match self {
            CaError::Unavailable(_) => "unavailable",
            CaError::Throttled(_) => "throttled",
            CaError::Timeout(_) => "timeout",
            CaError::Denied(_) => "denied",
            CaError::Misconfigured(_) => "misconfigured",
            CaError::BadResponse(_) => "bad_response",
            CaError::Other { .. } => "other",
        }
    }
}

/// An error and its sources on one line, each said once, cut at 600 characters: for CA
/// errors whose libraries nest the cause (a TLS failure inside a connect error inside a
/// transport error).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = Some(err);
    while let Some(e) = source {
        let text = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    let line = parts.join(": ");
    match line.char_indices().nth(600) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line,
    }
}

/// A server's message on one line, quoted, cut after `max` characters: for errors that
/// repeat what a CA said.
pub fn quote(message: &str, max: usize) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{:?}...", &line[..i]),
        None => format!("{line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_the_kind() {
        let retryable = [
            CaError::Unavailable("x".into()),
            CaError::Throttled("x".into()),
            CaError::Timeout(Duration::from_secs(1)),
        ];
        let fatal = [
            CaError::Denied("x".into()),
            CaError::Misconfigured("x".into()),
            CaError::BadResponse("x".into()),
        ];
        assert!(retryable.iter().all(CaError::is_retryable));
        assert!(!fatal.iter().any(CaError::is_retryable));
        let other = CaError::Other {
            error: Arc::new(std::io::Error::other("plugin")),
            retryable: true,
        };
        assert!(other.is_retryable());
        assert_eq!(other.kind(), "other");
        let listed: Vec<(&str, bool)> = retryable
            .iter()
            .chain(&fatal)
            .map(|e| (e.kind(), e.is_retryable()))
            .collect();
        assert_eq!(listed, CaError::KINDS);
    }

    #[test]
    fn empty_bundle_is_refused() {
        assert_eq!(TrustBundle::new(vec![]), Err(EmptyTrustBundle));
    }
}
