//! The identities this agent serves and the SDS resource names they are served under.
//!
//! A caller is served one workload identity, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: in
//! per-pod mode the agent's own, in node mode the one its pod was proven to run as. Its
//! certificate and key are served under the resource name `default`, or under the identity
//! itself (as the SPIRE agent does), and the trust bundle under `ROOTCA`. These are the names
//! istio-agent and SPIRE use, so existing Envoy bootstraps work unchanged.
//!
//! The bundles of the trust domains the agent trusts go by the SPIRE agent's names too: `ALL`
//! (the agent's domain and every federated one) and `spiffe://<trust-domain>` (one domain, the
//! agent's own or a federated one). Which federated domains exist is only known when a name is
//! served, so a trust domain name is parsed here and looked up by the SDS server.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

pub use sds_backends::{SpiffeId, TrustDomain};

/// Resource name of the workload certificate and key.
pub const DEFAULT_RESOURCE: &str = "default";
/// Resource name of the trust bundle.
pub const ROOTCA_RESOURCE: &str = "ROOTCA";
/// Resource name of every trusted domain's bundle (the agent's and the federated ones).
pub const ALL_RESOURCE: &str = "ALL";

/// A secret this agent can serve.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceName {
    /// `default`: a `tls_certificate`.
    Default,
    /// `ROOTCA`: a `validation_context` of the agent's trust domain.
    RootCa,
    /// `ALL`: a `validation_context` of the agent's trust domain and every federated one.
    All,
    /// The caller's own SPIFFE ID: the same `tls_certificate` as `default`, under the name
    /// the caller used.
    OwnId,
    /// `spiffe://<trust-domain>`: a `validation_context` of that domain alone, if the agent
    /// trusts it (its own, or a federated one).
    TrustDomain(TrustDomain),
}

/// Why a resource name is not served to a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Not a name this agent serves (per-pod mode: `NOT_FOUND`).
    #[error(transparent)]
    Unknown(#[from] UnknownResource),
    /// Another workload's identity, or (node mode) any name but the caller's own.
    #[error("not authorized for the requested identities: {0:?}")]
    NotAuthorized(String),
}

/// A resource name this agent does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown secret {0:?}: this agent serves \"default\" (the workload certificate), \"ROOTCA\" (its trust domain's bundle), \"ALL\" (every trusted domain's bundle) and \"spiffe://<trust-domain>\" for the domains it trusts"
)]
pub struct UnknownResource(pub String);

impl UnknownResource {
    /// The name, cut short: it comes from the client.
    pub fn of(name: &str) -> Self {
        Self(name.chars().take(128).collect())
    }
}

impl ResourceName {
    /// The name for logs and version strings; the caller's own ID is `spiffe-id` here.
    pub fn as_str(&self) -> Cow<'static, str> {
        match self {
            ResourceName::Default => Cow::Borrowed(DEFAULT_RESOURCE),
            ResourceName::RootCa => Cow::Borrowed(ROOTCA_RESOURCE),
            ResourceName::All => Cow::Borrowed(ALL_RESOURCE),
            ResourceName::OwnId => Cow::Borrowed("spiffe-id"),
            ResourceName::TrustDomain(td) => Cow::Owned(format!("spiffe://{td}")),
        }
    }

    /// The name on the wire for a caller served as `own`.
    pub fn wire_name(&self, own: &SpiffeId) -> Cow<'static, str> {
        match self {
            ResourceName::OwnId => Cow::Owned(own.to_string()),
            other => other.as_str(),
        }
    }

    /// The name `s` as asked by a caller served as `own`. A `spiffe://` name with a path is
    /// a workload's identity: only the caller's own is served, any other is refused. Bundle
    /// names (`ROOTCA`, `ALL`, `spiffe://<trust-domain>`) are served to every caller, since
    /// they are nobody's identity. `strict` (node mode) refuses every other name; otherwise
    /// other names are unknown.
    pub fn for_caller(s: &str, own: &SpiffeId, strict: bool) -> Result<Self, NameError> {
        match s.parse::<ResourceName>() {
            Ok(name) => Ok(name),
            Err(_) if s.parse::<SpiffeId>().is_ok_and(|id| id == *own) => Ok(ResourceName::OwnId),
            Err(unknown) if strict || s.starts_with("spiffe://") => {
                Err(NameError::NotAuthorized(unknown.0))
            }
            Err(unknown) => Err(NameError::Unknown(unknown)),
        }
    }
}

