//! AWS Private CA (ACM PCA): the agent's CSR is signed by `IssueCertificate`, collected with
//! `GetCertificate`, and the trust bundle is read with `GetCertificateAuthorityCertificate`.
//! Everything goes through `aws-sdk-acmpca` with credentials from the standard AWS chain
//! (environment, profile, IRSA web identity, EKS Pod Identity, ...).
//!
//! What this backend decides, as SPIRE's `aws_pca` and cert-manager's aws-privateca-issuer
//! do:
//! - **Validity.** PCA has no hours unit, so the lifetime asked for is an `ABSOLUTE` end date
//!   (now + `--cert-ttl`). It is capped for a CA in short-lived-certificate mode (at most
//!   seven days, less the hour PCA backdates `notBefore` by) and at the CA's own `NotAfter`,
//!   with a warning either way. Rotation follows the certificate returned, never the TTL
//!   asked for.
//! - **Signing algorithm.** `--acm-pca-signing-algorithm`, or derived from the CA's key
//!   algorithm (`DescribeCertificateAuthority`), read once and re-read after a state error.
//! - **Idempotency.** `IdempotencyToken` is a digest of the CSR, so the SDK's own retries of
//!   `IssueCertificate` cannot issue twice. A new renewal has a new key, so a new token.
//! - **Collecting.** `IssueCertificate` only queues the request: the certificate is polled
//!   with the SDK's `certificate_issued` waiter (through `RequestInProgressException`, with
//!   backoff, up to an overall deadline).
//! - **Quota.** PCA's request rate is low (tens per second per account and region), so at
//!   most [`MAX_IN_FLIGHT`] issuances run at once per agent; the rest queue. The secret
//!   manager already coalesces rotation requests of one identity into one CSR.
//! - **Errors.** Throttling, quota, in-progress, 5xx and timeouts are retryable; a CA not
//!   `ACTIVE`, a malformed CSR, access denied, an unknown CA and bad arguments are not, and
//!   each says what to fix.

pub mod settings;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_acmpca::Client;
use aws_sdk_acmpca::client::Waiters;
use aws_sdk_acmpca::config::http::HttpResponse;
use aws_sdk_acmpca::config::retry::RetryConfig;
use aws_sdk_acmpca::config::timeout::TimeoutConfig;
use aws_sdk_acmpca::config::{BehaviorVersion, Region};
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    CertificateAuthorityStatus, CertificateAuthorityUsageMode, KeyAlgorithm, SigningAlgorithm,
    Validity, ValidityPeriodType,
};
use aws_sdk_acmpca::waiters::certificate_issued::WaitUntilCertificateIssuedError;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Mutex, OnceCell, Semaphore};
use tracing::{debug, info, warn};

use crate::chain::{roots_of, split_roots};
use crate::pem::decode_certificates;
use crate::{CaError, CertificateAuthority, IssuedChain, SignRequest, TrustBundle};

/// The template that takes subject and SANs from the CSR, for end-entity certificates.
pub const DEFAULT_TEMPLATE_ARN: &str = "arn:aws:acm-pca:::template/EndEntityCertificate/V1";
/// Longest time one HTTP attempt may take, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to wait for an issued certificate to become readable, by default. Below the
/// secret manager's 30 s limit on a whole CA call.
pub const DEFAULT_ISSUE_WAIT: Duration = Duration::from_secs(20);
/// Most issuances one agent runs against PCA at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// The lifetime limit of a short-lived-certificate-mode CA: seven days, less the hour PCA
/// backdates `notBefore` by, in case the limit counts from there.
const SHORT_LIVED_MAX: Duration = Duration::from_secs(7 * 24 * 3600 - 3600);
/// How old the CA's description may be when its expiry limits a certificate.
const STALE_FACTS: Duration = Duration::from_secs(300);
/// Attempts per API call, the first included, by the SDK's standard retry strategy
/// (exponential backoff with jitter, and its client-side retry quota).
const SDK_MAX_ATTEMPTS: u32 = 3;

/// The ARN of a private CA: `arn:<partition>:acm-pca:<region>:<account>:certificate-authority/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaArn {
    arn: String,
    region: String,
}

