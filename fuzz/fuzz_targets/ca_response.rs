//! What a CA answers: PEM text or DER, turned into an `IssuedChain` the way the backends do
//! (`pem::decode_certificates`, then `chain::split_roots`: leaf first, self-issued
//! certificates to the roots hint) and checked by `secrets::validate::validate`, the gate
//! every certificate passes before it is served. Any input must be rejected or accepted,
//! never panic.
//!
//! The backends' own answer parsers (Vault's JSON, ACM PCA's `GetCertificate`, istiod's
//! `IstioCertificateResponse`) are private, so this target drives the public pieces they are
//! built from. The trust bundle is a fixed root (`fuzz/seeds/root.pem`, with the
//! intermediate and leaf the seed corpus holds), so a mutated real chain reaches the webpki
//! verification and the SPIFFE checks rather than stopping at "unknown issuer".

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use sds_agent::identity::SpiffeId;
use sds_agent::secrets::validate::validate;
use sds_backends::chain::{is_self_issued, roots_of, split_roots};
use sds_backends::pem::{decode_certificates, encode_certificates};
use sds_backends::{IssuedChain, TrustBundle};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The seed chain's identity.
const IDENTITY: &str = "spiffe://example.org/ns/default/sa/web";
/// 2027-01-15, inside the seed chain's validity (2026-11-23 to 2122).
const NOW_UNIX: u64 = 1_800_000_000;

struct Fixed {
    identity: SpiffeId,
    roots: Vec<CertificateDer<'static>>,
    /// The seed leaf's public key (the key the agent would have generated).
    our_key: Vec<u8>,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    // Fuzz set-up from committed files, not input: a failure is a broken checkout.
    FIXED.get_or_init(|| {
        let roots = decode_certificates(include_bytes!("../seeds/root.pem")).expect("root.pem");
        let leaf = decode_certificates(include_bytes!("../seeds/leaf.pem")).expect("leaf.pem");
        let our_key = public_key(&leaf[0]).expect("leaf.pem key");
        Fixed {
            identity: IDENTITY.parse().expect("identity"),
            roots,
            our_key,
        }
    })
}

/// The raw subject public key of a DER certificate, if it parses.
fn public_key(der: &[u8]) -> Option<Vec<u8>> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
}

/// Validates `chain` with our fixed key and with the leaf's own key (so that a leaf with any
/// key still reaches the SAN, validity and chain checks).
fn check(chain: &IssuedChain) {
    let f = fixed();
    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX);
    let _ = validate(chain, &f.our_key, &f.identity, &f.roots, now);
    if let Some(own) = public_key(&chain.leaf) {
        let _ = validate(chain, &own, &f.identity, &f.roots, now);
        let _ = validate(chain, &own, &f.identity, &f.roots, SystemTime::now());
        // The roots the CA sent, as a bundle of their own.
        if !chain.roots_hint.is_empty() {
            let _ = validate(chain, &own, &f.identity, &chain.roots_hint, now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // As PEM: one or more CERTIFICATE blocks, leaf first.
    if let Ok(certs) = decode_certificates(data) {
        let _ = encode_certificates(certs.iter());
        let _ = roots_of("fuzz", std::slice::from_ref(&certs));
        let _ = TrustBundle::new(certs.clone());
        let mut rest = certs.into_iter();
        if let Some(leaf) = rest.next() {
            let (intermediates, roots_hint) = split_roots(rest);
            check(&IssuedChain {
                leaf,
                intermediates,
                roots_hint,
            });
        }
    }

    // As DER: the input is the leaf, under the seed intermediate.
    let leaf = CertificateDer::from(data.to_vec());
    let _ = is_self_issued(&leaf);
    let intermediates = decode_certificates(include_bytes!("../seeds/int.pem")).unwrap_or_default();
    check(&IssuedChain {
        leaf,
        intermediates,
        roots_hint: Vec::new(),
    });
});
