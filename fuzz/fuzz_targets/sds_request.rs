//! SDS requests from a proxy, through a real agent: one `RunningAgent` (embedded CA, on a
//! temporary Unix socket) serves the whole run, and each input is decoded as protobuf
//! `DiscoveryRequest`s or `DeltaDiscoveryRequest`s and sent to it over tonic, as a SotW
//! stream, a delta stream or `FetchSecrets`. The agent must never panic (libfuzzer-sys's
//! panic hook aborts the process on a panic in any thread, the agent's tasks included), and
//! every `HEALTH_EVERY` inputs it must still serve a well-formed `FetchSecrets` for
//! `default`.
//!
//! Input: the first byte picks the RPC (mod 3: SotW, delta, fetch); the rest is a run of
//! length-delimited messages (as `prost::Message::encode_length_delimited` writes them),
//! sent on one stream in order, or, if it does not start with one, a single message.
//! Undecodable inputs are skipped: tonic would never send them, and the agent's decoder is
//! prost's.

#![no_main]

mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{assert_serves, connect};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long to wait for each response to a fuzzed request. Most bad requests are answered at
/// once (an error status); an ACK or an unknown name is answered with nothing, so this bounds
/// an input's time.
const ANSWER_WAIT: Duration = Duration::from_millis(5);
/// Most messages sent on one stream.
const MAX_MESSAGES: usize = 16;
/// Every this many inputs, check that a good request is still served.
const HEALTH_EVERY: u64 = 256;

struct Harness {
    rt: Runtime,
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
            // Every input opens a stream: the limits must not be what answers.
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
            let client = connect(socket).await;
            (agent, client)
        });
        let h = Harness {
            rt,
            client,
            inputs: AtomicU64::new(0),
            _agent: agent,
            _dir: dir,
        };
        h.rt.block_on(assert_serves(h.client.clone()));
        h
    })
}

/// The input's messages: length-delimited ones while they decode, else the whole as one.
fn messages<M: Message + Default>(mut data: &[u8]) -> Vec<M> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < MAX_MESSAGES {
        match M::decode_length_delimited(&mut data) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    if out.is_empty() {
        if let Ok(m) = M::decode(data) {
            out.push(m);
        }
    }
    out
}

/// Reads responses until the stream ends, errs, or is quiet for `ANSWER_WAIT`.
macro_rules! drain {
    ($stream:expr) => {
        for _ in 0..=MAX_MESSAGES {
            match tokio::time::timeout(ANSWER_WAIT, $stream.message()).await {
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let mut client = h.client.clone();
    h.rt.block_on(async {
        match kind % 3 {
            0 => {
                let reqs = messages::<DiscoveryRequest>(rest);
                if reqs.is_empty() {
                    return;
                }
                let (tx, rx) = mpsc::channel(reqs.len());
                for r in reqs {
                    let _ = tx.send(r).await;
                }
                if let Ok(Ok(resp)) = tokio::time::timeout(
                    ANSWER_WAIT * 10,
                    client.stream_secrets(ReceiverStream::new(rx)),
                )
                .await
                {
                    let mut stream = resp.into_inner();
                    drain!(stream);
                }
                drop(tx);
            }
            1 => {
                let reqs = messages::<DeltaDiscoveryRequest>(rest);
                if reqs.is_empty() {
                    return;
                }
                let (tx, rx) = mpsc::channel(reqs.len());
                for r in reqs {
                    let _ = tx.send(r).await;
                }
                if let Ok(Ok(resp)) = tokio::time::timeout(
                    ANSWER_WAIT * 10,
                    client.delta_secrets(ReceiverStream::new(rx)),
                )
                .await
                {
                    let mut stream = resp.into_inner();
                    drain!(stream);
                }
                drop(tx);
            }
            _ => {
                if let Some(req) = messages::<DiscoveryRequest>(rest).into_iter().next() {
                    let _ = tokio::time::timeout(ANSWER_WAIT * 10, client.fetch_secrets(req)).await;
                }
            }
        }
    });
    if h.inputs.fetch_add(1, Ordering::Relaxed) % HEALTH_EVERY == HEALTH_EVERY - 1 {
        h.rt.block_on(assert_serves(h.client.clone()));
    }
});
