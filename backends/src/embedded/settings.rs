//! The embedded CA's settings: its flags and config-file keys, their checks, and building
//! the CA from them. Compiled whatever the cargo features; building needs `embedded`.
//!
//! It reads the CA's files only when building, never while resolving.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::settings::{Backend, BackendSettings, ResolveContext, SettingsError, pick};

/// Flags of the embedded CA.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[command(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub struct EmbeddedArgs {
    /// Embedded CA: PEM signing certificate followed by its chain up to the root. Without
    /// it, an ephemeral root is generated at start-up.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_CA_CERT", value_name = "PEM")]
    pub embedded_ca_cert: Option<PathBuf>,
    /// Embedded CA: PEM private key (PKCS#8) of the signing certificate.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_CA_KEY", value_name = "PEM")]
    pub embedded_ca_key: Option<PathBuf>,
    /// Embedded CA: the next signing CA for a staged root rotation, PEM chain up to its new
    /// root (with --embedded-next-ca-key). Read at start-up if it exists, which starts the
    /// rotation, else by `sds-agent ca rotate`.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_NEXT_CA_CERT", value_name = "PEM")]
    pub embedded_next_ca_cert: Option<PathBuf>,
    /// Embedded CA: PEM private key of the next signing CA.
    #[arg(long, env = "SDS_AGENT_EMBEDDED_NEXT_CA_KEY", value_name = "PEM")]
    pub embedded_next_ca_key: Option<PathBuf>,
}

/// Settings of the embedded CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmbeddedSettings {
    /// Signing certificate and chain, PEM; `None` for an ephemeral root.
    pub cert: Option<PathBuf>,
    /// Its key, PEM.
    pub key: Option<PathBuf>,
    /// The next signing CA's certificate and chain, for a root rotation.
    pub next_cert: Option<PathBuf>,
    /// Its key.
    pub next_key: Option<PathBuf>,
}

impl Backend for EmbeddedArgs {
    type Settings = EmbeddedSettings;

    fn resolve(
        &self,
        file: &Self,
        _ctx: &ResolveContext<'_>,
    ) -> Result<EmbeddedSettings, SettingsError> {
        let cert = pick(&self.embedded_ca_cert, &file.embedded_ca_cert);
        let key = pick(&self.embedded_ca_key, &file.embedded_ca_key);
        if cert.is_some() != key.is_some() {
            return Err(SettingsError::Conflict(
                "--embedded-ca-cert and --embedded-ca-key go together: give both or neither".into(),
            ));
        }
        let next_cert = pick(&self.embedded_next_ca_cert, &file.embedded_next_ca_cert);
        let next_key = pick(&self.embedded_next_ca_key, &file.embedded_next_ca_key);
        if next_cert.is_some() != next_key.is_some() {
            return Err(SettingsError::Conflict(
                "--embedded-next-ca-cert and --embedded-next-ca-key go together: give both or neither"
                    .into(),
            ));
        }
        if next_cert.is_some() && cert.is_none() {
            return Err(SettingsError::Conflict(
                "--embedded-next-ca-cert needs --embedded-ca-cert: an ephemeral root is rotated \
                 with `sds-agent ca rotate`, which makes the next one"
                    .into(),
            ));
        }
        if next_cert.is_some() && next_cert == cert {
            return Err(SettingsError::Conflict(
                "--embedded-next-ca-cert names the same file as --embedded-ca-cert".into(),
            ));
        }
        Ok(EmbeddedSettings {
            cert,
            key,
            next_cert,
            next_key,
        })
    }
}

impl BackendSettings for EmbeddedSettings {}

#[cfg(feature = "embedded")]
impl EmbeddedSettings {
    /// The embedded CA: loaded from its files, or an ephemeral root for `ctx`'s trust
    /// domain. Its only caller is this process's secret manager, which checks every leaf
    /// against its own key, so CSR self-signatures are not checked again.
    pub fn build(
        &self,
        ctx: &crate::settings::BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn crate::CertificateAuthority>, crate::settings::BuildError> {
        use crate::embedded::EmbeddedCa;
        use crate::embedded::rotating::{NextSource, RotatingCa};
        use crate::settings::BuildError;

        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            let ca = EmbeddedCa::generate(ctx.trust_domain)?;
            tracing::warn!(
                "embedded CA: generated an ephemeral self-signed root for this process; only proxies served by this \
                 agent will trust its certificates. Give --embedded-ca-cert and --embedded-ca-key to share a trust domain"
            );
            return Ok(std::sync::Arc::new(RotatingCa::new(
                ca.local_requests_only(),
                NextSource::Generate(ctx.trust_domain.clone()),
            )));
        };
        let read_error = |flag, path: &PathBuf| {
            let path = path.clone();
            move |source| BuildError::ReadFile { flag, path, source }
        };
        let cert_pem = std::fs::read(cert).map_err(read_error("--embedded-ca-cert", cert))?;
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(key).map_err(read_error("--embedded-ca-key", key))?,
        );
        let ca = EmbeddedCa::from_pem(&cert_pem, &key_pem).map_err(|e| BuildError::Invalid {
            context: format!(
                "--embedded-ca-cert {} / --embedded-ca-key {}",
                cert.display(),
                key.display()
            ),
            source: Box::new(e),
        })?;
        tracing::info!(cert = %cert.display(), "embedded CA loaded");
        let source = match (&self.next_cert, &self.next_key) {
            (Some(cert), Some(key)) => NextSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => NextSource::None,
        };
        let ca = RotatingCa::new(ca.local_requests_only(), source)
            .with_next_if_present()
            .map_err(|e| BuildError::Invalid {
                context: "the next embedded CA".into(),
                source: e.into(),
            })?;
        if let Some(next) = &self.next_cert
            && crate::RootControl::next_root(&ca).is_some()
        {
            tracing::info!(next = %next.display(), "embedded CA: the next CA is given; a staged root rotation begins");
        }
        Ok(std::sync::Arc::new(ca))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ResolveContext<'static> {
        ResolveContext {
            namespace: "default",
            node_mode: false,
            std_env: &|_| None,
        }
    }

    #[test]
    fn cert_and_key_go_together_from_flags_or_file() {
        let none = EmbeddedArgs::default();
        assert_eq!(
            none.resolve(&none, &ctx()).unwrap(),
            EmbeddedSettings {
                cert: None,
                key: None,
                next_cert: None,
                next_key: None,
            }
        );
        let cert_only = EmbeddedArgs {
            embedded_ca_cert: Some("ca.pem".into()),
            ..Default::default()
        };
        let err = cert_only.resolve(&none, &ctx()).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        let key_in_file = EmbeddedArgs {
            embedded_ca_key: Some("ca-key.pem".into()),
            ..Default::default()
        };
        let both = cert_only.resolve(&key_in_file, &ctx()).unwrap();
        assert_eq!(both.cert, Some("ca.pem".into()));
        assert_eq!(both.key, Some("ca-key.pem".into()));
    }
}
