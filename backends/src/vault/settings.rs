//! The Vault backend's settings: its flags and config-file keys, their checks (with the
//! usual `VAULT_*` variables as fallbacks), and building the backend from them. Compiled
//! whatever the cargo features; building needs `vault`.
//!
//! Resolving reads no file and calls no Vault; tokens are kept [`Redacted`].

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::settings::{
    Backend, BackendSettings, Redacted, ResolveContext, SettingsError, humanized, invalid,
    is_http_url, pick, positive_duration,
};

const DEFAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of the Vault backend.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[command(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub struct VaultArgs {
    /// Vault: address, e.g. https://vault.example:8200. Falls back to VAULT_ADDR.
    #[arg(long, env = "SDS_AGENT_VAULT_ADDR", value_name = "URL")]
    pub vault_addr: Option<String>,
    /// Vault: enterprise namespace, sent as X-Vault-Namespace. Falls back to VAULT_NAMESPACE.
    #[arg(long, env = "SDS_AGENT_VAULT_NAMESPACE", value_name = "NS")]
    pub vault_namespace: Option<String>,
    /// Vault: PEM CA bundle that signed Vault's TLS certificate. Falls back to VAULT_CACERT.
    #[arg(long, env = "SDS_AGENT_VAULT_CA_CERT", value_name = "PEM")]
    pub vault_ca_cert: Option<PathBuf>,
    /// Vault: mount path of the PKI secrets engine. [default: pki]
    #[arg(long, env = "SDS_AGENT_VAULT_PKI_MOUNT", value_name = "PATH")]
    pub vault_pki_mount: Option<String>,
    /// Vault: the PKI role that signs (required with --ca vault).
    #[arg(long, env = "SDS_AGENT_VAULT_ROLE", value_name = "ROLE")]
    pub vault_role: Option<String>,
    /// Vault: sign with this issuer (issuer/<ref>/sign/<role>) instead of the mount's default.
    #[arg(long, env = "SDS_AGENT_VAULT_ISSUER", value_name = "REF")]
    pub vault_issuer: Option<String>,
    /// Vault: use sign-verbatim/<role> instead of sign/<role>. [default: false]
    #[arg(
        long,
        env = "SDS_AGENT_VAULT_SIGN_VERBATIM",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub vault_sign_verbatim: Option<bool>,
    /// Vault: pin the trust bundle to these PEM roots instead of reading the mount's issuers.
    #[arg(long, env = "SDS_AGENT_VAULT_TRUST_BUNDLE", value_name = "PEM")]
    pub vault_trust_bundle: Option<PathBuf>,
    /// Vault: auth method, token, kubernetes or approle. [default: token]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH", value_name = "METHOD")]
    pub vault_auth: Option<String>,
    /// Vault token auth: the token (prefer --vault-token-file: flags show in `ps`). Falls
    /// back to VAULT_TOKEN.
    #[arg(
        long,
        env = "SDS_AGENT_VAULT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub vault_token: Option<String>,
    /// Vault token auth: file holding the token, re-read when it changes.
    #[arg(long, env = "SDS_AGENT_VAULT_TOKEN_FILE", value_name = "FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// Vault kubernetes/approle auth: mount path of the auth method.
    /// [default: kubernetes or approle]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH_MOUNT", value_name = "PATH")]
    pub vault_auth_mount: Option<String>,
    /// Vault kubernetes auth: the auth method's role. [default: the value of --vault-role]
    #[arg(long, env = "SDS_AGENT_VAULT_AUTH_ROLE", value_name = "ROLE")]
    pub vault_auth_role: Option<String>,
    /// Vault kubernetes auth: service-account JWT file, re-read at every login.
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/token]
    #[arg(long, env = "SDS_AGENT_VAULT_JWT_FILE", value_name = "FILE")]
    pub vault_jwt_file: Option<PathBuf>,
    /// Vault approle auth: the role ID.
    #[arg(long, env = "SDS_AGENT_VAULT_ROLE_ID", value_name = "ID")]
    pub vault_role_id: Option<String>,
    /// Vault approle auth: file holding the secret ID, re-read at every login.
    #[arg(long, env = "SDS_AGENT_VAULT_SECRET_ID_FILE", value_name = "FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// Vault: time limit of one HTTP request to Vault. [default: 10s]
    #[arg(long, env = "SDS_AGENT_VAULT_TIMEOUT", value_name = "DURATION")]
    pub vault_timeout: Option<String>,
}

/// Settings of the Vault backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VaultSettings {
    /// Vault's address.
    pub addr: String,
    /// Enterprise namespace.
    pub namespace: Option<String>,
    /// CA bundle for TLS to Vault.
    pub ca_cert: Option<PathBuf>,
    /// PKI mount path.
    pub pki_mount: String,
    /// PKI role.
    pub role: String,
    /// Issuer reference, if not the default issuer.
    pub issuer: Option<String>,
    /// Use sign-verbatim.
    pub sign_verbatim: bool,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// How to log in.
    pub auth: VaultAuthSettings,
    /// Time limit of one request.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

/// The Vault auth method and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum VaultAuthSettings {
    /// A token, given or in a file.
    Token {
        /// The token itself (printed redacted).
        token: Option<Redacted>,
        /// A file holding it.
        token_file: Option<PathBuf>,
    },
    /// Kubernetes service-account JWT login.
    Kubernetes {
        /// Auth mount path.
        mount: String,
        /// Auth role.
        role: String,
        /// JWT file.
        jwt_file: PathBuf,
    },
    /// AppRole login.
    Approle {
        /// Auth mount path.
        mount: String,
        /// Role ID.
        role_id: String,
        /// File holding the secret ID.
        secret_id_file: PathBuf,
    },
}

