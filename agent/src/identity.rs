//! The identities this agent serves and the SDS resource names they are served under.
//!
//! A caller is served one workload identity, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: in
//! per-pod mode the agent's own, in node mode the one its pod was proven to run as. Its
//! certificate and key are served under the resource name `default`, or under the identity
//! itself (as the SPIRE agent does), and the trust bundle under `ROOTCA`. These are the names
//! istio-agent and SPIRE use, so existing Envoy bootstraps work unchanged.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

pub use sds_backends::{SpiffeId, TrustDomain};

/// Resource name of the workload certificate and key.
pub const DEFAULT_RESOURCE: &str = "default";
/// Resource name of the trust bundle.
pub const ROOTCA_RESOURCE: &str = "ROOTCA";

/// A secret this agent can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceName {
    /// `default`: a `tls_certificate`.
    Default,
    /// `ROOTCA`: a `validation_context`.
    RootCa,
    /// The caller's own SPIFFE ID: the same `tls_certificate` as `default`, under the name
    /// the caller used.
    OwnId,
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
    "unknown secret {0:?}: this agent serves \"default\" (the workload certificate) and \"ROOTCA\" (the trust bundle)"
)]
pub struct UnknownResource(pub String);

impl ResourceName {
    /// The fixed names, in response order.
    pub const ALL: [ResourceName; 2] = [ResourceName::Default, ResourceName::RootCa];

    /// The name for logs and version strings; the caller's own ID is `spiffe-id` here.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceName::Default => DEFAULT_RESOURCE,
            ResourceName::RootCa => ROOTCA_RESOURCE,
            ResourceName::OwnId => "spiffe-id",
        }
    }

    /// The name on the wire for a caller served as `own`.
    pub fn wire_name(self, own: &SpiffeId) -> Cow<'static, str> {
        match self {
            ResourceName::OwnId => Cow::Owned(own.to_string()),
            other => Cow::Borrowed(other.as_str()),
        }
    }

    /// The name `s` as asked by a caller served as `own`. `strict` (node mode) refuses every
    /// name that is not `default`, `ROOTCA` or `own`; otherwise only other SPIFFE IDs are
    /// refused, and other names are unknown.
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

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            DEFAULT_RESOURCE => Ok(ResourceName::Default),
            ROOTCA_RESOURCE => Ok(ResourceName::RootCa),
            // Keep the echoed name short: it comes from the client.
            other => Err(UnknownResource(other.chars().take(128).collect())),
        }
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
}
