//! Issuance latency through OpenBao on loopback against the embedded CA, in the same run,
//! interleaved: one CSR signed by each per round, through the `CertificateAuthority` trait
//! (the CSR is made once per round and shared, so key generation is not in the figures).
//!
//! `BAO_BIN=.venv-test/bin/bao cargo bench -p sds-integration --bench vault_issuance`
//! (`ROUNDS=N` to change the 500 rounds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sds_backends::vault::{TokenSource, VaultAuth, VaultCa, VaultConfig};
use sds_integration::bench;
use sds_integration::vault::Vault;

#[tokio::main]
async fn main() {
    let rounds = bench::rounds(500);
    let dir = tempfile::tempdir().unwrap();
    let Some(vault) = Vault::start(dir.path()).await.unwrap() else {
        return;
    };
    vault.pki_with_root("pki", "bench root").await.unwrap();
    vault
        .role("pki", "sds", "spiffe://cluster.local/*", "1h")
        .await
        .unwrap();
    vault.sign_policy("sds", "pki", "sds").await.unwrap();
    let token = vault.token("sds", "1h", true).await.unwrap();
    let vault_ca = VaultCa::new(VaultConfig {
        addr: vault.addr().parse().unwrap(),
        namespace: None,
        ca_cert: None,
        pki_mount: "pki".into(),
        role: "sds".into(),
        issuer: None,
        sign_verbatim: false,
        trust_bundle: None,
        auth: VaultAuth::Token(TokenSource::Literal(token.into())),
        request_timeout: Duration::from_secs(10),
    })
    .unwrap();
    bench::against_embedded("openbao (loopback, HTTP)", &vault_ca, rounds)
        .await
        .unwrap();
}
