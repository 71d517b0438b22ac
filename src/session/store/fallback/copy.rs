//! Which copy of the sessions an outage is served from: the fallback's own, or the primary's
//! (see [`OutageCopy`]).

use super::Inner;
use crate::session::store::{Record, ReplayStore, SessionKey, UserKey};

/// Which copy of the sessions a [`FallbackStore`](super::FallbackStore) serves an outage
/// from (see [`FallbackStoreBuilder::outage_copy`](super::FallbackStoreBuilder::outage_copy)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutageCopy {
    /// A copy of its own, beside the store's: each session this instance loads or writes is
    /// copied as it goes. During an outage it serves the version this instance last saw, even
    /// if another instance changed the session since.
    #[default]
    Own,
    /// The store's own copy ([`ReplayStore::copied`]; for a
    /// [`RedisStore`](crate::session::RedisStore), one made with
    /// [`with_local_copy`](crate::session::RedisStore::with_local_copy) or
    /// [`with_restore_copy`](crate::session::RedisStore::with_restore_copy)): one copy of each
    /// session, and nothing copied while Redis answers. During an outage a session is taken
    /// from that copy when first used, so a session that another instance changed since this
    /// one read it (which Redis told this instance of) is not served from it: it is unavailable
    /// here until Redis answers. When the store keeps no copy (none configured, a Redis Cluster,
    /// or an ACL that refuses `CLIENT TRACKING`), the fallback keeps its own, as with
    /// [`OutageCopy::Own`].
    Primary,
}

impl<P: ReplayStore> Inner<P> {
    /// Whether outages are served from the primary's copy (see [`OutageCopy::Primary`]): this
    /// store then copies nothing while the primary answers.
    pub(super) fn shares(&self) -> bool {
        self.outage_copy == OutageCopy::Primary && self.primary.keeps_copy()
    }

    /// The copy of `key` an outage serves: the one this store holds, or else, when it shares
    /// the primary's copy, the primary's, which this store then holds.
    pub(super) fn held(&self, key: &SessionKey) -> Option<Record> {
        if let Some(record) = self.local.get(key) {
            return Some(record);
        }
        if !self.shares() {
            return None;
        }
        let record = self.primary.copied(key)?;
        self.local.put(key, &record);
        Some(record)
    }

    /// Before a decision on `user`'s sessions during an outage: this store holds every one of
    /// them that the primary's copy holds. Answers their keys.
    pub(super) fn hold_user(&self, user: &UserKey) -> Vec<SessionKey> {
        if !self.shares() {
            return Vec::new();
        }
        let copied = self.primary.copied_of_user(user);
        for (key, record) in &copied {
            if !self.local.contains(key) {
                self.local.put(key, record);
            }
        }
        copied.into_iter().map(|(key, _)| key).collect()
    }
}
