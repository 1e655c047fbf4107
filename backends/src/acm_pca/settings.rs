//! The ACM PCA backend's settings: its flags and config-file keys, their checks (with
//! `AWS_ENDPOINT_URL_ACM_PCA` as a fallback), and building the backend from them. Compiled
//! whatever the cargo features; building needs `acm-pca`, and so do the full checks of the
//! ARN and the signing algorithm (without it the ARN's region is read plainly).
//!
//! Resolving calls nothing: credentials are resolved and the CA described at the first
//! signature.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{
    Backend, BackendSettings, ResolveContext, SettingsError, humanized, invalid, is_http_url, pick,
    positive_duration,
};

const DEFAULT_TEMPLATE: &str = "arn:aws:acm-pca:::template/EndEntityCertificate/V1";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of the ACM PCA backend.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[command(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub struct AcmPcaArgs {
    /// ACM PCA: ARN of the private CA that signs (required with --ca acm-pca).
    #[arg(long, env = "SDS_AGENT_ACM_PCA_ARN", value_name = "ARN")]
    pub acm_pca_arn: Option<String>,
    /// ACM PCA: signing algorithm, e.g. SHA256WITHECDSA. [default: derived from the CA's key]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_SIGNING_ALGORITHM", value_name = "ALG")]
    pub acm_pca_signing_algorithm: Option<String>,
    /// ACM PCA: certificate template ARN.
    /// [default: arn:aws:acm-pca:::template/EndEntityCertificate/V1]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TEMPLATE_ARN", value_name = "ARN")]
    pub acm_pca_template_arn: Option<String>,
    /// ACM PCA: endpoint URL instead of the region's (VPC endpoints, tests). Falls back to
    /// AWS_ENDPOINT_URL_ACM_PCA.
    #[arg(long, env = "SDS_AGENT_ACM_PCA_ENDPOINT", value_name = "URL")]
    pub acm_pca_endpoint: Option<String>,
    /// ACM PCA: pin the trust bundle to these PEM roots instead of reading the CA's chain.
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TRUST_BUNDLE", value_name = "PEM")]
    pub acm_pca_trust_bundle: Option<PathBuf>,
    /// ACM PCA: time limit of one HTTP request to AWS. [default: 10s]
    #[arg(long, env = "SDS_AGENT_ACM_PCA_TIMEOUT", value_name = "DURATION")]
    pub acm_pca_timeout: Option<String>,
    /// AWS region to call. [default: the region in --acm-pca-arn]
    #[arg(long, env = "SDS_AGENT_AWS_REGION", value_name = "REGION")]
    pub aws_region: Option<String>,
}

/// Settings of the ACM PCA backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AcmPcaSettings {
    /// The CA's ARN.
    pub arn: String,
    /// The region to call.
    pub region: String,
    /// Endpoint URL instead of the region's.
    pub endpoint: Option<String>,
    /// Signing algorithm; `None` to derive it from the CA's key.
    pub signing_algorithm: Option<String>,
    /// Certificate template ARN.
    pub template_arn: String,
    /// Pinned roots, PEM file.
    pub trust_bundle: Option<PathBuf>,
    /// Time limit of one request.
    #[serde(serialize_with = "humanized")]
    pub timeout: Duration,
}

impl Backend for AcmPcaArgs {
    type Settings = AcmPcaSettings;

    fn resolve(
        &self,
        file: &Self,
        ctx: &ResolveContext<'_>,
    ) -> Result<AcmPcaSettings, SettingsError> {
        let arn = pick(&self.acm_pca_arn, &file.acm_pca_arn).ok_or_else(|| {
            SettingsError::Conflict(
                "--ca acm-pca needs --acm-pca-arn, the ARN of the private CA that signs".into(),
            )
        })?;
        let arn_region = parse_ca_arn(&arn).map_err(|e| invalid("acm-pca-arn", &arn, e))?;
        let region = match pick(&self.aws_region, &file.aws_region) {
            Some(r) => {
                if r.is_empty()
                    || !r
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(invalid(
                        "aws-region",
                        &r,
                        "expected a region name, e.g. us-east-1",
                    ));
                }
                r
            }
            None => arn_region,
        };
        let endpoint = pick(&self.acm_pca_endpoint, &file.acm_pca_endpoint)
            .or_else(|| (ctx.std_env)("AWS_ENDPOINT_URL_ACM_PCA"));
        if let Some(e) = &endpoint
            && !is_http_url(e)
        {
            return Err(invalid(
                "acm-pca-endpoint",
                e,
                "expected an http:// or https:// URL",
            ));
        }
        let signing_algorithm = pick(
            &self.acm_pca_signing_algorithm,
            &file.acm_pca_signing_algorithm,
        );
        if let Some(alg) = &signing_algorithm {
            check_signing_algorithm(alg)
                .map_err(|e| invalid("acm-pca-signing-algorithm", alg, e))?;
        }
        let template_arn = pick(&self.acm_pca_template_arn, &file.acm_pca_template_arn)
            .unwrap_or_else(|| DEFAULT_TEMPLATE.into());
        if !template_arn.starts_with("arn:") || !template_arn.contains(":acm-pca:::template/") {
            return Err(invalid(
                "acm-pca-template-arn",
                &template_arn,
                format!(
                    "expected arn:<partition>:acm-pca:::template/<name>/V<n>, e.g. {DEFAULT_TEMPLATE}"
                ),
            ));
        }
        let timeout = positive_duration(
            "acm-pca-timeout",
            pick(&self.acm_pca_timeout, &file.acm_pca_timeout),
            DEFAULT_TIMEOUT,
        )?;
        Ok(AcmPcaSettings {
            arn,
            region,
            endpoint,
            signing_algorithm,
            template_arn,
            trust_bundle: pick(&self.acm_pca_trust_bundle, &file.acm_pca_trust_bundle),
            timeout,
        })
    }
}

