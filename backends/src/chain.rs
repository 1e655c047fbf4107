//! Sorting the certificates a CA returns: which are roots, which are intermediates. Shared by
//! the backends whose CA answers with a chain (Vault, ACM PCA, ...).

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

#[cfg(any(feature = "istiod", feature = "cert-manager"))]
use crate::{CaError, TrustBundle};

/// Whether the certificate's subject is its issuer.
pub fn is_self_issued(cert: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(cert.as_ref())
        .map(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
        .unwrap_or(false)
}

/// Splits the certificates above a leaf into (intermediates, roots), keeping their order: the
/// self-issued ones are roots.
pub fn split_roots(
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
    certs.into_iter().partition(|c| !is_self_issued(c))
}

/// The roots of these chains: their self-issued certificates, or where a chain has none (a
/// CA holding only an intermediate), its topmost certificate, with a warning naming
/// `backend`. No duplicates.
pub fn roots_of(
    backend: &'static str,
    chains: &[Vec<CertificateDer<'static>>],
) -> Vec<CertificateDer<'static>> {
    let mut roots: Vec<CertificateDer<'static>> = Vec::new();
    for chain in chains {
        let mut found: Vec<&CertificateDer<'static>> =
            chain.iter().filter(|c| is_self_issued(c)).collect();
        if let Some(top) = chain.last().filter(|_| found.is_empty()) {
            tracing::warn!(
                backend,
                "the CA's chain does not reach a self-signed root; trusting its topmost \
                 certificate"
            );
            found.push(top);
        }
        for cert in found {
            if !roots.contains(cert) {
                roots.push(cert.clone());
            }
        }
    }
    roots
}

/// The roots a CA sent with its last certificate, for backends whose CA has no call of its
/// own for them (istiod, cert-manager): the trust bundle is known from the first answer on.
#[cfg(any(feature = "istiod", feature = "cert-manager"))]
#[derive(Debug, Default)]
pub(crate) struct LearnedRoots(parking_lot::Mutex<Option<TrustBundle>>);

#[cfg(any(feature = "istiod", feature = "cert-manager"))]
impl LearnedRoots {
    /// Keeps `roots` (ignored when empty). True when they replace different roots kept
    /// before, for the caller to say so; false the first time and when unchanged.
    pub(crate) fn learn(&self, roots: &[CertificateDer<'static>]) -> bool {
        let Ok(bundle) = TrustBundle::new(roots.to_vec()) else {
            return false;
        };
        let mut current = self.0.lock();
        let changed = current.as_ref().is_some_and(|c| c != &bundle);
        *current = Some(bundle);
        changed
    }

    /// The roots kept, or `Unavailable` with `not_yet` before the first answer.
    pub(crate) fn get(&self, not_yet: &str) -> Result<TrustBundle, CaError> {
        self.0
            .lock()
            .clone()
            .ok_or_else(|| CaError::Unavailable(not_yet.to_owned()))
    }
}
