//! The cert-manager backend's settings: its flags and config-file keys (the pod's name and
//! UID among them, for the requests' ownerReference), their checks, and building the
//! backend from them. Compiled whatever the cargo features; building needs `cert-manager`.
//!
//! In node mode each pod's CertificateRequest goes in that pod's namespace, so the settings
//! that name one namespace or one pod (`--cert-manager-namespace`, `--pod-name`,
//! `--pod-uid`) are refused there.
//!
//! Resolving reads no kubeconfig and calls no API server; building reads the kubeconfig.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{
    Backend, BackendSettings, ResolveContext, SettingsError, humanized, invalid, pick, setting_name,
};

const DEFAULT_GROUP: &str = "cert-manager.io";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer than one request's own limit the secret manager waits for it.
const MANAGER_MARGIN: Duration = Duration::from_secs(15);

/// Flags of the cert-manager backend.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[command(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub struct CertManagerArgs {
    /// cert-manager: namespace the CertificateRequests are created in (not with --mode
    /// node, where each pod's goes in its own namespace). [default: --namespace, the pod's]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_NAMESPACE", value_name = "NS")]
    pub cert_manager_namespace: Option<String>,
    /// cert-manager: name of the Issuer or ClusterIssuer that signs (required with
    /// --ca cert-manager).
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_ISSUER_NAME", value_name = "NAME")]
    pub cert_manager_issuer_name: Option<String>,
    /// cert-manager: kind of the issuer: Issuer or ClusterIssuer (any kind for an external
    /// issuer's group). [default: Issuer]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_ISSUER_KIND", value_name = "KIND")]
    pub cert_manager_issuer_kind: Option<String>,
    /// cert-manager: API group of the issuer. [default: cert-manager.io]
    #[arg(
        long,
        env = "SDS_AGENT_CERT_MANAGER_ISSUER_GROUP",
        value_name = "GROUP"
    )]
    pub cert_manager_issuer_group: Option<String>,
    /// cert-manager: longest wait for a CertificateRequest to be approved and issued.
    /// [default: 60s]
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_TIMEOUT", value_name = "DURATION")]
    pub cert_manager_timeout: Option<String>,
    /// cert-manager: keep the last CertificateRequest instead of deleting it once read.
    /// [default: false]
    #[arg(
        long,
        env = "SDS_AGENT_CERT_MANAGER_KEEP_REQUESTS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub cert_manager_keep_requests: Option<bool>,
    /// cert-manager: pin the trust bundle to these PEM roots, for issuers that leave
    /// status.ca empty (ACME, some external issuers).
    #[arg(long, env = "SDS_AGENT_CERT_MANAGER_TRUST_BUNDLE", value_name = "PEM")]
    pub cert_manager_trust_bundle: Option<PathBuf>,
    /// cert-manager: kubeconfig to use instead of the pod's service account.
    #[arg(long, env = "SDS_AGENT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of the pod served (Downward API metadata.name): with --pod-uid, requests are
    /// owned by the pod, so Kubernetes deletes them with it.
    #[arg(long, env = "SDS_AGENT_POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,
    /// UID of the pod served (Downward API metadata.uid).
    #[arg(long, env = "SDS_AGENT_POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,
}

/// Settings of the cert-manager backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CertManagerSettings {
    /// Namespace of the requests. Empty (and not printed) in node mode: see
    /// `per_pod_namespace`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Node mode: each pod's request goes in that pod's namespace, the `ns/<namespace>` of
    /// its SPIFFE ID. Printed only when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub per_pod_namespace: bool,
    /// Issuer name.
    pub issuer_name: String,
    /// Issuer kind.
    pub issuer_kind: String,
    /// Issuer group.
    pub issuer_group: String,
    /// Longest wait for a verdict.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
    /// Keep the last request.
    pub keep_requests: bool,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Kubeconfig instead of in-cluster credentials.
    pub kubeconfig: Option<PathBuf>,
    /// The pod's name, for the ownerReference.
    pub pod_name: Option<String>,
    /// The pod's UID.
    pub pod_uid: Option<String>,
}

