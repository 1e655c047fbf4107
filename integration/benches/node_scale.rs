//! Node mode at scale (issue 18): one agent-side secret manager serving 1,000 identities, as
//! a node agent serving 1,000 pods would, once with the embedded CA and once with the test
//! Istio CA over TLS. Each backend runs in a fresh process of this binary, so one run's freed
//! heap does not flatter the other's memory figures.
//!
//! The callers are synthetic: identity `i` is `spiffe://cluster.local/ns/ns-<i>/sa/sa-<i>`,
//! subscribed through [`SecretManager::subscribe_cert`] with its receiver held for the whole
//! run, as an SDS stream holds it (no SDS socket, no attestation: this measures the secret
//! manager and the CA, not the streams, which `agent/benches/streams.rs` measures). Phases:
//!
//! 1. memory: `VmRSS` and `RssAnon` of this process once the manager serves the trust bundle
//!    and no identity, then once all 1,000 have their first certificate; the difference per
//!    identity;
//! 2. first issuance: the time from the first subscription to the last first certificate;
//! 3. all renew at once ([`SecretManager::rotate_now`], the real-time lane): the most CA
//!    calls in flight at once, counted by a decorator around the CA and by sampling the
//!    `sds_agent_ca_in_flight` gauge every millisecond, against `--ca-concurrency`; and the
//!    sign calls per second;
//! 4. newcomers under load: every identity's renewal is queued due now in the background
//!    lane ([`SecretManager::renew_all_in_background`]) and new identities arrive one by
//!    one, 1 ms apart, for as long as any of the 1,000 is not renewed yet; then another round,
//!    until 100 have arrived. The time each waits for its first certificate (p50, p99, max),
//!    and how many of the 1,000 were still not renewed when it arrived.
//!
//! One warm-up identity is served before the memory baseline, so one-time costs are not
//! counted per identity; the sign counts include it.
//!
//! The Istio CA is `integration/src/istio_ca.rs` in this process, answering over TLS gRPC on
//! loopback, with istiod's NodeAuthorizer: the bench's one istiod client is a node agent's,
//! as `run --mode node --ca istiod` builds it (the node's token, each identity in
//! `ImpersonatedIdentity`), and every identity is a pod of that node. Its TLS channel is
//! opened (by one signature, outside the manager) before the baseline is read, so the
//! figures are the manager's and the CA calls'.
//!
//! `cargo bench -p sds-integration --bench node_scale` (after `--`: `--ca-concurrency N`,
//! `--identities N`, `--newcomers N`, `--newcomer-every-ms N`, `--backend embedded|istiod`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sds_agent::config::RenewAt;
use sds_agent::metrics::Metrics;
use sds_agent::secrets::{Policy, SecretManager, ServedCert};
use sds_backends::embedded::settings::EmbeddedSettings;
use sds_backends::istiod::{IstiodCa, IstiodConfig};
use sds_backends::settings::BuildContext;
use sds_backends::{
    CaError, CertificateAuthority, IssuedChain, KeyType, SignRequest, SpiffeId, TrustBundle,
    TrustDomain,
};
use sds_integration::bench;
use sds_integration::istio_ca::{IstioTestCa, SERVER_NAME};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Bound on every wait of this bench.
const LIMIT: Duration = Duration::from_secs(60);
/// The target of issue 18: memory per identity, KiB.
const MEMORY_TARGET_KIB: f64 = 30.0;
/// The target of issue 18: a newcomer's p99 wait with the embedded CA under load.
const NEWCOMER_TARGET: Duration = Duration::from_millis(100);
/// Set in a child process: the backend it measures.
const CHILD_ENV: &str = "NODE_SCALE_BACKEND";
const TRUST_DOMAIN: &str = "cluster.local";

/// What a run measures, from the command line.
#[derive(Debug, Clone)]
struct Options {
    ca_concurrency: usize,
    identities: usize,
    newcomers: usize,
    newcomer_every: Duration,
    backends: Vec<String>,
}

