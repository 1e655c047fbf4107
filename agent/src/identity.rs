//! The identity this agent serves and the SDS resource names it is served under.
//!
//! One agent serves one workload identity, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, under
//! the resource name `default` (its certificate and key) and the trust bundle under `ROOTCA`.
//! These are the names istio-agent and SPIRE use, so existing Envoy bootstraps work unchanged.

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
}

/// A resource name this agent does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown secret {0:?}: this agent serves \"default\" (the workload certificate) and \"ROOTCA\" (the trust bundle)"
)]
pub struct UnknownResource(pub String);

impl ResourceName {
    /// Both names, in response order.
    pub const ALL: [ResourceName; 2] = [ResourceName::Default, ResourceName::RootCa];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceName::Default => DEFAULT_RESOURCE,
            ResourceName::RootCa => ROOTCA_RESOURCE,
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
