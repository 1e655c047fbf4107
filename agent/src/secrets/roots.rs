//! Staged root rotation: which roots are served, and the four phases a change of root goes
//! through so that no proxy ever holds a certificate its peer cannot verify.
//!
//! 1. **announced**: a new root is served next to the old; certificates still come from the
//!    old one (a certificate of the new root that a CA sends early is held back).
//! 2. **issuing**: once every proxy subscribed to the bundle has ACKed a version holding the
//!    new root, or after the overlap, certificates are issued under the new root (the embedded
//!    CA is switched; held certificates are published) and every identity is renewed.
//! 3. **retiring**: no certificate this agent serves chains to the old root; the old root is
//!    still served for the overlap, for the peers of other agents that have not moved yet.
//! 4. **removed**: the overlap is over and the CA no longer announces the old root; it leaves
//!    the bundle.
//!
//! The same phases run whether the agent moves the CA itself (the embedded CA, through
//! [`sds_backends::RootControl`]) or follows a CA that announces its roots (istiod, Vault,
//! cert-manager). A CA that drops a root abruptly, with no new one, starts at phase 2: the
//! dropped root is kept while anything served chains to it, plus the overlap.
//!
//! This is the state machine alone: time, ACKs and the roots in use are handed in, so that it
//! is tested without a clock or a CA.

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{info, warn};

type Root = CertificateDer<'static>;

/// A phase of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No rotation has happened.
    None,
    /// 1: the new root is served next to the old.
    Announced,
    /// 2: certificates are issued under the new root.
    Issuing,
    /// 3: nothing served chains to the old root; it stays for the overlap.
    Retiring,
    /// 4: the old root was removed (the last rotation is complete).
    Removed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::None,
        Phase::Announced,
        Phase::Issuing,
        Phase::Retiring,
        Phase::Removed,
    ];

    /// The phase's number: 0 (none) to 4 (removed), as the metric shows it.
    pub fn number(self) -> i64 {
        self as i64
    }

    /// The phase's name in logs, metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::None => "none",
            Phase::Announced => "announced",
            Phase::Issuing => "issuing",
            Phase::Retiring => "retiring",
            Phase::Removed => "removed",
        }
    }
}

/// What the manager must do after a phase changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Switch the CA to the new root ([`sds_backends::RootControl::activate_next`]).
    Activate,
    /// Publish the certificates held back during phase 1.
    PublishHeld,
    /// Renew every identity now (in the background lane), to move to the new root.
    RenewAll,
    /// The served roots changed: publish a new bundle.
    Republish,
}

/// What the agent sees when it asks whether a phase is over.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, wall clock, for the history.
    pub wall: SystemTime,
    /// For each stream subscribed to the bundle, the bundle version it last ACKed.
    pub acks: &'a [Option<u64>],
    /// The roots that served (and held) certificates chain to, one per certificate (only
    /// those among the old roots are looked at).
    pub anchors: &'a [Root],
}

/// The roots and the rotation in progress.
#[derive(Debug)]
pub struct Rotation {
    overlap: Duration,
    /// The roots as the CA last gave them; empty before the first read.
    ca_roots: Vec<Root>,
    current: Option<InProgress>,
    /// The history of the last completed rotation.
    last: Option<Vec<Change>>,
    /// Phases entered since [`Rotation::take_entered`] was last called, for the metrics.
    entered: Vec<Phase>,
}

#[derive(Debug)]
struct InProgress {
    phase: Phase,
    old: Vec<Root>,
    new: Vec<Root>,
    /// The first served bundle version that held every new root.
    announced_version: Option<u64>,
    since: Instant,
    history: Vec<Change>,
    /// The agent moves the CA (embedded) rather than following it.
    controlled: bool,
    /// Why the phase has not ended yet, for status.
    waiting_for: String,
}

/// A phase entered, and when.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// The phase entered.
    pub phase: Phase,
    /// When, RFC 3339.
    pub at: String,
}

/// What `/trust` and `sds-agent status` show of the rotation.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    /// The phase now: `none`, `announced`, `issuing`, `retiring`, or `removed` once the last
    /// rotation is complete.
    pub phase: Phase,
    /// The phase's number, 0 to 4.
    pub phase_number: i64,
    /// Serials (hex) of the roots being replaced.
    pub old_roots: Vec<String>,
    /// Serials of the roots replacing them.
    pub new_roots: Vec<String>,
    /// What the phase waits for.
    pub waiting_for: Option<String>,
    /// The phases of the rotation in progress, or of the last one, in order.
    pub history: Vec<Change>,
    /// How long the old root is kept after nothing chains to it, and phase 1 waits at most.
    pub overlap_seconds: u64,
}

