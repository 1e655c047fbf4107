//! Issuance throughput of the agent (`SecretManager::issue_once` on the embedded CA that the
//! default configuration builds) against the machine's raw rate for the same cryptography
//! (one P-256 keygen, two signatures, one verification), interleaved in one run. Then the
//! issuance latency of the agent's full path (keygen → CSR → embedded CA sign → validate),
//! stage by stage, beside two floors measured in the same run: bare rcgen doing the same
//! encoding and signing (no parsing, no verification), and the raw aws-lc primitives the path
//! cannot avoid (one P-256 keygen, two signatures, one verification). Prints figures;
//! `docs/benchmarks.md` records them.
//!
//! `cargo bench -p sds-agent --bench issuance`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use sds_agent::config::{Cli, Command};
use sds_agent::metrics::Metrics;
use sds_agent::secrets::{Policy, SecretManager};

use rcgen::{CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SanType, SigningKey};
use sds_agent::keys::PrivateKey;
use sds_agent::secrets::validate::validate;
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, KeyType, SignRequest, SpiffeId};

const N: usize = 1000;
const WARMUP: usize = 50;
const ROUNDS: usize = 10;
/// Throughput: rounds, and issuances per round of each side.
const TP_ROUNDS: usize = 10;
const TP_BATCH: usize = 300;

#[derive(Default)]
struct Stages {
    total: Vec<Duration>,
    keygen: Vec<Duration>,
    csr: Vec<Duration>,
    sign: Vec<Duration>,
    validate: Vec<Duration>,
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bench"
        .parse()
        .unwrap();
    // `cargo bench --bench issuance -- throughput` (or `-- latency`) runs one part.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if wants("throughput") {
        throughput(&rt);
    }
    if !wants("latency") {
        return;
    }

    // The agent's embedded CA is built for in-process requests only (it does not re-verify
    // the CSR's signature; the agent checks the leaf's key instead), as here.
    let ca = EmbeddedCa::generate(id.trust_domain())
        .unwrap()
        .local_requests_only();
    let roots = rt.block_on(ca.trust_bundle()).unwrap().roots().to_vec();

    println!("issuance latency, stage by stage: {N} issuances after {WARMUP} warm-up, one thread");
    println!();

    // The three measurements run interleaved, in ROUNDS rounds of N / ROUNDS each, so that
    // drift on a shared machine (frequency, neighbours) falls on all of them alike.
    let (mut agent, mut floor, mut raw) = (Stages::default(), Vec::new(), Raw::default());
    let bare = BareRcgen::new();
    rt.block_on(agent_path(
        &ca,
        &roots,
        &id,
        KeyType::EcdsaP256,
        WARMUP,
        &mut Stages::default(),
    ));
    bare.run(WARMUP, &mut Vec::new());
    raw_primitives(WARMUP, &mut Raw::default());
    for _ in 0..ROUNDS {
        rt.block_on(agent_path(
            &ca,
            &roots,
            &id,
            KeyType::EcdsaP256,
            N / ROUNDS,
            &mut agent,
        ));
        bare.run(N / ROUNDS, &mut floor);
        raw_primitives(N / ROUNDS, &mut raw);
    }
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "path (microseconds)", "p50", "p90", "p99", "max", "mean", "per sec"
    );
    row("agent: keygen+CSR+sign+validate (P-256)", &agent.total);
    row("  keygen", &agent.keygen);
    row("  CSR", &agent.csr);
    row("  sign (embedded CA, incl. CSR parse)", &agent.sign);
    row("  validate (SPIFFE rules + webpki chain)", &agent.validate);
    row("floor: bare rcgen keygen+CSR+sign (P-256)", &floor);
    row("raw aws-lc: P-256 keygen", &raw.keygen);
    row("raw aws-lc: P-256 sign (CSR-sized message)", &raw.sign);
    row("raw aws-lc: P-256 verify", &raw.verify);
    let agent_p50 = pct(&agent.total, 0.5).as_secs_f64();
    // The agent's cryptography: one keygen, two signatures (CSR, certificate), one
    // verification (the agent checks the chain; its in-process CA skips the CSR's).
    let raw_p50 = pct(&raw.keygen, 0.5).as_secs_f64()
        + 2.0 * pct(&raw.sign, 0.5).as_secs_f64()
        + pct(&raw.verify, 0.5).as_secs_f64();
    println!();
    println!(
        "agent / bare rcgen at p50: {:.2}x",
        agent_p50 / pct(&floor, 0.5).as_secs_f64()
    );
    println!(
        "raw floor = keygen + 2 sign + 1 verify at p50 = {:.1} us; agent / raw floor at p50: {:.2}x",
        raw_p50 * 1e6,
        agent_p50 / raw_p50
    );
    if let Some((line, sign, verify)) = openssl_speed() {
        println!("openssl speed -seconds 1 ecdsap256: {line}");
        let keygen = pct(&agent.keygen, 0.5).as_secs_f64();
        let crypto = keygen + 2.0 / sign + 1.0 / verify;
        println!(
            "  {sign:.0} sign/s, {verify:.0} verify/s -> agent keygen + 2 sign + 1 verify = {:.1} us; agent / that = {:.2}x",
            crypto * 1e6,
            pct(&agent.total, 0.5).as_secs_f64() / crypto
        );
    } else {
        println!("openssl not found (or its output not understood): no openssl line");
    }
    println!();

    let mut p384 = Stages::default();
    rt.block_on(agent_path(
        &ca,
        &roots,
        &id,
        KeyType::EcdsaP384,
        WARMUP,
        &mut Stages::default(),
    ));
    rt.block_on(agent_path(
        &ca,
        &roots,
        &id,
        KeyType::EcdsaP384,
        200,
        &mut p384,
    ));
    row("agent: full path, ecdsa-p384 (200)", &p384.total);
    let mut rsa = Stages::default();
    rt.block_on(agent_path(
        &ca,
        &roots,
        &id,
        KeyType::Rsa2048,
        5,
        &mut Stages::default(),
    ));
    rt.block_on(agent_path(&ca, &roots, &id, KeyType::Rsa2048, 50, &mut rsa));
    row("agent: full path, rsa-2048 (50)", &rsa.total);
    row("  rsa-2048 keygen alone", &rsa.keygen);
}

