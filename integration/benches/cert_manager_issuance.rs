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

use sds_backends::cert_manager::{CertManagerCa, CertManagerConfig, Credentials, IssuerRef};
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
    bench::against_embedded("cert-manager (fake API)", &cert_manager, rounds)
        .await
        .unwrap();
    assert!(api.requests().is_empty(), "every request deleted");
}
