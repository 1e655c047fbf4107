//! Memory per open SDS stream and rotation fan-out, for the release binary on the embedded
//! CA: opens 10,000 SotW streams (100 connections of 100 streams, as a node agent serving
//! many proxies would see them), reading the agent's resident set after every 1,000; then
//! forces rotations and times how long the new certificate takes to reach the last stream.
//! Prints figures; `docs/benchmarks.md` records them.
//!
//! `cargo build --release -p sds-agent && cargo bench -p sds-agent --bench streams`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, free_local_addr, release_binary, rss_parts, terminate, vm_rss_kib};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

const STREAMS: usize = 10_000;
const PER_CONNECTION: usize = 100;
const STEP: usize = 1_000;
const ROTATIONS: usize = 5;
/// Connect/disconnect storm: rounds, and clients at once in each.
const STORM_ROUNDS: usize = 20;
const STORM_CLIENTS: usize = 500;
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Bound on every wait in this bench.
const LIMIT: Duration = Duration::from_secs(60);

fn main() {
    let bin = release_binary();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sock");
    let admin = free_local_addr();
    let mut child = Command::new(&bin)
        .args(["run", "--log-level", "warn", "--max-streams", "20000"])
        .args(["--admin-addr", &admin.to_string()])
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        wait_ready(admin.port()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = vm_rss_kib(pid);
        println!("sds-agent stream benchmark: {}", bin.display());
        println!("idle, one identity: {}", rss_parts(pid));
        println!(
            "{:>8} {:>12} {:>16}",
            "streams", "VmRSS KiB", "KiB per stream"
        );
        println!("{:>8} {:>12} {:>16}", 0, idle, "-");

        let (events_tx, mut events) = mpsc::unbounded_channel::<(String, Instant)>();
        let mut streams = Vec::new();
        let mut client = None;
        while streams.len() < STREAMS {
            for _ in 0..STEP {
                if streams.len() % PER_CONNECTION == 0 {
                    client = Some(connect(&socket).await.unwrap());
                }
                let c = client.as_mut().unwrap();
                streams.push(open(c, events_tx.clone()).await);
            }
            // Every stream of this step has its first response before memory is read.
            let mut first = 0;
            while first < STEP {
                tokio::time::timeout(LIMIT, events.recv())
                    .await
                    .expect("initial responses did not arrive")
                    .unwrap();
                first += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss = vm_rss_kib(pid);
            println!(
                "{:>8} {:>12} {:>16.1}",
                streams.len(),
                rss,
                (rss - idle) as f64 / streams.len() as f64
            );
        }

        println!();
        println!(
            "rotation fan-out to {STREAMS} streams, POST /rotate -> response on the stream (ms):"
        );
        println!(
            "{:>8} {:>10} {:>10} {:>10}",
            "rotation", "first", "p50", "last"
        );
        let mut lasts = Vec::new();
        let mut current = String::new();
        for r in 1..=ROTATIONS {
            // Nothing else is pushed on these streams: every event from here on is the
            // rotation, and all of them carry one new version.
            let started = Instant::now();
            post_rotate(admin.port());
            let mut arrivals = Vec::with_capacity(STREAMS);
            let mut versions = std::collections::BTreeSet::new();
            while arrivals.len() < STREAMS {
                let (v, at) = tokio::time::timeout(LIMIT, events.recv())
                    .await
                    .expect("not every stream got the rotation")
                    .unwrap();
                versions.insert(v);
                arrivals.push(at - started);
            }
            assert_eq!(versions.len(), 1, "one version per rotation: {versions:?}");
            let new = versions.pop_first().unwrap();
            assert_ne!(new, current, "the rotation changed nothing");
            current = new;
            arrivals.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{r:>8} {:>10.1} {:>10.1} {:>10.1}",
                ms(arrivals[0]),
                ms(arrivals[STREAMS / 2]),
                ms(arrivals[STREAMS - 1])
            );
            lasts.push(arrivals[STREAMS - 1]);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        lasts.sort();
        println!(
            "median time to the last stream: {:.1} ms; VmRSS after: {} KiB",
            lasts[lasts.len() / 2].as_secs_f64() * 1e3,
            vm_rss_kib(pid)
        );

        // Every client goes away; then a storm of short-lived ones comes and goes.
        for s in &streams {
            s.abort();
        }
        drop(streams);
        drop(client);
        wait_streams_open(admin.port(), 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!();
        println!("all {STREAMS} streams closed: {}", rss_parts(pid));
        let started = Instant::now();
        for _ in 0..STORM_ROUNDS {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..STORM_CLIENTS {
                let socket = socket.clone();
                set.spawn(async move {
                    let mut c = connect(&socket).await.unwrap();
                    let (_tx, mut responses) = sotw_stream(&mut c).await;
                    tokio::time::timeout(LIMIT, responses.message())
                        .await
                        .expect("no first response")
                        .unwrap()
                        .unwrap();
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        }
        wait_streams_open(admin.port(), 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!(
            "storm of {} connections ({STORM_ROUNDS} rounds of {STORM_CLIENTS} at once: connect, open, first response, hang up) in {:.1} s; after: {}",
            STORM_ROUNDS * STORM_CLIENTS,
            started.elapsed().as_secs_f64(),
            rss_parts(pid)
        );
    });
    drop(rt);
    terminate(&mut child);
}

/// Opens a SotW stream for `default` with its first request sent: the sender that keeps it
/// open (and carries ACKs), and its responses.
async fn sotw_stream(
    client: &mut SecretDiscoveryServiceClient<Channel>,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request("", "")).await.unwrap();
    let responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// One SotW stream for `default`: every response is reported on `events` and ACKed.
async fn open(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    events: mpsc::UnboundedSender<(String, Instant)>,
) -> tokio::task::JoinHandle<()> {
    let (tx, mut responses) = sotw_stream(client).await;
    tokio::spawn(async move {
        while let Ok(Some(resp)) = responses.message().await {
            let _ = events.send((resp.version_info.clone(), Instant::now()));
            ack(&tx, &resp).await;
        }
    })
}

async fn ack(tx: &mpsc::Sender<DiscoveryRequest>, resp: &DiscoveryResponse) {
    let _ = tx.send(request(&resp.version_info, &resp.nonce)).await;
}

fn request(version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// One HTTP/1.1 request to the admin port; the status code.
fn admin(port: u16, method: &str, path: &str) -> Option<u16> {
    admin_response(port, method, path)?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// One HTTP/1.1 request to the admin port; the whole response.
fn admin_response(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

/// Waits until the agent counts `n` open SotW streams.
async fn wait_streams_open(port: u16, n: u64) {
    let deadline = Instant::now() + LIMIT;
    let wanted = format!("sds_agent_sds_streams_open{{api=\"sotw\"}} {n}");
    while !admin_response(port, "GET", "/metrics").is_some_and(|m| m.lines().any(|l| l == wanted)) {
        assert!(Instant::now() < deadline, "streams still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + LIMIT;
    while admin(port, "GET", "/readyz") != Some(200) {
        assert!(Instant::now() < deadline, "agent not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn post_rotate(port: u16) {
    assert_eq!(admin(port, "POST", "/rotate"), Some(202));
}