/// Issuances per second of the agent's own issuance path against the raw cryptography it
/// contains, in alternating batches on this one thread.
fn throughput(rt: &tokio::runtime::Runtime) {
    let Command::Run(args) = Cli::try_parse_from(["sds-agent", "run"]).unwrap().command else {
        unreachable!("parsed `run`")
    };
    let config = args.resolve().unwrap();
    let ca = sds_agent::build_ca(&config).unwrap();
    let manager = SecretManager::new(
        config.spiffe_id.clone(),
        Policy::from_config(&config),
        ca,
        Arc::new(Metrics::new()),
    );
    let agent_batch = |n: usize| {
        rt.block_on(async {
            for _ in 0..n {
                black_box(manager.issue_once(&config.spiffe_id).await.unwrap());
            }
        })
    };
    let raw = RawIssuance::new();
    agent_batch(WARMUP);
    raw.run(WARMUP);

    println!(
        "issuance throughput, one thread: {TP_ROUNDS} rounds of {TP_BATCH} issuances each side"
    );
    println!("  agent: SecretManager::issue_once, embedded CA from the default configuration");
    println!("  raw:   P-256 keygen + 2 signatures + 1 verification, aws-lc");
    println!(
        "{:>6} {:>12} {:>12} {:>8}",
        "round", "agent /s", "raw /s", "ratio"
    );
    let (mut agent_total, mut raw_total) = (Duration::ZERO, Duration::ZERO);
    let mut ratios = Vec::new();
    for round in 1..=TP_ROUNDS {
        // Alternate which side goes first, so neither always runs on a warmer machine.
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };
        let (a, r) = if round % 2 == 1 {
            let a = time(&|| agent_batch(TP_BATCH));
            (a, time(&|| raw.run(TP_BATCH)))
        } else {
            let r = time(&|| raw.run(TP_BATCH));
            (time(&|| agent_batch(TP_BATCH)), r)
        };
        agent_total += a;
        raw_total += r;
        let rate = |d: Duration| TP_BATCH as f64 / d.as_secs_f64();
        ratios.push(rate(a) / rate(r));
        println!(
            "{round:>6} {:>12.0} {:>12.0} {:>7.1}%",
            rate(a),
            rate(r),
            100.0 * rate(a) / rate(r)
        );
    }
    let n = (TP_ROUNDS * TP_BATCH) as f64;
    ratios.sort_by(f64::total_cmp);
    println!(
        "{:>6} {:>12.0} {:>12.0} {:>7.1}%   (median round {:.1}%)",
        "all",
        n / agent_total.as_secs_f64(),
        n / raw_total.as_secs_f64(),
        100.0 * raw_total.as_secs_f64() / agent_total.as_secs_f64(),
        100.0 * ratios[ratios.len() / 2]
    );
    println!();
}