impl VaultAuthSettings {
    /// The method's name, as `--vault-auth` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            VaultAuthSettings::Token { .. } => "token",
            VaultAuthSettings::Kubernetes { .. } => "kubernetes",
            VaultAuthSettings::Approle { .. } => "approle",
        }
    }
}

/// Auth method names `--vault-auth` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VaultAuthKind {
    Token,
    Kubernetes,
    Approle,
}

impl Backend for VaultArgs {
    type Settings = VaultSettings;

    fn resolve(
        &self,
        file: &Self,
        ctx: &ResolveContext<'_>,
    ) -> Result<VaultSettings, SettingsError> {
        let std_env = ctx.std_env;
        let pick_or_env = |flag: &Option<String>, file: &Option<String>, fallback: &str| {
            pick(flag, file).or_else(|| std_env(fallback))
        };
        let addr =
            pick_or_env(&self.vault_addr, &file.vault_addr, "VAULT_ADDR").ok_or_else(|| {
                SettingsError::Conflict(
                    "--ca vault needs --vault-addr (SDS_AGENT_VAULT_ADDR, file key vault-addr, \
                     or VAULT_ADDR)"
                        .into(),
                )
            })?;
        if !is_http_url(&addr) {
            return Err(invalid(
                "vault-addr",
                &addr,
                "expected an http:// or https:// URL, e.g. https://vault.example:8200",
            ));
        }
        let role = pick(&self.vault_role, &file.vault_role).ok_or_else(|| {
            SettingsError::Conflict("--ca vault needs --vault-role, the PKI role that signs".into())
        })?;
        let ca_cert = pick(&self.vault_ca_cert, &file.vault_ca_cert)
            .or_else(|| std_env("VAULT_CACERT").map(PathBuf::from));
        let timeout = positive_duration(
            "vault-timeout",
            pick(&self.vault_timeout, &file.vault_timeout),
            DEFAULT_TIMEOUT,
        )?;
        let auth_raw = pick(&self.vault_auth, &file.vault_auth).unwrap_or_else(|| "token".into());
        let auth_kind = VaultAuthKind::from_str(&auth_raw, false).map_err(|_| {
            invalid(
                "vault-auth",
                &auth_raw,
                "expected token, kubernetes or approle",
            )
        })?;
        let auth_mount = pick(&self.vault_auth_mount, &file.vault_auth_mount);
        let auth = match auth_kind {
            VaultAuthKind::Token => {
                let token_file = pick(&self.vault_token_file, &file.vault_token_file);
                let token = pick(&self.vault_token, &file.vault_token);
                let token = match (&token, &token_file) {
                    (Some(_), Some(_)) => {
                        return Err(SettingsError::Conflict(
                            "--vault-token and --vault-token-file are exclusive: give one".into(),
                        ));
                    }
                    (None, None) => std_env("VAULT_TOKEN"),
                    _ => token,
                };
                if token.is_none() && token_file.is_none() {
                    return Err(SettingsError::Conflict(
                        "--vault-auth token needs --vault-token-file, --vault-token or VAULT_TOKEN"
                            .into(),
                    ));
                }
                VaultAuthSettings::Token {
                    token: token.map(Redacted::new),
                    token_file,
                }
            }
            VaultAuthKind::Kubernetes => VaultAuthSettings::Kubernetes {
                mount: auth_mount.unwrap_or_else(|| "kubernetes".into()),
                role: pick(&self.vault_auth_role, &file.vault_auth_role)
                    .unwrap_or_else(|| role.clone()),
                jwt_file: pick(&self.vault_jwt_file, &file.vault_jwt_file)
                    .unwrap_or_else(|| DEFAULT_JWT_FILE.into()),
            },
            VaultAuthKind::Approle => VaultAuthSettings::Approle {
                mount: auth_mount.unwrap_or_else(|| "approle".into()),
                role_id: pick(&self.vault_role_id, &file.vault_role_id).ok_or_else(|| {
                    SettingsError::Conflict("--vault-auth approle needs --vault-role-id".into())
                })?,
                secret_id_file: pick(&self.vault_secret_id_file, &file.vault_secret_id_file)
                    .ok_or_else(|| {
                        SettingsError::Conflict(
                            "--vault-auth approle needs --vault-secret-id-file".into(),
                        )
                    })?,
            },
        };
        Ok(VaultSettings {
            addr,
            namespace: pick_or_env(
                &self.vault_namespace,
                &file.vault_namespace,
                "VAULT_NAMESPACE",
            ),
            ca_cert,
            pki_mount: pick(&self.vault_pki_mount, &file.vault_pki_mount)
                .unwrap_or_else(|| "pki".into()),
            role,
            issuer: pick(&self.vault_issuer, &file.vault_issuer),
            sign_verbatim: pick(&self.vault_sign_verbatim, &file.vault_sign_verbatim)
                .unwrap_or(false),
            trust_bundle: pick(&self.vault_trust_bundle, &file.vault_trust_bundle),
            auth,
            timeout,
        })
    }
}

