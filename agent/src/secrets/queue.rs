//! The renewal queue of the secret manager's scheduler: which identity goes to the CA next.
//!
//! Two lanes, as in ztunnel's certificate manager: real-time work (an identity someone is
//! waiting for with no valid certificate, or a rotation an operator asked for) always goes
//! ahead of background work (renewals of certificates that are still valid, and their
//! retries). Within a lane, the earliest due goes first, ties in the order they were queued.
//! Each identity is queued at most once: queueing it again replaces its entry, except that a
//! real-time entry is never demoted by a later background one.
//!
//! This is a plain data structure, with no clock and no locking of its own; the manager
//! holds it under its lock and asks it what is due at an instant it read.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use tokio::time::Instant;

/// Which lane an entry waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Priority {
    /// Someone waits: a first certificate, an expired one, or a forced rotation.
    RealTime,
    /// A renewal (or its retry) while the served certificate is still valid.
    Background,
}

impl Priority {
    /// The `priority` label of the queue metrics.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Priority::RealTime => "realtime",
            Priority::Background => "background",
        }
    }
}

/// Where an entry sits: its lane, when it is due, and its place among equals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    priority: Priority,
    due: Instant,
    seq: u64,
}

/// The queue of due renewals, keyed by `K` (the identity).
#[derive(Debug)]
pub(super) struct Queue<K> {
    realtime: BTreeMap<(Instant, u64), K>,
    background: BTreeMap<(Instant, u64), K>,
    slots: HashMap<K, Slot>,
    next_seq: u64,
}

impl<K: Clone + Eq + Hash> Default for Queue<K> {
    fn default() -> Self {
        Self {
            realtime: BTreeMap::new(),
            background: BTreeMap::new(),
            slots: HashMap::new(),
            next_seq: 0,
        }
    }
}

impl<K: Clone + Eq + Hash> Queue<K> {
    /// Queues `key` at `due` in `priority`'s lane, replacing an entry it had; a real-time
    /// entry is kept (at the earlier of the two times) when `priority` is background.
    pub(super) fn push(&mut self, key: K, priority: Priority, due: Instant) {
        let (priority, due) = match self.slots.get(&key) {
            Some(old) if old.priority == Priority::RealTime && priority == Priority::Background => {
                (Priority::RealTime, old.due.min(due))
            }
            _ => (priority, due),
        };
        self.remove(&key);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.lane(priority).insert((due, seq), key.clone());
        self.slots.insert(key, Slot { priority, due, seq });
    }

    /// Takes `key` out of the queue; whether it was in it.
    pub(super) fn remove(&mut self, key: &K) -> bool {
        match self.slots.remove(key) {
            Some(slot) => {
                self.lane(slot.priority).remove(&(slot.due, slot.seq));
                true
            }
            None => false,
        }
    }

    /// Moves `key` to the real-time lane, keeping when it is due; whether it was queued.
    pub(super) fn promote(&mut self, key: &K) -> bool {
        match self.slots.get(key) {
            Some(slot) => {
                let due = slot.due;
                self.push(key.clone(), Priority::RealTime, due);
                true
            }
            None => false,
        }
    }

    /// Takes the entry to serve next at `now`: the earliest due real-time one, else the
    /// earliest due background one; `None` if nothing is due yet.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(K, Priority)> {
        for priority in [Priority::RealTime, Priority::Background] {
            let lane = self.lane(priority);
            if let Some(entry) = lane.first_entry()
                && entry.key().0 <= now
            {
                let key = entry.remove();
                self.slots.remove(&key);
                return Some((key, priority));
            }
        }
        None
    }

    /// When the earliest entry of either lane is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let first = |lane: &BTreeMap<(Instant, u64), K>| lane.keys().next().map(|(due, _)| *due);
        match (first(&self.realtime), first(&self.background)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether `key` is queued, and in which lane.
    pub(super) fn priority_of(&self, key: &K) -> Option<Priority> {
        self.slots.get(key).map(|s| s.priority)
    }

    /// Entries waiting in `priority`'s lane, due or not.
    pub(super) fn len(&self, priority: Priority) -> usize {
        match priority {
            Priority::RealTime => self.realtime.len(),
            Priority::Background => self.background.len(),
        }
    }

    /// Whether nothing is queued.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn lane(&mut self, priority: Priority) -> &mut BTreeMap<(Instant, u64), K> {
        match priority {
            Priority::RealTime => &mut self.realtime,
            Priority::Background => &mut self.background,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn realtime_goes_first_even_when_background_is_older() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.push(
            "renew-1",
            Priority::Background,
            now - Duration::from_secs(60),
        );
        q.push(
            "renew-2",
            Priority::Background,
            now - Duration::from_secs(30),
        );
        q.push("new-pod", Priority::RealTime, now);
        assert_eq!(q.pop_due(now), Some(("new-pod", Priority::RealTime)));
        assert_eq!(q.pop_due(now), Some(("renew-1", Priority::Background)));
        assert_eq!(q.pop_due(now), Some(("renew-2", Priority::Background)));
        assert_eq!(q.pop_due(now), None);
        assert!(q.is_empty());
    }

    #[test]
    fn nothing_is_taken_before_it_is_due() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.push("later", Priority::RealTime, now + Duration::from_secs(5));
        q.push(
            "later-bg",
            Priority::Background,
            now + Duration::from_secs(3),
        );
        assert_eq!(q.pop_due(now), None);
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(3)));
        assert_eq!(
            q.pop_due(now + Duration::from_secs(3)),
            Some(("later-bg", Priority::Background))
        );
        // A real-time entry that is not due yet does not hold up a due background one, and
        // is served first once both are due.
        q.push("bg", Priority::Background, now + Duration::from_secs(4));
        assert_eq!(
            q.pop_due(now + Duration::from_secs(6)),
            Some(("later", Priority::RealTime))
        );
        assert_eq!(
            q.pop_due(now + Duration::from_secs(6)),
            Some(("bg", Priority::Background))
        );
    }

    #[test]
    fn one_entry_per_key_and_realtime_is_never_demoted() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.push("a", Priority::Background, now + Duration::from_secs(100));
        q.push("a", Priority::Background, now + Duration::from_secs(10));
        assert_eq!(q.len(Priority::Background), 1);
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(10)));
        // Promoted.
        q.push("a", Priority::RealTime, now + Duration::from_secs(20));
        assert_eq!(q.len(Priority::Background), 0);
        assert_eq!(q.priority_of(&"a"), Some(Priority::RealTime));
        // A later background push keeps it real-time, at the earlier time.
        q.push("a", Priority::Background, now + Duration::from_secs(5));
        assert_eq!(q.priority_of(&"a"), Some(Priority::RealTime));
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(5)));
        assert!(q.remove(&"a"));
        assert!(!q.remove(&"a"));
        // Promotion keeps the time.
        q.push("b", Priority::Background, now + Duration::from_secs(7));
        assert!(q.promote(&"b"));
        assert_eq!(q.priority_of(&"b"), Some(Priority::RealTime));
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(7)));
        assert!(q.remove(&"b"));
        assert!(!q.promote(&"b"));
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn equals_are_served_in_the_order_queued() {
        let now = Instant::now();
        let mut q = Queue::default();
        for i in 0..100 {
            q.push(i, Priority::Background, now);
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop_due(now).map(|(k, _)| k)).collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }
}
