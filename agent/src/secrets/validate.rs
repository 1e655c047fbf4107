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
    /// The chain does not verify to the trust bundle for the usage named.
    #[error("chain does not verify to the trust bundle for {usage}: {error}")]
    Chain {
        /// serverAuth or clientAuth.
        usage: &'static str,
        /// webpki's reason.
        error: String,
    },
}

impl Rejection {
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

    let anchors = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect::<Vec<_>>();
    let ee = webpki::EndEntityCert::try_from(&chain.leaf)
        .map_err(|e| Rejection::Unparseable(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    for (usage, ku) in [
        ("serverAuth", webpki::KeyUsage::server_auth()),
        ("clientAuth", webpki::KeyUsage::client_auth()),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain.intermediates,
            time,
            ku,
            None,
            None,
        )
        .map_err(|e| Rejection::Chain {
            usage,
            error: e.to_string(),
        })?;
    }
    Ok(LeafInfo {
        serial: leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: from_unix(nb),
        not_after: from_unix(na),
    })
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_unix(s: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0))
}
