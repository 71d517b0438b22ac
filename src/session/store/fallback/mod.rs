//! Sessions in Redis that survive a Redis outage.
//!
//! - `copy`: which copy an outage serves from, the store's own or the primary's.
//! - `journal`: the writes made during an outage, in order (pure bookkeeping).
//! - `replay`: the background task that takes them back to Redis once it answers.
//! - `status`: what the store is doing, for health reports.
//! - `update`: an update, from the copy held during an outage or when Redis refuses writes.

mod copy;
mod journal;
mod replay;
mod status;
mod update;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;

use self::journal::{Full, Journal, diff};
pub use self::{copy::OutageCopy, status::FallbackStatus};
use super::{
    Clock, JournaledWrite, LoginHold, MemoryStore, Patch, Record, RedisStore, ReplayStore,
    SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written, clock::SharedClock,
    oldest_over, room_for,
};
use crate::{metrics, sync::lock, time::now_millis};

/// Sessions in Redis that survive a Redis outage: [`RedisStore`] first, and a bounded local
/// copy of the sessions this instance served, used only while Redis cannot be reached.
///
/// - **While Redis answers** it is a `RedisStore`: the same commands and round trips per
///   request. It also keeps a copy of each session it loads or writes (bounded in number and
///   idle time), which is never read while Redis answers, so instances never serve each other
///   stale data. With [`OutageCopy::Primary`] it keeps none: the `RedisStore`'s own copy is
///   the one copy, and an outage takes each session it needs from it.
/// - **During an outage** (the breaker is open, or a call fails) sessions this instance holds
///   are read from the copy; every write (fields, new sessions, logins, id changes, destroys,
///   "log out everywhere") applies to the copy and goes into a journal, in order. A session this
///   instance never saw is unavailable (its request sees a degraded session, see
///   [`Session::is_degraded`](crate::session::Session::is_degraded)), and a new visitor gets a
///   session that lives here until the journal is replayed.
/// - **When Redis answers again** a background task replays the journal in order, field by
///   field. A field is written unless Redis holds a newer write of it: every write in Redis
///   records its time per field, and a journaled write carries the time it was made (so the
///   order between instances is as good as their clocks agree with Redis's). A session gone
///   from Redis (destroyed elsewhere, expired) is never brought back, unless it was created
///   during the outage; a destroy deletes it and its user-index entry; an id changed during the
///   outage leaves the old id dead. Replaying a write twice leaves the same state, so a replay
///   cut short by a new failure simply runs again. Until every journaled write of a session is
///   replayed, that session is served from the copy, so a request sees either the copy or
///   Redis, never a mix.
///
/// What cannot survive, and is counted in [`FallbackStatus`] and logged: writes past the
/// journal's limit (refused: the request sees a degraded session, and a layer with
/// [`FailurePolicy::fail_closed_on_write`](crate::session::FailurePolicy::fail_closed_on_write)
/// answers `503`), journaled writes of sessions that Redis lost meanwhile, and the journal of an
/// instance that stops during an outage (it is kept in memory only; see
/// [`FallbackStore::flush`] for a graceful stop).
///
/// ```no_run
/// use tower_turnstile::{backend::RedisBackend, session::{FailurePolicy, FallbackStore, RedisStore, SessionLayer}};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let sessions = FallbackStore::new(RedisStore::new(redis));
/// let layer = SessionLayer::new(sessions.clone())
///     .with_failure_policy(FailurePolicy::fail_closed_on_write());
/// // Later, on a health page: sessions.status().active, .journal_len, ...
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// Tuned for a bigger instance:
///
/// ```no_run
/// use std::time::Duration;
/// use tower_turnstile::{backend::RedisBackend, session::{FallbackStore, RedisStore}};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let sessions = FallbackStore::builder(RedisStore::new(redis))
///     .max_local_sessions(200_000)
///     .max_local_idle(Duration::from_secs(3600))
///     .max_journal(500_000)
///     .build();
/// # let _ = sessions;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FallbackStore<P = RedisStore> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for FallbackStore<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Builds a [`FallbackStore`] with non-default bounds.
#[derive(Debug, Clone)]
#[must_use]
pub struct FallbackStoreBuilder<P = RedisStore> {
    primary: P,
    outage_copy: OutageCopy,
    max_local_sessions: u64,
    max_local_idle: Duration,
    max_journal: usize,
    clock: SharedClock,
}

