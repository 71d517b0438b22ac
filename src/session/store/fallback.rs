use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use serde::Serialize;

use super::{
    Clock, MemoryStore, Patch, Record, RedisStore, SessionInfo, SessionKey, SessionStore,
    StoreError, UserKey, Written,
    clock::SharedClock,
    redis::{ReplayMode, ReplayWrite},
};
use crate::{
    backend::BreakerState,
    metrics,
    sync::lock,
    time::{now_millis, unix_millis},
};

/// Sessions in Redis that survive a Redis outage: [`RedisStore`] first, and a bounded local
/// copy of the sessions this instance served, used only while Redis cannot be reached.
///
/// - **While Redis answers** it is a `RedisStore`: the same commands and round trips per
///   request. It also keeps a copy of each session it loads or writes (bounded in number and
///   idle time), which is never read while Redis answers, so instances never serve each other
///   stale data.
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
/// [`with_fail_closed_on_write`](crate::session::SessionLayer::with_fail_closed_on_write)
/// answers `503`), journaled writes of sessions that Redis lost meanwhile, and the journal of an
/// instance that stops during an outage (it is kept in memory only; see
/// [`FallbackStore::flush`] for a graceful stop).
///
/// ```no_run
/// use tower_turnstile::{backend::RedisBackend, session::{FallbackStore, RedisStore, SessionLayer}};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let sessions = FallbackStore::new(RedisStore::new(redis));
/// let layer = SessionLayer::new(sessions.clone()).with_fail_closed_on_write(true);
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
#[derive(Debug, Clone)]
pub struct FallbackStore {
    inner: Arc<Inner>,
}

/// Builds a [`FallbackStore`] with non-default bounds.
#[derive(Debug, Clone)]
#[must_use]
pub struct FallbackStoreBuilder {
    primary: RedisStore,
    max_local_sessions: u64,
    max_local_idle: Duration,
    max_journal: usize,
    clock: SharedClock,
}

impl FallbackStoreBuilder {
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
    pub fn build(self) -> FallbackStore {
        FallbackStore {
            inner: Arc::new(Inner {
                primary: self.primary,
                local: MemoryStore::builder()
                    .max_sessions(self.max_local_sessions)
                    .max_users(self.max_local_sessions)
                    .max_idle(self.max_local_idle)
                    .shared_clock(self.clock)
                    .build(),
                journal: Mutex::new(Journal::default()),
                journaled_now: AtomicBool::new(false),
                max_journal: self.max_journal,
                replaying: AtomicBool::new(false),
                in_fallback: AtomicBool::new(false),
                active: Mutex::new(None),
                counters: Counters::default(),
            }),
        }
    }
}

/// What a [`FallbackStore`] is doing, for health reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FallbackStatus {
    /// Whether sessions are being served from the local copy (Redis unreachable, or journaled
    /// writes still waiting to be replayed).
    pub active: bool,
    /// Since when, in Unix milliseconds.
    pub active_since: Option<u64>,
    /// Sessions held in the local copy (an estimate).
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

