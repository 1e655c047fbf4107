//! The embedded CA as the agent runs it: one signing CA now, and a next one during a staged
//! root rotation ([`crate::RootControl`]).
//!
//! Its bundle is the current root, plus the next root once one is prepared. Activating the
//! next root makes it sign and drops the old root from this CA's bundle; the agent's secret
//! manager keeps serving the old root until no certificate it serves chains to it, plus the
//! overlap (docs/trust.md, "Staged root rotation").
//!
//! Where the next root comes from:
//! - an ephemeral CA (no files given) makes a new ephemeral root when asked
//!   (`sds-agent ca rotate`);
//! - a CA loaded from files reads the next CA from `--embedded-next-ca-cert` and
//!   `--embedded-next-ca-key`: at start-up if they exist then (two roots given), or when asked.
//!   A root made here would be trusted by no other agent of the trust domain, so this CA never
//!   makes one.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls_pki_types::CertificateDer;

use super::EmbeddedCa;
use crate::{CaError, CertificateAuthority, IssuedChain, SignRequest, TrustBundle, TrustDomain};

/// Where a next CA comes from.
#[derive(Debug, Clone)]
pub enum NextSource {
    /// A new ephemeral root for this trust domain, made when asked.
    Generate(TrustDomain),
    /// PEM files the operator puts in place: the signing certificate and its chain up to a
    /// self-signed root, and its key.
    Files {
        /// `--embedded-next-ca-cert`.
        cert: PathBuf,
        /// `--embedded-next-ca-key`.
        key: PathBuf,
    },
    /// No next CA can be had (files for the current CA, none named for the next).
    None,
}

/// The embedded CA with a current and, during a root rotation, a next signing CA.
pub struct RotatingCa {
    gens: RwLock<Generations>,
    source: NextSource,
}

struct Generations {
    current: Arc<EmbeddedCa>,
    next: Option<Arc<EmbeddedCa>>,
}

impl RotatingCa {
    /// `current` signs; a next CA is had from `source` when asked.
    pub fn new(current: EmbeddedCa, source: NextSource) -> Self {
        Self {
            gens: RwLock::new(Generations {
                current: Arc::new(current),
                next: None,
            }),
            source,
        }
    }

    /// Reads the next CA's files if they exist, so that a rotation begins at start-up. Missing
    /// files are not an error: they may be put in place later, then `sds-agent ca rotate`
    /// reads them. Files that exist but do not hold a usable CA are.
    pub fn with_next_if_present(self) -> Result<Self, String> {
        if let NextSource::Files { cert, key } = &self.source
            && (cert.exists() || key.exists())
        {
            crate::RootControl::prepare_next(&self)?;
        }
        Ok(self)
    }

    /// The CA that signs now.
    fn current(&self) -> Arc<EmbeddedCa> {
        self.gens.read().current.clone()
    }

    fn load_next(&self) -> Result<EmbeddedCa, String> {
        let ca = match &self.source {
            NextSource::Generate(td) => EmbeddedCa::generate(td).map_err(|e| e.to_string())?,
            NextSource::Files { cert, key } => {
                let read = |flag: &str, path: &PathBuf| {
                    std::fs::read(path)
                        .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
                };
                let cert_pem = read("--embedded-next-ca-cert", cert)?;
                let key_pem = zeroize::Zeroizing::new(
                    String::from_utf8(read("--embedded-next-ca-key", key)?).map_err(|_| {
                        format!("--embedded-next-ca-key {}: not PEM text", key.display())
                    })?,
                );
                EmbeddedCa::from_pem(&cert_pem, &key_pem).map_err(|e| {
                    format!(
                        "--embedded-next-ca-cert {} / --embedded-next-ca-key {}: {e}",
                        cert.display(),
                        key.display()
                    )
                })?
            }
            NextSource::None => {
                return Err(
                    "this embedded CA was loaded from files that other agents share; a root made \
                     here would be trusted by none of them. Give the next CA with \
                     --embedded-next-ca-cert and --embedded-next-ca-key"
                        .into(),
                );
            }
        };
        Ok(ca.local_requests_only())
    }
}

#[async_trait::async_trait]
impl CertificateAuthority for RotatingCa {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, CaError> {
        self.current().sign(req).await
    }

    async fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        let gens = self.gens.read();
        let mut roots = gens.current.bundle.roots().to_vec();
        if let Some(next) = &gens.next {
            roots.extend(next.bundle.roots().iter().cloned());
        }
        TrustBundle::new(roots).map_err(|e| CaError::Misconfigured(e.to_string()))
    }

    fn root_control(&self) -> Option<&dyn crate::RootControl> {
        Some(self)
    }
}

