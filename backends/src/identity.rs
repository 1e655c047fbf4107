//! Workload identity types: [`TrustDomain`], [`SpiffeId`] and the [`KeyType`] of the key
//! that carries it.
//!
//! These are parsed, never validated after the fact: once a value exists it is valid per the
//! SPIFFE ID specification (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//! Both the CA backends and the agent depend on them; nothing here does I/O.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the specification allows (URI SAN length limit, in bytes).
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name (a DNS name's limit).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a trust domain, path segment or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain holds a character outside `[a-z0-9.-_]`.
    #[error(
        "trust domain {0:?} may only hold lowercase letters, digits, '.', '-' and '_' (SPIFFE ID spec 2.1)"
    )]
    BadTrustDomainChar(String),
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// A path segment (namespace, service account) is empty.
    #[error("{what} is empty")]
    EmptySegment {
        /// Which part: "namespace", "service account", "path segment".
        what: &'static str,
    },
    /// A path segment is `.` or `..`.
    #[error("{what} {value:?} is a relative path segment, which SPIFFE IDs forbid")]
    DotSegment {
        /// Which part.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// A path segment holds a character outside `[A-Za-z0-9.-_]`.
    #[error(
        "{what} {value:?} may only hold letters, digits, '.', '-' and '_' (SPIFFE ID spec 2.2)"
    )]
    BadSegmentChar {
        /// Which part.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// The string is not of the form `spiffe://<trust-domain>/<path>`.
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/<path>")]
    NotSpiffeUri(String),
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
}

/// A SPIFFE trust domain, such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID with a non-empty path: `spiffe://<trust-domain>/<segment>/...`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// The path, starting with `/`.
    path: String,
}

/// The kind of private key generated for a workload certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: the default, and what istio-agent and SPIRE use.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
    /// RSA 3072.
    Rsa3072,
    /// RSA 4096.
    Rsa4096,
}

/// An unknown key type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown key type {0:?}: expected one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096"
)]
pub struct UnknownKeyType(pub String);

impl TrustDomain {
    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdentityError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TrustDomainTooLong);
        }
        let ok = s
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'));
        if !ok {
            return Err(IdentityError::BadTrustDomainChar(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl SpiffeId {
    /// The Kubernetes-style workload ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`
    /// that Istio and SPIRE's k8s workload registrar use.
    pub fn for_service_account(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        let id = Self {
            trust_domain,
            path: format!("/ns/{namespace}/sa/{service_account}"),
        };
        id.check_len()?;
        Ok(id)
    }

    /// The trust domain of this ID.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path of this ID, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check_len(&self) -> Result<(), IdentityError> {
        // "spiffe://" + td + path
        if 9 + self.trust_domain.0.len() + self.path.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        Ok(())
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let not_spiffe = || IdentityError::NotSpiffeUri(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(not_spiffe)?;
        let (td, path) = rest
            .find('/')
            .map(|i| rest.split_at(i))
            .ok_or_else(not_spiffe)?;
        let trust_domain: TrustDomain = td.parse()?;
        // `path` starts with '/'; every segment after it must be valid (this also rejects a
        // trailing slash, query, fragment, port and userinfo).
        for segment in path[1..].split('/') {
            check_segment("path segment", segment)?;
        }
        let id = Self {
            trust_domain,
            path: path.to_owned(),
        };
        id.check_len()?;
        Ok(id)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain.0, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl KeyType {
    /// Every key type, in the order `--help` lists them.
    pub const ALL: [KeyType; 5] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name used on the command line and in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA key (RSA leaves also carry keyEncipherment).
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }
}

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKeyType(s.to_owned()))
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn check_segment(what: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::EmptySegment { what });
    }
    if value == "." || value == ".." {
        return Err(IdentityError::DotSegment {
            what,
            value: value.to_owned(),
        });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(IdentityError::BadSegmentChar {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    #[test]
    fn builds_kubernetes_style_ids() {
        let id = SpiffeId::for_service_account(td("cluster.local"), "default", "frontend").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/frontend"
        );
        assert_eq!(id, id.to_string().parse().unwrap());
    }

    #[test]
    fn rejects_bad_trust_domains() {
        for bad in [
            "",
            "Cluster.local",
            "cluster local",
            "a/b",
            "a:8080",
            "ü.example",
        ] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "x".repeat(256).parse::<TrustDomain>(),
            Err(IdentityError::TrustDomainTooLong)
        );
        assert!("x".repeat(255).parse::<TrustDomain>().is_ok());
    }

    #[test]
    fn rejects_bad_segments() {
        let t = td("example.org");
        for (ns, sa) in [
            ("", "a"),
            ("a", ""),
            (".", "a"),
            ("a", ".."),
            ("a b", "a"),
            ("a", "a/b"),
            ("a", "ä"),
        ] {
            assert!(
                SpiffeId::for_service_account(t.clone(), ns, sa).is_err(),
                "{ns:?}/{sa:?} accepted"
            );
        }
        // Uppercase is allowed in paths, unlike in trust domains.
        assert!(SpiffeId::for_service_account(t, "Prod", "Web_1.v-2").is_ok());
    }

    #[test]
    fn parses_and_rejects_uris() {
        assert!("spiffe://td/a/b".parse::<SpiffeId>().is_ok());
        for bad in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/a/",
            "spiffe://td//a",
            "spiffe://td/a?x=1",
            "spiffe://td/a#f",
            "spiffe://u@td/a",
            "spiffe://td:80/a",
            "https://td/a",
            "SPIFFE://td/a",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(long.parse::<SpiffeId>(), Err(IdentityError::TooLong));
    }

    #[test]
    fn key_types_round_trip() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
        }
        let err = "ed25519".parse::<KeyType>().unwrap_err();
        assert!(err.to_string().contains("ecdsa-p256"));
    }
}
