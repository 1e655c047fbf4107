//! The embedded CA: signs workload CSRs in process with a root or intermediate it holds.
//!
//! It is the zero-setup default (an ephemeral self-signed root made at start-up) and the way
//! several agents share one trust domain without any CA server (`--embedded-ca-cert` and
//! `--embedded-ca-key`, the same files on every agent). It issues X.509-SVIDs as the SPIFFE
//! spec describes them: exactly one URI SAN, `CA:FALSE`, key usage digitalSignature (plus
//! keyEncipherment for RSA keys), and the serverAuth and clientAuth extended key usages. It
//! takes only the public key and the URI SAN from the CSR; every other extension is its own.
//!
//! It checks every CSR's self-signature (proof that the requester holds the key) unless it
//! is told its requests come only from its own process ([`EmbeddedCa::local_requests_only`]).
//!
//! It never logs or exposes its signing key.

pub mod rotating;
pub mod settings;

use std::fmt;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CaError, IssuedChain, KeyType, SignRequest, SpiffeId, TrustBundle, TrustDomain};

/// Lifetime of the ephemeral root made when no CA files are given.
const EPHEMERAL_ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most a leaf's notBefore is set back, to absorb clock skew between agents and proxies.
const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// An in-process CA.
pub struct EmbeddedCa {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then its chain up to (not including) the root.
    intermediates: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    not_after: SystemTime,
    ephemeral: bool,
    /// Whether each CSR's self-signature is verified; see [`EmbeddedCa::local_requests_only`].
    check_possession: bool,
}

/// A leaf about to be signed; the testing CA bends these fields to make bad answers.
#[derive(Debug, Clone)]
pub(crate) struct LeafSpec {
    pub(crate) identity: SpiffeId,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) key_type: KeyType,
}

impl EmbeddedCa {
    /// A CA with a fresh self-signed ECDSA P-256 root for `trust_domain`, living as long as
    /// the process. Agents that must trust each other need [`EmbeddedCa::from_pem`] instead.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Misconfigured(format!("cannot generate root key: {e}")))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sds-agent");
        dn.push(
            DnType::CommonName,
            format!("sds-agent ephemeral root for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // A SPIFFE signing certificate names its trust domain (X.509-SVID spec 4.1).
        let td_uri = format!("spiffe://{trust_domain}");
        params.subject_alt_names =
            vec![SanType::URI(td_uri.try_into().map_err(|e| {
                CaError::Misconfigured(format!("bad trust domain uri: {e}"))
            })?)];
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + EPHEMERAL_ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Misconfigured(format!("cannot self-sign root: {e}")))?;
        let root = cert.der().clone();
        Ok(Self {
            issuer: Issuer::new(params, key),
            intermediates: Vec::new(),
            bundle: TrustBundle::new(vec![root])
                .map_err(|e| CaError::Misconfigured(e.to_string()))?,
            not_after: now + EPHEMERAL_ROOT_LIFETIME,
            ephemeral: true,
            check_possession: true,
        })
    }