/// An ARN that is not a private CA's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an ACM PCA certificate authority ARN (expected \
     arn:<partition>:acm-pca:<region>:<account>:certificate-authority/<id>): {0}"
)]
pub struct BadCaArn(String);

impl FromStr for CaArn {
    type Err = BadCaArn;

    fn from_str(s: &str) -> Result<Self, BadCaArn> {
        let bad = |why: &str| BadCaArn(why.to_owned());
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts[..] else {
            return Err(bad("too few ':'-separated fields"));
        };
        if arn != "arn" || partition.is_empty() {
            return Err(bad("it must start with arn:<partition>:"));
        }
        if service != "acm-pca" {
            return Err(bad("the service must be acm-pca"));
        }
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("the region field is empty or not a region name"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account field is not a 12-digit account ID"));
        }
        let id = resource
            .strip_prefix("certificate-authority/")
            .ok_or_else(|| bad("the resource must be certificate-authority/<id>"))?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad(
                "the CA ID is empty or has characters other than letters, digits and '-'",
            ));
        }
        Ok(Self {
            arn: s.to_owned(),
            region: region.to_owned(),
        })
    }
}

impl CaArn {
    /// The whole ARN.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The region the CA lives in.
    pub fn region(&self) -> &str {
        &self.region
    }
}

impl fmt::Display for CaArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// How to reach and use the private CA.
#[derive(Debug, Clone)]
pub struct AcmPcaConfig {
    /// The CA.
    pub ca_arn: CaArn,
    /// The region to call; the CA ARN's region when `None`.
    pub region: Option<String>,
    /// Endpoint URL instead of the region's (tests, VPC endpoints). Without it the SDK still
    /// honours `AWS_ENDPOINT_URL_ACM_PCA` and `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Signing algorithm name (e.g. `SHA256WITHECDSA`); derived from the CA's key when `None`.
    pub signing_algorithm: Option<String>,
    /// The certificate template.
    pub template_arn: String,
    /// Roots to trust instead of the CA's chain.
    pub trust_bundle: Option<TrustBundle>,
    /// Longest time one HTTP attempt may take.
    pub request_timeout: Duration,
    /// Longest time to wait for an issued certificate.
    pub issue_wait: Duration,
}

/// An ACM PCA configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AcmPcaConfigError(String);

impl AcmPcaConfig {
    /// The defaults for this CA: region from the ARN, algorithm from the CA, the end-entity
    /// template, the CA's own chain as trust bundle.
    pub fn new(ca_arn: CaArn) -> Self {
        Self {
            ca_arn,
            region: None,
            endpoint: None,
            signing_algorithm: None,
            template_arn: DEFAULT_TEMPLATE_ARN.to_owned(),
            trust_bundle: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            issue_wait: DEFAULT_ISSUE_WAIT,
        }
    }

