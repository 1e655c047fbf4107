//! The istiod backend's settings: its flags and config-file keys, their checks, and
//! building the backend from them. Compiled whatever the cargo features; building needs
//! `istiod`, and so do the full checks of `--ca-addr` and `--ca-header` (without it they
//! are taken as given, as the backend is refused at build anyway).
//!
//! Header values may be credentials: no error and no output ever prints one.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{
    Backend, BackendSettings, ResolveContext, SettingsError, humanized, invalid, pick,
    positive_duration,
};

const DEFAULT_ADDR: &str = "istiod.istio-system.svc:15012";
const DEFAULT_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of the istiod backend.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[command(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub struct IstiodArgs {
    /// istiod: address of the Istio CA (istiod or istio-csr), host:port, over TLS.
    /// [default: istiod.istio-system.svc:15012]
    #[arg(long, env = "SDS_AGENT_CA_ADDR", value_name = "HOST:PORT")]
    pub ca_addr: Option<String>,
    /// istiod: PEM roots that signed the CA's TLS certificate, re-read at every reconnect.
    /// [default: the system's roots]
    #[arg(long, env = "SDS_AGENT_CA_ROOT_CERT", value_name = "PEM")]
    pub ca_root_cert: Option<PathBuf>,
    /// istiod: name to expect in the CA's TLS certificate, and to send as SNI.
    /// [default: the host of --ca-addr]
    #[arg(long, env = "SDS_AGENT_CA_SERVER_NAME", value_name = "NAME")]
    pub ca_server_name: Option<String>,
    /// istiod: file holding the service-account token sent as the bearer token, re-read at
    /// every call. [default: ./var/run/secrets/tokens/istio-token]
    #[arg(long, env = "SDS_AGENT_CA_TOKEN_FILE", value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// istiod: cluster ID sent as ClusterID metadata (istiod picks the cluster that checks
    /// the token by it).
    #[arg(long, env = "SDS_AGENT_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// istiod: extra header sent with every call, KEY=VALUE; repeatable.
    #[arg(
        long = "ca-header",
        env = "SDS_AGENT_CA_HEADER",
        value_name = "KEY=VALUE",
        hide_env_values = true
    )]
    #[serde(rename = "ca-header", default)]
    pub ca_headers: Vec<String>,
    /// istiod: pin the trust bundle to these PEM roots instead of the root each answer ends
    /// with.
    #[arg(long, env = "SDS_AGENT_CA_TRUST_BUNDLE", value_name = "PEM")]
    pub ca_trust_bundle: Option<PathBuf>,
    /// istiod: time limit of one call to the CA. [default: 10s]
    #[arg(long, env = "SDS_AGENT_CA_TIMEOUT", value_name = "DURATION")]
    pub ca_timeout: Option<String>,
}

/// Settings of the istiod backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IstiodSettings {
    /// The CA's address, host:port.
    pub addr: String,
    /// Roots for the CA's TLS certificate, PEM file; the system's when `None`.
    pub root_cert: Option<PathBuf>,
    /// Name expected in the CA's TLS certificate.
    pub server_name: Option<String>,
    /// File holding the bearer token.
    pub token_file: PathBuf,
    /// Sent as ClusterID metadata.
    pub cluster_id: Option<String>,
    /// Extra headers, `KEY=VALUE` (values printed redacted).
    #[serde(serialize_with = "header_names")]
    pub headers: Vec<String>,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Time limit of one call.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

impl Backend for IstiodArgs {
    type Settings = IstiodSettings;

    fn resolve(
        &self,
        file: &Self,
        _ctx: &ResolveContext<'_>,
    ) -> Result<IstiodSettings, SettingsError> {
        let addr = pick(&self.ca_addr, &file.ca_addr).unwrap_or_else(|| DEFAULT_ADDR.into());
        check_ca_addr(&addr).map_err(|e| invalid("ca-addr", &addr, e))?;
        let server_name = pick(&self.ca_server_name, &file.ca_server_name);
        if let Some(name) = &server_name
            && (name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/'))
        {
            return Err(invalid(
                "ca-server-name",
                name,
                "expected a DNS name or IP address, e.g. istiod.istio-system.svc",
            ));
        }
        let cluster_id = pick(&self.cluster_id, &file.cluster_id);
        if let Some(id) = &cluster_id
            && (id.is_empty() || !id.bytes().all(|b| (0x21..0x7f).contains(&b)))
        {
            return Err(invalid(
                "cluster-id",
                id,
                "expected visible ASCII without spaces, e.g. Kubernetes",
            ));
        }
        // The repeated flag replaces the file's list.
        let headers = if self.ca_headers.is_empty() {
            file.ca_headers.clone()
        } else {
            self.ca_headers.clone()
        };
        for h in &headers {
            let name = h.split_once('=').map_or(h.as_str(), |(k, _)| k);
            check_ca_header(h).map_err(|e| invalid("ca-header", &format!("{name}=..."), e))?;
        }
        let timeout = positive_duration(
            "ca-timeout",
            pick(&self.ca_timeout, &file.ca_timeout),
            DEFAULT_TIMEOUT,
        )?;
        Ok(IstiodSettings {
            addr,
            root_cert: pick(&self.ca_root_cert, &file.ca_root_cert),
            server_name,
            token_file: pick(&self.ca_token_file, &file.ca_token_file)
                .unwrap_or_else(|| DEFAULT_TOKEN_FILE.into()),
            cluster_id,
            headers,
            trust_bundle: pick(&self.ca_trust_bundle, &file.ca_trust_bundle),
            timeout,
        })
    }
}

impl BackendSettings for IstiodSettings {}

#[cfg(feature = "istiod")]
fn check_ca_addr(addr: &str) -> Result<(), String> {
    addr.parse::<crate::istiod::CaAddr>()
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "istiod"))]
fn check_ca_addr(_addr: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(feature = "istiod")]
fn check_ca_header(header: &str) -> Result<(), String> {
    header
        .parse::<crate::istiod::ExtraHeader>()
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "istiod"))]
fn check_ca_header(_header: &str) -> Result<(), String> {
    Ok(())
}