impl Backend for CertManagerArgs {
    type Settings = CertManagerSettings;

    /// The requests' namespace defaults to the pod's (`ctx.namespace`); in node mode it is
    /// each pod's own, and naming one is refused.
    fn resolve(
        &self,
        file: &Self,
        ctx: &ResolveContext<'_>,
    ) -> Result<CertManagerSettings, SettingsError> {
        let given_namespace = pick(&self.cert_manager_namespace, &file.cert_manager_namespace);
        if ctx.node_mode && given_namespace.is_some() {
            return Err(SettingsError::Conflict(format!(
                "{} puts every CertificateRequest in one namespace; it cannot be used with \
                 --mode node, where each pod's request goes in that pod's own namespace (the \
                 agent needs a ClusterRole for certificaterequests: docs/backends/cert-manager.md)",
                setting_name("cert-manager-namespace")
            )));
        }
        let namespace = match given_namespace {
            Some(namespace) => namespace,
            None if ctx.node_mode => String::new(),
            None => ctx.namespace.to_owned(),
        };
        if !ctx.node_mode && !is_dns_label(&namespace) {
            return Err(invalid(
                "cert-manager-namespace",
                &namespace,
                "expected a Kubernetes namespace name (lowercase letters, digits and '-')",
            ));
        }
        let issuer_name = pick(&self.cert_manager_issuer_name, &file.cert_manager_issuer_name)
            .ok_or_else(|| {
                SettingsError::Conflict(
                    "--ca cert-manager needs --cert-manager-issuer-name                      (SDS_AGENT_CERT_MANAGER_ISSUER_NAME, file key cert-manager-issuer-name): the                      Issuer or ClusterIssuer that signs"
                        .into(),
                )
            })?;
        if !is_dns_subdomain(&issuer_name) {
            return Err(invalid(
                "cert-manager-issuer-name",
                &issuer_name,
                "expected a Kubernetes object name (lowercase letters, digits, '-' and '.')",
            ));
        }
        let issuer_group = pick(
            &self.cert_manager_issuer_group,
            &file.cert_manager_issuer_group,
        )
        .unwrap_or_else(|| DEFAULT_GROUP.into());
        if !is_dns_subdomain(&issuer_group) {
            return Err(invalid(
                "cert-manager-issuer-group",
                &issuer_group,
                "expected an API group, e.g. cert-manager.io or awspca.cert-manager.io",
            ));
        }
        let issuer_kind = pick(
            &self.cert_manager_issuer_kind,
            &file.cert_manager_issuer_kind,
        )
        .unwrap_or_else(|| "Issuer".into());
        let kind_ok = if issuer_group == DEFAULT_GROUP {
            matches!(issuer_kind.as_str(), "Issuer" | "ClusterIssuer")
        } else {
            issuer_kind.starts_with(|c: char| c.is_ascii_uppercase())
                && issuer_kind.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if !kind_ok {
            return Err(invalid(
                "cert-manager-issuer-kind",
                &issuer_kind,
                "expected Issuer or ClusterIssuer (an external issuer's own kind, e.g.                  AWSPCAClusterIssuer, goes with its --cert-manager-issuer-group)",
            ));
        }
        let timeout = match pick(&self.cert_manager_timeout, &file.cert_manager_timeout) {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| {
                    invalid(
                        "cert-manager-timeout",
                        &v,
                        "expected a duration of at least 1s, e.g. 60s",
                    )
                })?,
            None => DEFAULT_TIMEOUT,
        };
        let pod_name = pick(&self.pod_name, &file.pod_name);
        let pod_uid = pick(&self.pod_uid, &file.pod_uid);
        if pod_name.is_some() != pod_uid.is_some() {
            return Err(SettingsError::Conflict(
                "--pod-name and --pod-uid go together (both from the Downward API:                  metadata.name and metadata.uid): give both or neither"
                    .into(),
            ));
        }
        if let Some(uid) = &pod_uid
            && (uid.is_empty()
                || uid.len() > 63
                || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(invalid(
                "pod-uid",
                uid,
                "expected a UID, e.g. 0d3c2b1a-...-6666",
            ));
        }
        if let Some(name) = &pod_name
            && !is_dns_subdomain(name)
        {
            return Err(invalid("pod-name", name, "expected a pod name"));
        }
        if ctx.node_mode && pod_name.is_some() {
            // They would name the agent's own pod, in the agent's namespace: an
            // ownerReference from a request in another namespace is invalid, and the garbage
            // collector deletes such a dependent, while it is still being waited on.
            return Err(SettingsError::Conflict(format!(
                "{} and {} make one pod the owner of the CertificateRequests; they cannot be \
                 used with --mode node, where the requests go in each pod's own namespace and \
                 an owner in the agent's namespace would have the garbage collector delete them",
                setting_name("pod-name"),
                setting_name("pod-uid")
            )));
        }
        Ok(CertManagerSettings {
            namespace,
            per_pod_namespace: ctx.node_mode,
            issuer_name,
            issuer_kind,
            issuer_group,
            timeout,
            keep_requests: pick(
                &self.cert_manager_keep_requests,
                &file.cert_manager_keep_requests,
            )
            .unwrap_or(false),
            trust_bundle: pick(
                &self.cert_manager_trust_bundle,
                &file.cert_manager_trust_bundle,
            ),
            kubeconfig: pick(&self.kubeconfig, &file.kubeconfig),
            pod_name,
            pod_uid,
        })
    }
}

