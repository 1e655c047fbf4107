//! Test doubles for the agent's tests: [`ScriptedCa`], an embedded CA that can be told to
//! fail or to answer wrongly, one scripted [`Fault`] per call, and that counts its calls.
//!
//! Compiled only for tests and with the `testing` feature; never part of a release build.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rcgen::KeyPair;

use crate::embedded::EmbeddedCa;
use crate::{CaError, CertificateAuthority, IssuedChain, SignRequest, SpiffeId, TrustBundle};

/// What the next `sign` call does instead of (or before) signing normally.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Fault {
    /// Fail with this error.
    Fail(CaError),
    /// Sign a different public key than the CSR's.
    WrongKey,
    /// Sign for a different identity than asked.
    WrongSan(SpiffeId),
    /// Issue a certificate that expired a minute ago.
    Expired,
    /// Sign with a CA that is not in the trust bundle.
    UnrelatedChain,
    /// Wait this long (tokio time), then sign normally.
    Delay(Duration),
}

/// An embedded CA with scripted faults and a call counter.
#[derive(Debug)]
pub struct ScriptedCa {
    ca: EmbeddedCa,
    stranger: EmbeddedCa,
    faults: Mutex<VecDeque<Fault>>,
    /// When set, every call fails with this (a CA outage) until cleared.
    outage: Mutex<Option<CaError>>,
    lifetime: Mutex<Option<Duration>>,
    calls: AtomicUsize,
    /// The root being rotated in, once a rotation started.
    next: OnceLock<EmbeddedCa>,
    /// Whether certificates are signed under `next` already.
    signing_next: AtomicBool,
    /// Whether the bundle is unknown until a certificate was signed (as istiod's).
    bundle_needs_a_certificate: AtomicBool,
    signed: AtomicBool,
    bundle_calls: AtomicUsize,
    /// How long every `sign` takes (tokio time), if set.
    latency: Mutex<Option<Duration>>,
    /// `sign` calls running now, and the most ever running at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// The identity of every `sign` call, in the order they started.
    order: Mutex<Vec<SpiffeId>>,
    /// Identities refused with `Denied`.
    denied: Mutex<Vec<SpiffeId>>,
}

/// Counts a running `sign` call for as long as it lives.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ScriptedCa {
    /// A fresh CA for `example.org`-style trust domains (any identity is signed).
    pub fn new() -> Arc<Self> {
        let td = "example.org"
            .parse()
            .unwrap_or_else(|_| unreachable!("valid literal"));
        let make = || EmbeddedCa::generate(&td).unwrap_or_else(|e| panic!("test CA: {e}"));
        Arc::new(Self {
            ca: make(),
            stranger: make(),
            faults: Mutex::new(VecDeque::new()),
            outage: Mutex::new(None),
            lifetime: Mutex::new(None),
            calls: AtomicUsize::new(0),
            next: OnceLock::new(),
            signing_next: AtomicBool::new(false),
            bundle_needs_a_certificate: AtomicBool::new(false),
            signed: AtomicBool::new(false),
            bundle_calls: AtomicUsize::new(0),
            latency: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            order: Mutex::new(Vec::new()),
            denied: Mutex::new(Vec::new()),
        })
    }

    /// Starts a root rotation: a new root joins the bundle and is named in every chain's
    /// roots hint, while certificates are still signed under the old one.
    pub fn start_root_rotation(&self) {
        let td = "example.org"
            .parse()
            .unwrap_or_else(|_| unreachable!("valid literal"));
        let _ = self
            .next
            .set(EmbeddedCa::generate(&td).unwrap_or_else(|e| panic!("test CA: {e}")));
    }

    /// Signs under the new root from now on (after [`ScriptedCa::start_root_rotation`]).
    pub fn sign_with_new_root(&self) {
        self.signing_next.store(true, Ordering::SeqCst);
    }

    /// Makes `trust_bundle` fail until a certificate has been signed, as a CA that sends its
    /// roots only with certificates (istiod) does.
    pub fn set_bundle_needs_a_certificate(&self, on: bool) {
        self.bundle_needs_a_certificate.store(on, Ordering::SeqCst);
    }

    /// How many times `trust_bundle` was called.
    pub fn bundle_calls(&self) -> usize {
        self.bundle_calls.load(Ordering::SeqCst)
    }

    /// The CA that signs now.
    fn signer(&self) -> &EmbeddedCa {
        match self.next.get() {
            Some(next) if self.signing_next.load(Ordering::SeqCst) => next,
            _ => &self.ca,
        }
    }

    /// The roots now: the old one, and the new one once a rotation started.
    fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        let mut roots = self.ca.bundle().roots().to_vec();
        if let Some(next) = self.next.get() {
            roots.extend(next.bundle().roots().iter().cloned());
        }
        roots
    }

    /// Queues a fault for a future call; faults run in order, one per call.
    pub fn push_fault(&self, fault: Fault) {
        self.faults.lock().push_back(fault);
    }

    /// Starts (Some) or ends (None) an outage: every call fails with the error meanwhile.
    pub fn set_outage(&self, error: Option<CaError>) {
        *self.outage.lock() = error;
    }

    /// Issues certificates of exactly this lifetime (notBefore = now), whatever TTL is asked:
    /// a CA that ignores or caps the requested TTL.
    pub fn set_lifetime(&self, lifetime: Option<Duration>) {
        *self.lifetime.lock() = lifetime;
    }

    /// How many times `sign` was called.
    pub fn sign_calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes every `sign` call take `latency` (tokio time) before it answers; `None` ends it.
    pub fn set_latency(&self, latency: Option<Duration>) {
        *self.latency.lock() = latency;
    }

    /// The most `sign` calls that ever ran at once.
    pub fn max_concurrent_signs(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The identities of the `sign` calls so far, in the order they started.
    pub fn sign_order(&self) -> Vec<SpiffeId> {
        self.order.lock().clone()
    }

    /// Refuses every `sign` for `identity` with `Denied` (a CA policy that does not allow it).
    pub fn deny(&self, identity: SpiffeId) {
        self.denied.lock().push(identity);
    }
}