type Receiver = watch::Receiver<Option<Arc<ServedCert>>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = Options::parse(&args);
    match std::env::var(CHILD_ENV) {
        Ok(backend) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(measure(&backend, &options));
        }
        Err(_) => {
            println!(
                "node_scale: {} identities, --ca-concurrency {}, {} newcomers {:?} apart; \
                 each backend in its own process",
                options.identities,
                options.ca_concurrency,
                options.newcomers,
                options.newcomer_every
            );
            let exe = std::env::current_exe().unwrap();
            for backend in &options.backends {
                let status = Command::new(&exe)
                    .args(&args)
                    .env(CHILD_ENV, backend)
                    .status()
                    .unwrap();
                assert!(status.success(), "the {backend} run failed: {status}");
            }
        }
    }
}

impl Options {
    /// Parses the flags after `--`; `--bench` (which cargo adds) is ignored.
    fn parse(args: &[String]) -> Self {
        let mut o = Options {
            ca_concurrency: 8,
            identities: 1_000,
            newcomers: 100,
            newcomer_every: Duration::from_millis(1),
            backends: vec!["embedded".into(), "istiod".into()],
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .unwrap_or_else(|| panic!("{flag} needs a value"))
                    .clone()
            };
            let number = |v: String| -> usize {
                v.parse()
                    .unwrap_or_else(|e| panic!("{flag} {v:?}: not a number: {e}"))
            };
            match flag.as_str() {
                "--bench" => {}
                "--ca-concurrency" => o.ca_concurrency = number(value()),
                "--identities" => o.identities = number(value()),
                "--newcomers" => o.newcomers = number(value()),
                "--newcomer-every-ms" => {
                    o.newcomer_every = Duration::from_millis(number(value()) as u64);
                }
                "--backend" => match value().as_str() {
                    b @ ("embedded" | "istiod") => o.backends = vec![b.to_owned()],
                    other => panic!("--backend {other:?}: embedded or istiod"),
                },
                other => panic!(
                    "unknown argument {other:?}: --ca-concurrency, --identities, --newcomers, \
                     --newcomer-every-ms, --backend"
                ),
            }
        }
        assert!(o.ca_concurrency > 0, "--ca-concurrency must be at least 1");
        assert!(o.identities > 0, "--identities must be at least 1");
        o
    }
}

/// The identity of synthetic caller `i`.
fn identity(i: usize) -> SpiffeId {
    SpiffeId::for_service_account(
        TRUST_DOMAIN.parse().unwrap(),
        &format!("ns-{i}"),
        &format!("sa-{i}"),
    )
    .unwrap()
}

/// The agent's policy (`Policy::from_config` with the defaults) and this run's concurrency.
fn policy(ca_concurrency: usize) -> Policy {
    Policy {
        ttl: Duration::from_secs(24 * 3600),
        renew_at: RenewAt::default(),
        key_type: KeyType::EcdsaP256,
        ca_timeout: Duration::from_secs(30),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        bundle_refresh: Duration::from_secs(300),
        ca_concurrency,
        idle_timeout: Duration::from_secs(3600),
        root_overlap: Duration::from_secs(24 * 3600),
    }
}