/// Extra headers as `name=<redacted>`: their values may be credentials.
fn header_names<S: serde::Serializer>(headers: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|h| {
        format!(
            "{}=<redacted>",
            h.split_once('=').map_or(h.as_str(), |(k, _)| k)
        )
    }))
}

#[cfg(feature = "istiod")]
impl IstiodSettings {
    /// The istiod backend. Connects to nothing and reads no token at start-up: a CA that is
    /// not up yet is retried like any outage, and the agent is ready once it answers.
    pub fn build(
        &self,
        ctx: &crate::settings::BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn crate::CertificateAuthority>, crate::settings::BuildError> {
        use crate::istiod::{CaAddr, ExtraHeader, IstiodCa, IstiodConfig};
        use crate::settings::{BuildError, read_pinned_roots};

        let addr: CaAddr = self.addr.parse().map_err(|e| BuildError::Invalid {
            context: format!("--ca-addr {}", self.addr),
            source: Box::new(e),
        })?;
        let mut config = IstiodConfig::new(addr);
        config.root_cert = self.root_cert.clone();
        config.server_name = self.server_name.clone();
        config.token_file = self.token_file.clone();
        config.cluster_id = self.cluster_id.clone();
        config.headers = self
            .headers
            .iter()
            .map(|h| h.parse::<ExtraHeader>())
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::Invalid {
                context: "--ca-header".into(),
                source: Box::new(e),
            })?;
        config.request_timeout = self.timeout;
        // Node mode signs for many pods with the agent's one token: ztunnel's way.
        config.impersonate = ctx.node_mode;
        config.trust_bundle = self
            .trust_bundle
            .as_deref()
            .map(|p| read_pinned_roots("--ca-trust-bundle", p))
            .transpose()?;
        let pinned = config.trust_bundle.is_some();
        let ca = IstiodCa::new(config)?;
        tracing::info!(
            addr = %self.addr,
            tls_roots = self
                .root_cert
                .as_deref()
                .map_or_else(|| "(the system's)".to_owned(), |p| p.display().to_string()),
            token_file = %self.token_file.display(),
            cluster_id = self.cluster_id.as_deref().unwrap_or("(none)"),
            trust_bundle = if pinned { "pinned" } else { "the root each answer ends with" },
            impersonate = ctx.node_mode,
            "istiod CA configured"
        );
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

    fn resolve(args: &IstiodArgs) -> Result<IstiodSettings, SettingsError> {
        args.resolve(&IstiodArgs::default(), &ctx())
    }

    #[test]
    fn istiod_defaults_are_istio_agents() {
        let v = resolve(&IstiodArgs::default()).unwrap();
        assert_eq!(v.addr, "istiod.istio-system.svc:15012");
        assert_eq!(
            v.token_file,
            PathBuf::from("./var/run/secrets/tokens/istio-token")
        );
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert_eq!(
            (v.root_cert, v.server_name, v.cluster_id, v.trust_bundle),
            (None, None, None, None)
        );
        assert!(v.headers.is_empty());
    }

    #[test]
    fn flag_headers_replace_the_files_and_values_are_never_printed() {
        let file = IstiodArgs {
            ca_headers: vec!["x-tenant=blue".into(), "x-api-key=s3cret".into()],
            ..Default::default()
        };
        let v = IstiodArgs::default().resolve(&file, &ctx()).unwrap();
        assert_eq!(v.headers, ["x-tenant=blue", "x-api-key=s3cret"]);
        let flags = IstiodArgs {
            ca_headers: vec!["x-tenant=red".into()],
            ..Default::default()
        };
        let v = flags.resolve(&file, &ctx()).unwrap();
        assert_eq!(v.headers, ["x-tenant=red"]);
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.contains("x-tenant=<redacted>"), "{json}");
        assert!(!json.contains("red\""), "{json}");
    }

    /// The address and header checks are the backend's parsers: with the feature only.
    #[cfg(feature = "istiod")]
    #[test]
    fn istiod_settings_that_cannot_work_name_their_flag() {
        let cases = [
            (
                IstiodArgs {
                    ca_addr: Some("http://istiod.istio-system.svc:15010".into()),
                    ..Default::default()
                },
                "TLS only",
            ),
            (
                IstiodArgs {
                    ca_addr: Some("istiod.istio-system.svc".into()),
                    ..Default::default()
                },
                "--ca-addr",
            ),
            (
                IstiodArgs {
                    ca_headers: vec!["authorization=Bearer abc".into()],
                    ..Default::default()
                },
                "--ca-header",
            ),
            (
                IstiodArgs {
                    ca_headers: vec!["x-tenant".into()],
                    ..Default::default()
                },
                "KEY=VALUE",
            ),
            (
                IstiodArgs {
                    cluster_id: Some("two words".into()),
                    ..Default::default()
                },
                "--cluster-id",
            ),
            (
                IstiodArgs {
                    ca_server_name: Some("".into()),
                    ..Default::default()
                },
                "--ca-server-name",
            ),
            (
                IstiodArgs {
                    ca_timeout: Some("soon".into()),
                    ..Default::default()
                },
                "--ca-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = resolve(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(!err.contains("abc"), "a header value was printed: {err}");
        }
    }
}