    /// Checks what can be checked without calling AWS.
    pub fn check(&self) -> Result<(), AcmPcaConfigError> {
        if let Some(alg) = &self.signing_algorithm {
            parse_signing_algorithm(alg)?;
        }
        check_template_arn(&self.template_arn)?;
        if let Some(region) = &self.region
            && (region.is_empty()
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(AcmPcaConfigError(format!(
                "aws region {region:?} is not a region name, e.g. us-east-1"
            )));
        }
        if let Some(endpoint) = &self.endpoint {
            let ok = endpoint.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty()
            });
            if !ok {
                return Err(AcmPcaConfigError(format!(
                    "acm-pca endpoint {endpoint:?} is not an http:// or https:// URL"
                )));
            }
        }
        if self.request_timeout.is_zero() || self.issue_wait.is_zero() {
            return Err(AcmPcaConfigError(
                "acm-pca timeouts must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The signing algorithm of this name, or an error listing the valid ones.
pub fn parse_signing_algorithm(name: &str) -> Result<SigningAlgorithm, AcmPcaConfigError> {
    SigningAlgorithm::try_parse(name).map_err(|_| {
        AcmPcaConfigError(format!(
            "unknown ACM PCA signing algorithm {name:?}; expected one of {}",
            SigningAlgorithm::values().join(", ")
        ))
    })
}

fn check_template_arn(arn: &str) -> Result<(), AcmPcaConfigError> {
    // arn:<partition>:acm-pca:::template/<Name>/V<n>
    let ok = arn.starts_with("arn:")
        && arn
            .split_once(":acm-pca:::template/")
            .is_some_and(|(_, name)| !name.is_empty() && !name.contains(char::is_whitespace));
    if ok {
        Ok(())
    } else {
        Err(AcmPcaConfigError(format!(
            "acm-pca template ARN {arn:?} is not arn:<partition>:acm-pca:::template/<name>/V<n>, \
             e.g. {DEFAULT_TEMPLATE_ARN}"
        )))
    }
}

/// What the agent needs to know of the CA, from `DescribeCertificateAuthority`.
#[derive(Debug, Clone)]
struct CaFacts {
    key_algorithm: String,
    signing_algorithm: SigningAlgorithm,
    short_lived: bool,
    not_after: Option<SystemTime>,
    described_at: tokio::time::Instant,
}

/// The ACM PCA backend.
pub struct AcmPcaCa {
    config: AcmPcaConfig,
    region: String,
    client: OnceCell<Client>,
    /// Read once, single-flight; cleared when PCA says the CA's state changed.
    facts: Mutex<Option<CaFacts>>,
    in_flight: Semaphore,
}

impl fmt::Debug for AcmPcaCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmPcaCa")
            .field("ca_arn", &self.config.ca_arn.as_str())
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AcmPcaCa {
    /// A backend for this configuration. Calls nothing yet: credentials and the CA are first
    /// used at the first signature, so a CA that is unreachable at start-up is retried like
    /// any outage.
    pub fn new(config: AcmPcaConfig) -> Result<Self, AcmPcaConfigError> {
        config.check()?;
        let region = config
            .region
            .clone()
            .unwrap_or_else(|| config.ca_arn.region().to_owned());
        Ok(Self {
            config,
            region,
            client: OnceCell::new(),
            facts: Mutex::new(None),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// Like [`AcmPcaCa::new`], with these credentials instead of the standard AWS chain: for
    /// programs that embed the backend with their own provider, and for tests.
    pub async fn with_credentials(
        config: AcmPcaConfig,
        credentials: impl aws_sdk_acmpca::config::ProvideCredentials + 'static,
    ) -> Result<Self, AcmPcaConfigError> {
        let ca = Self::new(config)?;
        let sdk = ca
            .sdk_loader()
            .credentials_provider(credentials)
            .load()
            .await;
        // A fresh cell: it cannot be set already.
        let _ = ca.client.set(Client::new(&sdk));
        Ok(ca)
    }

    /// The SDK configuration: region, endpoint, retries and timeouts set here, credentials
    /// and everything else from the standard AWS chain.
    fn sdk_loader(&self) -> aws_config::ConfigLoader {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(SDK_MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(self.config.request_timeout)
                    .build(),
            );
        if let Some(endpoint) = &self.config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        loader
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async { Client::new(&self.sdk_loader().load().await) })
            .await
    }

    /// The CA's facts, described once and cached; a CA that is not `ACTIVE` is an error and
    /// is not cached, so the next attempt looks again.
    async fn facts(&self) -> Result<CaFacts, CaError> {
        let mut cached = self.facts.lock().await;
        if let Some(facts) = cached.as_ref() {
            return Ok(facts.clone());
        }
        let client = self.client().await;
        let out = client
            .describe_certificate_authority()
            .certificate_authority_arn(self.config.ca_arn.as_str())
            .send()
            .await
            .map_err(|e| self.classify("DescribeCertificateAuthority", &e))?;
        let ca = out.certificate_authority().ok_or_else(|| {
            CaError::BadResponse("DescribeCertificateAuthority: no CertificateAuthority".into())
        })?;
        let status = ca.status().map_or("unknown", |s| s.as_str());
        if ca.status() != Some(&CertificateAuthorityStatus::Active) {
            return Err(self.not_active(status, "DescribeCertificateAuthority"));
        }
        let config = ca.certificate_authority_configuration().ok_or_else(|| {
            CaError::BadResponse(
                "DescribeCertificateAuthority: no CertificateAuthorityConfiguration".into(),
            )
        })?;
        let key = config.key_algorithm();
        let signing_algorithm = match &self.config.signing_algorithm {
            Some(name) => {
                let alg = parse_signing_algorithm(name)
                    .map_err(|e| CaError::Misconfigured(e.to_string()))?;
                if !algorithm_fits_key(&alg, key) {
                    return Err(CaError::Misconfigured(format!(
                        "--acm-pca-signing-algorithm {name} cannot sign with the key of CA {} \
                         ({}); use one for that key type, or leave the flag out to derive it",
                        self.config.ca_arn,
                        key.as_str()
                    )));
                }
                alg
            }
            None => algorithm_for_key(key).unwrap_or_else(|| config.signing_algorithm().clone()),
        };
        let facts = CaFacts {
            key_algorithm: key.as_str().to_owned(),
            signing_algorithm,
            short_lived: ca.usage_mode()
                == Some(&CertificateAuthorityUsageMode::ShortLivedCertificate),
            not_after: ca.not_after().and_then(|t| SystemTime::try_from(*t).ok()),
            described_at: tokio::time::Instant::now(),
        };
        info!(
            ca = %self.config.ca_arn,
            key_algorithm = %facts.key_algorithm,
            signing_algorithm = facts.signing_algorithm.as_str(),
            short_lived_mode = facts.short_lived,
            "acm-pca CA described"
        );
        *cached = Some(facts.clone());
        Ok(facts)
    }

    /// Forgets the CA's facts, after PCA said its state is not what they say.
    async fn forget_facts(&self) {
        *self.facts.lock().await = None;
    }

    /// The lifetime to ask for: `ttl`, capped by the CA's mode and its own expiry.
    fn validity(&self, ttl: Duration, facts: &CaFacts, now: SystemTime) -> Duration {
        let mut ttl = ttl;
        if facts.short_lived && ttl > SHORT_LIVED_MAX {
            warn!(
                ca = %self.config.ca_arn,
                asked_s = ttl.as_secs(),
                capped_s = SHORT_LIVED_MAX.as_secs(),
                "the CA is in short-lived-certificate mode (at most 7 days); asking for less than --cert-ttl"
            );
            ttl = SHORT_LIVED_MAX;
        }
        if let Some(left) = facts
            .not_after
            .and_then(|end| end.duration_since(now).ok())
            .filter(|left| *left < ttl)
        {
            warn!(
                ca = %self.config.ca_arn,
                asked_s = ttl.as_secs(),
                ca_left_s = left.as_secs(),
                "the CA's own certificate expires before --cert-ttl would; asking for a certificate ending with it. Renew the CA"
            );
            ttl = left;
        }
        ttl
    }

    fn not_active(&self, status: &str, call: &str) -> CaError {
        CaError::Misconfigured(format!(
            "{call}: CA {} is {status}, not ACTIVE: install its certificate, re-enable or \
             restore it, or point --acm-pca-arn at an active CA",
            self.config.ca_arn
        ))
    }

    /// Sorts an SDK error of `call` into a [`CaError`] with a line that says what to fix.
    fn classify<E>(&self, call: &str, err: &SdkError<E, HttpResponse>) -> CaError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let arn = &self.config.ca_arn;
        match err {
            SdkError::TimeoutError(_) => CaError::Timeout(self.config.request_timeout),
            SdkError::DispatchFailure(d) if d.is_timeout() => {
                CaError::Timeout(self.config.request_timeout)
            }
            _ if is_credentials_error(err) => CaError::Unavailable(format!(
                "{call}: no usable AWS credentials: {}. Give the agent an AWS identity: IRSA \
                 or EKS Pod Identity in a cluster, else AWS_* variables or a profile",
                crate::error_chain(err)
            )),
            SdkError::DispatchFailure(d) if d.is_user() => {
                CaError::Misconfigured(format!("{call}: {}", crate::error_chain(err)))
            }
            SdkError::DispatchFailure(_) => CaError::Unavailable(format!(
                "{call}: cannot reach ACM PCA in {}: {}",
                self.region,
                crate::error_chain(err)
            )),
            SdkError::ConstructionFailure(_) => CaError::Unavailable(format!(
                "{call}: request not sent: {}",
                crate::error_chain(err)
            )),
            SdkError::ResponseError(r) => {
                let status = r.raw().status().as_u16();
                let said = format!(
                    "HTTP {status} with an answer that is not ACM PCA's ({}): {}",
                    crate::error_chain(err),
                    one_line("", r.raw().body().bytes())
                );
                by_status(call, status, &said)
            }
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let code = s.err().code().unwrap_or("");
                let message = s.err().message().unwrap_or("");
                let said = if code.is_empty() {
                    format!(
                        "HTTP {status}: {}",
                        one_line(message, s.raw().body().bytes())
                    )
                } else {
                    format!("{code}: {message}")
                };
                match code {
                    "ThrottlingException"
                    | "Throttling"
                    | "TooManyRequestsException"
                    | "RequestLimitExceeded"
                    | "LimitExceededException" => CaError::Throttled(format!(
                        "{call}: {said} (PCA's request quota; backing off)"
                    )),
                    "RequestInProgressException" => CaError::Unavailable(format!(
                        "{call}: {said} (the certificate is not ready yet)"
                    )),
                    "RequestFailedException" | "ServiceUnavailable" | "InternalFailure" => {
                        CaError::Unavailable(format!("{call}: {said}"))
                    }
                    "ExpiredTokenException" | "RequestExpired" => CaError::Unavailable(format!(
                        "{call}: {said} (AWS credentials expired; the SDK refreshes them)"
                    )),
                    "InvalidStateException" => CaError::Misconfigured(format!(
                        "{call}: {said}. CA {arn} is not ACTIVE (disabled, pending its \
                         certificate, expired or deleted): activate it, or point \
                         --acm-pca-arn at an active CA"
                    )),
                    "MalformedCSRException" | "MalformedCsrException" => {
                        CaError::Misconfigured(format!(
                            "{call}: {said}. PCA refused the CSR: check that --key-type is one \
                             the CA and --acm-pca-template-arn accept"
                        ))
                    }
                    "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "InvalidClientTokenId"
                    | "InvalidSignatureException"
                    | "SignatureDoesNotMatch"
                    | "MissingAuthenticationToken" => CaError::Denied(format!(
                        "{call}: {said}. The agent's AWS identity needs acm-pca:{call} on \
                             {arn} (and, for IssueCertificate, the template in the policy's \
                             acm-pca:TemplateArn condition); see docs/backends/acm-pca.md"
                    )),
                    "ResourceNotFoundException" | "InvalidArnException" => {
                        CaError::Misconfigured(format!(
                            "{call}: {said}. No CA {arn} in region {}: check --acm-pca-arn and \
                             --aws-region",
                            self.region
                        ))
                    }
                    "InvalidArgsException"
                    | "ValidationException"
                    | "InvalidRequestException"
                    | "InvalidParameterException" => CaError::Misconfigured(format!(
                        "{call}: {said}. PCA refused the arguments: check \
                         --acm-pca-template-arn, --acm-pca-signing-algorithm and --cert-ttl \
                         (not past the CA's own expiry)"
                    )),
                    _ => by_status(call, status, &said),
                }
            }
            _ => CaError::Unavailable(format!("{call}: {}", crate::error_chain(err))),
        }
    }

    /// Sorts a waiter's failure to collect the certificate.
    fn waiter_error(&self, err: WaitUntilCertificateIssuedError) -> CaError {
        use aws_smithy_runtime_api::client::waiters::error::WaiterError;
        match err {
            WaiterError::ExceededMaxWait(_) => CaError::Timeout(self.config.issue_wait),
            WaiterError::OperationFailed(e) => self.classify("GetCertificate", e.error()),
            WaiterError::FailureState(state) => match state.final_poll().as_result() {
                Ok(_) => CaError::BadResponse("GetCertificate: waiter failed on success".into()),
                Err(e) => {
                    let said = format!(
                        "{}: {}",
                        e.code().unwrap_or("error"),
                        e.message().unwrap_or("")
                    );
                    if e.code() == Some("AccessDeniedException") {
                        CaError::Denied(format!(
                            "GetCertificate: {said}. The agent's AWS identity needs \
                             acm-pca:GetCertificate on {}",
                            self.config.ca_arn
                        ))
                    } else {
                        CaError::BadResponse(format!("GetCertificate: {said}"))
                    }
                }
            },
            other => {
                CaError::Misconfigured(format!("GetCertificate: {}", crate::error_chain(&other)))
            }
        }
    }

    async fn issue(&self, req: &SignRequest, facts: &CaFacts) -> Result<IssuedChain, CaError> {
        let client = self.client().await;
        let now = SystemTime::now();
        let ttl = self.validity(req.ttl, facts, now);
        let not_after = now
            .checked_add(ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .ok_or_else(|| CaError::Misconfigured(format!("--cert-ttl {ttl:?} is out of range")))?;
        // Whole seconds, rounded up, so the certificate lives at least as long as asked.
        let not_after_s = i64::try_from(
            not_after.as_secs() + u64::from(not_after.subsec_nanos() > 0),
        )
        .map_err(|_| CaError::Misconfigured(format!("--cert-ttl {ttl:?} is out of range")))?;
        let validity = Validity::builder()
            .r#type(ValidityPeriodType::Absolute)
            .value(not_after_s)
            .build()
            .map_err(|e| CaError::Misconfigured(format!("validity: {e}")))?;
        let csr_pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone()));
        let issued = client
            .issue_certificate()
            .certificate_authority_arn(self.config.ca_arn.as_str())
            .csr(Blob::new(csr_pem))
            .signing_algorithm(facts.signing_algorithm.clone())
            .template_arn(&self.config.template_arn)
            .validity(validity)
            .idempotency_token(idempotency_token(&req.csr_der))
            .send()
            .await;
        let issued = match issued {
            Ok(out) => out,
            Err(e) => {
                if e.as_service_error().and_then(ProvideErrorMetadata::code)
                    == Some("InvalidStateException")
                {
                    self.forget_facts().await;
                }
                return Err(self.classify("IssueCertificate", &e));
            }
        };
        let cert_arn = issued.certificate_arn().ok_or_else(|| {
            CaError::BadResponse("IssueCertificate: no CertificateArn in the answer".into())
        })?;
        debug!(certificate_arn = cert_arn, "acm-pca issuance queued");
        let polled = client
            .wait_until_certificate_issued()
            .certificate_authority_arn(self.config.ca_arn.as_str())
            .certificate_arn(cert_arn)
            .wait(self.config.issue_wait)
            .await
            .map_err(|e| self.waiter_error(e))?;
        let out = polled
            .into_result()
            .map_err(|e| self.classify("GetCertificate", &e))?;
        parse_issued(out.certificate(), out.certificate_chain())
            .map_err(|e| CaError::BadResponse(format!("GetCertificate: {e}")))
    }
}

#[async_trait::async_trait]
impl CertificateAuthority for AcmPcaCa {
    fn name(&self) -> &'static str {
        "acm-pca"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| CaError::Unavailable("acm-pca backend is shutting down".into()))?;
        let mut facts = self.facts().await?;
        // The CA's expiry would shorten this certificate: make sure it is still the CA's
        // expiry (a CA certificate renewed since it was read moves it), at most once per
        // STALE_FACTS.
        let ends_early = facts
            .not_after
            .is_some_and(|end| end < SystemTime::now() + req.ttl);
        if ends_early && facts.described_at.elapsed() > STALE_FACTS {
            self.forget_facts().await;
            facts = self.facts().await?;
        }
        self.issue(req, &facts).await
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        if let Some(pinned) = &self.config.trust_bundle {
            return Ok(pinned.clone());
        }
        let client = self.client().await;
        let out = client
            .get_certificate_authority_certificate()
            .certificate_authority_arn(self.config.ca_arn.as_str())
            .send()
            .await
            .map_err(|e| self.classify("GetCertificateAuthorityCertificate", &e))?;
        let chain =
            parse_ca_certificate(out.certificate(), out.certificate_chain()).map_err(|e| {
                CaError::BadResponse(format!("GetCertificateAuthorityCertificate: {e}"))
            })?;
        TrustBundle::new(roots_of("acm-pca", &[chain]))
            .map_err(|e| CaError::BadResponse(format!("GetCertificateAuthorityCertificate: {e}")))
    }
}

