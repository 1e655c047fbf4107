//! Helpers shared by the bench binaries that run the release agent as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// An SDS client on the Unix socket at `socket`.
pub(crate) async fn connect(
    socket: &Path,
) -> Result<SecretDiscoveryServiceClient<Channel>, tonic::transport::Error> {
    Ok(SecretDiscoveryServiceClient::new(channel(socket).await?))
}

/// One HTTP/2 connection to the Unix socket at `socket`, for any gRPC client.
pub(crate) async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// `target/release/sds-agent`, next to this bench's own binary; exits with the build command
/// if it is missing.
pub(crate) fn release_binary() -> PathBuf {
    // target/release/deps/<bench>-<hash> → target/release/sds-agent
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("sds-agent");
    if !bin.exists() {
        eprintln!(
            "{} not found: run `cargo build --release -p sds-agent` first",
            bin.display()
        );
        std::process::exit(1);
    }
    bin
}

/// A loopback address with a port free now, for the agent's admin listener.
pub(crate) fn free_local_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends the agent SIGTERM and waits for it to exit; panics unless it exits 0.
pub(crate) fn terminate(child: &mut Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}

/// The resident set of process `pid`, KiB.
#[allow(dead_code)] // not every bench prints it
pub(crate) fn vm_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The anonymous part of process `pid`'s resident set (heap, stacks), KiB.
#[allow(dead_code)] // not every bench prints it
pub(crate) fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon")
}

/// `VmRSS` of process `pid` and its parts, KiB, as one line: anonymous memory (heap, stacks:
/// what the process itself allocated) and pages of mapped files (the executable and shared
/// libraries, which the kernel may map a large folio at a time) or tmpfs.
#[allow(dead_code)] // not every bench prints it
pub(crate) fn rss_parts(pid: u32) -> String {
    format!(
        "VmRSS {} KiB = RssAnon {} + RssFile {} + RssShmem {}",
        status_kib(pid, "VmRSS"),
        status_kib(pid, "RssAnon"),
        status_kib(pid, "RssFile"),
        status_kib(pid, "RssShmem")
    )
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
