//! Validation of a CA's answer before anything reaches a proxy (DESIGN.md rule 2).
//!
//! An answer is used only if its leaf holds our public key, its only URI SAN is exactly the
//! SPIFFE ID we asked for, now lies inside its validity window, it is not a CA, and it chains
//! (through the intermediates given) to the trust bundle for both serverAuth and clientAuth.
//! Chain building and signature checks are webpki's; this module adds the SPIFFE rules.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use sds_backends::{IssuedChain, SpiffeId};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What validation learned about an accepted leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Why a CA answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The leaf is not a parseable X.509 certificate.
    #[error("leaf certificate cannot be parsed: {0}")]
    Unparseable(String),
    /// The leaf certifies another public key than the one in our CSR.
    #[error("leaf certifies a public key that is not ours")]
    WrongKey,
    /// The leaf's URI SANs are not exactly our SPIFFE ID.
    #[error("leaf URI SANs are {found:?}, expected exactly [{expected}]")]
    WrongSan {
        /// What the leaf carries.
        found: Vec<String>,
        /// What we asked for.
        expected: String,
    },
    /// The leaf is not valid yet.
    #[error("leaf is not valid until {0} (Unix seconds)")]
    NotYetValid(i64),
    /// The leaf has expired.
    #[error("leaf expired at {0} (Unix seconds)")]
    Expired(i64),
    /// The leaf is a CA certificate.
    #[error("leaf is a CA certificate (basicConstraints CA:TRUE)")]
    IsCa,
    /// The chain does not verify to the trust bundle for the usage named, or the leaf does
    /// not allow that usage.
    #[error("chain does not verify to the trust bundle for {usage}: {error}")]
    Chain {
        /// serverAuth or clientAuth.
        usage: &'static str,
        /// webpki's reason.
        error: String,
    },
}

impl Rejection {
    /// Every [`Rejection::reason`], for metrics created before any rejection.
    /// (The list lives with the metrics, which register every label value up front.)
    pub const REASONS: [&'static str; 7] = crate::metrics::REJECTION_REASONS;

    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Unparseable(_) => "unparseable",
            Rejection::WrongKey => "wrong_key",
            Rejection::WrongSan { .. } => "wrong_san",
            Rejection::NotYetValid(_) => "not_yet_valid",
            Rejection::Expired(_) => "expired",
            Rejection::IsCa => "is_ca",
            Rejection::Chain { .. } => "chain",
        }
    }
}

