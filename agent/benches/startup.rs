//! Time from process start to the first secret served, time to exit on SIGTERM, and idle
//! memory, for the release binary on the embedded CA. Prints figures;
//! `docs/benchmarks.md` records them.
//!
//! `cargo build --release -p sds-agent && cargo bench -p sds-agent --bench startup`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, free_local_addr, release_binary, rss_parts, terminate};
use envoy_types::pb::envoy::config::core::v3::DataSource;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;

const RUNS: usize = 20;

fn main() {
    let bin = release_binary();
    let (mut exec, mut accepting, mut first, mut exits, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        // The floor for any start-up: exec, dynamic loading and exit of the same binary,
        // doing nothing (`sds-agent version`).
        let t = Instant::now();
        let status = Command::new(&bin)
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        exec.push(t.elapsed());
        assert!(status.success());

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let admin = free_local_addr();
        // A runtime per run, built before the clock starts and dropped (closing the client's
        // connection, as a proxy that goes away would) before the agent is told to stop.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
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
        let connected = rt.block_on(first_secret(&socket));
        first.push(started.elapsed());
        accepting.push(connected - started);
        drop(rt);
        if i == 0 {
            // Idle with one identity: let it settle, then read its resident set.
            std::thread::sleep(Duration::from_secs(1));
            rss.push(rss_parts(child.id()));
        }
        let stop = Instant::now();
        terminate(&mut child);
        exits.push(stop.elapsed());
        assert!(!socket.exists(), "socket left behind");
    }
    println!(
        "sds-agent start-up benchmark: {RUNS} runs of {}",
        bin.display()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "milliseconds", "p50", "p90", "max"
    );
    row("`sds-agent version`: spawn -> exit", &exec);
    row("run: process start -> SDS socket connected", &accepting);
    row("run: process start -> first secret served", &first);
    row("SIGTERM -> exit (socket removed)", &exits);
    println!(
        "idle with one identity, 1 s after the first secret: {}",
        rss[0]
    );
}

/// Connects to the socket as soon as it exists and fetches `default` until it is served.
/// Returns when the first connection was established.
async fn first_secret(socket: &Path) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut connected = None;
    loop {
        assert!(Instant::now() < deadline, "no secret within 10 s");
        if let Ok(mut client) = connect(socket).await {
            let at = *connected.get_or_insert_with(Instant::now);
            let req = DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
                    .into(),
                ..Default::default()
            };
            if let Ok(resp) = client.fetch_secrets(req).await
                && carries_certificate(resp.get_ref())
            {
                return at;
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Whether the response holds a `default` secret whose TLS certificate has a chain in it.
fn carries_certificate(resp: &DiscoveryResponse) -> bool {
    resp.resources.iter().any(|any| {
        Secret::decode(any.value.as_slice()).is_ok_and(|s| {
            s.name == "default"
                && matches!(
                    s.r#type,
                    Some(secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: Some(DataSource {
                            specifier: Some(_),
                            ..
                        }),
                        ..
                    }))
                )
        })
    })
}

fn row(name: &str, v: &[Duration]) {
    let mut s = v.to_vec();
    s.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<44} {:>9.2} {:>9.2} {:>9.2}",
        ms(p(0.5)),
        ms(p(0.9)),
        ms(s[s.len() - 1])
    );
}