/// The signing algorithm for a CA key: SHA-2 sized to the key.
fn algorithm_for_key(key: &KeyAlgorithm) -> Option<SigningAlgorithm> {
    Some(match key {
        KeyAlgorithm::Rsa2048 => SigningAlgorithm::Sha256Withrsa,
        KeyAlgorithm::Rsa3072 => SigningAlgorithm::Sha384Withrsa,
        KeyAlgorithm::Rsa4096 => SigningAlgorithm::Sha512Withrsa,
        KeyAlgorithm::EcPrime256v1 => SigningAlgorithm::Sha256Withecdsa,
        KeyAlgorithm::EcSecp384r1 => SigningAlgorithm::Sha384Withecdsa,
        KeyAlgorithm::EcSecp521r1 => SigningAlgorithm::Sha512Withecdsa,
        KeyAlgorithm::Sm2 => SigningAlgorithm::Sm3Withsm2,
        KeyAlgorithm::MlDsa44 => SigningAlgorithm::MlDsa44,
        KeyAlgorithm::MlDsa65 => SigningAlgorithm::MlDsa65,
        KeyAlgorithm::MlDsa87 => SigningAlgorithm::MlDsa87,
        _ => return None,
    })
}

/// Whether `alg` can sign with a CA key of type `key` (the same family).
fn algorithm_fits_key(alg: &SigningAlgorithm, key: &KeyAlgorithm) -> bool {
    let (a, k) = (alg.as_str(), key.as_str());
    if k.starts_with("RSA_") {
        a.contains("WITHRSA")
    } else if k.starts_with("EC_") {
        a.ends_with("WITHECDSA")
    } else if k == "SM2" {
        a == "SM3WITHSM2"
    } else {
        // ML-DSA keys sign with the algorithm of their own name; unknown keys: let PCA judge.
        !k.starts_with("ML_DSA_") || a == k
    }
}

