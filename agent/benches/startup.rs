//! Time from process start to the first secret served, time to exit on SIGTERM, and idle
//! memory, for the release binary on the embedded CA. Prints figures;
//! `docs/benchmarks.md` records them.
//!
//! `cargo build --release -p sds-agent && cargo bench -p sds-agent --bench startup`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::Endpoint;

const RUNS: usize = 20;

fn main() {
    let bin = release_binary();
    let (mut first, mut exits, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args([
                "run",
                "--log-level",
                "warn",
                "--admin-addr",
                &admin.to_string(),
            ])
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A runtime per run, dropped (closing the client's connection, as a proxy that goes
        // away would) before the agent is told to stop.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(first_secret(&socket));
        first.push(started.elapsed());
        drop(rt);
        if i == 0 {
            // Idle with one identity: let it settle, then read its resident set.
            std::thread::sleep(Duration::from_secs(1));
            rss.push(vm_rss_kib(child.id()));
        }
        let stop = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        exits.push(stop.elapsed());
        assert!(status.success(), "agent exited with {status}");
        assert!(!socket.exists(), "socket left behind");
    }
    println!(
        "sds-agent start-up benchmark: {RUNS} runs of {}",
        bin.display()
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "milliseconds", "p50", "p90", "max"
    );
    row("process start -> first secret served", &first);
    row("SIGTERM -> exit (socket removed)", &exits);
    println!("idle RSS with one identity: {} KiB", rss[0]);
}

/// Connects to the socket as soon as it exists and fetches `default` until it is served.
async fn first_secret(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no secret within 10 s");
        if let Ok(mut client) = connect(socket).await {
            let req = DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
                    .into(),
                ..Default::default()
            };
            if let Ok(resp) = client.fetch_secrets(req).await
                && !resp.get_ref().resources.is_empty()
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn connect(
    socket: &Path,
) -> Result<SecretDiscoveryServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

fn release_binary() -> PathBuf {
    // target/release/deps/startup-<hash> → target/release/sds-agent
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

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn row(name: &str, v: &[Duration]) {
    let mut s = v.to_vec();
    s.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<40} {:>9.2} {:>9.2} {:>9.2}",
        ms(p(0.5)),
        ms(p(0.9)),
        ms(s[s.len() - 1])
    );
}
