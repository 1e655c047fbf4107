//! Issuance latency through the Istio CA API against the embedded CA, in the same run,
//! interleaved: one CSR signed by each per round, through the `CertificateAuthority` trait
//! (the CSR is made once per round and shared, so key generation is not in the figures).
//! The Istio CA is the test CA of `integration/src/istio_ca.rs` in this process, over TLS
//! gRPC on loopback: the figure is the istiod client's cost (token read, TLS HTTP/2 call,
//! answer parsing) plus the test CA's own check and signature.
//!
//! `cargo bench -p sds-integration --bench istiod_issuance` (`ROUNDS=N` to change the 500
//! rounds).

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A bench measures wall time on purpose.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::istiod::{IstiodCa, IstiodConfig};
use sds_backends::{CertificateAuthority, KeyType, SignRequest, SpiffeId, TrustDomain};
use sds_integration::istio_ca::{IstioTestCa, SERVER_NAME};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    ca.allow("bench-token", "cluster.local", "default", "bench")
        .await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "bench-token").unwrap();
    let mut config = IstiodConfig::new(ca.addr().to_string().parse().unwrap());
    config.root_cert = Some(ca.tls_root().to_owned());
    config.server_name = Some(SERVER_NAME.into());
    config.token_file = token_file;
    let istiod = IstiodCa::new(config).unwrap();
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let embedded = EmbeddedCa::generate(&td).unwrap();
    let identity = SpiffeId::for_service_account(td, "default", "bench").unwrap();

    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds + 20 {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
        let req = SignRequest {
            identity: identity.clone(),
            csr_der: p.serialize_request(&key).unwrap().der().to_vec(),
            ttl: Duration::from_secs(3600),
            key_type: KeyType::EcdsaP256,
        };
        let cas: [&dyn CertificateAuthority; 2] = [&istiod, &embedded];
        for (i, ca) in cas.iter().enumerate() {
            let t = Instant::now();
            ca.sign(&req).await.unwrap();
            // The first 20 rounds warm up the connection and caches.
            if round >= 20 {
                times[i].push(t.elapsed());
            }
        }
    }
    for (name, t) in ["istiod API (loopback, TLS)", "embedded"]
        .iter()
        .zip(times.iter_mut())
    {
        t.sort();
        println!(
            "{name:<28} n={} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
            t.len(),
            percentile(t, 0.5),
            percentile(t, 0.99),
            percentile(t, 1.0),
        );
    }
}
