//! Issuance latency of the agent's full path (keygen → CSR → embedded CA sign → validate),
//! stage by stage, beside the bare rcgen floor for the same cryptographic work, measured in
//! one run. Prints figures; `docs/benchmarks.md` records them.
//!
//! `cargo bench -p sds-agent --bench issuance`

// Benches measure wall time, not tokio time; a panic is the failure report.
#![allow(clippy::disallowed_types, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SanType};
use sds_agent::keys::PrivateKey;
use sds_agent::secrets::validate::validate;
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, KeyType, SignRequest, SpiffeId};

const N: usize = 1000;
const WARMUP: usize = 50;

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
    let ca = EmbeddedCa::generate(id.trust_domain()).unwrap();
    let roots = rt.block_on(ca.trust_bundle()).unwrap().roots().to_vec();

    println!("sds-agent issuance benchmark: {N} issuances after {WARMUP} warm-up, one thread");
    println!();

    let agent = rt.block_on(agent_path(&ca, &roots, &id, KeyType::EcdsaP256, N));
    let floor = bare_rcgen(N);
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
    let ratio = pct(&agent.total, 0.5).as_secs_f64() / pct(&floor, 0.5).as_secs_f64();
    println!();
    println!("agent / bare rcgen at p50: {ratio:.2}x");
    if let Some((sign, verify)) = openssl_speed() {
        // The agent's cryptography: one keygen, two signatures (CSR, certificate) and two
        // verifications (the CA checks the CSR, the agent checks the chain).
        let keygen = pct(&agent.keygen, 0.5).as_secs_f64();
        let crypto = keygen + 2.0 / sign + 2.0 / verify;
        println!(
            "openssl speed ecdsap256: {sign:.0} sign/s, {verify:.0} verify/s -> keygen + 2 sign + 2 verify = {:.1} us; agent / that = {:.2}x",
            crypto * 1e6,
            pct(&agent.total, 0.5).as_secs_f64() / crypto
        );
    } else {
        println!("openssl not found: no raw-crypto line");
    }
    println!();

    let p384 = rt.block_on(agent_path(&ca, &roots, &id, KeyType::EcdsaP384, 200));
    row("agent: full path, ecdsa-p384 (200)", &p384.total);
    let rsa = rt.block_on(agent_path(&ca, &roots, &id, KeyType::Rsa2048, 50));
    row("agent: full path, rsa-2048 (50)", &rsa.total);
    row("  rsa-2048 keygen alone", &rsa.keygen);
}

async fn agent_path(
    ca: &EmbeddedCa,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    id: &SpiffeId,
    kt: KeyType,
    n: usize,
) -> Stages {
    let mut s = Stages {
        total: vec![],
        keygen: vec![],
        csr: vec![],
        sign: vec![],
        validate: vec![],
    };
    let warmup = WARMUP.min(n / 4);
    for i in 0..n + warmup {
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
        if i >= warmup {
            s.keygen.push(t1 - t0);
            s.csr.push(t2 - t1);
            s.sign.push(t3 - t2);
            s.validate.push(t4 - t3);
            s.total.push(t4 - t0);
        }
    }
    s
}

/// The same cryptographic work with rcgen alone: a P-256 key, a CSR (one signature), and a
/// certificate for it signed by a CA key (one signature). No parsing, no checks.
fn bare_rcgen(n: usize) -> Vec<Duration> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca_params, ca_key);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
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
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::hint::black_box((csr.der().len(), cert.der().len()));
        if i >= WARMUP {
            out.push(t0.elapsed());
        }
    }
    out
}

/// (sign/s, verify/s) for ECDSA P-256 from `openssl speed`, if openssl is installed.
fn openssl_speed() -> Option<(f64, f64)> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", "2", "ecdsap256"])
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
        [.., sign, verify] => Some((*sign, *verify)),
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