impl Rotation {
    /// No roots yet; phases 1 and 3 last at most and at least `overlap`.
    pub fn new(overlap: Duration) -> Self {
        Self {
            overlap,
            ca_roots: Vec::new(),
            current: None,
            last: None,
            entered: Vec::new(),
        }
    }

    /// The phases entered since the last call, in order.
    pub fn take_entered(&mut self) -> Vec<Phase> {
        std::mem::take(&mut self.entered)
    }

    /// The roots being replaced, while a rotation runs.
    pub fn old_roots(&self) -> Option<Vec<Root>> {
        self.current.as_ref().map(|p| p.old.clone())
    }

    /// The roots as the CA last gave them.
    pub fn ca_roots(&self) -> &[Root] {
        &self.ca_roots
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        match (&self.current, &self.last) {
            (Some(p), _) => p.phase,
            (None, Some(_)) => Phase::Removed,
            (None, None) => Phase::None,
        }
    }

    /// The roots to serve: the CA's, and the old ones a rotation still keeps.
    pub fn served_roots(&self) -> Vec<Root> {
        let mut roots = self.ca_roots.clone();
        if let Some(p) = &self.current {
            for r in &p.old {
                if !roots.contains(r) {
                    roots.push(r.clone());
                }
            }
        }
        roots
    }

    /// Whether a new certificate chaining to `anchor` must be held back: it is of a root
    /// that not every proxy may trust yet.
    pub fn holds(&self, anchor: &Root) -> bool {
        self.current
            .as_ref()
            .is_some_and(|p| p.phase == Phase::Announced && p.new.contains(anchor))
    }

    /// Whether a certificate chaining to `anchor` must be renewed at once: the agent switched
    /// its CA to the new root, and this one was signed under the old just before.
    pub fn is_stale(&self, anchor: &Root) -> bool {
        self.current
            .as_ref()
            .is_some_and(|p| p.controlled && p.phase >= Phase::Issuing && p.old.contains(anchor))
    }

    /// When phase 1 or 3 ends at the latest or earliest: the scheduler looks again then.
    pub fn deadline(&self) -> Option<Instant> {
        let p = self.current.as_ref()?;
        matches!(p.phase, Phase::Announced | Phase::Retiring).then(|| p.since + self.overlap)
    }

    /// The CA's roots were read. `next` is the prepared root of a CA the agent moves itself
    /// (its presence at the first read means two roots were given at start-up). Returns
    /// true when the phase changed.
    pub fn on_ca_roots(&mut self, roots: &[Root], next: Option<&Root>, obs: &Observed<'_>) -> bool {
        let first = self.ca_roots.is_empty();
        let previous = std::mem::replace(&mut self.ca_roots, roots.to_vec());
        if first {
            if let Some(next) = next.filter(|n| roots.contains(n) && roots.len() > 1) {
                let old = roots.iter().filter(|r| *r != next).cloned().collect();
                self.begin(Phase::Announced, old, vec![next.clone()], true, obs);
                return true;
            }
            return false;
        }
        let known = |r: &Root| {
            previous.contains(r)
                || self
                    .current
                    .as_ref()
                    .is_some_and(|p| p.old.contains(r) || p.new.contains(r))
        };
        let added: Vec<Root> = roots.iter().filter(|r| !known(r)).cloned().collect();
        let dropped: Vec<Root> = previous
            .iter()
            .filter(|r| !roots.contains(r))
            .cloned()
            .collect();
        match &mut self.current {
            None if !added.is_empty() => {
                self.begin(Phase::Announced, previous, added, next.is_some(), obs);
                true
            }
            None if !dropped.is_empty() => {
                warn!(
                    dropped = dropped.len(),
                    "the CA dropped a root with no new one; it is still served while certificates chain to it, plus the overlap"
                );
                let new = roots.to_vec();
                self.begin(Phase::Issuing, dropped, new, false, obs);
                true
            }
            None => false,
            Some(p) => {
                if !added.is_empty() {
                    warn!(
                        added = added.len(),
                        "another new root during a root rotation; announcing it too before anything is issued under it"
                    );
                    p.new.extend(added);
                    p.announced_version = None;
                    return Self::enter(&mut self.entered, p, Phase::Announced, obs);
                }
                let withdrawn = dropped.iter().any(|r| p.new.contains(r));
                if withdrawn {
                    p.new.retain(|r| !dropped.contains(r));
                    if p.new.is_empty() {
                        warn!("the CA withdrew the new root; the root rotation is abandoned");
                        self.current = None;
                        return true;
                    }
                }
                false
            }
        }
    }