impl<P: ReplayStore> FallbackStoreBuilder<P> {
    /// Which copy an outage is served from. Default: [`OutageCopy::Own`].
    ///
    /// ```no_run
    /// use tower_turnstile::{backend::RedisBackend, session::{FallbackStore, OutageCopy, RedisStore}};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
    /// let sessions = FallbackStore::builder(
    ///     RedisStore::new(redis).with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY),
    /// )
    /// .outage_copy(OutageCopy::Primary)
    /// .build();
    /// # let _ = sessions;
    /// # Ok(())
    /// # }
    /// ```
    pub fn outage_copy(mut self, copy: OutageCopy) -> Self {
        self.outage_copy = copy;
        self
    }

    /// The most sessions kept in the local copy. Default: 100 000.
    pub fn max_local_sessions(mut self, max: u64) -> Self {
        self.max_local_sessions = max;
        self
    }

    /// How long a session stays in the local copy after this instance last served it.
    /// Default: 24 hours.
    pub fn max_local_idle(mut self, idle: Duration) -> Self {
        self.max_local_idle = idle;
        self
    }

    /// The most writes journaled during one outage; past it, writes are refused (and counted)
    /// rather than kept where they would be lost. Default: 100 000.
    pub fn max_journal(mut self, max: usize) -> Self {
        self.max_journal = max;
        self
    }

    /// Where the local copy reads the time to expire sessions. Default: the system clock; a
    /// [`ManualClock`](super::ManualClock) lets a test expire them without sleeping. Journaled
    /// writes are still stamped with the system clock, as Redis's writes are.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// Builds the store. The replay task starts with the first journaled write, on the Tokio
    /// runtime that write runs on, and ends when the journal is empty or the store is dropped.
    pub fn build(self) -> FallbackStore<P> {
        FallbackStore {
            inner: Arc::new(Inner {
                primary: self.primary,
                outage_copy: self.outage_copy,
                local: MemoryStore::builder()
                    .max_sessions(self.max_local_sessions)
                    .max_users(self.max_local_sessions)
                    .max_idle(self.max_local_idle)
                    .clock(self.clock)
                    .build(),
                journal: Mutex::new(Journal::new(self.max_journal)),
                journaled_now: AtomicBool::new(false),
                replaying: AtomicBool::new(false),
                in_fallback: AtomicBool::new(false),
                active: Mutex::new(None),
                counters: Counters::default(),
            }),
        }
    }
}

/// What every clone of one store shares.
#[derive(Debug)]
struct Inner<P> {
    primary: P,
    outage_copy: OutageCopy,
    /// The sessions this instance served, served itself while the primary is unreachable.
    local: MemoryStore,
    journal: Mutex<Journal>,
    /// Whether the journal holds anything: lets the healthy path skip the journal's lock.
    journaled_now: AtomicBool,
    /// Whether the replay task runs: one at a time, so entries leave the journal in order.
    replaying: AtomicBool,
    /// Whether a fallback run is on (`active` is set): lets the healthy path skip its lock.
    in_fallback: AtomicBool,
    /// Since when the current fallback run is on.
    active: Mutex<Option<SystemTime>>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    journaled: AtomicU64,
    replayed: AtomicU64,
    superseded: AtomicU64,
    dropped: AtomicU64,
}

fn unavailable(reason: &'static str) -> StoreError {
    StoreError::Unavailable {
        source: reason.into(),
    }
}

/// The read or write of a session this instance holds no copy of, during an outage.
fn not_held() -> StoreError {
    unavailable("Redis is unreachable and this instance holds no copy of the session")
}