/// One backend's run, in a child process; prints its figures.
async fn measure(backend: &str, o: &Options) {
    let dir = tempfile::tempdir().unwrap();
    let total = o.identities + o.newcomers;
    // The test CA lives as long as the run.
    let (ca, _istio): (Arc<dyn CertificateAuthority>, Option<IstioTestCa>) = match backend {
        "embedded" => (embedded_as_the_agent_builds_it(), None),
        "istiod" => {
            // One more for the warm-up identity.
            let (ca, istio) = istiod_node_client(dir.path(), total + 1).await;
            (ca, Some(istio))
        }
        other => panic!("unknown backend {other}"),
    };
    let counting = Arc::new(Counting::new(ca));
    let metrics = Arc::new(Metrics::new());
    let manager = SecretManager::for_node(
        TRUST_DOMAIN.parse().unwrap(),
        policy(o.ca_concurrency),
        counting.clone(),
        metrics.clone(),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(manager.clone().run(shutdown.clone()));
    let mut bundle = manager.subscribe_bundle();
    tokio::time::timeout(LIMIT, bundle.wait_for(Option::is_some))
        .await
        .expect("trust bundle in time")
        .unwrap();
    let tag = format!("[{backend}]");
    // One identity served before the baseline, so what is paid once (the first key, the
    // first metric series, the scheduler's first call) is not counted per identity.
    let warmup = identity(total);
    tokio::time::timeout(
        LIMIT,
        manager.subscribe_cert(&warmup).wait_for(Option::is_some),
    )
    .await
    .expect("warm-up certificate in time")
    .unwrap();

    // 1 and 2: memory, and the first certificates of all.
    let before = Memory::now();
    let started = Instant::now();
    let mut rxs: Vec<Receiver> = (0..o.identities)
        .map(|i| manager.subscribe_cert(&identity(i)))
        .collect();
    for rx in &mut rxs {
        tokio::time::timeout(LIMIT, rx.wait_for(Option::is_some))
            .await
            .expect("first certificate in time")
            .unwrap();
    }
    let first = started.elapsed();
    let after = Memory::now();
    let n = o.identities as f64;
    let per_rss = after.vm_rss.saturating_sub(before.vm_rss) as f64 / n;
    let per_anon = after.rss_anon.saturating_sub(before.rss_anon) as f64 / n;
    println!(
        "{tag} memory before the first subscription: VmRSS {} KiB, RssAnon {} KiB",
        before.vm_rss, before.rss_anon
    );
    println!(
        "{tag} memory with {} identities served:    VmRSS {} KiB, RssAnon {} KiB",
        o.identities, after.vm_rss, after.rss_anon
    );
    println!(
        "{tag} memory per identity: VmRSS {per_rss:.1} KiB, RssAnon {per_anon:.1} KiB \
         (target at most {MEMORY_TARGET_KIB} KiB: {})",
        verdict(per_rss.max(per_anon) <= MEMORY_TARGET_KIB)
    );
    println!(
        "{tag} first certificates: all {} in {:.1?} ({:.0} issuances/s)",
        o.identities,
        first,
        n / first.as_secs_f64()
    );

    // 3: every identity renews at once, in the real-time lane.
    let serials = serials(&rxs);
    counting.reset_max();
    let sampler = GaugeSampler::start(metrics.clone());
    let signs_before = counting.signs();
    let started = Instant::now();
    manager.rotate_now();
    wait_renewed(&mut rxs, &serials).await;
    let took = started.elapsed();
    let signs = counting.signs() - signs_before;
    let sampled = sampler.stop().await;
    println!(
        "{tag} all renew at once (rotate_now): {} renewed in {:.1?}; {signs} sign calls (one \
         for the warm-up identity), \
         {:.0}/s; most in flight {} (decorator), {} (sds_agent_ca_in_flight sampled every ms); \
         within --ca-concurrency {}: {}",
        o.identities,
        took,
        signs as f64 / took.as_secs_f64(),
        counting.max_in_flight(),
        sampled,
        o.ca_concurrency,
        verdict(counting.max_in_flight() <= o.ca_concurrency && sampled <= o.ca_concurrency as i64)
    );

    // 4: newcomers while the renewals wait in the background lane. A round queues every
    // identity's renewal due now, then newcomers arrive one by one for as long as any of the
    // 1,000 is not renewed yet; rounds follow until every newcomer has arrived, so each one
    // meets a backlog (a fast CA drains 1,000 renewals in a fraction of a second).
    counting.reset_max();
    let signs_before = counting.signs();
    let started = Instant::now();
    let mut waits = JoinSet::new();
    let mut pending_at_arrival = Vec::with_capacity(o.newcomers);
    let mut drains = Vec::new();
    let mut queued = Vec::new();
    while pending_at_arrival.len() < o.newcomers {
        let serials = self::serials(&rxs);
        let watchers = rxs.clone();
        let round = Instant::now();
        queued.push(manager.identities().len());
        manager.renew_all_in_background();
        // Watched on its own, so the drain time is not held up by the newcomers.
        let renewals = {
            let mut rxs = std::mem::take(&mut rxs);
            let serials = serials.clone();
            tokio::spawn(async move {
                wait_renewed(&mut rxs, &serials).await;
                (round.elapsed(), rxs)
            })
        };
        let mut ticks = tokio::time::interval(o.newcomer_every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while pending_at_arrival.len() < o.newcomers {
            ticks.tick().await;
            let waiting = pending(&watchers, &serials);
            if waiting == 0 {
                break;
            }
            let j = pending_at_arrival.len();
            pending_at_arrival.push(waiting);
            let arrived = Instant::now();
            let mut rx = manager.subscribe_cert(&identity(o.identities + j));
            waits.spawn(async move {
                tokio::time::timeout(LIMIT, rx.wait_for(Option::is_some))
                    .await
                    .expect("newcomer served in time")
                    .unwrap();
                (j, arrived.elapsed(), rx)
            });
        }
        let (drained, held) = renewals.await.unwrap();
        drains.push(drained);
        rxs = held;
    }
    // In order of arrival, as `pending_at_arrival` is.
    let mut newcomer_waits = vec![Duration::ZERO; o.newcomers];
    let mut newcomer_rxs = Vec::with_capacity(o.newcomers);
    while let Some(joined) = waits.join_next().await {
        let (j, waited, rx) = joined.unwrap();
        newcomer_waits[j] = waited;
        newcomer_rxs.push(rx);
    }
    let elapsed = started.elapsed();
    let signs = counting.signs() - signs_before;
    println!(
        "{tag} newcomers under load: {} round(s) of renew_all_in_background ({:?} renewals \
         queued due now); the 1,000 renewed in {:.1?}; at each newcomer's arrival {}..{} of \
         the 1,000 not yet renewed",
        drains.len(),
        queued,
        drains,
        pending_at_arrival.iter().min().copied().unwrap_or_default(),
        pending_at_arrival.iter().max().copied().unwrap_or_default(),
    );
    let mut sorted = newcomer_waits.clone();
    sorted.sort();
    let p99 = percentile(&sorted, 0.99);
    bench::report(&format!("{tag} newcomer wait"), &mut newcomer_waits);
    if backend == "embedded" {
        println!(
            "{tag} newcomer p99 {p99:.1?} (target under {NEWCOMER_TARGET:?} with the embedded CA: {})",
            verdict(p99 < NEWCOMER_TARGET)
        );
    }
    println!(
        "{tag} under load: {signs} sign calls (renewals and newcomers) in {elapsed:.1?}, \
         {:.0}/s; most in flight {} (within --ca-concurrency {}: {})",
        signs as f64 / elapsed.as_secs_f64(),
        counting.max_in_flight(),
        o.ca_concurrency,
        verdict(counting.max_in_flight() <= o.ca_concurrency)
    );
    drop(newcomer_rxs);
    assert_eq!(
        manager.identities().len(),
        total + 1,
        "every identity (and the warm-up one) still served"
    );
    shutdown.cancel();
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// The serial each receiver holds now.
fn serials(rxs: &[Receiver]) -> Vec<String> {
    rxs.iter()
        .map(|rx| rx.borrow().as_ref().unwrap().leaf.serial.clone())
        .collect()
}

/// How many receivers still hold the certificate they held when `serials` was taken (their
/// renewal is queued or running).
fn pending(rxs: &[Receiver], serials: &[String]) -> usize {
    rxs.iter()
        .zip(serials)
        .filter(|(rx, old)| rx.borrow().as_ref().is_some_and(|c| c.leaf.serial == **old))
        .count()
}

/// Waits until every receiver holds a certificate other than the one it held.
async fn wait_renewed(rxs: &mut [Receiver], serials: &[String]) {
    for (rx, old) in rxs.iter_mut().zip(serials) {
        tokio::time::timeout(
            LIMIT,
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.leaf.serial != *old)),
        )
        .await
        .expect("renewed in time")
        .unwrap();
    }
}

/// The embedded CA exactly as `sds-agent run` builds it without `--embedded-ca-cert`: an
/// ephemeral root, local requests only.
fn embedded_as_the_agent_builds_it() -> Arc<dyn CertificateAuthority> {
    let td: TrustDomain = TRUST_DOMAIN.parse().unwrap();
    EmbeddedSettings {
        cert: None,
        key: None,
        next_cert: None,
        next_key: None,
    }
    .build(&BuildContext {
        trust_domain: &td,
        node_mode: true,
    })
    .unwrap()
}

/// The test Istio CA, serving, and one istiod client as a node agent builds it: the node
/// agent's own token (a trusted node account, its pod on [`NODE`]), and each identity named
/// in `ImpersonatedIdentity`. The test CA's NodeAuthorizer allows an identity only when a pod
/// of that service account runs on the same node, so the `count` pods are registered there.
/// The client's TLS channel is opened (by one signature, outside the manager) before the
/// baseline is read.
async fn istiod_node_client(
    dir: &Path,
    count: usize,
) -> (Arc<dyn CertificateAuthority>, IstioTestCa) {
    const NODE: &str = "node-a";
    let istio = IstioTestCa::start(dir).await.unwrap();
    istio
        .trust_node_accounts(&[("sds-agent-system", "sds-agent")])
        .await;
    istio
        .allow_node_agent(
            "node-agent-token",
            TRUST_DOMAIN,
            "sds-agent-system",
            "sds-agent",
            "sds-agent-x7k2p",
            NODE,
        )
        .await;
    for i in 0..count {
        istio
            .add_pod(
                NODE,
                &format!("ns-{i}"),
                &format!("sa-{i}"),
                &format!("pod-{i}"),
            )
            .await;
    }
    let token_file = dir.join("node-agent-token");
    std::fs::write(&token_file, "node-agent-token").unwrap();
    let mut config = IstiodConfig::new(istio.addr().to_string().parse().unwrap());
    config.root_cert = Some(istio.tls_root().to_owned());
    config.server_name = Some(SERVER_NAME.into());
    config.token_file = token_file;
    config.impersonate = true;
    let client = IstiodCa::new(config).unwrap();
    let started = Instant::now();
    client
        .sign(&bench::sign_request(&identity(0)).unwrap())
        .await
        .unwrap();
    println!(
        "[istiod] one node client (impersonating each identity), its TLS channel opened in \
         {:.1?} (before the baseline; not in the figures)",
        started.elapsed()
    );
    (Arc::new(client), istio)
}

/// `VmRSS` and `RssAnon` of this process, KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    vm_rss: u64,
    rss_anon: u64,
}