impl BackendSettings for VaultSettings {}

#[cfg(feature = "vault")]
impl VaultSettings {
    /// The Vault backend. Needs a tokio runtime (it starts its token renewer), but not
    /// Vault: a Vault that is down at start-up is retried like any outage.
    pub fn build(
        &self,
        _ctx: &crate::settings::BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn crate::CertificateAuthority>, crate::settings::BuildError> {
        use crate::settings::{BuildError, read_pinned_roots};
        use crate::vault::{TokenSource, VaultAuth, VaultCa, VaultConfig};

        let trust_bundle = self
            .trust_bundle
            .as_deref()
            .map(|p| read_pinned_roots("--vault-trust-bundle", p))
            .transpose()?;
        let auth = match &self.auth {
            VaultAuthSettings::Token {
                token: Some(token), ..
            } => VaultAuth::Token(TokenSource::Literal(zeroize::Zeroizing::new(
                token.expose().to_owned(),
            ))),
            VaultAuthSettings::Token {
                token_file: Some(file),
                ..
            } => VaultAuth::Token(TokenSource::File(file.clone())),
            VaultAuthSettings::Token { .. } => {
                return Err(BuildError::Unusable(
                    "vault token auth without a token".into(),
                ));
            }
            VaultAuthSettings::Kubernetes {
                mount,
                role,
                jwt_file,
            } => VaultAuth::Kubernetes {
                mount: mount.clone(),
                role: role.clone(),
                jwt_file: jwt_file.clone(),
            },
            VaultAuthSettings::Approle {
                mount,
                role_id,
                secret_id_file,
            } => VaultAuth::AppRole {
                mount: mount.clone(),
                role_id: role_id.clone(),
                secret_id_file: secret_id_file.clone(),
            },
        };
        let config = VaultConfig {
            addr: url::Url::parse(&self.addr).map_err(|e| BuildError::Invalid {
                context: format!("--vault-addr {}", self.addr),
                source: Box::new(e),
            })?,
            namespace: self.namespace.clone(),
            ca_cert: self.ca_cert.clone(),
            pki_mount: self.pki_mount.clone(),
            role: self.role.clone(),
            issuer: self.issuer.clone(),
            sign_verbatim: self.sign_verbatim,
            trust_bundle,
            auth,
            request_timeout: self.timeout,
        };
        let ca = VaultCa::new(config).map_err(|e| BuildError::Backend(Box::new(e)))?;
        tracing::info!(
            addr = %self.addr,
            mount = %self.pki_mount,
            role = %self.role,
            auth = self.auth.name(),
            "vault CA configured"
        );
        Ok(std::sync::Arc::new(ca))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn ctx<'a>(std_env: &'a dyn Fn(&str) -> Option<String>) -> ResolveContext<'a> {
        ResolveContext {
            namespace: "default",
            node_mode: false,
            std_env,
        }
    }

    fn vault_args() -> VaultArgs {
        VaultArgs {
            vault_addr: Some("https://vault.example:8200".into()),
            vault_role: Some("sds".into()),
            vault_token_file: Some("/run/vault-token".into()),
            ..Default::default()
        }
    }

