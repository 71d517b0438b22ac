use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{Expiry, sync::Cache};

use super::{
    Clock, Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written,
    clock::SharedClock,
};
use crate::{
    sync::lock,
    time::{from_unix_millis, millis},
};

/// Sessions in process memory: bounded in size, expired by time.
///
/// For a single instance, for tests, and as the fallback next to Redis. The number of sessions
/// is capped (least useful entries are evicted first), so a flood of new visitors cannot
/// exhaust memory; every session expires on its own inactivity timeout and absolute lifetime.
///
/// Clones share the same sessions. Time comes from the system clock, or from the
/// [`Clock`] given to [`MemoryStoreBuilder::clock`] (a
/// [`ManualClock`](super::ManualClock) lets a test expire sessions without sleeping).
///
/// ```
/// use tower_turnstile::session::{MemoryStore, SessionLayer};
///
/// let store = MemoryStore::builder().max_sessions(50_000).build();
/// let layer = SessionLayer::new(store);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    sessions: Cache<SessionKey, Arc<Entry>>,
    users: Cache<UserKey, Arc<Mutex<HashMap<SessionKey, Listed>>>>,
    clock: SharedClock,
}

/// A session in a user's index: what listing shows, and the entry, to tell whether it still
/// lives without counting the look as a use.
#[derive(Debug)]
struct Listed {
    info: SessionInfo,
    entry: Weak<Entry>,
}

/// Builds a [`MemoryStore`] with a non-default capacity.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_sessions: u64,
    max_users: u64,
    user_index_idle: Duration,
    max_idle: Option<Duration>,
    clock: SharedClock,
}

impl MemoryStoreBuilder {
    /// The most sessions kept at once. Default: 100 000.
    pub fn max_sessions(mut self, max: u64) -> Self {
        self.max_sessions = max;
        self
    }

    /// The most user indexes kept at once. Default: 100 000.
    pub fn max_users(mut self, max: u64) -> Self {
        self.max_users = max;
        self
    }

    /// Drops a session unused for this long, even if its own inactivity timeout is longer.
    /// Default: none (each session's own timeout decides).
    pub fn max_idle(mut self, idle: Duration) -> Self {
        self.max_idle = Some(idle);
        self
    }

    /// Where the store reads the time. Default: the system clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        // The cache's own expiry (on the monotonic clock) reclaims memory; whether a session
        // is alive is decided on `clock` (see `Entry::alive`). On the system clock both agree.
        let mut sessions = Cache::builder()
            .max_capacity(self.max_sessions)
            .expire_after(RecordExpiry {
                clock: self.clock.clone(),
            });
        if let Some(idle) = self.max_idle {
            sessions = sessions.time_to_idle(idle);
        }
        MemoryStore {
            sessions: sessions.build(),
            users: Cache::builder()
                .max_capacity(self.max_users)
                .time_to_idle(self.user_index_idle)
                .build(),
            clock: self.clock,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default capacity (100 000 sessions).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for a store with another capacity.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_sessions: 100_000,
            max_users: 100_000,
            // An index outlives no session it lists: sessions live 30 days at most by default,
            // and an index that is used is kept.
            user_index_idle: Duration::from_secs(31 * 24 * 3600),
            max_idle: None,
            clock: SharedClock::default(),
        }
    }

    /// How many sessions are held (an estimate: expiry and eviction run in the background).
    pub fn len(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }

    /// Whether the store holds no session (see [`MemoryStore::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn index(&self, user: &UserKey, key: &SessionKey, record: &Record, entry: &Arc<Entry>) {
        let index = self.users.get_with(user.clone(), Default::default);
        let info = SessionInfo {
            key: key.clone(),
            created_at: from_unix_millis(record.created_at),
            expires_at: from_unix_millis(record.expires_at),
        };
        let entry = Arc::downgrade(entry);
        lock(&index).insert(key.clone(), Listed { info, entry });
    }

    fn unindex(&self, user: &UserKey, key: &SessionKey) {
        if let Some(index) = self.users.get(user) {
            lock(&index).remove(key);
        }
    }
}

/// One session in memory. The record sits behind its own lock so that a field-level update
/// changes it in place; a request that still holds an entry removed meanwhile writes into a
/// detached copy, which is how a destroyed session stays destroyed.
#[derive(Debug)]
struct Entry {
    record: Mutex<Record>,
    /// When the session was last used, in Unix ms on the store's clock.
    used: AtomicU64,
}

impl Entry {
    fn new(record: &Record, now_ms: u64) -> Self {
        Self {
            record: Mutex::new(record.clone()),
            used: AtomicU64::new(now_ms),
        }
    }

    /// Whether the session is alive at `now_ms`: before its absolute end, and used within its
    /// inactivity timeout.
    fn alive(&self, now_ms: u64) -> bool {
        let record = lock(&self.record);
        let idle = now_ms.saturating_sub(self.used.load(Ordering::Relaxed));
        now_ms < record.expires_at && idle < millis(record.inactivity_timeout)
    }

    fn touch(&self, now_ms: u64) {
        self.used.fetch_max(now_ms, Ordering::Relaxed);
    }
}

struct RecordExpiry {
    clock: SharedClock,
}

impl RecordExpiry {
    fn ttl(&self, entry: &Entry) -> Option<Duration> {
        Some(lock(&entry.record).ttl_at(self.clock.now_ms()))
    }
}