impl BackendSettings for AcmPcaSettings {}

/// The region of a private CA's ARN, or why it is not one.
#[cfg(feature = "acm-pca")]
fn parse_ca_arn(arn: &str) -> Result<String, String> {
    arn.parse::<crate::acm_pca::CaArn>()
        .map(|a| a.region().to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "acm-pca"))]
fn parse_ca_arn(arn: &str) -> Result<String, String> {
    arn.split(':')
        .nth(3)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "not an ACM PCA certificate authority ARN".to_owned())
}

#[cfg(feature = "acm-pca")]
fn check_signing_algorithm(alg: &str) -> Result<(), String> {
    crate::acm_pca::parse_signing_algorithm(alg)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "acm-pca"))]
fn check_signing_algorithm(_alg: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(feature = "acm-pca")]
impl AcmPcaSettings {
    /// The ACM PCA backend. Calls nothing at start-up: credentials are resolved and the CA
    /// is described at the first signature, so an AWS outage at start-up is retried like
    /// any other.
    pub fn build(
        &self,
        _ctx: &crate::settings::BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn crate::CertificateAuthority>, crate::settings::BuildError> {
        use crate::acm_pca::{AcmPcaCa, AcmPcaConfig, CaArn};
        use crate::settings::{BuildError, read_pinned_roots};

        let arn: CaArn = self.arn.parse().map_err(|e| BuildError::Invalid {
            context: format!("--acm-pca-arn {}", self.arn),
            source: Box::new(e),
        })?;
        let mut config = AcmPcaConfig::new(arn);
        config.region = Some(self.region.clone());
        config.endpoint = self.endpoint.clone();
        config.signing_algorithm = self.signing_algorithm.clone();
        config.template_arn = self.template_arn.clone();
        config.request_timeout = self.timeout;
        config.trust_bundle = self
            .trust_bundle
            .as_deref()
            .map(|p| read_pinned_roots("--acm-pca-trust-bundle", p))
            .transpose()?;
        let ca = AcmPcaCa::new(config).map_err(|e| BuildError::Backend(Box::new(e)))?;
        tracing::info!(
            arn = %self.arn,
            region = %self.region,
            endpoint = self.endpoint.as_deref().unwrap_or("(the region's)"),
            template = %self.template_arn,
            "acm-pca CA configured"
        );
        Ok(std::sync::Arc::new(ca))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PCA_ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b-2c3d";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn resolve(
        args: &AcmPcaArgs,
        std_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AcmPcaSettings, SettingsError> {
        let ctx = ResolveContext {
            namespace: "default",
            node_mode: false,
            std_env,
        };
        args.resolve(&AcmPcaArgs::default(), &ctx)
    }

    #[test]
    fn acm_pca_defaults_region_from_the_arn_and_endpoint_fallback() {
        let args = AcmPcaArgs {
            acm_pca_arn: Some(PCA_ARN.into()),
            ..Default::default()
        };
        let v = resolve(&args, &no_env).unwrap();
        assert_eq!(v.region, "eu-west-1");
        assert_eq!(v.template_arn, DEFAULT_TEMPLATE);
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert_eq!(v.signing_algorithm, None);
        assert_eq!(v.endpoint, None);

        let env = |name: &str| {
            (name == "AWS_ENDPOINT_URL_ACM_PCA").then(|| "http://127.0.0.1:5000".to_owned())
        };
        let v = resolve(&args, &env).unwrap();
        assert_eq!(v.endpoint.as_deref(), Some("http://127.0.0.1:5000"));

        let args = AcmPcaArgs {
            aws_region: Some("us-gov-west-1".into()),
            acm_pca_endpoint: Some("https://vpce-1.acm-pca.eu-west-1.vpce.amazonaws.com".into()),
            acm_pca_signing_algorithm: Some("SHA384WITHECDSA".into()),
            acm_pca_timeout: Some("3s".into()),
            ..args
        };
        let v = resolve(&args, &env).unwrap();
        assert_eq!(v.region, "us-gov-west-1");
        assert!(v.endpoint.unwrap().starts_with("https://vpce-1"));
        assert_eq!(v.signing_algorithm.as_deref(), Some("SHA384WITHECDSA"));
        assert_eq!(v.timeout, Duration::from_secs(3));
    }

    /// The ARN and algorithm checks are the backend's parsers: with the feature only.
    #[cfg(feature = "acm-pca")]
    #[test]
    fn acm_pca_settings_that_cannot_work_name_their_flag() {
        let base = || AcmPcaArgs {
            acm_pca_arn: Some(PCA_ARN.into()),
            ..Default::default()
        };
        let cases = [
            (
                AcmPcaArgs {
                    acm_pca_arn: None,
                    ..base()
                },
                "needs --acm-pca-arn",
            ),
            (
                AcmPcaArgs {
                    acm_pca_arn: Some("arn:aws:acm:eu-west-1:123456789012:certificate/x".into()),
                    ..base()
                },
                "--acm-pca-arn",
            ),
            (
                AcmPcaArgs {
                    aws_region: Some("EU West".into()),
                    ..base()
                },
                "--aws-region",
            ),
            (
                AcmPcaArgs {
                    acm_pca_endpoint: Some("vpce.example".into()),
                    ..base()
                },
                "--acm-pca-endpoint",
            ),
            (
                AcmPcaArgs {
                    acm_pca_signing_algorithm: Some("SHA1WITHRSA".into()),
                    ..base()
                },
                "--acm-pca-signing-algorithm",
            ),
            (
                AcmPcaArgs {
                    acm_pca_template_arn: Some("EndEntityCertificate/V1".into()),
                    ..base()
                },
                "--acm-pca-template-arn",
            ),
            (
                AcmPcaArgs {
                    acm_pca_timeout: Some("0s".into()),
                    ..base()
                },
                "--acm-pca-timeout",
            ),
        ];
        for (args, needle) in cases {
            let err = resolve(&args, &no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
