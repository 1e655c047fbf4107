//! Local key generation and CSR building.
//!
//! Every issuance gets a fresh [`PrivateKey`]. It lives only in memory, its `Debug` prints a
//! redaction, and its bytes are zeroized when it is dropped. Nothing in this module writes a
//! file or logs key material.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sds_backends::{KeyType, SpiffeId};
use zeroize::{Zeroize, Zeroizing};

/// A workload private key, held in memory only.
pub struct PrivateKey {
    pair: KeyPair,
    key_type: KeyType,
}

/// Key generation or CSR encoding failed (a local crypto library error, not input).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KeyError {
    what: &'static str,
    #[source]
    source: rcgen::Error,
}

impl PrivateKey {
    /// Generates a new key. RSA keys take a while (tens to hundreds of milliseconds), so
    /// async callers run those on a blocking thread; EC keys take tens of microseconds.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        use rcgen::RsaKeySize;
        let pair = match key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeyType::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
        }
        .map_err(|source| KeyError {
            what: "key generation failed",
            source,
        })?;
        Ok(Self { pair, key_type })
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The raw public key (the SubjectPublicKeyInfo's BIT STRING contents), to compare with
    /// a certificate's.
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// A PKCS#10 CSR, DER, with an empty subject and `id` as its only SAN (a URI), signed by
    /// this key.
    pub fn csr(&self, id: &SpiffeId) -> Result<Vec<u8>, KeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.to_string().try_into().map_err(|source| KeyError {
            what: "SPIFFE ID is not IA5",
            source,
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.pair)
            .map_err(|source| KeyError {
                what: "CSR encoding failed",
                source,
            })?;
        Ok(csr.der().to_vec())
    }

    /// The key as PKCS#8 DER, the form the SPIFFE Workload API carries, in a buffer zeroized
    /// on drop.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.pair.serialize_der())
    }

    /// The key as a PKCS#8 PEM block, the form Envoy reads, in a buffer zeroized on drop.
    pub fn pkcs8_pem(&self) -> Zeroizing<String> {
        let der = Zeroizing::new(self.pair.serialize_der());
        Zeroizing::new(pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", der.as_slice()),
            sds_backends::pem::lf(),
        ))
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // rcgen keeps a DER copy of the key; the crypto library zeroizes its own copy.
        self.pair.zeroize();
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("key_type", &self.key_type)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509CertificationRequest};

    #[test]
    fn every_key_type_makes_a_csr_with_only_the_uri_san() {
        let id: SpiffeId = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
        for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            let der = key.csr(&id).unwrap();
            let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
            csr.verify_signature().unwrap();
            assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
            let exts: Vec<_> = csr.requested_extensions().unwrap().collect();
            assert_eq!(exts.len(), 1, "{kt}: only the SAN extension");
            match exts[0] {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => {
                    assert_eq!(
                        san.general_names,
                        vec![x509_parser::extensions::GeneralName::URI(
                            "spiffe://example.org/ns/a/sa/b"
                        )]
                    )
                }
                other => panic!("unexpected extension {other:?}"),
            }
            // With an empty subject, RFC 5280 requires the SAN to be critical, and AWS PCA
            // refuses a CSR where it is not.
            let san_critical =
                csr.certification_request_info
                    .iter_attributes()
                    .find_map(|a| match a.parsed_attribute() {
                        x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => {
                            Some(r.extensions.iter().all(|e| e.critical))
                        }
                        _ => None,
                    });
            assert_eq!(san_critical, Some(true), "{kt}: the SAN must be critical");
            assert!(key.pkcs8_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        }
    }

    #[test]
    fn keys_are_fresh_and_redacted() {
        let a = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let b = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        assert_ne!(a.public_key_raw(), b.public_key_raw());
        let shown = format!("{a:?}");
        assert!(shown.contains("<redacted>"));
        let pem = a.pkcs8_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!shown.contains(&body[..16]));
    }
}