/// The raw cryptography of one issuance: the workload's P-256 key, its CSR signature, the
/// CA's signature on the leaf, and one verification of that signature; aws-lc through the
/// same rcgen and webpki the agent uses, over messages the size of a CSR's info and a leaf's
/// TBSCertificate. No encoding, no parsing.
struct RawIssuance {
    ca_key: KeyPair,
}

impl RawIssuance {
    fn new() -> Self {
        Self {
            ca_key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    fn run(&self, n: usize) {
        let csr_info = [0x5au8; 200];
        let tbs = [0xa5u8; 450];
        let alg = webpki::aws_lc_rs::ECDSA_P256_SHA256;
        for _ in 0..n {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let csr_sig = key.sign(&csr_info).unwrap();
            let leaf_sig = self.ca_key.sign(&tbs).unwrap();
            alg.verify_signature(self.ca_key.public_key_raw(), &tbs, &leaf_sig)
                .unwrap();
            black_box((csr_sig, leaf_sig));
        }
    }
}

async fn agent_path(
    ca: &EmbeddedCa,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    id: &SpiffeId,
    kt: KeyType,
    n: usize,
    s: &mut Stages,
) {
    for _ in 0..n {
        let t0 = Instant::now();
        let key = PrivateKey::generate(kt).unwrap();
        let t1 = Instant::now();
        let csr_der = key.csr(id).unwrap();
        let t2 = Instant::now();
        let req = SignRequest {
            identity: id.clone(),
            csr_der,
            ttl: Duration::from_secs(86400),
            key_type: kt,
        };
        let chain = ca.sign(&req).await.unwrap();
        let t3 = Instant::now();
        validate(&chain, key.public_key_raw(), id, roots, SystemTime::now()).unwrap();
        let t4 = Instant::now();
        s.keygen.push(t1 - t0);
        s.csr.push(t2 - t1);
        s.sign.push(t3 - t2);
        s.validate.push(t4 - t3);
        s.total.push(t4 - t0);
    }
}

/// The same cryptographic work with rcgen alone: a P-256 key, a CSR (one signature), and a
/// certificate for it signed by a CA key (one signature). No parsing, no checks.
struct BareRcgen {
    issuer: Issuer<'static, KeyPair>,
}

impl BareRcgen {
    fn new() -> Self {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Self {
            issuer: Issuer::new(ca_params, ca_key),
        }
    }

    fn run(&self, n: usize, out: &mut Vec<Duration>) {
        for _ in 0..n {
            let t0 = Instant::now();
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/ns/default/sa/bench"
                    .try_into()
                    .unwrap(),
            )];
            let csr = p.serialize_request(&key).unwrap();
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            std::hint::black_box((csr.der().len(), cert.der().len()));
            out.push(t0.elapsed());
        }
    }
}

#[derive(Default)]
struct Raw {
    keygen: Vec<Duration>,
    sign: Vec<Duration>,
    verify: Vec<Duration>,
}

/// The primitives alone, through the same aws-lc the agent uses (rcgen for keygen and
/// signing, webpki's algorithm table for verification): no encoding, no parsing.
fn raw_primitives(n: usize, r: &mut Raw) {
    // About the size of the agent's CSR info and of a leaf's TBSCertificate.
    let msg = [0x5au8; 300];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let sig = key.sign(&msg).unwrap();
    let alg = webpki::aws_lc_rs::ECDSA_P256_SHA256;
    for _ in 0..n {
        let t0 = Instant::now();
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let t1 = Instant::now();
        let s = key.sign(&msg).unwrap();
        let t2 = Instant::now();
        alg.verify_signature(key.public_key_raw(), &msg, &sig)
            .unwrap();
        let t3 = Instant::now();
        std::hint::black_box((k.public_key_raw().len(), s.len()));
        r.keygen.push(t1 - t0);
        r.sign.push(t2 - t1);
        r.verify.push(t3 - t2);
    }
}

/// openssl's ECDSA P-256 line and its (sign/s, verify/s), if openssl is installed.
fn openssl_speed() -> Option<(String, f64, f64)> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", "1", "ecdsap256"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // "256 bits ecdsa (nistp256) 0.0000s 0.0001s 42727.6 13289.0": the last two.
    match nums.as_slice() {
        [.., sign, verify] => Some((line.trim().to_owned(), *sign, *verify)),
        _ => None,
    }
}

fn pct(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

fn row(name: &str, v: &[Duration]) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<44} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>10.0}",
        us(pct(v, 0.5)),
        us(pct(v, 0.9)),
        us(pct(v, 0.99)),
        us(*v.iter().max().unwrap()),
        us(mean),
        1.0 / mean.as_secs_f64()
    );
}
