//! What the issuance benches share: the round count, one fresh CSR per round, the
//! interleaved comparison with the embedded CA, and the percentile line each prints.

use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sds_backends::embedded::EmbeddedCa;
use sds_backends::{CertificateAuthority, KeyType, SignRequest, SpiffeId, TrustDomain};
use tokio::time::Instant;

/// Rounds run before any time is kept: they warm up connections and caches.
pub const WARMUP: usize = 20;

/// `ROUNDS` from the environment, else `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// A request for `identity` with a fresh P-256 key, shaped as the agent builds it: empty
/// subject, one URI SAN, one hour asked for.
pub fn sign_request(identity: &SpiffeId) -> Result<SignRequest, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    Ok(SignRequest {
        identity: identity.clone(),
        csr_der: params.serialize_request(&key)?.der().to_vec(),
        ttl: Duration::from_secs(3600),
        key_type: KeyType::EcdsaP256,
    })
}

/// Prints `name n=… p50=… p99=… max=…` for the samples (sorted in place).
pub fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |p: f64| {
        samples
            .get(((samples.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{name:<28} n={} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0),
    );
}

/// Signs `rounds` fresh CSRs (after [`WARMUP`] rounds not kept) with `ca` and with an
/// embedded CA, interleaved, each CSR given to both; then prints `name`'s line and the
/// embedded CA's.
pub async fn against_embedded(
    name: &str,
    ca: &dyn CertificateAuthority,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let td: TrustDomain = "cluster.local".parse()?;
    let embedded = EmbeddedCa::generate(&td)?;
    let identity = SpiffeId::for_service_account(td, "default", "bench")?;
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds + WARMUP {
        let req = sign_request(&identity)?;
        let cas: [&dyn CertificateAuthority; 2] = [ca, &embedded];
        for (i, ca) in cas.iter().enumerate() {
            let t = Instant::now();
            ca.sign(&req).await?;
            // The first rounds warm up connections and caches.
            if round >= WARMUP {
                times[i].push(t.elapsed());
            }
        }
    }
    let [signer, embedded_times] = &mut times;
    report(name, signer);
    report("embedded", embedded_times);
    Ok(())
}
