//! The instance's coherent copy of the sessions it served: decoded records, kept current by
//! the invalidations Redis pushes (see `backend::tracking`), so that a read of a session the
//! instance holds costs no round trip and no parsing.
//!
//! A key's copy lives in a slot, replaced whole by each read from Redis:
//! - a read from Redis puts a *filling* slot in place before it sends its commands, and fills
//!   it with what Redis answered only if nothing killed the slot meanwhile: an invalidation
//!   that overtakes the read's reply can never be lost;
//! - an invalidation kills the key's slot and removes it: that copy is dead, never served and
//!   never restored;
//! - a copy made in an older tracking epoch is *unconfirmed*: kept, but not served as current.
//!
//! This instance's own writes raise no invalidation (`NOLOOP`): the store applies them to the
//! copy itself, or forgets the copy.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use moka::sync::Cache;

use super::{
    super::{Lifetime, Patch, Record},
    restore::Restore,
};
use crate::{
    backend::{Invalidated, Tracking},
    metrics,
    sync::lock,
    time::{millis, now_millis},
};

/// The slide of the inactivity expiry is written to Redis only once this fraction of the
/// inactivity timeout has passed since the last one: every write, an expiry included,
/// invalidates every other instance's copy.
const SLIDE_EVERY: u32 = 16;

/// The copies one instance keeps of the sessions under one key prefix.
pub(super) struct LocalCopy {
    slots: Cache<String, Arc<Slot>>,
    tracking: Arc<Tracking>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    restored: AtomicU64,
    /// The checks for lost data, and what they found (see `restore`).
    restore: Restore,
    /// The tracking epoch in which a read turned `CLIENT TRACKING` on for the connection: while
    /// it is current, a key read inside any transaction on it is tracked too.
    tracking_on: AtomicU64,
    /// Redis refused `CLIENT TRACKING` (an ACL without `client`): no copy is served.
    refused: AtomicBool,
}

/// One key's copy, behind a lock held only to look at it or change it.
#[derive(Default)]
struct Slot(Mutex<State>);

#[derive(Default)]
enum State {
    /// A read from Redis is under way.
    #[default]
    Filling,
    Held(Held),
    /// Invalidated, or removed by this instance.
    Dead,
}

struct Held {
    record: Record,
    /// The tracking epoch the copy was confirmed in.
    epoch: u64,
    /// When Redis drops the key unless it is used again, on Redis's clock (Unix ms).
    expires: u64,
    /// How many writes this instance has applied to the copy, so that two at once are seen.
    writes: u64,
    /// When Redis last confirmed the copy, on this instance's clock (Unix ms): the write time
    /// its fields are restored with, older than anything written after.
    confirmed_at: u64,
}

impl Held {
    /// Whether the session is live at `now` by its deadlines and the key's TTL.
    fn live(&self, now: u64) -> bool {
        self.expires > now && !self.record.ttl_at(now).is_zero()
    }
}

/// What a read finds in the copy.
pub(super) enum Lookup {
    /// A current copy. `slide` is the TTL (ms) to send first: the inactivity expiry is due to
    /// be restarted in Redis.
    Current { record: Record, slide: Option<u64> },
    /// No current copy: Redis decides.
    Absent,
}

/// A read from Redis that will fill a key's slot unless the key changes meanwhile. Dropped
/// unfilled (the read failed), it puts back the copy the slot held before, unconfirmed: still
/// what a write-back after a loss of Redis's data would use.
pub(super) struct Fill {
    key: String,
    slot: Arc<Slot>,
    epoch: u64,
    /// The copy held before the read, until the read answers.
    before: Option<Held>,
}

/// A write about to be sent for a key whose copy is current: what it needs to know of the
/// session, and how to apply itself to the copy once Redis has taken it.
pub(super) struct Writing {
    slot: Arc<Slot>,
    epoch: u64,
    writes: u64,
    /// The session's expiry settings before the write.
    pub(super) lifetime: Lifetime,
    /// When Redis drops the key unless it is used again, as the copy knows it (Redis's clock,
    /// Unix ms).
    pub(super) expires: u64,
}

/// A snapshot of a local copy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalCopyStats {
    /// Reads served from the copy, with no round trip.
    pub hits: u64,
    /// Reads that went to Redis: no copy, or one that was unconfirmed or past its deadline.
    pub misses: u64,
    /// Copies dropped because another client changed their session.
    pub invalidations: u64,
    /// Sessions written back to Redis after it lost its data.
    pub restored: u64,
    /// Sessions held now (approximate).
    pub entries: u64,
}

impl LocalCopy {
    pub(super) fn new(tracking: Arc<Tracking>, capacity: u64) -> Self {
        Self {
            slots: Cache::builder().max_capacity(capacity).build(),
            tracking,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            restored: AtomicU64::new(0),
            restore: Restore::new(),
            tracking_on: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        }
    }

