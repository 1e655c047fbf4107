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

use sds_backends::istiod::{IstiodCa, IstiodConfig};
use sds_integration::bench;
use sds_integration::istio_ca::{IstioTestCa, SERVER_NAME};

#[tokio::main]
async fn main() {
    let rounds = bench::rounds(500);
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
    bench::against_embedded("istiod API (loopback, TLS)", &istiod, rounds)
        .await
        .unwrap();
}
