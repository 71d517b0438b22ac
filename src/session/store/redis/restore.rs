//! Writing the instance's copies back to Redis after Redis lost its data.
//!
//! A store that keeps a copy checks, on its first call after every reconnect, whether Redis
//! still holds the backend's marker (`backend::marker`), and every call waits for that check.
//! When the marker is gone, the store writes back every copy Redis confirmed since the last
//! check that found the marker, as the replay of a session created during an outage: written
//! only if Redis holds nothing under its key, with its user-index entry and its remaining
//! lifetime, and with the time Redis last confirmed it as its fields' write time, so that any
//! later write (a journaled one, replayed afterwards) wins.
//!
//! A session destroyed before the loss is not brought back: its copy died with the
//! invalidation Redis sent (or was forgotten by this instance's own destroy). One that the
//! instance holds no copy of cannot be restored.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;

use super::RedisStore;
use crate::{
    session::store::{JournaledWrite, Replayed, SessionKey},
    tenant::Tenant,
};

/// The checks for lost data of one copy (every store that shares the copy shares them, so a
/// loss is written back once).
#[derive(Debug)]
pub(super) struct Restore {
    /// The tracking epoch the last check ran in (`0` before the first).
    checked: AtomicU64,
    /// Held while a check (and a write-back) runs: every call waits for it.
    running: Mutex<Checked>,
}

#[derive(Debug, Default)]
struct Checked {
    /// The epoch of the last check that found Redis's data intact: copies confirmed since may
    /// be written back.
    trusted: u64,
    /// The backend's count of data losses this store has written back after.
    losses: u64,
}

impl Restore {
    pub(super) fn new() -> Self {
        Self {
            checked: AtomicU64::new(0),
            running: Mutex::default(),
        }
    }
}

impl RedisStore {
    /// Before a call: once per tracking epoch, checks whether Redis lost its data, and writes
    /// the copies back when it did. Costs one atomic load when already checked.
    pub(super) async fn ensure_intact(&self) {
        if !self.keeps_copy() {
            return;
        }
        let tracking = self.backend.tracking();
        let restore = self.copy().restore();
        if restore.checked.load(Ordering::Acquire) == tracking.epoch() {
            return;
        }
        let mut checked = restore.running.lock().await;
        let epoch = tracking.epoch();
        if restore.checked.load(Ordering::Acquire) == epoch {
            return;
        }
        let losses = match self.backend.data_losses(self.timeout).await {
            Ok(losses) => losses,
            // Refusing writes is no loss; anything else: the next call checks again.
            Err(error) if error.refuses_writes() => checked.losses,
            Err(_) => return,
        };
        if losses > checked.losses {
            self.write_back(checked.trusted).await;
            checked.losses = losses;
        }
        checked.trusted = epoch;
        restore.checked.store(epoch, Ordering::Release);
    }

    /// Writes back every copy confirmed in epoch `since` or later.
    async fn write_back(&self, since: u64) {
        let copies = self.copy().restorable(since);
        let (mut restored, mut present, mut failed) = (0u64, 0u64, 0u64);
        for (redis_key, record, confirmed_at) in copies {
            let Some(key) = self.session_key_of(&redis_key) else {
                continue;
            };
            let write = JournaledWrite::Create { key, record };
            match self.replay_now(confirmed_at, &write).await {
                Ok(Replayed::Applied) => restored += 1,
                Ok(Replayed::Superseded) => present += 1,
                Err(_) => failed += 1,
            }
        }
        self.copy().restored(restored);
        tracing::warn!(
            target: "tower_turnstile::session",
            restored,
            already_in_redis = present,
            failed,
            "sessions this instance held written back to Redis after it lost its data"
        );
    }

    /// The session a key of this store names: `{prefix}{tenant}:session:{hash}`.
    fn session_key_of(&self, redis_key: &str) -> Option<SessionKey> {
        let rest = redis_key.strip_prefix(self.keys.prefix())?;
        let (tenant, hash) = rest.split_once(":session:")?;
        SessionKey::from_hash(&Tenant::new(tenant).ok()?, hash)
    }
}