impl BackendSettings for CertManagerSettings {
    /// A request waits for an approver and an issuer: the secret manager waits a little
    /// longer than the backend's own limit.
    fn call_timeout(&self) -> Option<Duration> {
        Some(self.timeout + MANAGER_MARGIN)
    }
}

/// An RFC 1123 label: what a namespace name must be.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain: what most object names and API groups must be.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(feature = "cert-manager")]
impl CertManagerSettings {
    /// The cert-manager backend. Reads the kubeconfig (or checks for in-cluster
    /// credentials) now, so a missing file stops the agent at start-up; the API server is
    /// first called at the first signature, and an API server that is down is retried like
    /// any outage.
    pub fn build(
        &self,
        _ctx: &crate::settings::BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn crate::CertificateAuthority>, crate::settings::BuildError> {
        use crate::cert_manager::{
            CertManagerCa, CertManagerConfig, Credentials, IssuerRef, PodRef,
        };
        use crate::settings::read_pinned_roots;

        let issuer = IssuerRef {
            name: self.issuer_name.clone(),
            kind: self.issuer_kind.clone(),
            group: self.issuer_group.clone(),
        };
        let mut config = if self.per_pod_namespace {
            CertManagerConfig::per_pod_namespace(issuer)
        } else {
            CertManagerConfig::new(self.namespace.clone(), issuer)
        };
        config.credentials = match &self.kubeconfig {
            Some(path) => Credentials::Kubeconfig(path.clone()),
            None => Credentials::InCluster,
        };
        config.timeout = self.timeout;
        config.keep_requests = self.keep_requests;
        config.pod = match (&self.pod_name, &self.pod_uid) {
            (Some(name), Some(uid)) => Some(PodRef {
                name: name.clone(),
                uid: uid.clone(),
            }),
            _ => None,
        };
        config.trust_bundle = self
            .trust_bundle
            .as_deref()
            .map(|p| read_pinned_roots("--cert-manager-trust-bundle", p))
            .transpose()?;
        let pinned = config.trust_bundle.is_some();
        let owned = config.pod.is_some();
        let ca = CertManagerCa::new(config)?;
        tracing::info!(
            namespace = if self.per_pod_namespace {
                "each pod's own"
            } else {
                self.namespace.as_str()
            },
            issuer = %format!("{}/{} ({})", self.issuer_kind, self.issuer_name, self.issuer_group),
            credentials = self
                .kubeconfig
                .as_deref()
                .map_or_else(|| "in-cluster".to_owned(), |p| p.display().to_string()),
            timeout = ?self.timeout,
            owned_by_pod = owned,
            trust_bundle = if pinned { "pinned" } else { "status.ca" },
            "cert-manager CA configured"
        );
        if !owned && !self.per_pod_namespace {
            tracing::warn!(
                "cert-manager: --pod-name/--pod-uid not given: CertificateRequests are not owned \
                 by the pod, so requests left by a pod that dies mid-issuance are not garbage-collected"
            );
        }
        Ok(std::sync::Arc::new(ca))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(namespace: &str) -> ResolveContext<'_> {
        ResolveContext {
            namespace,
            node_mode: false,
            std_env: &|_| None,
        }
    }

    /// What `--mode node` gives a backend: the agent's own namespace, and node mode.
    fn node_ctx() -> ResolveContext<'static> {
        ResolveContext {
            namespace: "sds-agent",
            node_mode: true,
            std_env: &|_| None,
        }
    }

