//! The shared root CA of a test mesh, and reading serial numbers out of certificates.
//!
//! Two agents given the same root sign workload certificates that chain to it, so two
//! Envoys, each fed by its own agent, can verify each other. The root is written as an
//! operator would hand it to `--embedded-ca-cert` and `--embedded-ca-key`: PEM files, the key
//! as PKCS#8. Its key lives only in the test's temporary directory.

use std::path::{Path, PathBuf};

use std::net::Ipv4Addr;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::{Error, Serial, io_error};

/// A root CA written to disk as `ca.pem` and `ca-key.pem`.
#[derive(Debug, Clone)]
pub struct SharedCa {
    /// The self-signed root certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// The root's serial number, to recognise it in Envoy's `/certs`.
    pub serial: Serial,
}

impl SharedCa {
    /// Generates an ECDSA P-256 root (CA:TRUE, keyCertSign) and writes it into `dir`.
    pub fn write(dir: &Path) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Ca)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sds-agent end-to-end");
        dn.push(DnType::CommonName, "shared mesh root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(Error::Ca)?;
        let serial = serial_of_pem(&cert.pem())?;
        let ca = Self {
            cert: dir.join("ca.pem"),
            key: dir.join("ca-key.pem"),
            serial,
        };
        std::fs::write(&ca.cert, cert.pem())
            .map_err(io_error(format!("writing {}", ca.cert.display())))?;
        std::fs::write(&ca.key, key.serialize_pem())
            .map_err(io_error(format!("writing {}", ca.key.display())))?;
        Ok(ca)
    }
}

/// Parameters of a test CA certificate: `organization` and `common_name` as its subject,
/// CA:TRUE (path length limited by `constraint`, unconstrained by default), keyCertSign and
/// cRLSign.
pub fn ca_params(
    organization: &str,
    common_name: &str,
    constraint: Option<BasicConstraints>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraint.unwrap_or(BasicConstraints::Unconstrained));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A rustls server configuration presenting a serving certificate for `dns_names` and
/// 127.0.0.1 ([`serving_pki`]), with the root (PEM) its clients trust. `what` names the
/// server in errors ("fake kubelet", ...).
pub fn serving_tls(
    what: &str,
    organization: &str,
    root_name: &str,
    dns_names: &[&str],
) -> Result<(String, std::sync::Arc<rustls::ServerConfig>), Error> {
    let (root_pem, cert, key) = serving_pki(organization, root_name, dns_names)?;
    let tls_error = |e: rustls::Error| Error::Api {
        call: format!("{what} TLS"),
        detail: e.to_string(),
    };
    let key_der =
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| Error::Api {
            call: format!("{what} TLS key"),
            detail: e.to_string(),
        })?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_error)?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .map_err(tls_error)?;
    Ok((root_pem, std::sync::Arc::new(config)))
}

/// A TLS root (PEM) and a serving certificate it signed for `dns_names` and 127.0.0.1, with
/// the certificate's key: what a test server presents, and what its clients trust.
pub fn serving_pki(
    organization: &str,
    root_name: &str,
    dns_names: &[&str],
) -> Result<(String, Certificate, KeyPair), Error> {
    let root_key = KeyPair::generate().map_err(Error::Ca)?;
    let root = ca_params(organization, root_name, None);
    let root_cert = root.self_signed(&root_key).map_err(Error::Ca)?;
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate().map_err(Error::Ca)?;
    let names = dns_names
        .iter()
        .map(|n| (*n).to_owned())
        .collect::<Vec<_>>();
    let mut params = CertificateParams::new(names).map_err(Error::Ca)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    let cert = params.signed_by(&key, &issuer).map_err(Error::Ca)?;
    Ok((root_cert.pem(), cert, key))
}

/// The serial number of the first certificate in `pem`.
pub fn serial_of_pem(pem: &str) -> Result<Serial, Error> {
    let malformed = |detail: String| Error::Malformed {
        what: "PEM certificate",
        detail,
    };
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| malformed(format!("{e}")))?;
    let cert = block.parse_x509().map_err(|e| malformed(format!("{e}")))?;
    Ok(Serial::from_bytes(cert.raw_serial()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_ca_is_a_p256_root_with_a_pkcs8_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SharedCa::write(dir.path()).unwrap();
        let key = std::fs::read_to_string(&ca.key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        let pem = std::fs::read_to_string(&ca.cert).unwrap();
        assert_eq!(serial_of_pem(&pem).unwrap(), ca.serial);
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = block.parse_x509().unwrap();
        assert!(cert.is_ca());
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign());
    }
}
