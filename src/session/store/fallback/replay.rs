//! Taking the journal back to the store in front once it answers: one background task per
//! outage, replaying entries in order, one at a time.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use super::Inner;
use crate::{
    metrics,
    session::store::{ReplayStore, Replayed, StoreError},
    sync::lock,
};

impl<P: ReplayStore> Inner<P> {
    /// Starts the replay task unless it runs already. It runs on the Tokio runtime of the
    /// caller, and ends when the journal is empty or the store is dropped.
    pub(super) fn start_replay(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        runtime.spawn(replay_task(Arc::downgrade(self)));
    }

    /// Replays journaled writes in order until the journal is empty (`true`) or the store
    /// fails (`false`: try again later). Only the replay task calls it, so the front of the
    /// journal is still the entry replayed when it is removed.
    async fn replay(&self) -> bool {
        loop {
            let Some(entry) = lock(&self.journal).front().cloned() else {
                self.leave();
                return true;
            };
            let outcome = match self.primary.replay(entry.at, &entry.write).await {
                Ok(outcome) => outcome,
                Err(error) if error.is_outage() => return false,
                Err(error) => {
                    // The store answered but refused the write (a key of another type, say):
                    // it can never be replayed, and keeping it would block every write behind.
                    self.refused(&error);
                    Replayed::Applied
                }
            };
            let mut journal = lock(&self.journal);
            journal.pop_front();
            if journal.is_empty() {
                self.journaled_now.store(false, Ordering::Release);
            }
            drop(journal);
            match outcome {
                Replayed::Applied => {
                    metrics::count("turnstile_session_replayed_total", 1);
                    self.counters.replayed.fetch_add(1, Ordering::Relaxed);
                }
                Replayed::Superseded => {
                    metrics::count("turnstile_session_superseded_total", 1);
                    for key in entry.write.keys() {
                        self.local.remove(key, None);
                        self.primary.forget_copy(key);
                    }
                    tracing::info!(
                        target: "tower_turnstile::session",
                        "a session written during the outage is gone from Redis; its journaled \
                         write is not replayed"
                    );
                    self.counters.superseded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn refused(&self, error: &StoreError) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::count("turnstile_session_dropped_total", 1);
        tracing::error!(
            target: "tower_turnstile::session",
            error = %error,
            source = std::error::Error::source(error).map(ToString::to_string),
            "journaled session write refused by Redis; dropped"
        );
    }
}

/// Replays the journal while there is one, retrying while the store is down; ends when the
/// journal is empty or the store is dropped.
async fn replay_task<P: ReplayStore>(store: Weak<Inner<P>>) {
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        if inner.replay().await {
            inner.replaying.store(false, Ordering::Release);
            // A write journaled between the last replay and the flag: take it too.
            if !inner.journaled_now.load(Ordering::Acquire)
                || inner.replaying.swap(true, Ordering::AcqRel)
            {
                return;
            }
            continue;
        }
        drop(inner);
        // Still down; the breaker makes each retry cost nothing until it lets a probe through.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
