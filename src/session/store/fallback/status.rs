//! What a fallback store is doing, for health reports.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::Inner;
use crate::{session::store::ReplayStore, sync::lock, time::unix_millis};

/// What a [`FallbackStore`](super::FallbackStore) is doing, for health reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FallbackStatus {
    /// Whether sessions are being served from the local copy (Redis unreachable, or journaled
    /// writes still waiting to be replayed).
    pub active: bool,
    /// Since when, in Unix milliseconds.
    pub active_since: Option<u64>,
    /// Sessions held in the local copy (an estimate). With
    /// [`OutageCopy::Primary`](super::OutageCopy::Primary), only the sessions the current or
    /// last outage used; the rest are in the store's copy.
    pub local_sessions: u64,
    /// Writes waiting to be replayed.
    pub journal_len: usize,
    /// Writes journaled since the store was built.
    pub journaled: u64,
    /// Journaled writes replayed into Redis.
    pub replayed: u64,
    /// Journaled writes not replayed because their session was gone from Redis (destroyed
    /// elsewhere, or expired): never brought back.
    pub superseded: u64,
    /// Writes that could not be kept anywhere: refused because the journal was full, or
    /// refused by Redis on replay. Each is logged.
    pub dropped: u64,
}

impl<P: ReplayStore> Inner<P> {
    pub(super) fn status(&self) -> FallbackStatus {
        let (journal_len, journaled) = {
            let journal = lock(&self.journal);
            (journal.len(), !journal.is_empty())
        };
        let since = *lock(&self.active);
        FallbackStatus {
            active: since.is_some() && (journaled || self.primary.is_unreachable()),
            active_since: since.map(unix_millis),
            local_sessions: self.local.len(),
            journal_len,
            journaled: self.counters.journaled.load(Ordering::Relaxed),
            replayed: self.counters.replayed.load(Ordering::Relaxed),
            superseded: self.counters.superseded.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}