    /// Whether copies may be served (Redis accepted `CLIENT TRACKING`).
    pub(super) fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Redis refused `CLIENT TRACKING`: from now on every read goes to Redis.
    pub(super) fn refuse(&self) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "tower_turnstile::session",
                "Redis refused CLIENT TRACKING (does the ACL allow `client`?): sessions are \
                 read from Redis on every request, without a local copy"
            );
        }
    }

    /// Now on Redis's clock (Unix ms).
    pub(super) fn now(&self) -> u64 {
        self.tracking.redis_now()
    }

    pub(super) fn tracking(&self) -> &Tracking {
        &self.tracking
    }

    /// The current copy of `key`, if there is one and the session is live by its deadlines.
    pub(super) fn lookup(&self, key: &str) -> Lookup {
        let found = self.slots.get(key).and_then(|slot| {
            let state = lock(&slot.0);
            let State::Held(held) = &*state else {
                return None;
            };
            if !self.tracking.current(held.epoch) {
                return None;
            }
            let now = self.now();
            let ttl = millis(held.record.ttl_at(now));
            if ttl == 0 || now >= held.expires {
                return None;
            }
            let due = slide_due(&held.record.lifetime(), held.expires, now);
            Some(Lookup::Current {
                record: held.record.clone(),
                slide: due.then_some(ttl),
            })
        });
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::count_labeled("turnstile_session_copy_total", "outcome", outcome);
        found.unwrap_or(Lookup::Absent)
    }

    /// Starts a read of `key` from Redis that will fill its slot.
    pub(super) fn fill(&self, key: &str) -> Fill {
        // The epoch is taken before the read is sent: a reconnect while it is under way leaves
        // the copy it makes unconfirmed.
        let epoch = self.tracking.epoch();
        let before = self.slots.get(key).and_then(|old| {
            match std::mem::replace(&mut *lock(&old.0), State::Dead) {
                State::Held(held) => Some(held),
                State::Filling | State::Dead => None,
            }
        });
        let slot = Arc::new(Slot::default());
        self.slots.insert(key.to_owned(), Arc::clone(&slot));
        Fill {
            key: key.to_owned(),
            slot,
            epoch,
            before,
        }
    }

    /// The current copy of `key` for a write, if there is one.
    pub(super) fn writing(&self, key: &str) -> Option<Writing> {
        let slot = self.slots.get(key)?;
        let state = lock(&slot.0);
        let State::Held(held) = &*state else {
            return None;
        };
        if !self.tracking.current(held.epoch) {
            return None;
        }
        let writing = Writing {
            slot: Arc::clone(&slot),
            epoch: held.epoch,
            writes: held.writes,
            lifetime: held.record.lifetime(),
            expires: held.expires,
        };
        drop(state);
        Some(writing)
    }

    /// The copies Redis confirmed in tracking epoch `since` or later and has not ended by their
    /// deadlines: what may be written back after Redis lost its data. Each with its key and
    /// when Redis last confirmed it (this instance's clock, Unix ms).
    pub(super) fn restorable(&self, since: u64) -> Vec<(String, Record, u64)> {
        let now = self.now();
        self.each_held(|key, held| {
            (held.epoch >= since && held.live(now))
                .then(|| (key.to_owned(), held.record.clone(), held.confirmed_at))
        })
    }

    /// The copy of `key`, confirmed or not, if its session is live by its deadlines: what an
    /// outage serves. A copy another client's change killed is never one.
    pub(super) fn outage_copy(&self, key: &str) -> Option<Record> {
        let slot = self.slots.get(key)?;
        let state = lock(&slot.0);
        let State::Held(held) = &*state else {
            return None;
        };
        held.live(self.now()).then(|| held.record.clone())
    }

    /// [`outage_copy`](Self::outage_copy) of every key whose record `wanted` picks, with the
    /// key.
    pub(super) fn outage_copies(&self, wanted: impl Fn(&Record) -> bool) -> Vec<(String, Record)> {
        let now = self.now();
        self.each_held(|key, held| {
            (held.live(now) && wanted(&held.record)).then(|| (key.to_owned(), held.record.clone()))
        })
    }

    /// What `pick` takes of each held copy, by its key.
    fn each_held<T>(&self, pick: impl Fn(&str, &Held) -> Option<T>) -> Vec<T> {
        self.slots
            .iter()
            .filter_map(|(key, slot)| match &*lock(&slot.0) {
                State::Held(held) => pick(&key, held),
                State::Filling | State::Dead => None,
            })
            .collect()
    }

    /// Whether `CLIENT TRACKING` is known to be on for the connection in tracking `epoch`.
    pub(super) fn tracks(&self, epoch: u64) -> bool {
        self.tracking_on.load(Ordering::Acquire) == epoch
    }

    /// A read sent in `epoch` turned `CLIENT TRACKING` on for the connection.
    pub(super) fn tracking_on(&self, epoch: u64) {
        self.tracking_on.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Starts a write of a whole session under `key` that will fill its slot (a creation, or
    /// a move to a new id), when the connection is known to track what it reads: the write
    /// then reads the key's TTL in its transaction, and Redis tells this instance of later
    /// changes. `None` when it is not known.
    pub(super) fn fill_written(&self, key: &str) -> Option<Fill> {
        self.tracks(self.tracking.epoch()).then(|| self.fill(key))
    }

    /// The checks for lost data of this copy.
    pub(super) fn restore(&self) -> &Restore {
        &self.restore
    }

    /// Counts sessions written back after Redis lost its data.
    pub(super) fn restored(&self, sessions: u64) {
        self.restored.fetch_add(sessions, Ordering::Relaxed);
    }

    /// This instance removed `key` (or found it is no session): the copy goes.
    pub(super) fn forget(&self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            *lock(&slot.0) = State::Dead;
        }
    }

    /// This instance restarted `key`'s inactivity expiry: the key now expires at `expires`.
    pub(super) fn slid(&self, key: &str, expires: u64) {
        if let Some(slot) = self.slots.get(key)
            && let State::Held(held) = &mut *lock(&slot.0)
        {
            held.expires = held.expires.max(expires);
        }
    }

    pub(super) fn stats(&self) -> LocalCopyStats {
        // Evictions are applied lazily; count what is really held.
        self.slots.run_pending_tasks();
        LocalCopyStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            restored: self.restored.load(Ordering::Relaxed),
            entries: self.slots.entry_count(),
        }
    }
}

