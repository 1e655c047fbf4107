//! A real AWS API for the ACM PCA backend's tests: moto's server (`pip install
//! 'moto[server]'`, found as `MOTO_SERVER_BIN` or `moto_server` on `PATH`), which speaks ACM
//! PCA's JSON 1.1 wire protocol, driven here with the same `aws-sdk-acmpca` the agent uses.
//!
//! [`Moto::root_ca`] sets up a CA the way an operator does on AWS: create it, get its CSR,
//! self-issue its certificate with `RootCACertificate/V1`, import it, and check it is
//! `ACTIVE`.
//!
//! What moto does not reproduce, so the backend's unit tests cover it with a stub instead:
//! it ignores `Validity`, `SigningAlgorithm`, `ApiPassthrough` and `IdempotencyToken`, always
//! has an RSA-2048 CA key and issues for 365 days; `IssueCertificate` succeeds even on a
//! disabled CA; it never throttles nor answers `RequestInProgressException`; and it answers a
//! CSR it cannot parse, or an unknown certificate ARN, with an HTML 500.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_sdk_acmpca::Client;
use aws_sdk_acmpca::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_acmpca::error::DisplayErrorContext;
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    Asn1Subject, CertificateAuthorityConfiguration, CertificateAuthorityStatus,
    CertificateAuthorityType, KeyAlgorithm, SigningAlgorithm, Validity, ValidityPeriodType,
};

use crate::process::{ChildGuard, find_program};
use crate::{Error, free_port};

/// How long moto may take to start answering.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// The region the tests' CAs live in.
pub const REGION: &str = "us-east-1";
/// The template that makes a CA certificate.
const ROOT_TEMPLATE: &str = "arn:aws:acm-pca:::template/RootCACertificate/V1";

/// A running `moto_server`, killed when dropped.
#[derive(Debug)]
pub struct Moto {
    _proc: ChildGuard,
    endpoint: String,
    client: Client,
}

/// A private CA set up in moto.
#[derive(Debug, Clone)]
pub struct PcaCa {
    /// Its ARN.
    pub arn: String,
    /// Its self-signed certificate, PEM.
    pub root_pem: String,
}

/// The moto server binary: `MOTO_SERVER_BIN` if set, else `moto_server` on `PATH`; required
/// when `SDS_AGENT_REQUIRE_MOTO=1` (see [`find_program`]).
pub fn moto_bin() -> Result<Option<PathBuf>, Error> {
    find_program("moto_server", "MOTO_SERVER_BIN", "SDS_AGENT_REQUIRE_MOTO")
}

/// The environment an agent needs to call moto: fake static credentials (moto accepts any),
/// and no instance-metadata lookups.
pub fn agent_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn api(call: &str, e: impl std::error::Error) -> Error {
    Error::Api {
        call: call.to_owned(),
        detail: DisplayErrorContext(e).to_string(),
    }
}

impl Moto {
    /// Starts `moto_server` on a free loopback port, logging to `dir/moto.log`. `Ok(None)`
    /// when moto is not installed (and not required).
    pub async fn start(dir: &Path) -> Result<Option<Self>, Error> {
        let Some(bin) = moto_bin()? else {
            return Ok(None);
        };
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut proc = ChildGuard::spawn("moto", cmd, &dir.join("moto.log"))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        proc.wait_ready("GET /moto-api/ = 200", READY_LIMIT, || async move {
            crate::http::get(addr, "/moto-api/")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;
        let endpoint = format!("http://{addr}");
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .load()
            .await;
        Ok(Some(Self {
            _proc: proc,
            endpoint,
            client: Client::new(&sdk),
        }))
    }

    /// The endpoint URL, for `--acm-pca-endpoint`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An SDK client for moto.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A root CA named `common_name`, set up as on AWS and checked `ACTIVE`.
    pub async fn root_ca(&self, common_name: &str) -> Result<PcaCa, Error> {
        let c = &self.client;
        let config = CertificateAuthorityConfiguration::builder()
            .key_algorithm(KeyAlgorithm::Rsa2048)
            .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
            .subject(
                Asn1Subject::builder()
                    .common_name(common_name)
                    .organization("sds-agent tests")
                    .build(),
            )
            .build()
            .map_err(|e| api("CertificateAuthorityConfiguration", e))?;
        let arn = c
            .create_certificate_authority()
            .certificate_authority_type(CertificateAuthorityType::Root)
            .certificate_authority_configuration(config)
            .send()
            .await
            .map_err(|e| api("CreateCertificateAuthority", e))?
            .certificate_authority_arn
            .ok_or_else(|| Error::Malformed {
                what: "CreateCertificateAuthority answer",
                detail: "no CertificateAuthorityArn".into(),
            })?;
        let csr = c
            .get_certificate_authority_csr()
            .certificate_authority_arn(&arn)
            .send()
            .await
            .map_err(|e| api("GetCertificateAuthorityCsr", e))?
            .csr
            .ok_or_else(|| Error::Malformed {
                what: "GetCertificateAuthorityCsr answer",
                detail: "no Csr".into(),
            })?;
        let validity = Validity::builder()
            .r#type(ValidityPeriodType::Years)
            .value(10)
            .build()
            .map_err(|e| api("Validity", e))?;
        let cert_arn = c
            .issue_certificate()
            .certificate_authority_arn(&arn)
            .csr(Blob::new(csr))
            .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
            .template_arn(ROOT_TEMPLATE)
            .validity(validity)
            .send()
            .await
            .map_err(|e| api("IssueCertificate (root)", e))?
            .certificate_arn
            .ok_or_else(|| Error::Malformed {
                what: "IssueCertificate answer",
                detail: "no CertificateArn".into(),
            })?;
        let root_pem = c
            .get_certificate()
            .certificate_authority_arn(&arn)
            .certificate_arn(&cert_arn)
            .send()
            .await
            .map_err(|e| api("GetCertificate (root)", e))?
            .certificate
            .ok_or_else(|| Error::Malformed {
                what: "GetCertificate answer",
                detail: "no Certificate".into(),
            })?;
        c.import_certificate_authority_certificate()
            .certificate_authority_arn(&arn)
            .certificate(Blob::new(root_pem.clone()))
            .send()
            .await
            .map_err(|e| api("ImportCertificateAuthorityCertificate", e))?;
        let status = self.status(&arn).await?;
        if status != CertificateAuthorityStatus::Active {
            return Err(Error::Malformed {
                what: "CA status after import",
                detail: format!("{status:?}, not ACTIVE"),
            });
        }
        Ok(PcaCa { arn, root_pem })
    }

    /// The CA's status, from `DescribeCertificateAuthority`.
    pub async fn status(&self, arn: &str) -> Result<CertificateAuthorityStatus, Error> {
        self.client
            .describe_certificate_authority()
            .certificate_authority_arn(arn)
            .send()
            .await
            .map_err(|e| api("DescribeCertificateAuthority", e))?
            .certificate_authority
            .and_then(|ca| ca.status)
            .ok_or_else(|| Error::Malformed {
                what: "DescribeCertificateAuthority answer",
                detail: "no Status".into(),
            })
    }

    /// Sets the CA's status (`ACTIVE` or `DISABLED`), as `UpdateCertificateAuthority` does.
    pub async fn set_status(
        &self,
        arn: &str,
        status: CertificateAuthorityStatus,
    ) -> Result<(), Error> {
        self.client
            .update_certificate_authority()
            .certificate_authority_arn(arn)
            .status(status)
            .send()
            .await
            .map_err(|e| api("UpdateCertificateAuthority", e))?;
        Ok(())
    }
}
