//! The backend registry: which backends exist, and the seam through which the agent reads,
//! checks and builds the one the user picked.
//!
//! Each backend owns its settings in its own `settings` module: a clap [`clap::Args`] struct
//! of its flags (the same struct, through serde, holds its config-file keys), the validation
//! that turns flags and file into its resolved, serializable settings, and the construction
//! of its [`CertificateAuthority`]. This module lists the backends once, in
//! [`ca_backends!`], and generates from that list everything the agent dispatches on:
//! [`CaArgs`] (every backend's flags, flattened into the agent's `run`), [`CaConfig`] (the
//! resolved choice), the `--ca` names, and which backends this build has.
//!
//! The settings of every backend are compiled whatever the cargo features, so that a flag,
//! its checks and its error texts never depend on the build; only building the CA needs the
//! backend's feature, and without it [`CaConfig::build`] says so.
//!
//! Nothing here reads a file, the environment or the network by itself: the agent passes the
//! config file's parser ([`FileSource`]) and the environment ([`ResolveContext`]) in.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{CaError, CertificateAuthority, TrustDomain};

/// A setting that cannot be used, with the setting at fault named the way the agent names
/// all its settings: flag, environment variable and file key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// A setting has a value that cannot be used.
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        /// The setting, as `--flag (SDS_AGENT_FLAG, file key flag)`.
        setting: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two settings that only make sense together, or never together, or one that is
    /// required and missing.
    #[error("{0}")]
    Conflict(String),
}

/// Why a backend could not be built from settings that passed validation: a file it names
/// is unreadable or malformed, or the backend is not in this build.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A file named by a flag could not be read.
    #[error("cannot read {flag} {}", path.display())]
    ReadFile {
        /// The flag, `--vault-trust-bundle`.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A value the backend refused, with what it came from (`--ca-addr host:1`).
    #[error("{context}")]
    Invalid {
        /// The flag and value at fault.
        context: String,
        /// The backend's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The settings say something the backend cannot do.
    #[error("{0}")]
    Unusable(String),
    /// The backend's constructor failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The backend's own configuration error.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The backend's cargo feature was off when this binary was built.
    #[error("this sds-agent was built without the {0} feature")]
    NotBuiltIn(&'static str),
}

/// What resolving a backend's settings may look at besides its own flags and file keys.
pub struct ResolveContext<'a> {
    /// The workload's Kubernetes namespace (`--namespace`).
    pub namespace: &'a str,
    /// Whether the agent runs in node mode (`--mode node`), serving every pod of its node:
    /// a backend refuses here the settings that name one workload's resources.
    pub node_mode: bool,
    /// The process environment, for the fallbacks clap does not read (`VAULT_ADDR`, ...);
    /// a function so that tests never set variables.
    pub std_env: &'a dyn Fn(&str) -> Option<String>,
}

impl fmt::Debug for ResolveContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveContext")
            .field("namespace", &self.namespace)
            .field("node_mode", &self.node_mode)
            .finish_non_exhaustive()
    }
}

/// What building a backend may look at besides its settings.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The trust domain of the identities served.
    pub trust_domain: &'a TrustDomain,
    /// Whether the agent runs in node mode, signing for every pod on its node with its own
    /// credentials. A backend that must tell the CA whom it signs for (istiod's
    /// `ImpersonatedIdentity`) reads it; the others ignore it.
    pub node_mode: bool,
}

/// A backend's flags: a clap `Args` struct that is also, through serde, its config-file
/// keys (the same names, kebab-case). Precedence is flag > environment (clap reads both
/// into `self`) > file > default.
pub trait Backend: clap::Args + Default + DeserializeOwned {
    /// The settings once resolved: what `validate` prints, and what the CA is built from.
    type Settings: BackendSettings;

    /// Merges the flags (`self`) with the config file's keys (`file`) and the defaults, and
    /// validates the result.
    fn resolve(
        &self,
        file: &Self,
        ctx: &ResolveContext<'_>,
    ) -> Result<Self::Settings, SettingsError>;
}

/// A backend's resolved settings.
pub trait BackendSettings:
    fmt::Debug + Clone + PartialEq + Eq + Serialize + Send + Sync + 'static
{
    /// The longest one signature may take with these settings, when that is longer than
    /// the secret manager's own limit (a backend that waits for an approver, ...).
    fn call_timeout(&self) -> Option<Duration> {
        None
    }
}

