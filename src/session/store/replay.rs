//! What a [`FallbackStore`](super::FallbackStore) needs of the store in front of it: whether it
//! answers now, and a way to take back the writes journaled while it did not.

use async_trait::async_trait;

use super::{Patch, Record, SessionKey, SessionStore, StoreError, UserKey};

/// One write made while the store in front was unreachable, in the terms it is replayed in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JournaledWrite {
    /// A new session.
    Create {
        /// Where it lives.
        key: SessionKey,
        /// The whole record.
        record: Record,
    },
    /// Changed fields of an existing session.
    Update {
        /// The session.
        key: SessionKey,
        /// The change.
        patch: Patch,
    },
    /// The session moved to a new id (a login, say).
    Cycle {
        /// Where it lived.
        old: SessionKey,
        /// The user it was indexed under there.
        old_user: Option<String>,
        /// Where it lives now.
        new: SessionKey,
        /// What the move itself changed of the session (fields, lifetime).
        change: Patch,
        /// The user it is bound to now.
        user: Option<String>,
        /// Whether the move bound it to `user` (a login) rather than keeping its user.
        user_changed: bool,
        /// Its absolute end (Unix ms), up to which the user's index must list it.
        expires_at: u64,
    },
    /// The session was ended.
    Delete {
        /// The session.
        key: SessionKey,
        /// The user it was indexed under.
        user: Option<String>,
    },
    /// Every session of a user was ended ("log out everywhere").
    DeleteUser {
        /// The user.
        user: UserKey,
    },
}

impl JournaledWrite {
    /// The sessions the write touches.
    pub fn keys(&self) -> impl Iterator<Item = &SessionKey> {
        let (first, second) = match self {
            Self::Create { key, .. } | Self::Update { key, .. } | Self::Delete { key, .. } => {
                (Some(key), None)
            }
            Self::Cycle { old, new, .. } => (Some(old), Some(new)),
            Self::DeleteUser { .. } => (None, None),
        };
        first.into_iter().chain(second)
    }
}

/// What replaying one journaled write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replayed {
    /// Applied (fields the store holds newer writes of were left as they are).
    Applied,
    /// The session is gone from the store (destroyed elsewhere, or expired): nothing was
    /// written, and it stays gone.
    Superseded,
}

/// A store a [`FallbackStore`](super::FallbackStore) can stand in for while it is unreachable,
/// and give back what it kept meanwhile. Implemented by [`RedisStore`](super::RedisStore).
///
/// Replaying must keep these promises, which the fallback's tests check:
/// - a write is applied field by field, each only where the store holds no newer write of that
///   field, so nothing a client wrote since (on any instance) is overwritten;
/// - a session gone from the store is never brought back, unless the write created it
///   ([`JournaledWrite::Create`], or the new id of a [`JournaledWrite::Cycle`]);
/// - replaying a write twice leaves the same state, so a replay cut short by a new failure can
///   simply run again;
/// - "log out everywhere" ends the user's sessions created at or before its time, not the
///   logins made after it.
#[async_trait]
pub trait ReplayStore: SessionStore {
    /// Whether the store is known to be unreachable now (its breaker is open), without any I/O.
    fn is_unreachable(&self) -> bool;

    /// Replays `write`, made at `at` (Unix ms).
    async fn replay(&self, at: u64, write: &JournaledWrite) -> Result<Replayed, StoreError>;

    /// Whether the store keeps a copy of the sessions it serves that [`copied`](Self::copied)
    /// answers from while it is unreachable. A `FallbackStore` built with
    /// [`OutageCopy::Primary`](super::OutageCopy::Primary) in front of such a store keeps no
    /// copy of its own while the store answers: during an outage it takes each session it
    /// needs from this one. `false` unless the store says otherwise.
    fn keeps_copy(&self) -> bool {
        false
    }

    /// The store's own copy of `key`, if it holds one of a live session: confirmed by the
    /// store or not, but never one that another client changed since. `None` unless the
    /// store says otherwise.
    fn copied(&self, key: &SessionKey) -> Option<Record> {
        let _ = key;
        None
    }

    /// The store's own copies of `user`'s sessions, as [`copied`](Self::copied) answers them.
    fn copied_of_user(&self, user: &UserKey) -> Vec<(SessionKey, Record)> {
        let _ = user;
        Vec::new()
    }

    /// The session under `key` ended while the store was unreachable: its copy must never be
    /// served or copied again.
    fn forget_copy(&self, key: &SessionKey) {
        let _ = key;
    }
}
