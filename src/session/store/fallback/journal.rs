//! The writes made during an outage, in order, and how many of them each session still has
//! waiting: pure bookkeeping, no I/O.

use std::collections::{HashMap, VecDeque};

use crate::session::store::{JournaledWrite, Patch, Record, SessionKey};

/// One journaled write and when it was made.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// When the write was made (Unix ms).
    pub(super) at: u64,
    pub(super) write: JournaledWrite,
}

/// The journal is full (it holds `limit` writes): the write was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full {
    pub(super) limit: usize,
}

/// The writes of one outage, oldest first, at most `max` of them.
#[derive(Debug)]
pub(super) struct Journal {
    entries: VecDeque<Entry>,
    /// Entries waiting per session: a session with any is served from the local copy, so its
    /// writes reach Redis in order.
    pending: HashMap<SessionKey, usize>,
    max: usize,
}

impl Journal {
    pub(super) fn new(max: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            pending: HashMap::new(),
            max,
        }
    }

    /// Appends `write`, made at `at`, unless the journal is full.
    pub(super) fn push(&mut self, at: u64, write: JournaledWrite) -> Result<(), Full> {
        if self.entries.len() >= self.max {
            return Err(Full { limit: self.max });
        }
        for key in write.keys() {
            *self.pending.entry(key.clone()).or_default() += 1;
        }
        self.entries.push_back(Entry { at, write });
        Ok(())
    }

    /// The oldest write.
    pub(super) fn front(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// Removes the oldest write, once it is replayed (or given up on).
    pub(super) fn pop_front(&mut self) -> Option<Entry> {
        let done = self.entries.pop_front()?;
        for key in done.write.keys() {
            if let Some(count) = self.pending.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.pending.remove(key);
                }
            }
        }
        Some(done)
    }

    /// Whether `key` has writes waiting.
    pub(super) fn is_pending(&self, key: &SessionKey) -> bool {
        self.pending.contains_key(key)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What changed from `before` to `after`, as a patch: what a move to a new id changed of the
/// session, journaled with the move.
pub(super) fn diff(before: &Record, after: &Record) -> Patch {
    Patch {
        set: after
            .data
            .iter()
            .filter(|(key, value)| before.data.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        remove: before
            .data
            .keys()
            .filter(|key| !after.data.contains_key(*key))
            .cloned()
            .collect(),
        lifetime: (before.lifetime() != after.lifetime()).then(|| after.lifetime()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{session::store::UserKey, tenant::Tenant};

    fn key(n: u8) -> SessionKey {
        // The last of 43 base64url characters carries 4 bits: a multiple of 4 keeps it canonical.
        let hash = format!("{}{}", "A".repeat(42), char::from(b'A' + 4 * n));
        SessionKey::from_hash(&Tenant::default(), &hash).expect("a valid hash")
    }

    fn update(n: u8) -> JournaledWrite {
        JournaledWrite::Update {
            key: key(n),
            patch: Patch::default(),
        }
    }

    #[test]
    fn writes_leave_in_order_and_a_full_journal_refuses() {
        let mut journal = Journal::new(2);
        assert_eq!(journal.push(1, update(1)), Ok(()));
        assert_eq!(journal.push(2, update(2)), Ok(()));
        assert_eq!(journal.push(3, update(3)), Err(Full { limit: 2 }));
        assert_eq!(journal.len(), 2);
        assert_eq!(journal.pop_front().map(|e| e.at), Some(1));
        assert_eq!(journal.front().map(|e| e.at), Some(2));
        assert_eq!(journal.push(3, update(3)), Ok(()), "room again");
        assert_eq!(journal.pop_front().map(|e| e.at), Some(2));
        assert_eq!(journal.pop_front().map(|e| e.at), Some(3));
        assert!(journal.is_empty());
        assert!(journal.pop_front().is_none());
    }

    #[test]
    fn a_session_is_pending_until_its_last_write_leaves() {
        let mut journal = Journal::new(10);
        let moved = JournaledWrite::Cycle {
            old: key(1),
            old_user: None,
            new: key(2),
            change: Patch::default(),
            user: None,
            user_changed: false,
            expires_at: 0,
        };
        journal.push(1, update(1)).unwrap();
        journal.push(2, moved).unwrap();
        journal
            .push(
                3,
                JournaledWrite::DeleteUser {
                    user: UserKey::new(&Tenant::default(), "alice"),
                },
            )
            .unwrap();
        assert!(journal.is_pending(&key(1)) && journal.is_pending(&key(2)));
        journal.pop_front();
        assert!(journal.is_pending(&key(1)), "the move still waits");
        journal.pop_front();
        assert!(!journal.is_pending(&key(1)) && !journal.is_pending(&key(2)));
        assert_eq!(journal.len(), 1, "a user's writes name no session");
    }

    #[test]
    fn a_diff_holds_what_changed_and_nothing_else() {
        let mut before = Record::new(Duration::from_secs(60), Duration::from_secs(3600));
        before.data.insert("kept".into(), "1".into());
        before.data.insert("changed".into(), "1".into());
        before.data.insert("removed".into(), "1".into());
        let mut after = before.clone();
        after.data.insert("changed".into(), "2".into());
        after.data.insert("added".into(), "3".into());
        after.data.remove("removed");
        let patch = diff(&before, &after);
        assert_eq!(
            patch.set,
            vec![("added".into(), "3".into()), ("changed".into(), "2".into())]
        );
        assert_eq!(patch.remove, vec!["removed".to_owned()]);
        assert_eq!(patch.lifetime, None);
        after.persistent = true;
        assert_eq!(diff(&before, &after).lifetime, Some(after.lifetime()));
        let mut same = before.clone();
        same.apply(&diff(&before, &after));
        assert_eq!(same, after, "the diff applied to before gives after");
    }
}