impl crate::RootControl for RotatingCa {
    fn next_root(&self) -> Option<CertificateDer<'static>> {
        self.gens
            .read()
            .next
            .as_ref()
            .and_then(|n| n.bundle.roots().first().cloned())
    }

    fn prepare_next(&self) -> Result<CertificateDer<'static>, String> {
        if self.gens.read().next.is_some() {
            return Err("a root rotation is in progress already: its next root is prepared".into());
        }
        let next = self.load_next()?;
        let root = next
            .bundle
            .roots()
            .first()
            .cloned()
            .ok_or_else(|| "the next CA has no root".to_owned())?;
        let mut gens = self.gens.write();
        if gens.current.bundle.roots().contains(&root) {
            return Err(
                "the next CA's root is the current root: a rotation needs a new root".into(),
            );
        }
        if gens.next.is_some() {
            return Err("a root rotation is in progress already: its next root is prepared".into());
        }
        gens.next = Some(Arc::new(next));
        Ok(root)
    }

    fn activate_next(&self) -> bool {
        let mut gens = self.gens.write();
        match gens.next.take() {
            Some(next) => {
                gens.current = next;
                true
            }
            None => false,
        }
    }
}

impl fmt::Debug for RotatingCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gens = self.gens.read();
        f.debug_struct("RotatingCa")
            .field("current", &gens.current)
            .field("next", &gens.next)
            .field("source", &self.source)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyType, RootControl, SpiffeId};
    use rcgen::{CertificateParams, KeyPair};

    fn td() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    fn request() -> SignRequest {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        SignRequest {
            identity: id,
            csr_der: params.serialize_request(&key).unwrap().der().to_vec(),
            ttl: std::time::Duration::from_secs(3600),
            key_type: KeyType::EcdsaP256,
        }
    }

    #[tokio::test]
    async fn a_prepared_root_joins_the_bundle_then_signs_and_the_old_one_leaves() {
        let ca = RotatingCa::new(
            EmbeddedCa::generate(&td()).unwrap(),
            NextSource::Generate(td()),
        );
        let old = ca.trust_bundle().await.unwrap().roots().to_vec();
        assert_eq!(old.len(), 1);
        assert!(ca.next_root().is_none());
        assert!(!ca.activate_next(), "nothing prepared");

        let next = ca.prepare_next().unwrap();
        assert_eq!(ca.next_root(), Some(next.clone()));
        let both = ca.trust_bundle().await.unwrap().roots().to_vec();
        assert_eq!(both, vec![old[0].clone(), next.clone()]);
        // Still signing under the old root.
        let chain = ca.sign(&request()).await.unwrap();
        assert_eq!(chain.roots_hint, old);
        let again = ca.prepare_next().unwrap_err();
        assert!(again.contains("in progress"), "{again}");

        assert!(ca.activate_next());
        assert!(ca.next_root().is_none());
        let chain = ca.sign(&request()).await.unwrap();
        assert_eq!(chain.roots_hint, vec![next.clone()]);
        assert_eq!(ca.trust_bundle().await.unwrap().roots(), &[next]);
    }

    #[test]
    fn a_ca_from_shared_files_makes_no_root_of_its_own_and_reads_the_next_one_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let write_ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, name.to_owned());
            let cert = p.self_signed(&key).unwrap();
            let (c, k) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}-key.pem")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (c1, k1) = write_ca("one");
        let load = |c: &PathBuf, k: &PathBuf| {
            EmbeddedCa::from_pem(
                &std::fs::read(c).unwrap(),
                &std::fs::read_to_string(k).unwrap(),
            )
            .unwrap()
        };
        let none = RotatingCa::new(load(&c1, &k1), NextSource::None);
        let err = none.prepare_next().unwrap_err();
        assert!(err.contains("--embedded-next-ca-cert"), "{err}");

        let (c2, k2) = (dir.path().join("two.pem"), dir.path().join("two-key.pem"));
        let files = NextSource::Files {
            cert: c2.clone(),
            key: k2.clone(),
        };
        // Not there yet: no rotation at start, and asking says which file is missing.
        let ca = RotatingCa::new(load(&c1, &k1), files.clone())
            .with_next_if_present()
            .unwrap();
        assert!(ca.next_root().is_none());
        let err = ca.prepare_next().unwrap_err();
        assert!(err.contains("two.pem"), "{err}");
        // The current CA given again as the next one is refused.
        std::fs::copy(&c1, &c2).unwrap();
        std::fs::copy(&k1, &k2).unwrap();
        let err = ca.prepare_next().unwrap_err();
        assert!(err.contains("is the current root"), "{err}");
        // Garbage is refused at start-up, naming the flag.
        std::fs::write(&c2, "not pem").unwrap();
        let err = RotatingCa::new(load(&c1, &k1), files.clone())
            .with_next_if_present()
            .unwrap_err();
        assert!(err.contains("--embedded-next-ca-cert"), "{err}");
        // A real next CA, present at start-up: the rotation begins at once.
        let (c3, k3) = write_ca("three");
        std::fs::copy(&c3, &c2).unwrap();
        std::fs::copy(&k3, &k2).unwrap();
        let ca = RotatingCa::new(load(&c1, &k1), files)
            .with_next_if_present()
            .unwrap();
        assert!(ca.next_root().is_some());
    }
}
