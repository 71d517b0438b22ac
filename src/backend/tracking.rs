//! Server-assisted client-side caching: what the backend knows about the local copies its
//! users keep of Redis keys.
//!
//! The connection speaks RESP3, so Redis can push invalidations on it: after a read that
//! follows `CLIENT TRACKING ON NOLOOP` on the same connection, Redis tells this connection when
//! any *other* client changes the key read. `NOLOOP` keeps this instance's own writes silent:
//! the writer updates its copy itself. (Redis forgets a key's readers once it is changed, the
//! writer included, so a writer that keeps a copy reads the key again in the same transaction.)
//!
//! What makes a copy current is the promise that an invalidation would have reached us, so this
//! module also tracks when that promise breaks:
//! - the **epoch** is bumped whenever a copy could have gone stale unheard: a lost connection or
//!   a reconnect (the new connection tracks nothing), an outage, a failover, and the null
//!   invalidation Redis sends on `FLUSHALL`/`FLUSHDB`. A copy made in an older epoch is
//!   unconfirmed: kept, never served as current;
//! - **liveness**: a partitioned socket may not know it is dead, so a copy is current only while
//!   a round trip sent in the last [`FRESH_FOR`] has come back (an invalidation sent before it
//!   arrived before its reply). The backend pings when it has been quiet for a quarter of that.
//!
//! It also measures Redis's clock against the instance's, from the `TIME` replies the stores
//! read, so deadlines checked locally are checked on Redis's clock.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use redis::{PushInfo, PushKind, Value};

use crate::{sync::lock, time::unix_millis};

/// How long after the latest answer from Redis a copy may still be served as current.
pub(crate) const FRESH_FOR: Duration = Duration::from_secs(1);

/// A keeper of local copies, told when Redis says another client changed one of its keys.
pub(crate) trait Invalidated: Send + Sync + 'static {
    /// Another client changed (or Redis expired or evicted) `key`: its copy is dead.
    fn invalidated(&self, key: &str);

    /// Someone flushed the database (`FLUSHALL`, `FLUSHDB`): every copy is dead, and none may
    /// be written back as if Redis had lost it.
    fn flushed(&self);
}

/// What one backend knows about the copies its users keep.
pub(crate) struct Tracking {
    epoch: AtomicU64,
    /// Milliseconds since `started` at which the latest round trip that succeeded was sent.
    answered: AtomicU64,
    /// Redis's clock minus the instance's, in ms.
    offset: AtomicI64,
    /// When this tracking began: the origin of `answered`.
    started: Instant,
    /// The keepers of copies on this backend, one per name (a store's key prefix), shared by
    /// every store with that name so that one instance keeps one copy of a key.
    keepers: Mutex<HashMap<String, Keeper>>,
}

struct Keeper {
    any: Weak<dyn Any + Send + Sync>,
    invalidated: Weak<dyn Invalidated>,
}

impl fmt::Debug for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracking")
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl Tracking {
    pub(crate) fn new() -> Self {
        Self {
            epoch: AtomicU64::new(1),
            answered: AtomicU64::new(0),
            offset: AtomicI64::new(0),
            started: Instant::now(),
            keepers: Mutex::new(HashMap::new()),
        }
    }

    /// The current epoch: copies made in an older one are unconfirmed.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a copy made in `epoch` may be served as current now.
    pub(crate) fn current(&self, epoch: u64) -> bool {
        epoch == self.epoch() && self.quiet_for() <= FRESH_FOR
    }

    /// Every copy made so far becomes unconfirmed.
    pub(crate) fn lost(&self, why: &'static str) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::debug!(target: "tower_turnstile::backend", epoch, why, "local copies unconfirmed");
    }

    /// A round trip sent at `sent` came back.
    pub(crate) fn answered(&self, sent: Instant) {
        let at = millis_between(self.started, sent);
        self.answered.fetch_max(at, Ordering::AcqRel);
    }

    /// How long since the latest answered round trip was sent.
    pub(crate) fn quiet_for(&self) -> Duration {
        let now = millis_between(self.started, Instant::now());
        Duration::from_millis(now.saturating_sub(self.answered.load(Ordering::Acquire)))
    }

    /// Redis said its clock read `redis_ms` (Unix ms) during a round trip sent at `sent` and
    /// answered now.
    pub(crate) fn observed_time(&self, redis_ms: u64, sent: SystemTime) {
        let back = unix_millis(SystemTime::now());
        let middle = unix_millis(sent).midpoint(back);
        let offset =
            i64::try_from(redis_ms).unwrap_or(i64::MAX) - i64::try_from(middle).unwrap_or(i64::MAX);
        self.offset.store(offset, Ordering::Relaxed);
    }

    /// Now on Redis's clock (Unix ms), as measured from its latest `TIME`.
    pub(crate) fn redis_now(&self) -> u64 {
        let local = unix_millis(SystemTime::now());
        local.saturating_add_signed(self.offset.load(Ordering::Relaxed))
    }

    /// The keeper named `name` on this backend, made by `make` if there is none yet.
    pub(crate) fn keeper<T: Invalidated + Send + Sync>(
        &self,
        name: &str,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut keepers = lock(&self.keepers);
        if let Some(keeper) = keepers.get(name)
            && let Some(found) = keeper.any.upgrade()
            && let Ok(found) = found.downcast::<T>()
        {
            return found;
        }
        keepers.retain(|_, keeper| keeper.any.strong_count() > 0);
        let made = Arc::new(make());
        let any: Arc<dyn Any + Send + Sync> = made.clone();
        let invalidated: Arc<dyn Invalidated> = made.clone();
        keepers.insert(
            name.to_owned(),
            Keeper {
                any: Arc::downgrade(&any),
                invalidated: Arc::downgrade(&invalidated),
            },
        );
        made
    }

    /// The keepers still alive.
    fn live_keepers(&self) -> Vec<Arc<dyn Invalidated>> {
        lock(&self.keepers)
            .values()
            .filter_map(|keeper| keeper.invalidated.upgrade())
            .collect()
    }

    /// Whether any keeper of copies is alive (the backend pings only for them).
    pub(crate) fn keeps_copies(&self) -> bool {
        lock(&self.keepers)
            .values()
            .any(|keeper| keeper.any.strong_count() > 0)
    }

    /// Handles a message Redis (or the client library) pushed on the connection.
    pub(crate) fn pushed(&self, push: PushInfo) {
        match push.kind {
            PushKind::Invalidate => match push.data.into_iter().next() {
                Some(Value::Array(keys)) => {
                    let keepers = self.live_keepers();
                    for key in keys {
                        if let Value::BulkString(bytes) = key
                            && let Ok(key) = std::str::from_utf8(&bytes)
                        {
                            for keeper in &keepers {
                                keeper.invalidated(key);
                            }
                        }
                    }
                }
                // `FLUSHALL`/`FLUSHDB`: every key is gone, on purpose.
                _ => {
                    self.lost("flush");
                    for keeper in self.live_keepers() {
                        keeper.flushed();
                    }
                }
            },
            PushKind::Disconnection => self.lost("disconnection"),
            _ => {}
        }
    }
}

fn millis_between(start: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}