/// Checks `chain` for `identity` and our `public_key_raw` against `roots` at time `now`.
pub fn validate(
    chain: &IssuedChain,
    public_key_raw: &[u8],
    identity: &SpiffeId,
    roots: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<LeafInfo, Rejection> {
    validate_anchored(chain, public_key_raw, identity, roots, now).map(|(leaf, _)| leaf)
}

/// [`validate`], also saying which of `roots` (its index) the chain verified to.
pub fn validate_anchored(
    chain: &IssuedChain,
    public_key_raw: &[u8],
    identity: &SpiffeId,
    roots: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(LeafInfo, usize), Rejection> {
    let (_, leaf) = X509Certificate::from_der(&chain.leaf)
        .map_err(|e| Rejection::Unparseable(e.to_string()))?;
    if leaf.public_key().subject_public_key.data.as_ref() != public_key_raw {
        return Err(Rejection::WrongKey);
    }
    let expected = identity.to_string();
    let uris: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(Rejection::Unparseable(e.to_string())),
    };
    if uris.len() != 1 || uris[0] != expected {
        return Err(Rejection::WrongSan {
            found: uris,
            expected,
        });
    }
    if leaf.is_ca() {
        return Err(Rejection::IsCa);
    }
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now_s = unix(now);
    if now_s < nb {
        return Err(Rejection::NotYetValid(nb));
    }
    if now_s > na {
        return Err(Rejection::Expired(na));
    }

    let (indexes, anchors): (Vec<usize>, Vec<_>) = roots
        .iter()
        .enumerate()
        .filter_map(|(i, r)| webpki::anchor_from_trusted_cert(r).ok().map(|a| (i, a)))
        .unzip();
    let ee = webpki::EndEntityCert::try_from(&chain.leaf)
        .map_err(|e| Rejection::Unparseable(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    // One chain verification (signatures, validity, name constraints) for clientAuth; the
    // serverAuth half of the usage check needs no second pass over the signatures.
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain.intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| Rejection::Chain {
            usage: "clientAuth",
            error: e.to_string(),
        })?;
    let used = path.anchor();
    let anchor = anchors
        .iter()
        .position(|a| {
            a.subject == used.subject && a.subject_public_key_info == used.subject_public_key_info
        })
        .map_or(0, |i| indexes[i]);
    // Same rule as webpki's: an EKU extension, when present, must allow the usage.
    if let Ok(Some(eku)) = leaf.extended_key_usage()
        && !eku.value.server_auth
        && !eku.value.any
    {
        return Err(Rejection::Chain {
            usage: "serverAuth",
            error: "the extended key usage does not include serverAuth".into(),
        });
    }
    Ok((
        LeafInfo {
            serial: leaf
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: from_unix(nb),
            not_after: from_unix(na),
        },
        anchor,
    ))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_unix(s: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let all = [
            Rejection::Unparseable(String::new()),
            Rejection::WrongKey,
            Rejection::WrongSan {
                found: vec![],
                expected: String::new(),
            },
            Rejection::NotYetValid(0),
            Rejection::Expired(0),
            Rejection::IsCa,
            Rejection::Chain {
                usage: "serverAuth",
                error: String::new(),
            },
        ];
        let reasons: Vec<&str> = all.iter().map(Rejection::reason).collect();
        assert_eq!(reasons, Rejection::REASONS);
    }
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        root: CertificateDer<'static>,
    }

    fn new_ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = p.self_signed(&key).unwrap().der().clone();
        Ca {
            issuer: Issuer::new(p, key),
            root,
        }
    }

    fn id() -> SpiffeId {
        "spiffe://example.org/ns/a/sa/b".parse().unwrap()
    }

    /// A leaf for `key` from `ca`, bent by `edit`.
    fn leaf(ca: &Ca, key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> IssuedChain {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id().to_string().try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
        edit(&mut p);
        IssuedChain {
            leaf: p.signed_by(key, &ca.issuer).unwrap().der().clone(),
            intermediates: vec![],
            roots_hint: vec![],
        }
    }

    fn check(ca: &Ca, key: &KeyPair, chain: &IssuedChain) -> Result<LeafInfo, Rejection> {
        validate(
            chain,
            key.public_key_raw(),
            &id(),
            std::slice::from_ref(&ca.root),
            SystemTime::now(),
        )
    }

    #[test]
    fn accepts_a_good_svid() {
        let (ca, key) = (new_ca(), KeyPair::generate().unwrap());
        let info = check(&ca, &key, &leaf(&ca, &key, |_| {})).unwrap();
        assert!(!info.serial.is_empty());
        assert!(info.not_after > info.not_before);
    }

    #[test]
    fn rejects_every_kind_of_bad_answer() {
        let (ca, key) = (new_ca(), KeyPair::generate().unwrap());
        let other = KeyPair::generate().unwrap();
        let stranger = new_ca();
        let now = SystemTime::now();
        let cases: Vec<(IssuedChain, &str)> = vec![
            (leaf(&ca, &other, |_| {}), "wrong_key"),
            (
                leaf(&ca, &key, |p| {
                    p.subject_alt_names = vec![SanType::URI(
                        "spiffe://example.org/ns/a/sa/c".try_into().unwrap(),
                    )]
                }),
                "wrong_san",
            ),
            (
                leaf(&ca, &key, |p| {
                    p.subject_alt_names
                        .push(SanType::URI("spiffe://example.org/x".try_into().unwrap()))
                }),
                "wrong_san",
            ),
            (
                leaf(&ca, &key, |p| {
                    p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())]
                }),
                "wrong_san",
            ),
            (
                leaf(&ca, &key, |p| {
                    p.not_before = (now + Duration::from_secs(600)).into()
                }),
                "not_yet_valid",
            ),
            (
                leaf(&ca, &key, |p| {
                    p.not_after = (now - Duration::from_secs(10)).into()
                }),
                "expired",
            ),
            (
                leaf(&ca, &key, |p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
                }),
                "is_ca",
            ),
            (leaf(&stranger, &key, |_| {}), "chain"),
            (
                leaf(&ca, &key, |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
                }),
                "chain",
            ),
            (
                IssuedChain {
                    leaf: CertificateDer::from(vec![0x30, 0x00]),
                    intermediates: vec![],
                    roots_hint: vec![],
                },
                "unparseable",
            ),
        ];
        for (chain, reason) in cases {
            let err = check(&ca, &key, &chain).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
    }
}
