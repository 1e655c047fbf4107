//! Memory per open stream and rotation fan-out, for the release binary on the embedded CA,
//! for SDS and for the SPIFFE Workload API in the same run. For each API in turn a fresh
//! agent (the same flags for both) gets 10,000 streams, 100 connections of 100 streams
//! each, as a node agent serving many proxies would see them: SotW `StreamSecrets` for
//! `default`, ACKing every response, then `FetchX509SVID`. The agent's resident set is read
//! after every 1,000; then rotations are forced and the bench times how long the new
//! certificate takes to reach the last stream. After SDS, a connect/disconnect storm. Prints
//! the figures of each API and then both side by side; `docs/benchmarks.md` records them.
//!
//! `cargo build --release -p sds-agent && cargo bench -p sds-agent --bench streams`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    channel, connect, free_local_addr, release_binary, rss_anon_kib, rss_parts, terminate,
    vm_rss_kib,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use sds_proto::pb::spiffe_workload::X509svidRequest;
use sds_proto::pb::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
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

/// The API whose streams are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// SDS `StreamSecrets` (state of the world) for `default`.
    Sds,
    /// Workload API `FetchX509SVID`.
    WorkloadApi,
}

/// A connection of either API.
enum Client {
    Sds(SecretDiscoveryServiceClient<Channel>),
    WorkloadApi(SpiffeWorkloadApiClient<Channel>),
}

/// An agent started for one API's measurement.
struct Agent {
    child: Child,
    pid: u32,
    admin: SocketAddr,
    sds_socket: PathBuf,
    api_socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// One API's figures from one run, for the side-by-side summary.
struct Figures {
    idle_rss: u64,
    idle_anon: u64,
    /// VmRSS and RssAnon growth over idle per stream, KiB, with all streams open.
    per_stream_rss: f64,
    per_stream_anon: f64,
    /// Time from `POST /rotate` to the last stream, per rotation.
    lasts: Vec<Duration>,
}

/// What a stream's task reports for each message: what identifies its content (SDS: the
/// version; Workload API: the DER chain), and when it arrived.
type Event = (Vec<u8>, Instant);

fn main() {
    let bin = release_binary();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("sds-agent stream benchmark: {}", bin.display());
    let sds = rt.block_on(measure(&bin, Api::Sds));
    let api = rt.block_on(measure(&bin, Api::WorkloadApi));
    drop(rt);
    summary(&sds, &api);
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Sds => "SDS StreamSecrets",
            Api::WorkloadApi => "Workload API FetchX509SVID",
        }
    }

    /// The `api` label of the stream metrics.
    fn label(self) -> &'static str {
        match self {
            Api::Sds => "sotw",
            Api::WorkloadApi => "workload",
        }
    }
}

impl Agent {
    /// A fresh agent, the same flags whichever API is measured: both sockets, room for
    /// 10,000 streams, and a call rate that lets one process open 10,000 Workload API
    /// streams in a few seconds (the limit is per calling process there).
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sds_socket = dir.path().join("sock");
        let api_socket = dir.path().join("api.sock");
        let admin = free_local_addr();
        let child = Command::new(bin)
            .args(["run", "--log-level", "warn", "--max-streams", "20000"])
            .args(["--max-requests-per-second", "100000"])
            .args(["--admin-addr", &admin.to_string()])
            .arg("--socket")
            .arg(&sds_socket)
            .arg("--workload-api-socket")
            .arg(&api_socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let agent = Self {
            child,
            pid,
            admin,
            sds_socket,
            api_socket,
            _dir: dir,
        };
        wait_ready(admin.port()).await;
        agent
    }

    async fn connect(&self, api: Api) -> Client {
        match api {
            Api::Sds => Client::Sds(connect(&self.sds_socket).await.unwrap()),
            Api::WorkloadApi => Client::WorkloadApi(SpiffeWorkloadApiClient::new(
                channel(&self.api_socket).await.unwrap(),
            )),
        }
    }
}