/// The retry-safe token of one CSR: 32 hex digits of its SHA-256 (PCA allows 36 characters).
fn idempotency_token(csr_der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr_der);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Leaf and chain of a `GetCertificate` answer: `Certificate` (one PEM certificate) and
/// `CertificateChain` (PEM, issuer first; roots move to the hint).
fn parse_issued(certificate: Option<&str>, chain: Option<&str>) -> Result<IssuedChain, String> {
    let leaf_pem = certificate.ok_or("no Certificate in the answer")?;
    let mut leaf =
        decode_certificates(leaf_pem.as_bytes()).map_err(|e| format!("Certificate: {e}"))?;
    if leaf.len() != 1 {
        return Err(format!(
            "Certificate holds {} certificates, expected 1",
            leaf.len()
        ));
    }
    let above = match chain.filter(|c| !c.trim().is_empty()) {
        Some(pem) => {
            decode_certificates(pem.as_bytes()).map_err(|e| format!("CertificateChain: {e}"))?
        }
        None => Vec::new(),
    };
    let (intermediates, roots_hint) = split_roots(above);
    Ok(IssuedChain {
        leaf: leaf.remove(0),
        intermediates,
        roots_hint,
    })
}

/// The CA's certificate and the chain above it, from `GetCertificateAuthorityCertificate`.
fn parse_ca_certificate(
    certificate: Option<&str>,
    chain: Option<&str>,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = certificate.ok_or("no Certificate in the answer")?;
    let mut certs = decode_certificates(pem.as_bytes()).map_err(|e| format!("Certificate: {e}"))?;
    if let Some(chain) = chain.filter(|c| !c.trim().is_empty()) {
        certs.extend(
            decode_certificates(chain.as_bytes()).map_err(|e| format!("CertificateChain: {e}"))?,
        );
    }
    Ok(certs)
}

/// Whether the call failed because no credentials could be had from the chain.
fn is_credentials_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// An HTTP status sorted into retryable or not, for answers without an AWS error code (such
/// as an HTML error page from a proxy, or moto's answer to input it cannot parse).
fn by_status(call: &str, status: u16, said: &str) -> CaError {
    match status {
        429 => CaError::Throttled(format!("{call}: {said}")),
        500..=599 => CaError::Unavailable(format!("{call}: {said}")),
        401 | 403 => CaError::Denied(format!("{call}: {said}")),
        400..=499 => CaError::Misconfigured(format!("{call}: {said}")),
        _ => CaError::BadResponse(format!("{call}: {said}")),
    }
}

/// A message, or failing that the start of the body, on one line and short.
fn one_line(message: &str, body: Option<&[u8]>) -> String {
    let text = if message.is_empty() {
        body.map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    } else {
        message.to_owned()
    };
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests;