impl FromStr for ResourceName {
    type Err = UnknownResource;

    /// The names any caller may ask for: the fixed ones and `spiffe://<trust-domain>` with
    /// no path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            DEFAULT_RESOURCE => Ok(ResourceName::Default),
            ROOTCA_RESOURCE => Ok(ResourceName::RootCa),
            ALL_RESOURCE => Ok(ResourceName::All),
            other => other
                .strip_prefix("spiffe://")
                .and_then(|td| td.parse::<TrustDomain>().ok())
                .map(ResourceName::TrustDomain)
                .ok_or_else(|| UnknownResource::of(other)),
        }
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> SpiffeId {
        "spiffe://cluster.local/ns/web/sa/frontend"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_caller_gets_the_fixed_names_and_its_own_id_only() {
        for strict in [false, true] {
            assert_eq!(
                ResourceName::for_caller("default", &own(), strict),
                Ok(ResourceName::Default)
            );
            assert_eq!(
                ResourceName::for_caller("ROOTCA", &own(), strict),
                Ok(ResourceName::RootCa)
            );
            assert_eq!(
                ResourceName::for_caller(
                    "spiffe://cluster.local/ns/web/sa/frontend",
                    &own(),
                    strict
                ),
                Ok(ResourceName::OwnId)
            );
            for other in [
                "spiffe://cluster.local/ns/web/sa/backend",
                "spiffe://cluster.local/ns/web/sa/frontend/",
                "spiffe://other.domain/ns/web/sa/frontend",
                "spiffe://CLUSTER.local/ns/web/sa/frontend",
            ] {
                assert!(
                    matches!(
                        ResourceName::for_caller(other, &own(), strict),
                        Err(NameError::NotAuthorized(_))
                    ),
                    "{other}"
                );
            }
        }
        assert!(matches!(
            ResourceName::for_caller("rootca", &own(), false),
            Err(NameError::Unknown(_))
        ));
        assert!(matches!(
            ResourceName::for_caller("rootca", &own(), true),
            Err(NameError::NotAuthorized(_))
        ));
        assert_eq!(
            ResourceName::OwnId.wire_name(&own()),
            "spiffe://cluster.local/ns/web/sa/frontend"
        );
        assert_eq!(ResourceName::RootCa.wire_name(&own()), "ROOTCA");
    }

    #[test]
    fn bundle_names_are_served_to_every_caller_and_other_ids_are_not() {
        for strict in [false, true] {
            assert_eq!(
                ResourceName::for_caller("ALL", &own(), strict),
                Ok(ResourceName::All)
            );
            for td in ["cluster.local", "partner.example", "nobody.example"] {
                let name = format!("spiffe://{td}");
                let got = ResourceName::for_caller(&name, &own(), strict);
                assert_eq!(
                    got,
                    Ok(ResourceName::TrustDomain(
                        td.parse().unwrap_or_else(|e| panic!("{e}"))
                    )),
                    "{name} (strict: {strict})"
                );
                assert_eq!(
                    got.map(|n| n.wire_name(&own()).into_owned()),
                    Ok(name),
                    "the name on the wire is the name asked"
                );
            }
            // A path makes it a workload's identity; a bad domain is no trust domain.
            for refused in [
                "spiffe://partner.example/ns/web/sa/frontend",
                "spiffe://partner.example/",
                "spiffe://Partner.example",
                "spiffe://",
            ] {
                assert!(
                    matches!(
                        ResourceName::for_caller(refused, &own(), strict),
                        Err(NameError::NotAuthorized(_))
                    ),
                    "{refused} (strict: {strict})"
                );
            }
        }
        assert!(matches!(
            ResourceName::for_caller("all", &own(), false),
            Err(NameError::Unknown(_))
        ));
    }
}