    fn resolve(args: &CertManagerArgs) -> Result<CertManagerSettings, SettingsError> {
        args.resolve(&CertManagerArgs::default(), &ctx("default"))
    }

    #[test]
    fn cert_manager_defaults_follow_the_pod() {
        let args = CertManagerArgs {
            cert_manager_issuer_name: Some("mesh-ca".into()),
            ..Default::default()
        };
        let v = args
            .resolve(&CertManagerArgs::default(), &ctx("shop"))
            .unwrap();
        assert_eq!(v.namespace, "shop", "the pod's namespace");
        assert_eq!(
            (v.issuer_kind.as_str(), v.issuer_group.as_str()),
            ("Issuer", "cert-manager.io")
        );
        assert_eq!(v.timeout, Duration::from_secs(60));
        assert!(!v.keep_requests);
        assert_eq!(v.call_timeout(), Some(Duration::from_secs(75)));
        assert_eq!(
            (v.kubeconfig, v.pod_name, v.trust_bundle),
            (None, None, None)
        );
    }

    #[test]
    fn cert_manager_flags_win_over_the_file() {
        let file = CertManagerArgs {
            cert_manager_issuer_name: Some("pca".into()),
            cert_manager_keep_requests: Some(true),
            ..Default::default()
        };
        let v = CertManagerArgs::default()
            .resolve(&file, &ctx("default"))
            .unwrap();
        assert!(v.keep_requests);
        let flags = CertManagerArgs {
            cert_manager_keep_requests: Some(false),
            cert_manager_issuer_name: Some("other".into()),
            ..Default::default()
        };
        let v = flags.resolve(&file, &ctx("default")).unwrap();
        assert!(!v.keep_requests, "the flag wins");
        assert_eq!(v.issuer_name, "other");
    }