    fn resolve(
        args: &VaultArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<VaultSettings, SettingsError> {
        args.resolve(&VaultArgs::default(), &ctx(env))
    }

    #[test]
    fn vault_defaults_and_auth_methods() {
        let v = resolve(&vault_args(), &no_env).unwrap();
        assert_eq!(v.pki_mount, "pki");
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert!(!v.sign_verbatim);
        assert_eq!(
            v.auth,
            VaultAuthSettings::Token {
                token: None,
                token_file: Some("/run/vault-token".into())
            }
        );

        let v = resolve(
            &VaultArgs {
                vault_auth: Some("kubernetes".into()),
                vault_token_file: None,
                ..vault_args()
            },
            &no_env,
        )
        .unwrap();
        assert_eq!(
            v.auth,
            VaultAuthSettings::Kubernetes {
                mount: "kubernetes".into(),
                role: "sds".into(),
                jwt_file: DEFAULT_JWT_FILE.into(),
            }
        );

        let v = resolve(
            &VaultArgs {
                vault_auth: Some("approle".into()),
                vault_role_id: Some("rid".into()),
                vault_secret_id_file: Some("/run/sid".into()),
                vault_auth_mount: Some("approle-mesh".into()),
                ..vault_args()
            },
            &no_env,
        )
        .unwrap();
        assert_eq!(
            v.auth,
            VaultAuthSettings::Approle {
                mount: "approle-mesh".into(),
                role_id: "rid".into(),
                secret_id_file: "/run/sid".into(),
            }
        );
    }

    #[test]
    fn vault_falls_back_to_the_usual_vault_variables() {
        let env = |name: &str| match name {
            "VAULT_ADDR" => Some("http://127.0.0.1:8200".to_owned()),
            "VAULT_TOKEN" => Some("hvs.secret-token".to_owned()),
            "VAULT_CACERT" => Some("/etc/vault-ca.pem".to_owned()),
            "VAULT_NAMESPACE" => Some("team-a".to_owned()),
            _ => None,
        };
        let args = VaultArgs {
            vault_role: Some("sds".into()),
            ..Default::default()
        };
        let v = resolve(&args, &env).unwrap();
        let json = serde_json::to_string(&v).unwrap();
        assert!(!json.contains("hvs.secret-token"), "{json}");
        assert!(json.contains("<redacted>"), "{json}");
        assert!(!format!("{v:?}").contains("hvs.secret-token"));
        assert_eq!(v.addr, "http://127.0.0.1:8200");
        assert_eq!(v.ca_cert, Some("/etc/vault-ca.pem".into()));
        assert_eq!(v.namespace.as_deref(), Some("team-a"));
        let VaultAuthSettings::Token { token: Some(t), .. } = v.auth else {
            panic!("token auth expected")
        };
        assert_eq!(t.expose(), "hvs.secret-token");

        // Flags win over the fallbacks.
        let v = resolve(
            &VaultArgs {
                vault_addr: Some("https://flag.example".into()),
                ..args
            },
            &env,
        )
        .unwrap();
        assert_eq!(v.addr, "https://flag.example");
    }

    #[test]
    fn vault_settings_are_checked() {
        let cases: Vec<(VaultArgs, &str)> = vec![
            (
                VaultArgs {
                    vault_addr: None,
                    ..vault_args()
                },
                "needs --vault-addr",
            ),
            (
                VaultArgs {
                    vault_addr: Some("vault:8200".into()),
                    ..vault_args()
                },
                "--vault-addr",
            ),
            (
                VaultArgs {
                    vault_role: None,
                    ..vault_args()
                },
                "needs --vault-role",
            ),
            (
                VaultArgs {
                    vault_auth: Some("ldap".into()),
                    ..vault_args()
                },
                "--vault-auth",
            ),
            (
                VaultArgs {
                    vault_token: Some("t".into()),
                    ..vault_args()
                },
                "exclusive",
            ),
            (
                VaultArgs {
                    vault_token_file: None,
                    ..vault_args()
                },
                "needs --vault-token-file",
            ),
            (
                VaultArgs {
                    vault_auth: Some("approle".into()),
                    vault_secret_id_file: Some("/run/sid".into()),
                    ..vault_args()
                },
                "needs --vault-role-id",
            ),
            (
                VaultArgs {
                    vault_auth: Some("approle".into()),
                    vault_role_id: Some("rid".into()),
                    ..vault_args()
                },
                "needs --vault-secret-id-file",
            ),
            (
                VaultArgs {
                    vault_timeout: Some("0s".into()),
                    ..vault_args()
                },
                "--vault-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = resolve(&args, &no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn the_file_fills_what_flags_leave_out() {
        let file = VaultArgs {
            vault_role: Some("file-role".into()),
            vault_sign_verbatim: Some(true),
            ..Default::default()
        };
        let flags = VaultArgs {
            vault_role: None,
            ..vault_args()
        };
        let v = flags.resolve(&file, &ctx(&no_env)).unwrap();
        assert_eq!(v.role, "file-role");
        assert!(v.sign_verbatim);
    }
}