impl fmt::Debug for LocalCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCopy")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Invalidated for LocalCopy {
    fn invalidated(&self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            *lock(&slot.0) = State::Dead;
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            metrics::count_labeled("turnstile_session_copy_total", "outcome", "invalidated");
        }
    }

    fn flushed(&self) {
        for (_, slot) in &self.slots {
            *lock(&slot.0) = State::Dead;
        }
        self.slots.invalidate_all();
    }
}

impl Fill {
    /// The tracking epoch the read or write was sent in.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Redis answered with `record`, whose key it drops at `expires` (Redis's clock, Unix ms)
    /// unless used: the copy holds it, unless the key changed since the read was sent.
    pub(super) fn hold(mut self, record: &Record, expires: u64) {
        self.before = None;
        let mut state = lock(&self.slot.0);
        if matches!(*state, State::Filling) {
            *state = State::Held(Held {
                record: record.clone(),
                epoch: self.epoch,
                expires,
                writes: 0,
                confirmed_at: now_millis(),
            });
        }
    }

    /// Redis found no session: the slot goes.
    pub(super) fn vacate(mut self, copy: &LocalCopy) {
        self.before = None;
        *lock(&self.slot.0) = State::Dead;
        if let Some(current) = copy.slots.get(&self.key)
            && Arc::ptr_eq(&current, &self.slot)
        {
            copy.slots.invalidate(&self.key);
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        let before = self.before.take();
        let mut state = lock(&self.slot.0);
        if !matches!(*state, State::Filling) {
            // Filled, vacated, or killed by an invalidation meanwhile.
            return;
        }
        // The read or write failed. The copy held before stays (unconfirmed, if Redis was
        // unreachable: that moved the tracking epoch), or the slot is left dead.
        *state = before.map_or(State::Dead, State::Held);
    }
}

impl Writing {
    /// Redis took `patch`, and the key now expires at `expires`: the copy takes it too. If
    /// another write from this instance was applied meanwhile, the order Redis applied the two
    /// in is unknown here, and the copy becomes unconfirmed (the next read confirms it).
    pub(super) fn applied(self, patch: &Patch, expires: u64) {
        let mut state = lock(&self.slot.0);
        let State::Held(held) = &mut *state else {
            return;
        };
        held.record.apply(patch);
        held.expires = expires;
        held.confirmed_at = now_millis();
        if held.writes != self.writes || held.epoch != self.epoch {
            held.epoch = 0;
        }
        held.writes += 1;
    }
}

/// Whether restarting the inactivity expiry now would move the key's end by more than a
/// sixteenth of the inactivity timeout, for a session with these expiry settings.
pub(super) fn slide_due(lifetime: &Lifetime, expires: u64, now: u64) -> bool {
    let end = now.saturating_add(millis(lifetime.ttl_at(now)));
    let step = lifetime.inactivity_timeout / SLIDE_EVERY;
    end.saturating_sub(expires) > millis(step.max(Duration::from_millis(1)))
}