    /// A bundle of version `version` holding `roots` was published.
    pub fn published(&mut self, version: u64, roots: &[Root]) {
        if let Some(p) = &mut self.current
            && p.phase == Phase::Announced
            && p.announced_version.is_none()
            && p.new.iter().all(|r| roots.contains(r))
        {
            p.announced_version = Some(version);
        }
    }

    /// Moves through every phase whose end has come; what the manager must do for it.
    pub fn advance(&mut self, obs: &Observed<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(p) = &mut self.current {
            let elapsed = obs.now.saturating_duration_since(p.since);
            let overlap_over = elapsed >= self.overlap;
            let chains_to_old = obs.anchors.iter().filter(|a| p.old.contains(a)).count();
            match p.phase {
                Phase::Announced => {
                    let Some(v) = p.announced_version else {
                        p.waiting_for = "the bundle with the new root to be published".into();
                        break;
                    };
                    let behind = obs.acks.iter().filter(|a| a.is_none_or(|a| a < v)).count();
                    if behind > 0 && !overlap_over {
                        p.waiting_for = format!(
                            "{behind} of {} proxies to ACK bundle version {v} (at most until the overlap ends)",
                            obs.acks.len()
                        );
                        break;
                    }
                    if behind > 0 {
                        warn!(
                            behind,
                            version = v,
                            "root rotation: the overlap ended before every proxy ACKed the new root; issuing under it anyway"
                        );
                    }
                    let controlled = p.controlled;
                    Self::enter(&mut self.entered, p, Phase::Issuing, obs);
                    if controlled {
                        actions.push(Action::Activate);
                    }
                    actions.extend([Action::PublishHeld, Action::RenewAll]);
                }
                Phase::Issuing => {
                    if chains_to_old > 0 {
                        p.waiting_for = format!(
                            "{chains_to_old} served certificates that still chain to the old root to be renewed under the new one"
                        );
                        break;
                    }
                    Self::enter(&mut self.entered, p, Phase::Retiring, obs);
                }
                Phase::Retiring => {
                    if chains_to_old > 0 {
                        warn!(
                            chains_to_old,
                            "root rotation: a certificate of the old root is served again; back to issuing"
                        );
                        Self::enter(&mut self.entered, p, Phase::Issuing, obs);
                        continue;
                    }
                    if !overlap_over {
                        p.waiting_for = "the overlap to end".into();
                        break;
                    }
                    if p.old.iter().any(|r| self.ca_roots.contains(r)) {
                        p.waiting_for = "the CA to stop announcing the old root".into();
                        break;
                    }
                    Self::enter(&mut self.entered, p, Phase::Removed, obs);
                    let history = std::mem::take(&mut p.history);
                    self.current = None;
                    self.last = Some(history);
                    actions.push(Action::Republish);
                }
                Phase::None | Phase::Removed => break,
            }
        }
        actions
    }

    /// What status shows; serials come from `serial`.
    pub fn status(&self, serial: impl Fn(&Root) -> String) -> RotationStatus {
        let (old, new, waiting, history) = match &self.current {
            Some(p) => (
                p.old.iter().map(&serial).collect(),
                p.new.iter().map(&serial).collect(),
                Some(p.waiting_for.clone()).filter(|w| !w.is_empty()),
                p.history.clone(),
            ),
            None => (
                Vec::new(),
                Vec::new(),
                None,
                self.last.clone().unwrap_or_default(),
            ),
        };
        RotationStatus {
            phase: self.phase(),
            phase_number: self.phase().number(),
            old_roots: old,
            new_roots: new,
            waiting_for: waiting,
            history,
            overlap_seconds: self.overlap.as_secs(),
        }
    }

