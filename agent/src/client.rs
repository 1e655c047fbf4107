//! The commands that talk to a running agent through its admin endpoint: `status`,
//! `rotate` and `ca rotate`, plus `version`. Each prints to the writer it is given and returns the process
//! exit code, so scripts can branch on it:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; for `status`, ready and no proxy rejecting its secrets |
//! | 1 | the agent could not be reached, or answered something unexpected |
//! | 2 | bad command line (clap's own code) |
//! | 3 | `status`: the agent serves no valid certificate (not ready) |
//! | 4 | `status`: a connected proxy rejected (NACKed) its secrets |

use std::io::Write;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{ClientArgs, OutputFormat, RotateArgs};

/// Exit code: the agent could not be reached or answered unexpectedly.
pub const EXIT_UNREACHABLE: u8 = 1;
/// Exit code of `status`: no valid certificate is served.
pub const EXIT_NOT_READY: u8 = 3;
/// Exit code of `status`: a proxy NACKed.
pub const EXIT_NACKED: u8 = 4;

/// How often `rotate --wait` looks for the new certificate.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// The most of an answer's body quoted in an error.
const QUOTED: usize = 200;

/// A served secret, as `/secrets` lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SecretView {
    /// `default` or `ROOTCA`.
    pub name: String,
    /// SPIFFE ID (for `ROOTCA`, the trust domain's).
    pub spiffe_id: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339, `default` only.
    pub next_renewal: Option<String>,
    /// Version served on SDS streams.
    pub version: u64,
    /// The CA backend.
    pub backend: String,
}

/// A connected proxy, as `/proxies` lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyView {
    /// Stream number.
    pub stream: u64,
    /// sotw, delta, or workload (the SPIFFE Workload API).
    pub api: String,
    /// Envoy node ID.
    pub node_id: String,
    /// Resources subscribed.
    pub resources: Vec<String>,
    /// Last version sent.
    pub sent_version: Option<String>,
    /// Last version ACKed.
    pub acked_version: Option<String>,
    /// Last NACK's message.
    pub nack: Option<String>,
    /// acked, nacked, pending or waiting; streaming for a Workload API stream.
    pub state: String,
}

/// What `status` reports, and prints with `--output json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The admin address asked.
    pub admin: String,
    /// Whether a valid certificate and trust bundle are served.
    pub ready: bool,
    /// `/readyz`'s health details when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    /// Served secrets.
    pub secrets: Vec<SecretView>,
    /// Connected proxies.
    pub proxies: Vec<ProxyView>,
    /// The served roots and the staged root rotation, as `/trust` says.
    pub trust: TrustView,
}

/// `/trust`: the served roots and the root rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustView {
    /// The served bundle's version.
    pub bundle_version: Option<u64>,
    /// Serials of the served roots.
    pub roots: Vec<RootView>,
    /// SDS streams subscribed to the bundle.
    pub proxies_subscribed: usize,
    /// The rotation.
    pub rotation: RotationView,
}

/// A served root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootView {
    /// Serial, hex.
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
}

/// The staged root rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationView {
    /// `none`, `announced`, `issuing`, `retiring` or `removed`.
    pub phase: String,
    /// 0 to 4.
    pub phase_number: i64,
    /// Serials of the roots being replaced.
    pub old_roots: Vec<String>,
    /// Serials of the roots replacing them.
    pub new_roots: Vec<String>,
    /// What the phase waits for.
    pub waiting_for: Option<String>,
    /// The phases entered, in order.
    pub history: Vec<PhaseView>,
}

/// A phase entered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseView {
    /// The phase.
    pub phase: String,
    /// RFC 3339.
    pub at: String,
}

/// A failed exchange with the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection, or no answer in time.
    #[error(
        "cannot reach the agent's admin endpoint at {url}: {reason} (is the agent running, and is --admin-addr right?)"
    )]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// An answer that is not what the agent sends.
    #[error("unexpected answer from {url}: {reason}")]
    Unexpected {
        /// What was asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// `rotate --wait` saw no new certificate in time.
    #[error(
        "no new certificate within {0:?}; see the agent's log and `sds-agent status` (the CA may be failing)"
    )]
    NotRotated(Duration),
}