/// One API on a fresh agent: memory per stream, rotation fan-out, and (SDS) the storm.
async fn measure(bin: &Path, api: Api) -> Figures {
    let mut agent = Agent::start(bin).await;
    let pid = agent.pid;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, idle_anon) = (vm_rss_kib(pid), rss_anon_kib(pid));
    println!();
    println!("== {}: {STREAMS} streams", api.name());
    println!("idle, one identity: {}", rss_parts(pid));
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12} {:>14}",
        "streams", "VmRSS KiB", "RssAnon", "KiB/stream", "anon/stream", "anon/stream,"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12} {:>14}",
        "", "", "", "(VmRSS)", "(RssAnon)", "this 1,000"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12} {:>14}",
        0, idle_rss, idle_anon, "-", "-", "-"
    );

    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut streams = Vec::new();
    let mut client = None;
    let (mut per_stream_rss, mut per_stream_anon) = (0.0, 0.0);
    let mut last_anon = idle_anon;
    while streams.len() < STREAMS {
        for _ in 0..STEP {
            if streams.len() % PER_CONNECTION == 0 {
                client = Some(agent.connect(api).await);
            }
            let c = client.as_mut().unwrap();
            streams.push(open(c, events_tx.clone()).await);
        }
        // Every stream of this step has its first message before memory is read.
        for _ in 0..STEP {
            tokio::time::timeout(LIMIT, events.recv())
                .await
                .expect("first messages did not arrive")
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss, anon) = (vm_rss_kib(pid), rss_anon_kib(pid));
        let n = streams.len() as f64;
        per_stream_rss = rss.saturating_sub(idle_rss) as f64 / n;
        per_stream_anon = anon.saturating_sub(idle_anon) as f64 / n;
        println!(
            "{:>8} {:>10} {:>10} {:>12.1} {:>12.1} {:>14.1}",
            streams.len(),
            rss,
            anon,
            per_stream_rss,
            per_stream_anon,
            anon.saturating_sub(last_anon) as f64 / STEP as f64
        );
        last_anon = anon;
    }

    println!();
    println!(
        "rotation fan-out to {STREAMS} {} streams, POST /rotate -> message on the stream (ms):",
        api.label()
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10}",
        "rotation", "first", "p50", "last"
    );
    let mut lasts = Vec::new();
    let mut current = Vec::new();
    for r in 1..=ROTATIONS {
        // Nothing else is pushed on these streams: every event from here on is the
        // rotation, and all of them carry one new certificate.
        let started = Instant::now();
        post_rotate(agent.admin.port());
        let mut arrivals = Vec::with_capacity(STREAMS);
        let mut contents = BTreeSet::new();
        while arrivals.len() < STREAMS {
            let (content, at) = tokio::time::timeout(LIMIT, events.recv())
                .await
                .expect("not every stream got the rotation")
                .unwrap();
            contents.insert(content);
            arrivals.push(at - started);
        }
        assert_eq!(contents.len(), 1, "one certificate per rotation");
        let new = contents.pop_first().unwrap();
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
    let mut sorted = lasts.clone();
    sorted.sort();
    println!(
        "median time to the last stream: {:.1} ms; after: {}",
        sorted[sorted.len() / 2].as_secs_f64() * 1e3,
        rss_parts(pid)
    );

    // Every client goes away.
    for s in &streams {
        s.abort();
    }
    drop(streams);
    drop(client);
    wait_streams_open(agent.admin.port(), api, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!();
    println!("all {STREAMS} streams closed: {}", rss_parts(pid));
    if api == Api::Sds {
        storm(&agent).await;
    }
    terminate(&mut agent.child);
    Figures {
        idle_rss,
        idle_anon,
        per_stream_rss,
        per_stream_anon,
        lasts,
    }
}

/// A storm of short-lived SDS clients: connect, open a stream, take the first response,
/// hang up; round after round.
async fn storm(agent: &Agent) {
    let started = Instant::now();
    for _ in 0..STORM_ROUNDS {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..STORM_CLIENTS {
            let socket = agent.sds_socket.clone();
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
    wait_streams_open(agent.admin.port(), Api::Sds, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "storm of {} connections ({STORM_ROUNDS} rounds of {STORM_CLIENTS} at once: connect, open, first response, hang up) in {:.1} s; after: {}",
        STORM_ROUNDS * STORM_CLIENTS,
        started.elapsed().as_secs_f64(),
        rss_parts(agent.pid)
    );
}

/// Both APIs' figures, side by side.
fn summary(sds: &Figures, api: &Figures) {
    let fan_out = |f: &Figures| {
        let mut l = f.lasts.clone();
        l.sort();
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        (ms(l[l.len() / 2]), ms(l[0]), ms(l[l.len() - 1]))
    };
    let (s, a) = (fan_out(sds), fan_out(api));
    println!();
    println!("== side by side, {STREAMS} streams each, one fresh agent per API");
    println!("{:<44} {:>12} {:>14}", "", "SDS", "Workload API");
    let row = |what: &str, s: String, a: String| println!("{what:<44} {s:>12} {a:>14}");
    row(
        "idle VmRSS / RssAnon, KiB",
        format!("{} / {}", sds.idle_rss, sds.idle_anon),
        format!("{} / {}", api.idle_rss, api.idle_anon),
    );
    row(
        "KiB per stream over idle, VmRSS",
        format!("{:.1}", sds.per_stream_rss),
        format!("{:.1}", api.per_stream_rss),
    );
    row(
        "KiB per stream over idle, RssAnon",
        format!("{:.1}", sds.per_stream_anon),
        format!("{:.1}", api.per_stream_anon),
    );
    row(
        &format!("fan-out to the last stream, median of {ROTATIONS} (ms)"),
        s.0,
        a.0,
    );
    row("fan-out to the last stream, min (ms)", s.1, a.1);
    row("fan-out to the last stream, max (ms)", s.2, a.2);
}

/// Opens one stream on `client`, with a task that reports every message on `events` (and
/// ACKs it, on SDS).
async fn open(
    client: &mut Client,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    match client {
        Client::Sds(c) => {
            let (tx, mut responses) = sotw_stream(c).await;
            tokio::spawn(async move {
                while let Ok(Some(resp)) = responses.message().await {
                    let _ = events.send((resp.version_info.clone().into_bytes(), Instant::now()));
                    ack(&tx, &resp).await;
                }
            })
        }
        Client::WorkloadApi(c) => {
            let mut request = tonic::Request::new(X509svidRequest {});
            request
                .metadata_mut()
                .insert("workload.spiffe.io", "true".parse().unwrap());
            let mut messages = c.fetch_x509svid(request).await.unwrap().into_inner();
            tokio::spawn(async move {
                while let Ok(Some(mut m)) = messages.message().await {
                    let at = Instant::now();
                    let chain = m.svids.swap_remove(0).x509_svid;
                    let _ = events.send((chain, at));
                }
            })
        }
    }
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

/// Waits until the agent counts `n` open streams of `api`.
async fn wait_streams_open(port: u16, api: Api, n: u64) {
    let deadline = Instant::now() + LIMIT;
    let wanted = format!("sds_agent_sds_streams_open{{api=\"{}\"}} {n}", api.label());
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