impl Expiry<SessionKey, Arc<Entry>> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &SessionKey,
        entry: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        self.ttl(entry)
    }

    fn expire_after_read(
        &self,
        _: &SessionKey,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        self.ttl(entry)
    }

    fn expire_after_update(
        &self,
        _: &SessionKey,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.ttl(entry)
    }
}

/// The store's work, without the trait's boxed futures: every operation is synchronous here.
impl MemoryStore {
    pub(crate) fn get(&self, key: &SessionKey) -> Option<Record> {
        // `get` restarts the inactivity clock (see `RecordExpiry::expire_after_read`).
        let entry = self.live(key)?;
        let record = lock(&entry.record).clone();
        Some(record)
    }

    /// The entry of a session alive now, marked as used; a dead one is dropped.
    fn live(&self, key: &SessionKey) -> Option<Arc<Entry>> {
        let entry = self.sessions.get(key)?;
        let now = self.clock.now_ms();
        if !entry.alive(now) {
            self.sessions.invalidate(key);
            return None;
        }
        entry.touch(now);
        Some(entry)
    }

    /// Drops every session and user index.
    #[cfg(feature = "redis")] // the fallback store's
    pub(crate) fn clear(&self) {
        self.sessions.invalidate_all();
        self.users.invalidate_all();
    }

    /// Whether a live session is under `key`, without counting the look as a use.
    pub(crate) fn contains(&self, key: &SessionKey) -> bool {
        self.sessions.contains_key(key)
    }

    pub(crate) fn put(&self, key: &SessionKey, record: &Record) {
        let entry = Arc::new(Entry::new(record, self.clock.now_ms()));
        if let Some(user) = &record.user {
            self.index(
                &UserKey::new(key.tenant(), user.as_str()),
                key,
                record,
                &entry,
            );
        }
        self.sessions.insert(key.clone(), entry);
    }

    pub(crate) fn patch(&self, key: &SessionKey, patch: &Patch) -> Written {
        let Some(entry) = self.live(key) else {
            return Written::Missing;
        };
        lock(&entry.record).apply(patch);
        if !entry.alive(self.clock.now_ms()) {
            // The change ended the session's life (or it had just run out).
            self.sessions.invalidate(key);
            return Written::Missing;
        }
        if patch.lifetime.is_some() {
            // Re-inserting the same entry makes the cache recompute its expiry.
            self.sessions.insert(key.clone(), entry);
        }
        Written::Applied
    }

    pub(crate) fn move_to(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Written {
        if !self
            .sessions
            .get(old)
            .is_some_and(|entry| entry.alive(self.clock.now_ms()))
        {
            return Written::Missing;
        }
        self.put(new, record);
        let removed = self.sessions.remove(old);
        if let Some(user) = old_user {
            self.unindex(&UserKey::new(old.tenant(), user), old);
        }
        if removed.is_none() {
            // Destroyed between the check and the move: do not let the copy outlive it.
            self.remove(new, record.user.as_deref());
            return Written::Missing;
        }
        Written::Applied
    }

    pub(crate) fn remove(&self, key: &SessionKey, user: Option<&str>) {
        self.sessions.invalidate(key);
        if let Some(user) = user {
            self.unindex(&UserKey::new(key.tenant(), user), key);
        }
    }

    pub(crate) fn user_sessions(&self, user: &UserKey) -> Vec<SessionInfo> {
        let Some(index) = self.users.get(user) else {
            return Vec::new();
        };
        self.live_in(&mut lock(&index))
    }

    /// The live sessions of a user's index, the entries of gone ones dropped. Neither
    /// `contains_key` nor `alive` counts as use of a session, so listing a user's sessions
    /// does not keep the idle ones alive.
    fn live_in(&self, index: &mut HashMap<SessionKey, Listed>) -> Vec<SessionInfo> {
        let now = self.clock.now_ms();
        index.retain(|key, listed| {
            self.sessions.contains_key(key)
                && listed.entry.upgrade().is_some_and(|entry| entry.alive(now))
        });
        index.values().map(|listed| listed.info.clone()).collect()
    }

    /// The sessions a login into `login` ends under a cap of `max`, decided and taken out of
    /// the user's index under its lock, so that concurrent logins each end different ones.
    pub(crate) fn claim_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
    ) -> Vec<SessionKey> {
        let Some(index) = self.users.get(user) else {
            return Vec::new();
        };
        let mut index = lock(&index);
        let over = super::oldest_over(self.live_in(&mut index), login, max);
        for key in &over {
            index.remove(key);
        }
        over
    }

    pub(crate) fn remove_user_sessions(&self, user: &UserKey) -> usize {
        let Some(index) = self.users.remove(user) else {
            return 0;
        };
        let keys: Vec<SessionKey> = lock(&index).drain().map(|(key, _)| key).collect();
        keys.iter()
            .filter(|key| self.sessions.remove(*key).is_some())
            .count()
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        Ok(self.get(key))
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        self.put(key, record);
        Ok(())
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        Ok(self.patch(key, patch))
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        Ok(self.move_to(old, old_user, new, record))
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        self.remove(key, user);
        Ok(())
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        Ok(self.user_sessions(user))
    }

    /// Atomic within the process: decided under the user's index lock.
    async fn sessions_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        _held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        Ok(self.claim_over_cap(user, login, max))
    }

    /// Looks without restarting the inactivity clock.
    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        Ok(self.contains(key))
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        Ok(self.remove_user_sessions(user))
    }
}