/// A small HTTP client for the admin endpoint.
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(args: &ClientArgs) -> Result<Self, ClientError> {
        let base = if args.admin_addr.contains("://") {
            args.admin_addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", args.admin_addr)
        };
        // The admin endpoint is plain HTTP: no TLS roots are loaded, so the commands work in
        // an image without a CA bundle, and a broken bundle cannot stop them.
        let http = reqwest::Client::builder()
            .timeout(args.timeout)
            .no_proxy()
            .tls_certs_only(std::iter::empty())
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self { base, http })
    }

    /// Sends a request; returns the status code and the body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: sds_backends::error_chain(&e),
        };
        let resp = self
            .http
            .request(method, &url)
            .send()
            .await
            .map_err(unreachable)?;
        let code = resp.status().as_u16();
        let body = resp.bytes().await.map_err(unreachable)?;
        Ok((code, body.to_vec()))
    }

    /// GETs `path` and parses its JSON, expecting one of `codes`.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        codes: &[u16],
    ) -> Result<(u16, T), ClientError> {
        let (code, body) = self.call(reqwest::Method::GET, path).await?;
        let unexpected = |reason: String| ClientError::Unexpected {
            url: format!("{}{path}", self.base),
            reason,
        };
        if !codes.contains(&code) {
            return Err(unexpected(format!(
                "HTTP {code}: {}",
                sds_backends::quote(&String::from_utf8_lossy(&body), QUOTED)
            )));
        }
        let value = serde_json::from_slice(&body).map_err(|e| {
            unexpected(format!(
                "not the JSON the agent sends ({e}): {}",
                sds_backends::quote(&String::from_utf8_lossy(&body), QUOTED)
            ))
        })?;
        Ok((code, value))
    }

    async fn secrets(&self) -> Result<Vec<SecretView>, ClientError> {
        Ok(self.get_json("/secrets", &[200]).await?.1)
    }
}

/// Reads `/readyz`, `/secrets` and `/proxies`.
pub async fn fetch_status(args: &ClientArgs) -> Result<Status, ClientError> {
    let admin = Admin::new(args)?;
    let (ready, secrets, proxies, trust) = tokio::try_join!(
        admin.get_json::<serde_json::Value>("/readyz", &[200, 503]),
        admin.secrets(),
        admin.get_json::<Vec<ProxyView>>("/proxies", &[200]),
        admin.get_json::<TrustView>("/trust", &[200]),
    )?;
    let (code, body) = ready;
    Ok(Status {
        admin: args.admin_addr.clone(),
        ready: code == 200,
        health: body.get("health").cloned(),
        secrets,
        proxies: proxies.1,
        trust: trust.1,
    })
}

/// `sds-agent status`.
pub async fn status(args: &ClientArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let status = match fetch_status(args).await {
        Ok(s) => s,
        Err(e) => {
            drop(writeln!(err, "error: {e}"));
            return EXIT_UNREACHABLE;
        }
    };
    let printed = match args.output {
        OutputFormat::Json => serde_json::to_string_pretty(&status)
            .map_err(std::io::Error::other)
            .and_then(|json| writeln!(out, "{json}")),
        OutputFormat::Text => write_status_text(&status, SystemTime::now(), out),
    };
    // A closed stdout (`| head`) is not worth a failure code of its own.
    drop(printed);
    if !status.ready {
        EXIT_NOT_READY
    } else if status.proxies.iter().any(|p| p.state == "nacked") {
        EXIT_NACKED
    } else {
        0
    }
}

