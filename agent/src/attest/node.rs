//! Node mode's answer to "which identity does this connection get": the chain of
//! [`super`]'s overview, run once per connection and kept for its life.
//!
//! The outcome is one of three, and nothing else:
//! - the pod's SPIFFE ID, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`;
//! - [`Refusal::Unauthenticated`]: the process behind the connection could not be proven
//!   (gone, reused pid, owner mismatch, not in a pod, a pod the kubelet places elsewhere);
//!   the connection is closed after the answer;
//! - [`Refusal::Unavailable`]: the process is proven but its pod is not (yet) in the kubelet's
//!   list, or the kubelet cannot be asked; the caller may retry. Never a guess.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::conn::ConnInfo;
use super::kubelet::{KubeletClient, KubeletError};
use super::process::{self, ProcRoot};
use crate::identity::{SpiffeId, TrustDomain};

/// Proves callers on this node and names their identities.
#[derive(Debug)]
pub struct NodeAttestor {
    proc_root: ProcRoot,
    kubelet: KubeletClient,
    trust_domain: TrustDomain,
}

/// Why a caller is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The caller is not the pod process it must be proven to be.
    #[error("caller not attested: {0}")]
    Unauthenticated(String),
    /// The caller's pod cannot be looked up now; retry.
    #[error("caller's pod not known yet: {0}")]
    Unavailable(String),
}

impl NodeAttestor {
    /// An attestor reading processes under `proc_root` and pods from `kubelet`, naming
    /// identities in `trust_domain`.
    pub fn new(
        proc_root: ProcRoot,
        kubelet: KubeletClient,
        trust_domain: TrustDomain,
    ) -> Arc<Self> {
        Arc::new(Self {
            proc_root,
            kubelet,
            trust_domain,
        })
    }

    /// The kubelet client (for its fetch count).
    pub fn kubelet(&self) -> &KubeletClient {
        &self.kubelet
    }

    /// The identity of the caller on `conn`, proven on the connection's first request and
    /// kept for its life.
    pub async fn identify(&self, conn: &ConnInfo) -> Result<SpiffeId, Refusal> {
        conn.attested(|| self.prove(conn)).await
    }

    async fn prove(&self, conn: &ConnInfo) -> Result<SpiffeId, Refusal> {
        let unauthenticated = |why: String| {
            warn!(reason = %why, "refusing caller: attestation failed");
            Refusal::Unauthenticated(why)
        };
        let Some(cred) = conn.peer_cred else {
            return Err(unauthenticated(
                "no peer credentials on the connection".into(),
            ));
        };
        // A pid of 0 or none: the caller is in a PID namespace the agent cannot see into
        // (the agent must share the host's, `hostPID`).
        let pid = match cred.pid() {
            Some(pid) if pid > 0 => pid,
            _ => {
                return Err(unauthenticated(
                    "the caller's pid is not visible to the agent (is the agent in the host PID namespace?)"
                        .into(),
                ));
            }
        };
        let info = process::inspect(&self.proc_root, pid, cred.uid())
            .map_err(|e| unauthenticated(e.to_string()))?;
        if info.started_after(conn.accepted_at) {
            return Err(unauthenticated(format!(
                "process {pid} started after its connection was accepted: the pid was reused"
            )));
        }
        let pod_uid = info.cgroup.pod_uid.as_str();
        let container = info.cgroup.container_id.as_str();
        debug!(
            pid,
            pod_uid, container, "caller's process proven; asking the kubelet"
        );
        let pod = match self.kubelet.find(pod_uid, container).await {
            Ok(pod) => pod,
            Err(KubeletError::PodUidMismatch { .. }) => {
                return Err(unauthenticated(format!(
                    "the kubelet lists container {container} in a pod other than {pod_uid}"
                )));
            }
            Err(e) => {
                warn!(error = %e, pid, pod_uid, "caller's pod not found; answering Unavailable");
                return Err(Refusal::Unavailable(e.to_string()));
            }
        };
        let id = SpiffeId::for_service_account(
            self.trust_domain.clone(),
            &pod.namespace,
            &pod.service_account,
        )
        .map_err(|e| unauthenticated(format!("pod {}/{}: {e}", pod.namespace, pod.name)))?;
        info!(pid, pod = %format!("{}/{}", pod.namespace, pod.name), id = %id, "caller attested");
        Ok(id)
    }
}