    /// A CA that signs with `cert_pem`'s first certificate and `key_pem`'s PKCS#8 key.
    ///
    /// `cert_pem` holds the signing certificate first, then the rest of its chain; its last
    /// certificate must be self-signed (the root, which becomes the trust bundle). A root
    /// alone is both. The key must match the first certificate, which must be a CA that is
    /// valid now.
    pub fn from_pem(cert_pem: &[u8], key_pem: &str) -> Result<Self, CaError> {
        let bad = |what: String| CaError::Misconfigured(format!("embedded CA: {what}"));
        let certs = crate::pem::decode_certificates(cert_pem)
            .map_err(|e| bad(format!("cannot read the CA certificate file: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| {
            // rcgen's message can quote the input; say only what is wrong.
            bad("cannot read the CA key file: expected an unencrypted PKCS#8 or SEC1 PEM private key".into())
        })?;
        let signing = &certs[0];
        let (_, parsed) = X509Certificate::from_der(signing)
            .map_err(|e| bad(format!("cannot parse the CA certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("the CA key does not match the CA certificate".into()));
        }
        if !parsed.is_ca() {
            return Err(bad(
                "the CA certificate is not a CA (basicConstraints CA:FALSE)".into(),
            ));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let now = unix_seconds(SystemTime::now());
        if parsed.validity().not_before.timestamp() > now || not_after <= now {
            return Err(bad("the CA certificate is not valid now".into()));
        }
        let root = certs
            .last()
            .cloned()
            .ok_or_else(|| bad("empty certificate file".into()))?;
        let (_, parsed_root) = X509Certificate::from_der(&root).map_err(|e| {
            bad(format!(
                "cannot parse the last certificate in the file: {e}"
            ))
        })?;
        if parsed_root.subject() != parsed_root.issuer() {
            return Err(bad(
                "the CA certificate file must end with the self-signed root of its chain".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(signing, key)
            .map_err(|e| bad(format!("cannot use the CA certificate: {e}")))?;
        let intermediates = certs[..certs.len() - 1].to_vec();
        Ok(Self {
            issuer,
            intermediates,
            bundle: TrustBundle::new(vec![root]).map_err(|e| bad(e.to_string()))?,
            not_after: SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(not_after).unwrap_or(0)),
            ephemeral: false,
            check_possession: true,
        })
    }

    /// Stops verifying each CSR's self-signature, for a CA whose only caller is the agent in
    /// the same process.
    ///
    /// A CSR's signature proves to a CA across a trust boundary that the requester holds the
    /// private key. In process there is no such boundary: the secret manager has just made the
    /// key and the CSR, and before it serves anything it checks that the issued leaf carries
    /// exactly that key (DESIGN.md rule 2), which is the same guarantee from the other end.
    /// The check it skips is one signature verification, about a third of the CPU time of an
    /// issuance (docs/benchmarks.md). The CSR is still parsed and its SAN still checked.
    ///
    /// Never use this for a CA that takes CSRs from other processes (the test CAs under
    /// integration/ do not).
    #[must_use]
    pub fn local_requests_only(mut self) -> Self {
        self.check_possession = false;
        self
    }

    /// Whether the root was generated at start-up (and so is trusted by nobody else).
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// When the signing certificate expires; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The roots this CA's chains end in.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Signs a leaf for `public_key` exactly as `spec` says. The public entry point,
    /// [`crate::CertificateAuthority::sign`], fills `spec` from the request.
    pub(crate) fn issue(
        &self,
        public_key: &impl PublicKeyData,
        spec: &LeafSpec,
    ) -> Result<IssuedChain, CaError> {
        let mut params = CertificateParams::default();
        // Empty subject; rcgen then marks the SAN extension critical (RFC 5280 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(spec.identity.to_string().try_into().map_err(
                |e| CaError::BadResponse(format!("identity is not IA5: {e}")),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if spec.key_type.is_rsa() {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(spec.not_before);
        params.not_after = OffsetDateTime::from(spec.not_after);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::BadResponse(format!("cannot sign: {e}")))?;
        Ok(IssuedChain {
            leaf: cert.der().clone(),
            intermediates: self.intermediates.clone(),
            roots_hint: self.bundle.roots().to_vec(),
        })
    }

    /// Parses and checks a CSR: its signature (unless [`EmbeddedCa::local_requests_only`]),
    /// and that its only SAN is the URI of the identity asked for. Returns the public key to
    /// certify and the spec of the leaf to issue.
    pub(crate) fn check_request(
        &self,
        req: &SignRequest,
    ) -> Result<(SubjectPublicKeyInfo, LeafSpec), CaError> {
        let (rest, csr) = X509CertificationRequest::from_der(&req.csr_der)
            .map_err(|e| CaError::Denied(format!("unusable CSR: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::Denied(
                "unusable CSR: trailing bytes after the request".into(),
            ));
        }
        if self.check_possession {
            csr.verify_signature().map_err(|_| {
                CaError::Denied("unusable CSR: its signature does not verify".into())
            })?;
        }
        let mut names = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                names.extend(san.general_names.iter());
            }
        }
        let wanted = req.identity.to_string();
        match names.as_slice() {
            [GeneralName::URI(uri)] if *uri == wanted => {}
            _ => {
                return Err(CaError::Denied(format!(
                    "the CSR must carry exactly one SAN, the URI {wanted}"
                )));
            }
        }
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| CaError::Denied(format!("unusable CSR public key: {e}")))?;
        let now = SystemTime::now();
        let backdate = MAX_BACKDATE.min(req.ttl / 4);
        let not_after = (now + req.ttl).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Misconfigured(
                "the embedded CA certificate has expired".into(),
            ));
        }
        let spec = LeafSpec {
            identity: req.identity.clone(),
            not_before: now - backdate,
            not_after,
            key_type: req.key_type,
        };
        Ok((public_key, spec))
    }
}

#[async_trait::async_trait]
impl crate::CertificateAuthority for EmbeddedCa {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let (public_key, spec) = self.check_request(req)?;
        self.issue(&public_key, &spec)
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        Ok(self.bundle.clone())
    }
}