/// The `status` table, in the spirit of `istioctl proxy-config secret`.
pub fn write_status_text(s: &Status, now: SystemTime, out: &mut dyn Write) -> std::io::Result<()> {
    let state = if s.ready { "ready" } else { "NOT READY" };
    writeln!(out, "agent {}: {state}", s.admin)?;
    if let Some(health) = &s.health {
        writeln!(out, "health: {health}")?;
    }
    writeln!(out)?;
    let mut rows = vec![
        [
            "RESOURCE",
            "SPIFFE ID",
            "SERIAL",
            "VALID FROM",
            "VALID UNTIL",
            "RENEWAL IN",
            "BACKEND",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for sec in &s.secrets {
        let renewal = sec
            .next_renewal
            .as_deref()
            .map_or_else(|| "-".to_owned(), |t| until(t, now));
        rows.push(vec![
            sec.name.clone(),
            sec.spiffe_id.clone(),
            sec.serial.clone(),
            sec.not_before.clone(),
            sec.not_after.clone(),
            renewal,
            sec.backend.clone(),
        ]);
    }
    if s.secrets.is_empty() {
        writeln!(out, "no secrets served yet")?;
    } else {
        write_table(&rows, out)?;
    }
    writeln!(out)?;
    write_trust_text(&s.trust, out)?;
    writeln!(out)?;
    if s.proxies.is_empty() {
        return writeln!(out, "no proxies connected");
    }
    let mut rows = vec![
        ["STREAM", "NODE", "API", "RESOURCES", "VERSION", "STATE"]
            .map(String::from)
            .to_vec(),
    ];
    for p in &s.proxies {
        let state = match &p.nack {
            Some(msg) => format!("NACKED: {msg}"),
            None => p.state.to_uppercase(),
        };
        rows.push(vec![
            p.stream.to_string(),
            if p.node_id.is_empty() {
                "-".into()
            } else {
                p.node_id.clone()
            },
            p.api.clone(),
            p.resources.join(","),
            // Workload API streams have no ACKs: their version is the one last sent.
            p.acked_version
                .clone()
                .or_else(|| {
                    (p.api == "workload")
                        .then(|| p.sent_version.clone())
                        .flatten()
                })
                .unwrap_or_else(|| "-".into()),
            state,
        ]);
    }
    write_table(&rows, out)
}

/// The roots and the root rotation's phase.
fn write_trust_text(t: &TrustView, out: &mut dyn Write) -> std::io::Result<()> {
    let roots: Vec<&str> = t.roots.iter().map(|r| r.serial.as_str()).collect();
    writeln!(
        out,
        "trust bundle: version {}, roots {}",
        t.bundle_version
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        if roots.is_empty() {
            "-".to_owned()
        } else {
            roots.join(", ")
        }
    )?;
    let r = &t.rotation;
    let history = r
        .history
        .iter()
        .map(|h| format!("{} at {}", h.phase, h.at))
        .collect::<Vec<_>>()
        .join(" -> ");
    match r.phase.as_str() {
        "none" => writeln!(out, "root rotation: none"),
        "removed" => writeln!(out, "root rotation: complete (phase 4/4): {history}"),
        phase => {
            writeln!(
                out,
                "root rotation: phase {}/4 {phase}; old {} -> new {}; {history}",
                r.phase_number,
                r.old_roots.join(","),
                r.new_roots.join(","),
            )?;
            match &r.waiting_for {
                Some(w) => writeln!(out, "  waiting for {w}"),
                None => Ok(()),
            }
        }
    }
}

/// `sds-agent ca rotate`.
pub async fn ca_rotate(args: &ClientArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = async {
        let admin = Admin::new(args)?;
        let (code, body) = admin.call(reqwest::Method::POST, "/ca/rotate").await?;
        let url = format!("{}/ca/rotate", admin.base);
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
                url: url.clone(),
                reason: format!(
                    "HTTP {code}, not the JSON the agent sends ({e}): {}",
                    sds_backends::quote(&String::from_utf8_lossy(&body), QUOTED)
                ),
            })?;
        Ok::<_, ClientError>((code, json, url))
    }
    .await;
    match result {
        Ok((202, json, _)) => {
            let serial = json["new_root"].as_str().unwrap_or("-");
            let printed = match args.output {
                OutputFormat::Json => writeln!(out, "{json}"),
                OutputFormat::Text => writeln!(
                    out,
                    "root rotation begun: new root {serial}; follow its phases with `sds-agent status`"
                ),
            };
            drop(printed);
            0
        }
        Ok((code, json, url)) => {
            let reason = json["error"]
                .as_str()
                .map_or_else(|| json.to_string(), str::to_owned);
            drop(writeln!(
                err,
                "error: {url} refused (HTTP {code}): {}",
                sds_backends::quote(&reason, 400)
            ));
            EXIT_UNREACHABLE
        }
        Err(e) => {
            drop(writeln!(err, "error: {e}"));
            EXIT_UNREACHABLE
        }
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn write_table(rows: &[Vec<String>], out: &mut dyn Write) -> std::io::Result<()> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// "5h 3m", "42s", or "overdue" for an RFC 3339 time relative to `now`.
fn until(rfc3339: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339(rfc3339) else {
        return rfc3339.to_owned();
    };
    match t.duration_since(now) {
        Ok(d) => {
            let s = d.as_secs();
            match (s / 3600, (s % 3600) / 60, s % 60) {
                (0, 0, s) => format!("{s}s"),
                (0, m, s) => format!("{m}m {s}s"),
                (h, m, _) => format!("{h}h {m}m"),
            }
        }
        Err(_) => "overdue".into(),
    }
}

/// What `rotate --output json` prints.
#[derive(Debug, Serialize)]
struct RotateReport {
    requested: bool,
    previous_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<String>,
}

/// `sds-agent rotate`.
pub async fn rotate(args: &RotateArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match rotate_inner(args).await {
        Ok(report) => {
            let printed = match args.client.output {
                OutputFormat::Json => serde_json::to_string_pretty(&report)
                    .map_err(std::io::Error::other)
                    .and_then(|json| writeln!(out, "{json}")),
                OutputFormat::Text => match (&report.serial, &report.not_after) {
                    (Some(serial), Some(not_after)) => {
                        writeln!(
                            out,
                            "new certificate served: serial {serial}, valid until {not_after}"
                        )
                    }
                    _ => writeln!(out, "rotation requested"),
                },
            };
            drop(printed);
            0
        }
        Err(e) => {
            drop(writeln!(err, "error: {e}"));
            EXIT_UNREACHABLE
        }
    }
}

async fn rotate_inner(args: &RotateArgs) -> Result<RotateReport, ClientError> {
    let admin = Admin::new(&args.client)?;
    let deadline = Instant::now() + args.client.timeout;
    let default_serial = |secrets: &[SecretView]| {
        secrets
            .iter()
            .find(|s| s.name == crate::identity::DEFAULT_RESOURCE)
            .map(|s| (s.serial.clone(), s.not_after.clone()))
    };
    let before = default_serial(&admin.secrets().await?).map(|(s, _)| s);
    let (code, body) = admin.call(reqwest::Method::POST, "/rotate").await?;
    if code != 202 {
        return Err(ClientError::Unexpected {
            url: format!("{}/rotate", admin.base),
            reason: format!(
                "HTTP {code}: {}",
                sds_backends::quote(&String::from_utf8_lossy(&body), QUOTED)
            ),
        });
    }
    let mut report = RotateReport {
        requested: true,
        previous_serial: before.clone(),
        serial: None,
        not_after: None,
    };
    if !args.wait {
        return Ok(report);
    }
    loop {
        if let Some((serial, not_after)) = default_serial(&admin.secrets().await?)
            && Some(&serial) != before.as_ref()
        {
            report.serial = Some(serial);
            report.not_after = Some(not_after);
            return Ok(report);
        }
        if Instant::now() + WAIT_POLL > deadline {
            return Err(ClientError::NotRotated(args.client.timeout));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// What `version --output json` prints.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    /// The crate version.
    pub version: &'static str,
    /// CA backends built in.
    pub backends: &'static [&'static str],
}

/// `sds-agent version`.
pub fn version(output: OutputFormat, out: &mut dyn Write) -> u8 {
    let info = VersionInfo {
        version: env!("CARGO_PKG_VERSION"),
        backends: crate::BACKENDS,
    };
    let printed = match output {
        OutputFormat::Json => serde_json::to_string_pretty(&info)
            .map_err(std::io::Error::other)
            .and_then(|json| writeln!(out, "{json}")),
        OutputFormat::Text => writeln!(
            out,
            "sds-agent {} (backends: {})",
            info.version,
            info.backends.join(", ")
        ),
    };
    drop(printed);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_renewal_reads_as_people_write_it() {
        let now =
            humantime::parse_rfc3339("2026-11-23T10:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH);
        assert_eq!(until("2026-11-23T15:03:20Z", now), "5h 3m");
        assert_eq!(until("2026-11-23T10:02:05Z", now), "2m 5s");
        assert_eq!(until("2026-11-23T10:00:42Z", now), "42s");
        assert_eq!(until("2026-11-23T09:00:00Z", now), "overdue");
        assert_eq!(until("soon", now), "soon");
    }

    #[test]
    fn the_table_names_each_secret_and_each_proxy_state() {
        let now =
            humantime::parse_rfc3339("2026-11-23T10:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH);
        let status = Status {
            admin: "127.0.0.1:15020".into(),
            ready: true,
            health: None,
            secrets: vec![SecretView {
                name: "default".into(),
                spiffe_id: "spiffe://example.org/ns/default/sa/web".into(),
                serial: "0a1b".into(),
                not_before: "2026-11-23T09:00:00Z".into(),
                not_after: "2026-11-24T09:00:00Z".into(),
                next_renewal: Some("2026-11-23T21:00:00Z".into()),
                version: 2,
                backend: "vault".into(),
            }],
            proxies: vec![
                ProxyView {
                    stream: 1,
                    api: "sotw".into(),
                    node_id: "web-1".into(),
                    resources: vec!["default".into(), "ROOTCA".into()],
                    acked_version: Some("default:2,ROOTCA:1".into()),
                    state: "acked".into(),
                    ..ProxyView::default()
                },
                ProxyView {
                    stream: 2,
                    api: "delta".into(),
                    nack: Some("bad key".into()),
                    state: "nacked".into(),
                    ..ProxyView::default()
                },
                ProxyView {
                    stream: 3,
                    api: "workload".into(),
                    resources: vec!["x509-svid".into()],
                    sent_version: Some("default:2,ROOTCA:1".into()),
                    state: "streaming".into(),
                    ..ProxyView::default()
                },
            ],
            trust: TrustView {
                bundle_version: Some(3),
                roots: vec![
                    RootView {
                        serial: "01".into(),
                        not_after: "2027-11-23T09:00:00Z".into(),
                    },
                    RootView {
                        serial: "02".into(),
                        not_after: "2028-11-23T09:00:00Z".into(),
                    },
                ],
                proxies_subscribed: 1,
                rotation: RotationView {
                    phase: "announced".into(),
                    phase_number: 1,
                    old_roots: vec!["01".into()],
                    new_roots: vec!["02".into()],
                    waiting_for: Some("1 of 1 proxies to ACK bundle version 3".into()),
                    history: vec![PhaseView {
                        phase: "announced".into(),
                        at: "2026-11-23T09:59:00Z".into(),
                    }],
                },
            },
        };
        let mut out = Vec::new();
        assert!(write_status_text(&status, now, &mut out).is_ok());
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("agent 127.0.0.1:15020: ready"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("default"))
            .unwrap_or_default();
        for cell in [
            "spiffe://example.org/ns/default/sa/web",
            "0a1b",
            "11h 0m",
            "vault",
        ] {
            assert!(row.contains(cell), "{cell} missing from {row:?}");
        }
        assert!(text.contains("ACKED"), "{text}");
        assert!(
            text.contains("trust bundle: version 3, roots 01, 02"),
            "{text}"
        );
        assert!(
            text.contains("root rotation: phase 1/4 announced; old 01 -> new 02"),
            "{text}"
        );
        assert!(text.contains("waiting for 1 of 1 proxies to ACK"), "{text}");
        assert!(text.contains("NACKED: bad key"), "{text}");
        // A Workload API stream has no ACKs: its version is the one sent.
        let row = text
            .lines()
            .find(|l| l.starts_with('3'))
            .unwrap_or_default();
        for cell in ["workload", "x509-svid", "default:2,ROOTCA:1", "STREAMING"] {
            assert!(row.contains(cell), "{cell} missing from {row:?}");
        }
    }
}