#[async_trait::async_trait]
impl CertificateAuthority for ScriptedCa {
    fn name(&self) -> &'static str {
        "scripted"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let running = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = Running(&self.in_flight);
        self.max_in_flight.fetch_max(running, Ordering::SeqCst);
        self.order.lock().push(req.identity.clone());
        let latency = *self.latency.lock();
        if let Some(latency) = latency {
            tokio::time::sleep(latency).await;
        }
        if let Some(error) = self.outage.lock().clone() {
            return Err(error);
        }
        if self.denied.lock().contains(&req.identity) {
            return Err(CaError::Denied(format!("{} is not allowed", req.identity)));
        }
        let fault = self.faults.lock().pop_front();
        let signer = self.signer();
        let (public_key, mut spec) = signer.check_request(req)?;
        if let Some(lifetime) = *self.lifetime.lock() {
            spec.not_before = SystemTime::now();
            spec.not_after = spec.not_before + lifetime;
        }
        let mut chain = match fault {
            None => signer.issue(&public_key, &spec),
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::WrongKey) => {
                let other = KeyPair::generate().map_err(|e| CaError::BadResponse(e.to_string()))?;
                signer.issue(&other, &spec)
            }
            Some(Fault::WrongSan(id)) => {
                spec.identity = id;
                signer.issue(&public_key, &spec)
            }
            Some(Fault::Expired) => {
                let now = SystemTime::now();
                spec.not_before = now - Duration::from_secs(3600);
                spec.not_after = now - Duration::from_secs(60);
                signer.issue(&public_key, &spec)
            }
            Some(Fault::UnrelatedChain) => return self.stranger.issue(&public_key, &spec),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                signer.issue(&public_key, &spec)
            }
        }?;
        chain.roots_hint = self.roots();
        self.signed.store(true, Ordering::SeqCst);
        Ok(chain)
    }

    fn roots_come_with_certificates(&self) -> bool {
        self.bundle_needs_a_certificate.load(Ordering::SeqCst)
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        self.bundle_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(error) = self.outage.lock().clone() {
            return Err(error);
        }
        if self.bundle_needs_a_certificate.load(Ordering::SeqCst)
            && !self.signed.load(Ordering::SeqCst)
        {
            return Err(CaError::Unavailable(
                "no roots before the first certificate".into(),
            ));
        }
        TrustBundle::new(self.roots()).map_err(|e| CaError::BadResponse(e.to_string()))
    }
}
