//! Raw HTTP/2 from a client, through a real agent: one `RunningAgent` (embedded CA, on a
//! temporary Unix socket) serves the whole run, and each input is written, after the client
//! connection preface, on a new connection to its socket. The input is the rest of the
//! connection: frames, HPACK header blocks and gRPC messages, well-formed or not. What reads
//! it is the agent's whole server stack: h2 (patched to accept the `:authority` gRPC clients
//! send on a Unix socket, vendor/README.md), hyper, tonic and the SDS service.
//!
//! The agent must never panic (libfuzzer-sys's panic hook aborts the process on a panic in
//! any thread, the agent's tasks included), and every `HEALTH_EVERY` inputs it must still
//! serve a well-formed `FetchSecrets` for `default` on a connection of its own.
//!
//! After writing, the target reads what the agent answers until the agent closes the
//! connection or is quiet for `ANSWER_WAIT` (so that a request the input completes is
//! served, not cut off), then half-closes and reads to the end; each read is bounded by
//! `READ_BOUND`, and the write by `WRITE_BOUND` (the target does not read while it writes,
//! so an agent that stopped reading until its answers are read would otherwise hang it).
//!
//! The seeds (fuzz/corpus/h2_connection/seed-*) are SETTINGS, one HEADERS of HPACK
//! literals (no indexing, no Huffman) and one DATA with a `FetchSecrets` or
//! `StreamSecrets` request for `default` and `ROOTCA`, one per `:authority` form: C-core's
//! percent-encoded path, grpc-java's raw path, `localhost`, none, and a CONNECT.

#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{assert_serves, connect};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use libfuzzer_sys::fuzz_target;
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long the agent may be quiet before the input is taken as answered. A served request
/// is answered within a millisecond; a connection the agent fails is closed at once.
const ANSWER_WAIT: Duration = Duration::from_millis(5);
/// Bound on each of the two reads of the answer (before and after the half-close).
const READ_BOUND: Duration = Duration::from_millis(50);
/// Bound on writing the input.
const WRITE_BOUND: Duration = Duration::from_secs(1);
/// Every this many inputs, check that a good request is still served.
const HEALTH_EVERY: u64 = 256;

struct Harness {
    rt: Runtime,
    socket: PathBuf,
    client: SecretDiscoveryServiceClient<Channel>,
    inputs: AtomicU64,
    // Kept alive for the process: the agent and its socket directory.
    _agent: RunningAgent,
    _dir: tempfile::TempDir,
}

// Fuzz set-up, not input: a failure to start is a broken machine, so `expect` is the report.
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("sds.sock");
        let config = RunArgs {
            socket: Some(socket.to_string_lossy().into_owned()),
            admin_addr: Some("127.0.0.1:0".into()),
            trust_domain: Some("example.org".into()),
            service_account: Some("web".into()),
            // Every input opens a connection and maybe streams: the limits must not be
            // what answers.
            max_streams: Some("1048576".into()),
            max_requests_per_second: Some("100000".into()),
            ..RunArgs::default()
        }
        .resolve()
        .expect("config");
        let policy = Policy::from_config(&config);
        let ca = sds_agent::build_ca(&config).expect("embedded CA");
        let (agent, client) = rt.block_on(async {
            let agent = RunningAgent::start(&config, policy, ca)
                .await
                .expect("agent start");
            let client = connect(socket.clone()).await;
            (agent, client)
        });
        let h = Harness {
            rt,
            socket,
            client,
            inputs: AtomicU64::new(0),
            _agent: agent,
            _dir: dir,
        };
        h.rt.block_on(assert_serves(h.client.clone()));
        h
    })
}

/// Reads until the end of the connection or an error (true), or until the agent is quiet
/// for `quiet` or `READ_BOUND` has passed (false).
async fn drain(io: &mut UnixStream, quiet: Duration) -> bool {
    let mut buf = [0u8; 16 * 1024];
    let read = async {
        loop {
            match tokio::time::timeout(quiet, io.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(READ_BOUND, read)
        .await
        .unwrap_or(false)
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        // The agent's accept loop is the only peer; failing to reach it is not the input's
        // doing, and the health check below reports a dead agent.
        let Ok(mut io) = UnixStream::connect(&h.socket).await else {
            return;
        };
        let mut out = Vec::with_capacity(PREFACE.len() + data.len());
        out.extend_from_slice(PREFACE);
        out.extend_from_slice(data);
        // The agent may close the connection before it has read everything (a GOAWAY).
        let _ = tokio::time::timeout(WRITE_BOUND, io.write_all(&out)).await;
        if !drain(&mut io, ANSWER_WAIT).await {
            let _ = io.shutdown().await;
            drain(&mut io, READ_BOUND).await;
        }
    });
    if h.inputs.fetch_add(1, Ordering::Relaxed) % HEALTH_EVERY == HEALTH_EVERY - 1 {
        h.rt.block_on(assert_serves(h.client.clone()));
    }
});
