//! Issuance latency through cert-manager CertificateRequests against the embedded CA, in the
//! same run, interleaved: one CSR signed by each per round, through the
//! `CertificateAuthority` trait (the CSR is made once per round and shared, so key generation
//! is not in the figures). The API server is the fake of `integration/src/kube_api.rs` in
//! this process, over HTTPS on loopback, with its signer playing cert-manager's approver and
//! CA issuer: the figure is the backend's cost (create, watch until approved and issued,
//! delete: four HTTPS calls on kept connections, three status updates watched) plus the fake
//! issuer's signature.
//!
//! `cargo bench -p sds-integration --bench cert_manager_issuance` (`ROUNDS=N` to change the
//! 300 rounds).

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A bench measures wall time on purpose.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use sds_backends::cert_manager::{CertManagerCa, CertManagerConfig, Credentials, IssuerRef};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, SpiffeId, TrustDomain};
use sds_integration::bench;
use sds_integration::kube_api::{ISSUER, KubeApi, NAMESPACE, TOKEN};

#[tokio::main]
async fn main() {
    let rounds = bench::rounds(300);
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await.unwrap();
    let mut config = CertManagerConfig::new(
        NAMESPACE,
        IssuerRef {
            name: ISSUER.into(),
            kind: "Issuer".into(),
            group: "cert-manager.io".into(),
        },
    );
    config.credentials = Credentials::Kubeconfig(api.write_kubeconfig(dir.path(), TOKEN).unwrap());
    let cert_manager = CertManagerCa::new(config).unwrap();
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let embedded = EmbeddedCa::generate(&td).unwrap();
    let identity = SpiffeId::for_service_account(td, NAMESPACE, "bench").unwrap();

    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds + bench::WARMUP {
        let req = bench::sign_request(&identity).unwrap();
        let cas: [&dyn CertificateAuthority; 2] = [&cert_manager, &embedded];
        for (i, ca) in cas.iter().enumerate() {
            let t = Instant::now();
            ca.sign(&req).await.unwrap();
            if round >= bench::WARMUP {
                times[i].push(t.elapsed());
            }
        }
    }
    let [signer, embedded_times] = &mut times;
    bench::report("cert-manager (fake API)", signer);
    bench::report("embedded", embedded_times);
    assert!(api.requests().is_empty(), "every request deleted");
}
