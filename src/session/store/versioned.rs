//! What a [`ChainStore`](super::ChainStore) needs of the store behind its copies: versions that
//! tell a copy from a newer write, and generations that retire every copy at once.

use async_trait::async_trait;

use super::{Record, SessionKey, SessionStore, StoreError};

/// A store that can hold the truth behind copies kept elsewhere. Implemented by
/// [`PostgresStore`](super::PostgresStore).
///
/// - Every write moves a session's version on, so a copy made from a read is kept only if the
///   version did not move meanwhile.
/// - A generation counter, shared by every instance, is part of every copy's key: moving it on
///   retires every copy at once, when one could not be dropped (the copies' store was
///   unreachable).
#[async_trait]
pub trait VersionedStore: SessionStore {
    /// [`SessionStore::load`], with the session's version.
    async fn load_versioned(&self, key: &SessionKey) -> Result<Option<(Record, i64)>, StoreError>;

    /// The version of a live session, without reading it or restarting its inactivity clock.
    async fn version(&self, key: &SessionKey) -> Result<Option<i64>, StoreError>;

    /// The generation of the copies kept in front of this store.
    async fn copy_generation(&self) -> Result<i64, StoreError>;

    /// Moves every instance on to a new generation of copies; returns it.
    async fn next_copy_generation(&self) -> Result<i64, StoreError>;
}