    #[test]
    fn cert_manager_settings_that_cannot_work_name_their_flag() {
        let base = || CertManagerArgs {
            cert_manager_issuer_name: Some("mesh-ca".into()),
            ..Default::default()
        };
        let cases = [
            (
                CertManagerArgs {
                    cert_manager_issuer_name: None,
                    ..base()
                },
                "needs --cert-manager-issuer-name",
            ),
            (
                CertManagerArgs {
                    cert_manager_issuer_kind: Some("AWSPCAIssuer".into()),
                    ..base()
                },
                "--cert-manager-issuer-kind",
            ),
            (
                CertManagerArgs {
                    cert_manager_issuer_name: Some("Mesh CA".into()),
                    ..base()
                },
                "--cert-manager-issuer-name",
            ),
            (
                CertManagerArgs {
                    cert_manager_namespace: Some("Team_A".into()),
                    ..base()
                },
                "--cert-manager-namespace",
            ),
            (
                CertManagerArgs {
                    cert_manager_timeout: Some("0s".into()),
                    ..base()
                },
                "--cert-manager-timeout",
            ),
            (
                CertManagerArgs {
                    pod_name: Some("web-0".into()),
                    ..base()
                },
                "--pod-name and --pod-uid go together",
            ),
            (
                CertManagerArgs {
                    pod_name: Some("web-0".into()),
                    pod_uid: Some("not a uid".into()),
                    ..base()
                },
                "--pod-uid",
            ),
        ];
        for (args, needle) in cases {
            let err = resolve(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn node_mode_puts_each_request_in_its_pods_namespace_and_says_so() {
        let args = CertManagerArgs {
            cert_manager_issuer_name: Some("mesh-ca".into()),
            cert_manager_issuer_kind: Some("ClusterIssuer".into()),
            ..Default::default()
        };
        let node = args
            .resolve(&CertManagerArgs::default(), &node_ctx())
            .unwrap();
        assert!(node.per_pod_namespace);
        assert_eq!(node.namespace, "", "not the agent's own namespace");
        let printed = serde_json::to_value(&node).unwrap();
        assert_eq!(printed["per-pod-namespace"], true, "{printed}");
        assert!(printed.get("namespace").is_none(), "{printed}");

        // Pod mode prints what it always printed.
        let pod = args
            .resolve(&CertManagerArgs::default(), &ctx("shop"))
            .unwrap();
        assert!(!pod.per_pod_namespace);
        let printed = serde_json::to_value(&pod).unwrap();
        assert_eq!(printed["namespace"], "shop", "{printed}");
        assert!(printed.get("per-pod-namespace").is_none(), "{printed}");
    }

    #[test]
    fn node_mode_refuses_a_namespace_or_a_pod_for_every_request() {
        let base = || CertManagerArgs {
            cert_manager_issuer_name: Some("mesh-ca".into()),
            ..Default::default()
        };
        let namespace = CertManagerArgs {
            cert_manager_namespace: Some("sds-agent".into()),
            ..Default::default()
        };
        let pod = CertManagerArgs {
            pod_name: Some("sds-agent-x7k2p".into()),
            pod_uid: Some("0d3c2b1a-1111-4222-8333-444455556666".into()),
            ..Default::default()
        };
        let flag_and_file = [
            // (flags, file)
            (
                CertManagerArgs {
                    cert_manager_namespace: namespace.cert_manager_namespace.clone(),
                    ..base()
                },
                CertManagerArgs::default(),
            ),
            (base(), namespace.clone()),
        ];
        for (flags, file) in flag_and_file {
            let err = flags.resolve(&file, &node_ctx()).unwrap_err();
            assert!(matches!(err, SettingsError::Conflict(_)), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(
                    "--cert-manager-namespace (SDS_AGENT_CERT_MANAGER_NAMESPACE, file key \
                     cert-manager-namespace) puts every CertificateRequest in one namespace; it \
                     cannot be used with --mode node"
                ),
                "{text}"
            );
            assert!(text.contains("each pod's request goes in that pod's own namespace"));
            // The same settings are fine in pod mode.
            assert_eq!(
                flags.resolve(&file, &ctx("shop")).unwrap().namespace,
                "sds-agent"
            );
        }
        for (flags, file) in [
            (
                CertManagerArgs {
                    pod_name: pod.pod_name.clone(),
                    pod_uid: pod.pod_uid.clone(),
                    ..base()
                },
                CertManagerArgs::default(),
            ),
            (base(), pod.clone()),
        ] {
            let text = flags.resolve(&file, &node_ctx()).unwrap_err().to_string();
            assert!(
                text.starts_with(
                    "--pod-name (SDS_AGENT_POD_NAME, file key pod-name) and --pod-uid"
                ),
                "{text}"
            );
            assert!(text.contains("cannot be used with --mode node"), "{text}");
            assert!(flags.resolve(&file, &ctx("shop")).is_ok());
        }
    }
}
