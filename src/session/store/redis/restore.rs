//! Writing the instance's copies back to Redis after Redis lost its data.
//!
//! A store that keeps a copy checks, on its first call after every reconnect, whether Redis
//! may have lost data (`backend::marker`: its marker key gone, or another server process
//! answering), and every call waits for that check. After a loss, the store writes back every
//! copy Redis confirmed since the last check that found nothing lost and that Redis no longer
//! holds, as the replay of a session created during an outage: written only if Redis holds
//! nothing under its key, with its user-index entry and its remaining lifetime, and with the
//! time Redis last confirmed it as its fields' write time, so that any later write (a
//! journaled one, replayed afterwards) wins.
//!
//! A session destroyed before the loss is not brought back: its copy died with the
//! invalidation Redis sent (or was forgotten by this instance's own destroy). One that the
//! instance holds no copy of cannot be restored.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{StreamExt, stream};
use tokio::sync::Mutex;

use super::RedisStore;
use crate::session::store::{JournaledWrite, Record, Replayed};

/// How many keys one `EXISTS` pipeline asks about.
const EXISTS_BATCH: usize = 512;
/// How many sessions are written back at once.
const WRITE_BACK_IN_FLIGHT: usize = 32;

/// A copy that may be written back: its Redis key, record, and the time Redis last confirmed
/// it (Unix ms).
type Restorable = (String, Record, u64);

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

    /// Writes back every copy confirmed in epoch `since` or later that Redis no longer holds.
    /// Calls wait meanwhile, so the write-back is quick: which sessions are missing is asked
    /// in pipelines of `EXISTS` (a restart that kept its data costs one round trip per
    /// [`EXISTS_BATCH`] sessions and writes nothing), and the missing ones are written
    /// [`WRITE_BACK_IN_FLIGHT`] at a time on the multiplexed connection.
    async fn write_back(&self, since: u64) {
        let copies = self.copy().restorable(since);
        let held = copies.len();
        let (copies, unknown) = self.missing_of(copies).await;
        let outcomes: Vec<_> = stream::iter(copies)
            .map(|(redis_key, record, confirmed_at)| async move {
                let key = self.keys.session_key_of(&redis_key)?;
                let write = JournaledWrite::Create { key, record };
                Some(self.replay_now(confirmed_at, &write).await)
            })
            .buffer_unordered(WRITE_BACK_IN_FLIGHT)
            .collect()
            .await;
        let (mut restored, mut failed) = (0u64, 0u64);
        for outcome in outcomes.into_iter().flatten() {
            match outcome {
                Ok(Replayed::Applied) => restored += 1,
                // Written meanwhile by a client: nothing to restore.
                Ok(Replayed::Superseded) => {}
                Err(_) => failed += 1,
            }
        }
        self.copy().restored(restored);
        if restored + failed > 0 || unknown {
            tracing::warn!(
                target: "tower_turnstile::session",
                held,
                restored,
                already_in_redis = (held as u64).saturating_sub(restored + failed),
                failed,
                "sessions this instance held that Redis lacked written back after it lost data"
            );
        }
    }

    /// The copies whose keys Redis does not hold, and whether that could not be asked (then
    /// every copy is returned: the write-back writes only where Redis holds nothing anyway).
    /// On a Cluster every copy is returned: one pipeline reaches one shard.
    async fn missing_of(&self, copies: Vec<Restorable>) -> (Vec<Restorable>, bool) {
        if self.backend.is_cluster() {
            return (copies, false);
        }
        let mut missing = Vec::new();
        let mut unknown = false;
        let mut rest = copies.into_iter().peekable();
        while rest.peek().is_some() {
            let batch: Vec<Restorable> = rest.by_ref().take(EXISTS_BATCH).collect();
            let keys: Vec<&str> = batch.iter().map(|(key, ..)| key.as_str()).collect();
            let exists = self
                .backend
                .run(self.timeout, |mut conn| async move {
                    let mut pipe = redis::pipe();
                    for key in keys {
                        pipe.cmd("EXISTS").arg(key);
                    }
                    pipe.query_async::<Vec<bool>>(&mut conn).await
                })
                .await;
            match exists {
                Ok(exists) if exists.len() == batch.len() => missing.extend(
                    batch
                        .into_iter()
                        .zip(exists)
                        .filter_map(|(copy, exists)| (!exists).then_some(copy)),
                ),
                _ => {
                    unknown = true;
                    missing.extend(batch);
                }
            }
        }
        (missing, unknown)
    }
}
