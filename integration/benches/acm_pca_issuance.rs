//! Issuance latency through moto's ACM PCA API on loopback against the embedded CA, in the
//! same run, interleaved: one CSR signed by each per round, through the
//! `CertificateAuthority` trait (the CSR is made once per round and shared, so key generation
//! is not in the figures). An ACM PCA signature is two calls: `IssueCertificate`, then
//! `GetCertificate` through the SDK's waiter.
//!
//! `MOTO_SERVER_BIN=.venv-test/bin/moto_server cargo bench -p sds-integration --bench acm_pca_issuance`
//! (`ROUNDS=N` to change the 300 rounds).

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A bench measures wall time on purpose.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use aws_sdk_acmpca::config::Credentials;
use sds_backends::acm_pca::{AcmPcaCa, AcmPcaConfig};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, SpiffeId, TrustDomain};
use sds_integration::bench;
use sds_integration::moto::Moto;

#[tokio::main]
async fn main() {
    let rounds = bench::rounds(300);
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(dir.path()).await.unwrap() else {
        return;
    };
    let pca = moto.root_ca("bench root").await.unwrap();
    let mut config = AcmPcaConfig::new(pca.arn.parse().unwrap());
    config.endpoint = Some(moto.endpoint().to_owned());
    let acm = AcmPcaCa::with_credentials(
        config,
        Credentials::new("testing", "testing", None, None, "bench"),
    )
    .await
    .unwrap();
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let embedded = EmbeddedCa::generate(&td).unwrap();
    let identity = SpiffeId::for_service_account(td, "default", "bench").unwrap();

    // A call that signs nothing, through the same SDK and server: the floor of one round
    // trip to moto (HTTP, SigV4, JSON, Flask), to tell moto's cost from the backend's.
    let mut floor = Vec::new();
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds + bench::WARMUP {
        let req = bench::sign_request(&identity).unwrap();
        let t = Instant::now();
        moto.status(&pca.arn).await.unwrap();
        if round >= bench::WARMUP {
            floor.push(t.elapsed());
        }
        let cas: [&dyn CertificateAuthority; 2] = [&acm, &embedded];
        for (i, ca) in cas.iter().enumerate() {
            let t = Instant::now();
            ca.sign(&req).await.unwrap();
            // The first 20 rounds warm up connections, the CA description and caches.
            if round >= bench::WARMUP {
                times[i].push(t.elapsed());
            }
        }
    }
    let [signer, embedded_times] = &mut times;
    bench::report("acm-pca (moto, loopback)", signer);
    bench::report("embedded", embedded_times);
    bench::report("moto Describe (1 call)", &mut floor);
}