impl<P: ReplayStore> FallbackStore<P> {
    /// A fallback store in front of `primary`, with the default bounds.
    ///
    /// ```no_run
    /// # use tower_turnstile::{backend::RedisBackend, session::{FallbackStore, RedisStore}};
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = FallbackStore::new(RedisStore::new(RedisBackend::new("redis://127.0.0.1")?));
    /// assert!(!store.status().active);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(primary: P) -> Self {
        Self::builder(primary).build()
    }

    /// A builder for a store with other bounds.
    pub fn builder(primary: P) -> FallbackStoreBuilder<P> {
        FallbackStoreBuilder {
            primary,
            outage_copy: OutageCopy::Own,
            max_local_sessions: 100_000,
            max_local_idle: Duration::from_secs(24 * 3600),
            max_journal: 100_000,
            clock: SharedClock::default(),
        }
    }

    /// The store in front.
    pub fn primary(&self) -> &P {
        &self.inner.primary
    }

    /// What the store is doing now, without any I/O.
    pub fn status(&self) -> FallbackStatus {
        self.inner.status()
    }

    /// Replays the journal now, waiting at most `deadline` (for a graceful shutdown). Returns
    /// how many journaled writes are still waiting: 0 when everything reached Redis.
    pub async fn flush(&self, deadline: Duration) -> usize {
        // The replay task is the only one that replays (entries leave the journal in order,
        // one at a time): make sure it runs, and wait for it.
        self.inner.start_replay();
        let _ = tokio::time::timeout(deadline, async {
            while self.inner.journaled_now.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        lock(&self.inner.journal).len()
    }
}

impl<P: ReplayStore> Inner<P> {
    /// Whether `key` has journaled writes that Redis has not seen yet: it is then served from
    /// the local copy, so that its writes stay in order.
    fn pending(&self, key: &SessionKey) -> bool {
        self.journaled_now.load(Ordering::Acquire) && lock(&self.journal).is_pending(key)
    }

    /// Called on each outage: the first one of a run logs the switch to the local copy.
    fn enter(&self, error: &StoreError) {
        let mut active = lock(&self.active);
        if active.is_none() {
            *active = Some(SystemTime::now());
            if self.shares() && !self.journaled_now.load(Ordering::Acquire) {
                // What the last run left is as old as that run: this run takes each session
                // afresh from the primary's copy.
                self.local.clear();
            }
            self.in_fallback.store(true, Ordering::Release);
            metrics::count_labeled(
                "turnstile_session_fallback_transitions_total",
                "to",
                "local",
            );
            tracing::warn!(
                target: "tower_turnstile::session",
                error = %error,
                source = std::error::Error::source(error).map(ToString::to_string),
                "Redis unreachable or refusing writes; writes are journaled and replayed \
                 later, and sessions with journaled writes (all of them while Redis is \
                 unreachable) are served from this instance's local copy"
            );
        }
    }

    /// Called after Redis answered: ends a fallback run once nothing is left to replay.
    fn leave(&self) {
        if !self.in_fallback.load(Ordering::Acquire) || self.journaled_now.load(Ordering::Acquire) {
            return;
        }
        let ended = lock(&self.active).take();
        self.in_fallback.store(false, Ordering::Release);
        if let Some(since) = ended {
            metrics::count_labeled(
                "turnstile_session_fallback_transitions_total",
                "to",
                "redis",
            );
            tracing::info!(
                target: "tower_turnstile::session",
                outage = ?since.elapsed().unwrap_or_default(),
                replayed = self.counters.replayed.load(Ordering::Relaxed),
                superseded = self.counters.superseded.load(Ordering::Relaxed),
                dropped = self.counters.dropped.load(Ordering::Relaxed),
                "Redis answers and the journal is replayed; sessions are served from Redis again"
            );
        }
    }

    /// Records a write made during an outage, or refuses it when the journal is full.
    fn journal(self: &Arc<Self>, write: JournaledWrite) -> Result<(), StoreError> {
        let refused = lock(&self.journal).push(now_millis(), write).err();
        if let Some(Full { limit }) = refused {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::count("turnstile_session_dropped_total", 1);
            if dropped.is_power_of_two() {
                tracing::error!(
                    target: "tower_turnstile::session",
                    limit,
                    dropped,
                    "session journal full: a write during the Redis outage was refused"
                );
            }
            return Err(unavailable("the session journal is full"));
        }
        self.journaled_now.store(true, Ordering::Release);
        self.counters.journaled.fetch_add(1, Ordering::Relaxed);
        metrics::count("turnstile_session_journaled_total", 1);
        self.start_replay();
        Ok(())
    }
}

impl<P: ReplayStore> FallbackStore<P> {
    /// Runs `op` against Redis unless the key must stay local; on an outage, `local` runs
    /// instead. Redis errors that are not outages are returned as they are.
    async fn either<T>(
        &self,
        key: Option<&SessionKey>,
        redis: impl Future<Output = Result<T, StoreError>>,
        mirror: impl FnOnce(&T),
        local: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if key.is_some_and(|key| self.inner.pending(key)) {
            return local();
        }
        match redis.await {
            Ok(value) => {
                mirror(&value);
                self.inner.leave();
                Ok(value)
            }
            Err(error) if error.is_outage() => {
                self.inner.enter(&error);
                local()
            }
            Err(error) => Err(error),
        }
    }
}

#[async_trait]
impl<P: ReplayStore> SessionStore for FallbackStore<P> {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let local = &self.inner.local;
        self.either(
            Some(key),
            self.inner.primary.load(key),
            |found| match found {
                Some(record) if !self.inner.shares() => local.put(key, record),
                // The primary's copy now holds what Redis answered; during a run, what this
                // store holds of the session is older, and the next outage takes it afresh.
                Some(_) if self.inner.in_fallback.load(Ordering::Acquire) => {
                    local.remove(key, None);
                }
                Some(_) => {}
                None => local.remove(key, None),
            },
            || match self.inner.held(key) {
                Some(record) => Ok(Some(record)),
                None => Err(not_held()),
            },
        )
        .await
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        let local = &self.inner.local;
        self.either(
            None,
            self.inner.primary.create(key, record),
            |()| {
                if !self.inner.shares() {
                    local.put(key, record);
                }
            },
            || {
                self.inner.journal(JournaledWrite::Create {
                    key: key.clone(),
                    record: record.clone(),
                })?;
                local.put(key, record);
                Ok(())
            },
        )
        .await
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let refused = AtomicBool::new(false);
        let result = self.update_held(key, patch, &refused).await;
        match result {
            Err(error) if refused.load(Ordering::Relaxed) && self.inner.held(key).is_none() => {
                self.update_unheld(key, patch).await.unwrap_or(Err(error))
            }
            result => result,
        }
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let local = &self.inner.local;
        self.either(
            Some(old),
            self.inner.primary.cycle(old, old_user, new, record),
            |written| {
                local.remove(old, old_user);
                if *written == Written::Applied && !self.inner.shares() {
                    local.put(new, record);
                }
            },
            || {
                let Some(before) = self.inner.held(old) else {
                    return Err(not_held());
                };
                self.inner.journal(JournaledWrite::Cycle {
                    old: old.clone(),
                    old_user: old_user.map(str::to_owned),
                    new: new.clone(),
                    change: diff(&before, record),
                    user: record.user.clone(),
                    user_changed: before.user != record.user,
                    expires_at: record.expires_at,
                })?;
                self.inner.primary.forget_copy(old);
                Ok(local.move_to(old, old_user, new, record))
            },
        )
        .await
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        let local = &self.inner.local;
        self.either(
            Some(key),
            self.inner.primary.delete(key, user),
            |()| local.remove(key, user),
            || {
                self.inner.journal(JournaledWrite::Delete {
                    key: key.clone(),
                    user: user.map(str::to_owned),
                })?;
                local.remove(key, user);
                self.inner.primary.forget_copy(key);
                Ok(())
            },
        )
        .await
    }

    /// During an outage: the sessions of `user` that this instance holds.
    /// During an outage: whether this instance holds the session.
    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let local = &self.inner.local;
        let redis = self.inner.primary.exists(key);
        let held = || Ok(local.contains(key) || self.inner.held(key).is_some());
        self.either(Some(key), redis, |_| {}, held).await
    }

    /// Redis's atomic decision while it answers; during an outage, ranked from the sessions
    /// of `user` this instance holds.
    async fn sessions_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        let local = &self.inner.local;
        let redis = self.inner.primary.sessions_over_cap(user, login, max, held);
        let ranked = || {
            self.inner.hold_user(user);
            Ok(oldest_over(local.user_sessions(user), login, max))
        };
        self.either(None, redis, |_| {}, ranked).await
    }

    /// Redis's atomic decision while it answers; during an outage, counted from the sessions
    /// of `user` this instance holds.
    async fn hold_login(
        &self,
        user: &UserKey,
        login: Option<&SessionKey>,
        max: usize,
    ) -> Result<LoginHold, StoreError> {
        let local = &self.inner.local;
        let redis = self.inner.primary.hold_login(user, login, max);
        let counted = || {
            self.inner.hold_user(user);
            Ok(room_for(&local.user_sessions(user), login, max))
        };
        self.either(None, redis, |_| {}, counted).await
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let local = &self.inner.local;
        self.either(
            None,
            self.inner.primary.list_user_sessions(user),
            |_| {},
            || {
                self.inner.hold_user(user);
                Ok(local.user_sessions(user))
            },
        )
        .await
    }

    /// During an outage: ends the sessions of `user` that this instance holds at once, and
    /// journals the rest: on replay, every session of the user created before this call ends,
    /// on every instance (logins made after it are kept).
    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let ended = match inner.primary.delete_user_sessions(user).await {
            Ok(ended) => Some(ended),
            Err(error) if error.is_outage() => {
                inner.enter(&error);
                None
            }
            Err(error) => return Err(error),
        };
        // During an outage, the sessions the primary's copy holds end here too, and never
        // come back from it.
        let copied = match ended {
            None => inner.hold_user(user),
            Some(_) => Vec::new(),
        };
        let ended_here = inner.local.remove_user_sessions(user);
        for key in &copied {
            inner.primary.forget_copy(key);
        }
        // During an outage, and also while journaled writes wait (sessions of this user created
        // during the outage may be among them): the journaled "log out everywhere" ends them
        // once they are replayed.
        if ended.is_none() || inner.journaled_now.load(Ordering::Acquire) {
            let journaled = inner.journal(JournaledWrite::DeleteUser { user: user.clone() });
            if let (Err(error), None) = (journaled, ended) {
                return Err(error);
            }
        } else {
            inner.leave();
        }
        Ok(ended.unwrap_or(ended_here))
    }
}