/// How the agent's config file is read into one backend's keys: the agent owns the file
/// and its format, a backend owns its keys.
pub trait FileSource {
    /// The parser's error.
    type Error;

    /// The file's keys that `T` knows; the others are ignored (the agent refuses keys
    /// nobody knows).
    fn read<T: DeserializeOwned>(&self) -> Result<T, Self::Error>;
}

/// The one list of backends. Each line is `Variant("name", module::settings::Args)`: the
/// `--ca` name (which is also the backend's cargo feature and its `backend` tag in
/// `validate`'s output), and the module whose `settings` holds its `Args` struct. The order
/// is the order of `--ca`'s list, of `version`, and of the flags in `run --help`.
macro_rules! ca_backends {
    ($( $(#[$doc:meta])* $variant:ident($name:literal, $module:ident::settings::$args:ident) ),+ $(,)?) => {
        /// Every backend's flags, flattened into the agent's `run`.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct CaArgs {
            $(
                #[allow(missing_docs)]
                #[command(flatten)]
                pub $module: crate::$module::settings::$args,
            )+
        }

        /// Which CA signs, and its settings.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(tag = "backend")]
        pub enum CaConfig {
            $(
                $(#[$doc])*
                #[serde(rename = $name)]
                $variant(Box<<crate::$module::settings::$args as Backend>::Settings>),
            )+
        }

        /// Every backend `--ca` accepts, in its order, built in or not.
        pub const NAMES: &[&str] = &[$($name),+];

        /// The backends this build has (their cargo features were on).
        pub const BUILT_IN: &[&str] = &[$(#[cfg(feature = $name)] $name),+];

        impl CaArgs {
            /// Reads every backend's keys from the config file. On failure, every error
            /// found (one per backend at most), for the caller to report the first.
            pub fn from_file<S: FileSource>(file: &S) -> Result<Self, Vec<S::Error>> {
                let mut errors = Vec::new();
                let args = Self {
                    $(
                        $module: file.read().unwrap_or_else(|e| {
                            errors.push(e);
                            Default::default()
                        }),
                    )+
                };
                if errors.is_empty() { Ok(args) } else { Err(errors) }
            }

            /// Resolves the settings of the backend named `name` (the value of `--ca`),
            /// from the flags (`self`) and the file's keys (`file`).
            pub fn resolve(
                &self,
                name: &str,
                file: &Self,
                ctx: &ResolveContext<'_>,
            ) -> Result<CaConfig, SettingsError> {
                match name {
                    $(
                        $name => Ok(CaConfig::$variant(Box::new(
                            self.$module.resolve(&file.$module, ctx)?,
                        ))),
                    )+
                    _ => Err(invalid("ca", name, format!("the backends are: {}", NAMES.join(", ")))),
                }
            }
        }

        impl CaConfig {
            /// The `--ca` name of this backend.
            pub fn name(&self) -> &'static str {
                match self {
                    $(CaConfig::$variant(_) => $name,)+
                }
            }

            /// The longest one signature may take, when the backend needs longer than the
            /// secret manager's own limit.
            pub fn call_timeout(&self) -> Option<Duration> {
                match self {
                    $(CaConfig::$variant(settings) => settings.call_timeout(),)+
                }
            }

            /// Builds the backend. Contacts no CA: a CA that is down at start-up is retried
            /// like any outage. Fails when a file it names cannot be used, or when this build
            /// does not have the backend.
            pub fn build(
                &self,
                ctx: &BuildContext<'_>,
            ) -> Result<Arc<dyn CertificateAuthority>, BuildError> {
                match self {
                    $(
                        #[cfg(feature = $name)]
                        CaConfig::$variant(settings) => settings.build(ctx),
                        #[cfg(not(feature = $name))]
                        CaConfig::$variant(_) => {
                            let _ = ctx;
                            Err(BuildError::NotBuiltIn($name))
                        }
                    )+
                }
            }
        }
    };
}

// THE backend enum. Adding a backend is one line here, plus its own folder (its `settings`
// module with its `Args`, `Settings` and `build`) and its docs page; everything the agent
// dispatches on is generated from this list.
ca_backends! {
    /// The in-process CA.
    Embedded("embedded", embedded::settings::EmbeddedArgs),
    /// The Istio CA API: istiod or cert-manager istio-csr.
    Istiod("istiod", istiod::settings::IstiodArgs),
    /// Vault's (or OpenBao's) PKI secrets engine.
    Vault("vault", vault::settings::VaultArgs),
    /// AWS Private CA.
    AcmPca("acm-pca", acm_pca::settings::AcmPcaArgs),
    /// cert-manager CertificateRequests.
    CertManager("cert-manager", cert_manager::settings::CertManagerArgs),
}

/// `--flag (SDS_AGENT_FLAG, file key flag)`: how every error names a setting.
pub fn setting_name(flag: &str) -> String {
    let var = format!("SDS_AGENT_{}", flag.to_uppercase().replace('-', "_"));
    format!("--{flag} ({var}, file key {flag})")
}

/// The error for a setting `flag` whose `value` cannot be used.
pub fn invalid(flag: &str, value: &str, reason: impl fmt::Display) -> SettingsError {
    SettingsError::Invalid {
        setting: setting_name(flag),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// The flag's value, else the file's.
pub(crate) fn pick<T: Clone>(flag: &Option<T>, file: &Option<T>) -> Option<T> {
    flag.clone().or_else(|| file.clone())
}

/// A positive duration (`10s`) for `flag`, or `default` when unset.
pub(crate) fn positive_duration(
    flag: &str,
    raw: Option<String>,
    default: Duration,
) -> Result<Duration, SettingsError> {
    match raw {
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(flag, &v, "expected a duration, e.g. 10s")),
        None => Ok(default),
    }
}

/// Whether `s` is an `http://` or `https://` URL with a host.
pub(crate) fn is_http_url(s: &str) -> bool {
    matches!(url::Url::parse(s), Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

/// Serializes a duration as people write it (`1m 30s`).
pub fn humanized<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Reads a PEM bundle of pinned roots named by `flag`.
#[cfg(any(
    feature = "vault",
    feature = "acm-pca",
    feature = "istiod",
    feature = "cert-manager"
))]
pub(crate) fn read_pinned_roots(
    flag: &'static str,
    path: &std::path::Path,
) -> Result<crate::TrustBundle, BuildError> {
    let pem = std::fs::read(path).map_err(|source| BuildError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let roots = crate::pem::decode_certificates(&pem).map_err(|e| BuildError::Invalid {
        context: format!("{flag} {}", path.display()),
        source: Box::new(e),
    })?;
    crate::TrustBundle::new(roots).map_err(|e| BuildError::Backend(Box::new(e)))
}

/// A secret setting: kept, but never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(zeroize::Zeroizing<String>);

impl Redacted {
    /// Keeps `secret`.
    pub fn new(secret: String) -> Self {
        Self(zeroize::Zeroizing::new(secret))
    }

    /// The secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_is_named_once_and_built_in_ones_are_among_them() {
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), NAMES.len(), "{NAMES:?}");
        assert!(BUILT_IN.iter().all(|b| NAMES.contains(b)), "{BUILT_IN:?}");
        assert_eq!(NAMES[0], "embedded", "the default comes first");
    }

    #[test]
    fn an_unknown_backend_lists_the_known_ones() {
        let ctx = ResolveContext {
            namespace: "default",
            node_mode: false,
            std_env: &|_| None,
        };
        let args = CaArgs::default();
        let err = args.resolve("acme", &args, &ctx).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --ca (SDS_AGENT_CA, file key ca) \"acme\": the backends are: embedded, \
             istiod, vault, acm-pca, cert-manager"
        );
        // Names are exact, as `--ca` always took them.
        assert!(args.resolve("Vault", &args, &ctx).is_err());
    }

    #[test]
    fn names_match_the_tag_validate_prints() {
        let ctx = ResolveContext {
            namespace: "default",
            node_mode: false,
            std_env: &|_| None,
        };
        let args = CaArgs::default();
        let config = args.resolve("embedded", &args, &ctx).unwrap();
        assert_eq!(config.name(), "embedded");
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["backend"], "embedded");
        assert_eq!(config.call_timeout(), None);
    }

    #[test]
    fn secrets_are_never_printed() {
        let r = Redacted::new("hvs.secret".into());
        assert_eq!(format!("{r:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"<redacted>\"");
        assert_eq!(r.expose(), "hvs.secret");
    }
}
