//! Sorting the certificates a CA returns: which are roots, which are intermediates. Shared by
//! the backends whose CA answers with a chain (Vault, ACM PCA, ...).

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

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
