//! PEM in and out. Decoding uses `rustls-pki-types`' parser and encoding the `pem` crate, so
//! nothing here hand-rolls base64 or armour lines.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why a PEM bundle of certificates could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// The text is not well-formed PEM.
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// The text holds no `CERTIFICATE` block.
    #[error("no CERTIFICATE block found")]
    NoCertificates,
}

/// Every `CERTIFICATE` block in `pem`, in order. Other block types are skipped.
pub fn decode_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// PEM as OpenSSL and Go write it: LF line endings (the pem crate defaults to CRLF).
pub fn lf() -> ::pem::EncodeConfig {
    ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF)
}

/// The certificates as concatenated PEM blocks, in order, LF line endings.
pub fn encode_certificates<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| ::pem::encode_config(&::pem::Pem::new("CERTIFICATE", c.as_ref()), lf()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        let a = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let b = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x02]);
        let text = encode_certificates([&a, &b]);
        assert_eq!(decode_certificates(text.as_bytes()).unwrap(), vec![a, b]);
        assert_eq!(decode_certificates(b"hello"), Err(PemError::NoCertificates));
        assert!(matches!(
            decode_certificates(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
            Err(PemError::Malformed(_))
        ));
    }
}