impl Memory {
    fn now() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} not in /proc/self/status"))
        };
        Self {
            vm_rss: field("VmRSS"),
            rss_anon: field("RssAnon"),
        }
    }
}

/// Reads the `sds_agent_ca_in_flight` gauge every millisecond and keeps the highest value.
struct GaugeSampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<i64>,
}

impl GaugeSampler {
    fn start(metrics: Arc<Metrics>) -> Self {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let mut max = 0;
            let mut every = tokio::time::interval(Duration::from_millis(1));
            every.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                max = max.max(metrics.ca_in_flight.get());
                tokio::select! {
                    _ = until.cancelled() => return max,
                    _ = every.tick() => {}
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> i64 {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// What an `async fn` of [`CertificateAuthority`] returns once `async_trait` has expanded it.
type CaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CaError>> + Send + 'a>>;

/// Counts the sign calls made through it and the most that ran at once.
struct Counting {
    inner: Arc<dyn CertificateAuthority>,
    signs: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Takes one off the in-flight count when a sign call ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Counting {
    fn new(inner: Arc<dyn CertificateAuthority>) -> Self {
        Self {
            inner,
            signs: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    fn signs(&self) -> u64 {
        self.signs.load(Ordering::SeqCst)
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn reset_max(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl CertificateAuthority for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn sign<'a, 'b, 'c>(&'a self, req: &'b SignRequest) -> CaFuture<'c, IssuedChain>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async move {
            self.signs.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let _running = InFlight(&self.in_flight);
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            self.inner.sign(req).await
        })
    }

    fn roots_come_with_certificates(&self) -> bool {
        self.inner.roots_come_with_certificates()
    }

    fn trust_bundle<'a, 'c>(&'a self) -> CaFuture<'c, TrustBundle>
    where
        'a: 'c,
        Self: 'c,
    {
        self.inner.trust_bundle()
    }
}