    fn begin(
        &mut self,
        phase: Phase,
        old: Vec<Root>,
        new: Vec<Root>,
        controlled: bool,
        obs: &Observed<'_>,
    ) {
        let mut p = InProgress {
            phase: Phase::None,
            old,
            new,
            announced_version: None,
            since: obs.now,
            history: Vec::new(),
            controlled,
            waiting_for: String::new(),
        };
        info!(
            old_roots = p.old.len(),
            new_roots = p.new.len(),
            controlled,
            "root rotation begins"
        );
        Self::enter(&mut self.entered, &mut p, phase, obs);
        self.current = Some(p);
    }

    fn enter(
        entered: &mut Vec<Phase>,
        p: &mut InProgress,
        phase: Phase,
        obs: &Observed<'_>,
    ) -> bool {
        if p.phase == phase {
            return false;
        }
        entered.push(phase);
        info!(
            from = p.phase.as_str(),
            to = phase.as_str(),
            phase = phase.number(),
            "root rotation phase"
        );
        p.phase = phase;
        p.since = obs.now;
        p.waiting_for.clear();
        p.history.push(Change {
            phase,
            at: super::rfc3339(obs.wall),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(n: u8) -> Root {
        CertificateDer::from(vec![n; 8])
    }

    struct World {
        now: Instant,
        acks: Vec<Option<u64>>,
        anchors: Vec<Root>,
    }

    impl World {
        fn new() -> Self {
            Self {
                now: Instant::now(),
                acks: Vec::new(),
                anchors: Vec::new(),
            }
        }
        fn obs(&self) -> Observed<'_> {
            Observed {
                now: self.now,
                wall: SystemTime::now(),
                acks: &self.acks,
                anchors: &self.anchors,
            }
        }
    }

    const OVERLAP: Duration = Duration::from_secs(60);

    fn phases(r: &Rotation) -> Vec<Phase> {
        r.status(|_| String::new())
            .history
            .iter()
            .map(|c| c.phase)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_followed_ca_goes_through_the_four_phases_in_order() {
        let mut w = World::new();
        let mut r = Rotation::new(OVERLAP);
        assert!(!r.on_ca_roots(&[root(1)], None, &w.obs()));
        assert_eq!(r.phase(), Phase::None);
        w.anchors = vec![root(1), root(1)];
        w.acks = vec![Some(1), Some(1)];

        // 1. The CA announces a second root.
        assert!(r.on_ca_roots(&[root(1), root(2)], None, &w.obs()));
        assert_eq!(r.phase(), Phase::Announced);
        assert_eq!(r.served_roots(), vec![root(1), root(2)]);
        assert!(r.holds(&root(2)) && !r.holds(&root(1)));
        assert!(r.advance(&w.obs()).is_empty(), "not published yet");
        r.published(2, &[root(1), root(2)]);
        w.acks = vec![Some(2), Some(1)];
        assert!(r.advance(&w.obs()).is_empty(), "one proxy has not ACKed");
        assert!(
            r.status(|_| String::new())
                .waiting_for
                .unwrap()
                .contains("1 of 2")
        );

        // 2. Every proxy ACKed: issue under the new root. Followed CA: nothing to activate.
        w.acks = vec![Some(2), Some(2)];
        assert_eq!(
            r.advance(&w.obs()),
            vec![Action::PublishHeld, Action::RenewAll]
        );
        assert_eq!(r.phase(), Phase::Issuing);
        assert!(!r.holds(&root(2)));
        w.anchors = vec![root(2), root(1)];
        assert!(
            r.advance(&w.obs()).is_empty(),
            "one certificate is of the old root"
        );

        // 3. Nothing chains to the old root; it stays for the overlap, and while the CA
        //    still announces it.
        w.anchors = vec![root(2), root(2)];
        assert!(r.advance(&w.obs()).is_empty());
        assert_eq!(r.phase(), Phase::Retiring);
        assert_eq!(r.deadline(), Some(w.now + OVERLAP));
        w.now += OVERLAP;
        assert!(r.advance(&w.obs()).is_empty());
        assert!(
            r.status(|_| String::new())
                .waiting_for
                .unwrap()
                .contains("stop announcing")
        );
        assert_eq!(r.served_roots(), vec![root(1), root(2)]);

        // 4. The CA drops it: removed.
        assert!(!r.on_ca_roots(&[root(2)], None, &w.obs()));
        assert_eq!(
            r.served_roots(),
            vec![root(2), root(1)],
            "kept until phase 4"
        );
        assert_eq!(r.advance(&w.obs()), vec![Action::Republish]);
        assert_eq!(r.phase(), Phase::Removed);
        assert_eq!(r.served_roots(), vec![root(2)]);
        assert_eq!(
            phases(&r),
            [
                Phase::Announced,
                Phase::Issuing,
                Phase::Retiring,
                Phase::Removed
            ]
        );
        assert_eq!(r.status(|_| String::new()).phase_number, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_controlled_ca_given_two_roots_starts_at_phase_one_and_is_activated() {
        let mut w = World::new();
        let mut r = Rotation::new(OVERLAP);
        assert!(r.on_ca_roots(&[root(1), root(2)], Some(&root(2)), &w.obs()));
        assert_eq!(r.phase(), Phase::Announced);
        r.published(1, &[root(1), root(2)]);
        // No proxy subscribed: nobody to wait for.
        assert_eq!(
            r.advance(&w.obs()),
            vec![Action::Activate, Action::PublishHeld, Action::RenewAll]
        );
        // The activated CA drops the old root from its bundle; the rotation keeps serving it.
        w.anchors = vec![root(1)];
        r.on_ca_roots(&[root(2)], None, &w.obs());
        assert_eq!(r.served_roots(), vec![root(2), root(1)]);
        assert!(r.advance(&w.obs()).is_empty());
        w.anchors = vec![root(2)];
        r.advance(&w.obs());
        assert_eq!(r.phase(), Phase::Retiring);
        w.now += OVERLAP - Duration::from_secs(1);
        assert!(r.advance(&w.obs()).is_empty(), "overlap not over");
        w.now += Duration::from_secs(1);
        assert_eq!(r.advance(&w.obs()), vec![Action::Republish]);
        assert_eq!(r.served_roots(), vec![root(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_that_never_acks_holds_phase_one_only_until_the_overlap() {
        let mut w = World::new();
        let mut r = Rotation::new(OVERLAP);
        r.on_ca_roots(&[root(1)], None, &w.obs());
        r.on_ca_roots(&[root(1), root(2)], None, &w.obs());
        r.published(5, &[root(1), root(2)]);
        w.acks = vec![Some(4), None];
        w.anchors = vec![root(1)];
        assert!(r.advance(&w.obs()).is_empty());
        assert_eq!(r.deadline(), Some(w.now + OVERLAP));
        w.now += OVERLAP;
        assert!(r.advance(&w.obs()).contains(&Action::RenewAll));
        assert_eq!(r.phase(), Phase::Issuing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_root_dropped_abruptly_is_kept_while_certificates_chain_to_it() {
        let mut w = World::new();
        let mut r = Rotation::new(OVERLAP);
        r.on_ca_roots(&[root(1), root(2)], None, &w.obs());
        w.anchors = vec![root(1)];
        assert!(r.on_ca_roots(&[root(2)], None, &w.obs()));
        assert_eq!(r.phase(), Phase::Issuing);
        assert_eq!(r.served_roots(), vec![root(2), root(1)]);
        assert!(r.advance(&w.obs()).is_empty());
        w.anchors = vec![root(2)];
        r.advance(&w.obs());
        w.now += OVERLAP;
        assert_eq!(r.advance(&w.obs()), vec![Action::Republish]);
        assert_eq!(r.served_roots(), vec![root(2)]);
        assert_eq!(
            phases(&r),
            [Phase::Issuing, Phase::Retiring, Phase::Removed]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_of_the_old_root_in_phase_three_goes_back_to_phase_two() {
        let mut w = World::new();
        let mut r = Rotation::new(OVERLAP);
        r.on_ca_roots(&[root(1)], None, &w.obs());
        r.on_ca_roots(&[root(1), root(2)], None, &w.obs());
        r.published(2, &[root(1), root(2)]);
        w.anchors = vec![root(2)];
        r.advance(&w.obs());
        assert_eq!(r.phase(), Phase::Retiring);
        w.anchors = vec![root(1)];
        r.advance(&w.obs());
        assert_eq!(r.phase(), Phase::Issuing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_new_root_abandons_the_rotation() {
        let w = World::new();
        let mut r = Rotation::new(OVERLAP);
        r.on_ca_roots(&[root(1)], None, &w.obs());
        r.on_ca_roots(&[root(1), root(2)], None, &w.obs());
        assert!(r.on_ca_roots(&[root(1)], None, &w.obs()));
        assert_eq!(r.phase(), Phase::None);
        assert_eq!(r.served_roots(), vec![root(1)]);
    }
}