impl fmt::Debug for EmbeddedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedCa")
            .field("ephemeral", &self.ephemeral)
            .field("intermediates", &self.intermediates.len())
            .field("check_possession", &self.check_possession)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A random, positive, 127-bit serial number (RFC 5280 4.1.2.2 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero octet, so the DER length is stable
    SerialNumber::from_slice(&bytes)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CertificateAuthority;

    fn identity() -> SpiffeId {
        "spiffe://example.org/ns/default/sa/web".parse().unwrap()
    }

    fn csr_for(uri: &str, key: &KeyPair) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.serialize_request(key).unwrap().der().to_vec()
    }

    fn request(csr_der: Vec<u8>, ttl: Duration, key_type: KeyType) -> SignRequest {
        SignRequest {
            identity: identity(),
            csr_der,
            ttl,
            key_type,
        }
    }

    #[tokio::test]
    async fn issues_an_x509_svid() {
        let ca = EmbeddedCa::generate(&"example.org".parse().unwrap()).unwrap();
        assert!(ca.is_ephemeral());
        let key = KeyPair::generate().unwrap();
        let chain = ca
            .sign(&request(
                csr_for(&identity().to_string(), &key),
                Duration::from_secs(3600),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain.leaf).unwrap();
        assert!(!leaf.is_ca());
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(sans.critical, "SAN must be critical with an empty subject");
        assert_eq!(
            sans.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/ns/default/sa/web")]
        );
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60, "ttl plus the backdate");
        // It verifies to the bundle.
        let bundle = ca.trust_bundle().await.unwrap();
        let anchors = [webpki::anchor_from_trusted_cert(&bundle.roots()[0]).unwrap()];
        let ee = webpki::EndEntityCert::try_from(&chain.leaf).unwrap();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain.intermediates,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
    }

    #[tokio::test]
    async fn rsa_leaves_carry_key_encipherment() {
        let ca = EmbeddedCa::generate(&"example.org".parse().unwrap()).unwrap();
        let key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let chain = ca
            .sign(&request(
                csr_for(&identity().to_string(), &key),
                Duration::from_secs(60),
                KeyType::Rsa2048,
            ))
            .await
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain.leaf).unwrap();
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
    }

    #[tokio::test]
    async fn refuses_csrs_for_other_identities() {
        let td = "example.org".parse().unwrap();
        // Whether or not it checks the CSR's signature.
        for ca in [
            EmbeddedCa::generate(&td).unwrap(),
            EmbeddedCa::generate(&td).unwrap().local_requests_only(),
        ] {
            refuses_csrs_for_other_identities_with(ca).await;
        }
    }

    async fn refuses_csrs_for_other_identities_with(ca: EmbeddedCa) {
        let key = KeyPair::generate().unwrap();
        let err = ca
            .sign(&request(
                csr_for("spiffe://example.org/ns/default/sa/other", &key),
                Duration::from_secs(60),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, CaError::Denied(_)), "{err}");
        let err = ca
            .sign(&request(
                b"not a csr".to_vec(),
                Duration::from_secs(60),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, CaError::Denied(_)), "{err}");
    }

    /// A CSR whose self-signature does not verify: its last signature byte flipped.
    fn forged_csr(key: &KeyPair) -> Vec<u8> {
        let mut der = csr_for(&identity().to_string(), key);
        let last = der.len() - 1;
        der[last] ^= 0x01;
        der
    }

    #[tokio::test]
    async fn refuses_csrs_whose_signature_does_not_verify() {
        let ca = EmbeddedCa::generate(&"example.org".parse().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let err = ca
            .sign(&request(
                forged_csr(&key),
                Duration::from_secs(60),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CaError::Denied(m) if m.contains("signature does not verify")),
            "{err}"
        );
        // Trailing bytes after an otherwise good request are refused too.
        let mut der = csr_for(&identity().to_string(), &key);
        der.push(0);
        let err = ca
            .sign(&request(der, Duration::from_secs(60), KeyType::EcdsaP256))
            .await
            .unwrap_err();
        assert!(matches!(err, CaError::Denied(_)), "{err}");
    }

    #[tokio::test]
    async fn a_local_only_ca_skips_the_signature_but_keeps_every_other_check() {
        let ca = EmbeddedCa::generate(&"example.org".parse().unwrap())
            .unwrap()
            .local_requests_only();
        let key = KeyPair::generate().unwrap();
        // The signature is not checked: the leaf certifies the CSR's key all the same.
        let chain = ca
            .sign(&request(
                forged_csr(&key),
                Duration::from_secs(60),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain.leaf).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        // The SAN rule and the parse still hold: refuses_csrs_for_other_identities.
    }

    #[tokio::test]
    async fn ttl_is_capped_by_the_ca_certificate() {
        // A root that expires in two hours, loaded from PEM as a user would.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + Duration::from_secs(7200)).into();
        let root = p.self_signed(&key).unwrap();
        let ca = EmbeddedCa::from_pem(root.pem().as_bytes(), &key.serialize_pem()).unwrap();
        assert!(!ca.is_ephemeral());
        let leaf_key = KeyPair::generate().unwrap();
        let chain = ca
            .sign(&request(
                csr_for(&identity().to_string(), &leaf_key),
                Duration::from_secs(86400),
                KeyType::EcdsaP256,
            ))
            .await
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain.leaf).unwrap();
        assert!(leaf.validity().not_after.timestamp() <= unix_seconds(now) + 7200);
    }

    #[test]
    fn from_pem_rejects_bad_files() {
        let key = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).unwrap();
        let leafish = CertificateParams::default().self_signed(&key).unwrap();

        let err = |cert: &str, key: &str| {
            EmbeddedCa::from_pem(cert.as_bytes(), key)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&root.pem(), &other.serialize_pem()).contains("does not match"));
        assert!(err(&leafish.pem(), &key.serialize_pem()).contains("not a CA"));
        assert!(err("garbage", &key.serialize_pem()).contains("certificate file"));
        let msg = err(
            &root.pem(),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        assert!(msg.contains("key file") && !msg.contains("AAAA"), "{msg}");
    }
}