#[derive(Debug)]
struct Inner {
    primary: RedisStore,
    local: MemoryStore,
    journal: Mutex<Journal>,
    /// Whether the journal holds anything: lets the healthy path skip the journal's lock.
    journaled_now: AtomicBool,
    max_journal: usize,
    replaying: AtomicBool,
    /// Whether a fallback run is on (`active` is set): lets the healthy path skip its lock.
    in_fallback: AtomicBool,
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

/// The writes made during an outage, in order, and how many of them each session has.
#[derive(Debug, Default)]
struct Journal {
    entries: VecDeque<Entry>,
    pending: HashMap<SessionKey, usize>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// When the write was made (Unix ms).
    at: u64,
    write: Write,
}

/// One write made during an outage, in the terms it is replayed in.
#[derive(Debug, Clone)]
enum Write {
    Create {
        key: SessionKey,
        record: Record,
    },
    Update {
        key: SessionKey,
        patch: Patch,
    },
    /// The session moved from `old` to `new`; `change` is what the move itself changed.
    Cycle {
        old: SessionKey,
        old_user: Option<String>,
        new: SessionKey,
        change: Patch,
        user: Option<String>,
        user_changed: bool,
        expires_at: u64,
    },
    Delete {
        key: SessionKey,
        user: Option<String>,
    },
    DeleteUser {
        user: UserKey,
    },
}

impl Write {
    fn keys(&self) -> impl Iterator<Item = &SessionKey> {
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

/// What replaying one entry did.
enum Replayed {
    Applied,
    /// The session is gone from Redis: the write was not replayed, and the local copy of it is
    /// dropped.
    Superseded,
}

fn unavailable(reason: &'static str) -> StoreError {
    StoreError::Unavailable {
        source: reason.into(),
    }
}

/// What changed from `before` to `after`, as a patch.
fn diff(before: &Record, after: &Record) -> Patch {
    Patch {
        set: after
            .data
            .iter()
            .filter(|(key, value)| before.data.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        remove: before
            .data
            .keys()
            .filter(|key| !after.data.contains_key(*key))
            .cloned()
            .collect(),
        lifetime: (before.lifetime() != after.lifetime()).then(|| after.lifetime()),
    }
}

impl FallbackStore {
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
    pub fn new(primary: RedisStore) -> Self {
        Self::builder(primary).build()
    }

    /// A builder for a store with other bounds.
    pub fn builder(primary: RedisStore) -> FallbackStoreBuilder {
        FallbackStoreBuilder {
            primary,
            max_local_sessions: 100_000,
            max_local_idle: Duration::from_secs(24 * 3600),
            max_journal: 100_000,
            clock: SharedClock::default(),
        }
    }

    /// The Redis store in front.
    pub fn primary(&self) -> &RedisStore {
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
        lock(&self.inner.journal).entries.len()
    }
}

impl Inner {
    fn status(&self) -> FallbackStatus {
        let (journal_len, journaled) = {
            let journal = lock(&self.journal);
            (journal.entries.len(), !journal.entries.is_empty())
        };
        let breaker = self.primary.backend().health().snapshot().state;
        let since = *lock(&self.active);
        FallbackStatus {
            active: since.is_some() && (journaled || breaker != BreakerState::Closed),
            active_since: since.map(unix_millis),
            local_sessions: self.local.len(),
            journal_len,
            journaled: self.counters.journaled.load(Ordering::Relaxed),
            replayed: self.counters.replayed.load(Ordering::Relaxed),
            superseded: self.counters.superseded.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }

    /// Whether `key` has journaled writes that Redis has not seen yet: it is then served from
    /// the local copy, so that its writes stay in order.
    fn pending(&self, key: &SessionKey) -> bool {
        self.journaled_now.load(Ordering::Acquire) && lock(&self.journal).pending.contains_key(key)
    }

    /// Called on each outage: the first one of a run logs the switch to the local copy.
    fn enter(&self, error: &StoreError) {
        let mut active = lock(&self.active);
        if active.is_none() {
            *active = Some(SystemTime::now());
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
                "Redis unreachable; sessions are served from this instance's local copy and \
                 writes are journaled"
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
    fn journal(self: &Arc<Self>, write: Write) -> Result<(), StoreError> {
        {
            let mut journal = lock(&self.journal);
            if journal.entries.len() >= self.max_journal {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::count("turnstile_session_dropped_total", 1);
                if dropped.is_power_of_two() {
                    tracing::error!(
                        target: "tower_turnstile::session",
                        limit = self.max_journal,
                        dropped,
                        "session journal full: a write during the Redis outage was refused"
                    );
                }
                return Err(unavailable("the session journal is full"));
            }
            for key in write.keys() {
                *journal.pending.entry(key.clone()).or_default() += 1;
            }
            journal.entries.push_back(Entry {
                at: now_millis(),
                write,
            });
            self.journaled_now.store(true, Ordering::Release);
        }
        self.counters.journaled.fetch_add(1, Ordering::Relaxed);
        metrics::count("turnstile_session_journaled_total", 1);
        self.start_replay();
        Ok(())
    }

    /// Starts the replay task unless it runs already.
    fn start_replay(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = Arc::downgrade(self);
        runtime.spawn(replay_task(store));
    }

    /// Replays journaled writes in order until the journal is empty (`true`) or Redis fails
    /// (`false`: try again later). Only the replay task calls it.
    async fn replay(&self) -> bool {
        loop {
            let Some(entry) = lock(&self.journal).entries.front().cloned() else {
                self.leave();
                return true;
            };
            let outcome = match self.replay_one(&entry).await {
                Ok(outcome) => outcome,
                Err(error) if error.is_outage() => return false,
                Err(error) => {
                    // Redis answered but refused the write (a key of another type, say): it can
                    // never be replayed, and keeping it would block every write behind it.
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::count("turnstile_session_dropped_total", 1);
                    tracing::error!(
                        target: "tower_turnstile::session",
                        error = %error,
                        source = std::error::Error::source(&error).map(ToString::to_string),
                        "journaled session write refused by Redis; dropped"
                    );
                    Replayed::Applied
                }
            };
            let mut journal = lock(&self.journal);
            // Only this task removes entries, so the front is still the entry replayed.
            if let Some(done) = journal.entries.pop_front() {
                for key in done.write.keys() {
                    if let Some(count) = journal.pending.get_mut(key) {
                        *count -= 1;
                        if *count == 0 {
                            journal.pending.remove(key);
                        }
                    }
                }
            }
            if journal.entries.is_empty() {
                self.journaled_now.store(false, Ordering::Release);
            }
            drop(journal);
            match outcome {
                Replayed::Applied => {
                    metrics::count("turnstile_session_replayed_total", 1);
                    self.counters.replayed.fetch_add(1, Ordering::Relaxed)
                }
                Replayed::Superseded => {
                    metrics::count("turnstile_session_superseded_total", 1);
                    for key in entry.write.keys() {
                        self.local.remove(key, None);
                    }
                    tracing::info!(
                        target: "tower_turnstile::session",
                        "a session written during the outage is gone from Redis; its journaled \
                         write is not replayed"
                    );
                    self.counters.superseded.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }

    async fn replay_one(&self, entry: &Entry) -> Result<Replayed, StoreError> {
        let redis = &self.primary;
        let at = entry.at;
        let applied = |done: bool| {
            if done {
                Replayed::Applied
            } else {
                Replayed::Superseded
            }
        };
        Ok(match &entry.write {
            Write::Create { key, record } => {
                let write = ReplayWrite {
                    mode: ReplayMode::Create,
                    at,
                    base: RedisStore::base_fields(key, record),
                    patch: &Patch::default(),
                    user: None,
                    index: record.user.as_deref().map(|u| (u, record.expires_at)),
                };
                applied(redis.replay(key, &write).await?)
            }
            Write::Update { key, patch } => {
                let write = ReplayWrite {
                    mode: ReplayMode::Patch,
                    at,
                    base: Vec::new(),
                    patch,
                    user: None,
                    index: None,
                };
                applied(redis.replay(key, &write).await?)
            }
            Write::Cycle {
                old,
                old_user,
                new,
                change,
                user,
                user_changed,
                expires_at,
            } => {
                let Some(base) = redis.load_raw(old).await? else {
                    // Gone from Redis: either this move was replayed already (the new key
                    // exists), or the session was destroyed meanwhile and stays destroyed.
                    return Ok(applied(redis.exists(new).await?));
                };
                let write = ReplayWrite {
                    mode: ReplayMode::Create,
                    at,
                    base,
                    patch: change,
                    user: user.as_deref().filter(|_| *user_changed),
                    index: user.as_deref().map(|u| (u, *expires_at)),
                };
                let moved = redis.replay(new, &write).await?;
                redis.delete(old, old_user.as_deref()).await?;
                applied(moved)
            }
            Write::Delete { key, user } => {
                redis.delete(key, user.as_deref()).await?;
                Replayed::Applied
            }
            Write::DeleteUser { user } => {
                redis.delete_user_sessions_before(user, at).await?;
                Replayed::Applied
            }
        })
    }
}

/// Replays the journal while there is one, retrying while Redis is down; ends when the journal
/// is empty or the store is dropped.
async fn replay_task(store: Weak<Inner>) {
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
        // Redis is still down; the breaker makes each retry cost nothing until it lets a
        // probe through.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl FallbackStore {
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
impl SessionStore for FallbackStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let local = &self.inner.local;
        self.either(
            Some(key),
            self.inner.primary.load(key),
            |found| match found {
                Some(record) => local.put(key, record),
                None => local.remove(key, None),
            },
            || match local.get(key) {
                Some(record) => Ok(Some(record)),
                None => Err(unavailable(
                    "Redis is unreachable and this instance holds no copy of the session",
                )),
            },
        )
        .await
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        let local = &self.inner.local;
        self.either(
            None,
            self.inner.primary.create(key, record),
            |()| local.put(key, record),
            || {
                self.inner.journal(Write::Create {
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
        let local = &self.inner.local;
        self.either(
            Some(key),
            self.inner.primary.update(key, patch),
            |written| match written {
                Written::Applied => {
                    let _ = local.patch(key, patch);
                }
                Written::Missing => local.remove(key, None),
            },
            || {
                if local.get(key).is_none() {
                    return Err(unavailable(
                        "Redis is unreachable and this instance holds no copy of the session",
                    ));
                }
                self.inner.journal(Write::Update {
                    key: key.clone(),
                    patch: patch.clone(),
                })?;
                Ok(local.patch(key, patch))
            },
        )
        .await
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
                if *written == Written::Applied {
                    local.put(new, record);
                }
            },
            || {
                let Some(before) = local.get(old) else {
                    return Err(unavailable(
                        "Redis is unreachable and this instance holds no copy of the session",
                    ));
                };
                self.inner.journal(Write::Cycle {
                    old: old.clone(),
                    old_user: old_user.map(str::to_owned),
                    new: new.clone(),
                    change: diff(&before, record),
                    user: record.user.clone(),
                    user_changed: before.user != record.user,
                    expires_at: record.expires_at,
                })?;
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
                self.inner.journal(Write::Delete {
                    key: key.clone(),
                    user: user.map(str::to_owned),
                })?;
                local.remove(key, user);
                Ok(())
            },
        )
        .await
    }

    /// During an outage: the sessions of `user` that this instance holds.
    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let local = &self.inner.local;
        self.either(
            None,
            self.inner.primary.list_user_sessions(user),
            |_| {},
            || Ok(local.user_sessions(user)),
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
        let ended_here = inner.local.remove_user_sessions(user);
        // During an outage, and also while journaled writes wait (sessions of this user created
        // during the outage may be among them): the journaled "log out everywhere" ends them
        // once they are replayed.
        if ended.is_none() || inner.journaled_now.load(Ordering::Acquire) {
            let journaled = inner.journal(Write::DeleteUser { user: user.clone() });
            if let (Err(error), None) = (journaled, ended) {
                return Err(error);
            }
        } else {
            inner.leave();
        }
        Ok(ended.unwrap_or(ended_here))
    }
}
