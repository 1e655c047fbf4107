//! The `cert-manager.io/v1` `CertificateRequest` resource, written out by hand: only the
//! fields this backend sets or reads, with cert-manager's JSON names. Unknown fields in
//! answers are ignored, so newer cert-manager versions parse too.
//!
//! (kube's `CustomResource` derive would generate this, but it pulls in a JSON-schema
//! generator for a CRD the agent never installs.)

use std::borrow::Cow;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// API group of cert-manager's resources.
pub const GROUP: &str = "cert-manager.io";
/// The served version.
pub const VERSION: &str = "v1";
/// The kind.
pub const KIND: &str = "CertificateRequest";
/// The resource name in URLs and RBAC rules.
pub const PLURAL: &str = "certificaterequests";

/// A `CertificateRequest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    /// Always `cert-manager.io/v1`.
    pub api_version: String,
    /// Always `CertificateRequest`.
    pub kind: String,
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// What is asked for.
    pub spec: CertificateRequestSpec,
    /// What cert-manager made of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CertificateRequestStatus>,
}

/// `spec` of a `CertificateRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestSpec {
    /// The PEM CSR (base64 in JSON, as Go's `[]byte`).
    pub request: ByteString,
    /// The issuer that should sign.
    pub issuer_ref: IssuerRef,
    /// Lifetime asked for, as a Go duration (`86400s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Whether a CA certificate is asked for.
    #[serde(default, rename = "isCA")]
    pub is_ca: bool,
    /// Key usages asked for, in cert-manager's spelling (`digital signature`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usages: Vec<String>,
    /// Set by cert-manager's webhook: the user that created the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

/// `spec.issuerRef`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the Issuer or ClusterIssuer.
    pub name: String,
    /// `Issuer` or `ClusterIssuer` (or an external issuer's kind).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// `cert-manager.io`, or an external issuer's group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

/// `status` of a `CertificateRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestStatus {
    /// `Approved`, `Denied`, `Ready`, `InvalidRequest`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The signed certificate, PEM, possibly followed by its chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<ByteString>,
    /// The issuer's CA certificate, PEM, when the issuer knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<ByteString>,
    /// When the request failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_time: Option<String>,
}

/// One entry of `status.conditions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Approved`, `Denied`, `Ready`, `InvalidRequest`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason: `Issued`, `Pending`, `Failed`, `Denied`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl CertificateRequestStatus {
    /// The condition of this type whose status is `True`, if any.
    pub fn true_condition(&self, type_: &str) -> Option<&Condition> {
        self.condition(type_).filter(|c| c.status == "True")
    }

    /// The condition of this type, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

impl kube::Resource for CertificateRequest {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
