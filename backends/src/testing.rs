//! Test doubles for the agent's tests: [`ScriptedCa`], an embedded CA that can be told to
//! fail or to answer wrongly, one scripted [`Fault`] per call, and that counts its calls.
//!
//! Compiled only for tests and with the `testing` feature; never part of a release build.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        })
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
}

#[async_trait::async_trait]
impl CertificateAuthority for ScriptedCa {
    fn name(&self) -> &'static str {
        "scripted"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(error) = self.outage.lock().clone() {
            return Err(error);
        }
        let fault = self.faults.lock().pop_front();
        let (csr, mut spec) = self.ca.check_request(req)?;
        if let Some(lifetime) = *self.lifetime.lock() {
            spec.not_before = SystemTime::now();
            spec.not_after = spec.not_before + lifetime;
        }
        match fault {
            None => self.ca.issue(&csr.public_key, &spec),
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::WrongKey) => {
                let other = KeyPair::generate().map_err(|e| CaError::BadResponse(e.to_string()))?;
                self.ca.issue(&other, &spec)
            }
            Some(Fault::WrongSan(id)) => {
                spec.identity = id;
                self.ca.issue(&csr.public_key, &spec)
            }
            Some(Fault::Expired) => {
                let now = SystemTime::now();
                spec.not_before = now - Duration::from_secs(3600);
                spec.not_after = now - Duration::from_secs(60);
                self.ca.issue(&csr.public_key, &spec)
            }
            Some(Fault::UnrelatedChain) => self.stranger.issue(&csr.public_key, &spec),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.ca.issue(&csr.public_key, &spec)
            }
        }
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        self.ca.trust_bundle().await
    }
}
