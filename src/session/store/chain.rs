//! Redis in front of PostgreSQL: PostgreSQL holds every session, Redis copies of them serve
//! reads.

use std::{
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::sync::Cache;

use super::{
    PostgresStore, Record, RedisStore, SessionInfo, SessionKey, SessionStore, StoreError, UserKey,
    VersionedStore, Written,
};
use crate::{session::store::Patch, sync};

/// Sessions in PostgreSQL with copies in Redis: the database is the truth, Redis the fast path,
/// and the database serves alone whenever Redis cannot.
///
/// - **Reads** look in Redis first (one round trip). A session Redis has no copy of is read
///   from PostgreSQL and copied into Redis; the copy is kept only if the row did not change
///   meanwhile (its version is checked after the copy is written), so a copy is never older
///   than a write that finished before it was made.
/// - **Writes** go to PostgreSQL, then drop Redis's copy of the session (two round trips; a
///   login or "log out everywhere" too). The next read copies it again.
/// - **Inactivity**: a read served by Redis also slides the session in PostgreSQL, in the
///   background, at most once per sixteenth of its timeout per instance. A session therefore
///   lives at least 7/8 of its inactivity timeout in PostgreSQL after its last use.
/// - **Redis down or slow** (its backend's breaker open, or a call failing): reads and writes
///   go to PostgreSQL alone, no request fails. A copy this instance could not drop would be
///   stale once Redis is back, so the instance first moves every instance to a new
///   *generation* of copies: a counter in PostgreSQL that is part of every Redis key. Every
///   instance reads the counter again before its first request after each
///   [`with_generation_refresh`](Self::with_generation_refresh) interval (default 250 ms);
///   older copies are never read again and expire by themselves. A stale copy can so be
///   served for at most that interval (plus one database round trip): by an instance that
///   still reaches Redis while another does not, or, just after an outage, by an instance that
///   has not yet read the new generation.
/// - **PostgreSQL down**: reads of sessions Redis has a copy of still answer; other reads see
///   no session (the store reports the outage, and the layer degrades), and every write fails,
///   so a layer with
///   [`FailurePolicy::fail_closed_on_write`](crate::session::FailurePolicy::fail_closed_on_write)
///   answers `503` rather than claim a write it did not keep.
///
#[cfg_attr(feature = "axum", doc = "```no_run")]
#[cfg_attr(not(feature = "axum"), doc = "```ignore")]
/// use tower_turnstile::{
///     backend::RedisBackend,
///     session::{ChainStore, PostgresStore, RedisStore, SessionLayer},
/// };
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let database = PostgresStore::new(sqlx::PgPool::connect("postgres://127.0.0.1/app").await?);
/// database.migrate().await?;
/// let redis = RedisStore::new(RedisBackend::new("redis://127.0.0.1:6379")?);
/// let layer = SessionLayer::new(ChainStore::new(redis, database));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
pub struct ChainStore<B = PostgresStore> {
    inner: Arc<Inner<B>>,
    refresh: Duration,
}

impl<B> Clone for ChainStore<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            refresh: self.refresh,
        }
    }
}

struct Inner<B> {
    /// Redis as configured; the copies of one generation live under its prefix plus `g<n>:`.
    redis: RedisStore,
    front: RwLock<Front>,
    database: B,
    refreshing: AtomicBool,
    /// When this instance last slid each session in PostgreSQL for a read Redis served.
    touched: Cache<SessionKey, Instant>,
}

struct Front {
    generation: i64,
    store: RedisStore,
    /// When the counter was last read; `None` before the first read.
    checked: Option<Instant>,
}

impl<B: VersionedStore> fmt::Debug for ChainStore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self.generation();
        f.debug_struct("ChainStore")
            .field("redis", &self.inner.redis)
            .field("database", &self.inner.database)
            .field("generation", &generation)
            .finish_non_exhaustive()
    }
}

impl<B: VersionedStore> ChainStore<B> {
    /// Copies in `redis` in front of `database`. For a [`PostgresStore`], run
    /// [`PostgresStore::migrate`] first (it creates the generation counter too).
    pub fn new(redis: RedisStore, database: B) -> Self {
        let store = generation_store(&redis, 0);
        Self {
            inner: Arc::new(Inner {
                redis,
                front: RwLock::new(Front {
                    generation: 0,
                    store,
                    checked: None,
                }),
                database,
                refreshing: AtomicBool::new(false),
                touched: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_idle(Duration::from_secs(3600))
                    .build(),
            }),
            refresh: Duration::from_millis(250),
        }
    }

    /// How often each instance reads the generation counter: the longest a copy made stale
    /// during a Redis outage can be served. Default: 250 ms (four small queries a second per
    /// busy instance).
    pub fn with_generation_refresh(mut self, every: Duration) -> Self {
        self.refresh = every;
        self
    }

    /// The Redis store in front.
    pub fn redis(&self) -> &RedisStore {
        &self.inner.redis
    }

    /// The store behind.
    pub fn database(&self) -> &B {
        &self.inner.database
    }

    /// The generation of Redis copies this instance uses.
    pub fn generation(&self) -> i64 {
        self.inner.front.read().map_or(0, |front| front.generation)
    }

    /// The Redis store of the current generation. When the counter was read longer than the
    /// refresh interval ago, this request reads it first (one database round trip per interval
    /// per instance); requests meanwhile use what is known.
    async fn front(&self) -> RedisStore {
        let (store, due) = {
            let front = sync::read(&self.inner.front);
            (
                front.store.clone(),
                front.checked.is_none_or(|at| at.elapsed() >= self.refresh),
            )
        };
        if !due || self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return store;
        }
        // Cleared however this ends, a request given up on halfway included.
        let _refreshing = Refreshing(&self.inner.refreshing);
        // A failed read keeps what is known, and is tried again one interval later.
        let generation = self.inner.database.copy_generation().await.unwrap_or(0);
        self.adopt(generation);
        let front = sync::read(&self.inner.front);
        front.store.clone()
    }

    fn adopt(&self, generation: i64) {
        let mut front = sync::write(&self.inner.front);
        front.checked = Some(Instant::now());
        if generation > front.generation {
            front.generation = generation;
            front.store = generation_store(&self.inner.redis, generation);
        }
    }

    /// Redis could not drop a copy: every copy of this generation may now be stale.
    async fn abandon_generation(&self, error: &StoreError) {
        match self.inner.database.next_copy_generation().await {
            Ok(generation) => {
                tracing::warn!(
                    target: "tower_turnstile::session",
                    error = %error,
                    generation,
                    "Redis could not drop a session copy; every instance moves to a new generation of copies"
                );
                self.adopt(generation);
            }
            Err(bump) => tracing::error!(
                target: "tower_turnstile::session",
                error = %error,
                bump = %bump,
                "Redis could not drop a session copy, and the generation could not be moved on"
            ),
        }
    }

    /// Drops Redis's copy after a write to the database.
    async fn drop_copy(&self, front: &RedisStore, key: &SessionKey, user: Option<&str>) {
        if let Err(error) = front.delete(key, user).await {
            self.abandon_generation(&error).await;
        }
    }

    /// Slides the session in PostgreSQL for a read Redis served, when this instance has not
    /// done so for a sixteenth of its timeout. A session gone from the database loses its copy.
    fn touch(&self, front: RedisStore, key: &SessionKey, record: &Record) {
        let due = record.inactivity_timeout / 16;
        let fresh = self
            .inner
            .touched
            .get(key)
            .is_some_and(|at| at.elapsed() < due);
        if fresh {
            return;
        }
        self.inner.touched.insert(key.clone(), Instant::now());
        let (chain, key, user) = (self.clone(), key.clone(), record.user.clone());
        tokio::spawn(async move {
            match chain.inner.database.load(&key).await {
                Ok(Some(_)) => {}
                Ok(None) => chain.drop_copy(&front, &key, user.as_deref()).await,
                Err(error) => tracing::debug!(
                    target: "tower_turnstile::session",
                    error = %error,
                    "sliding a session in PostgreSQL failed"
                ),
            }
        });
    }

    /// Copies a session read from the database into Redis, and keeps the copy only if the row
    /// did not change meanwhile.
    async fn copy(&self, front: &RedisStore, key: &SessionKey, record: &Record, version: i64) {
        if front.create(key, record).await.is_err() {
            return;
        }
        let unchanged =
            matches!(self.inner.database.version(key).await, Ok(Some(v)) if v == version);
        if !unchanged {
            self.drop_copy(front, key, record.user.as_deref()).await;
        }
    }
}

/// Marks a read of the generation counter under way, until dropped.
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn generation_store(redis: &RedisStore, generation: i64) -> RedisStore {
    let prefix = format!("{}g{generation}:", redis.key_prefix());
    redis.clone().with_key_prefix(prefix)
}

#[async_trait]
impl<B: VersionedStore> SessionStore for ChainStore<B> {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let front = self.front().await;
        match front.load(key).await {
            Ok(Some(record)) => {
                self.touch(front, key, &record);
                return Ok(Some(record));
            }
            Ok(None) => {}
            // Redis is down or failing: the database answers alone.
            Err(_) => return self.inner.database.load(key).await,
        }
        let Some((record, version)) = self.inner.database.load_versioned(key).await? else {
            return Ok(None);
        };
        self.copy(&front, key, &record, version).await;
        self.inner.touched.insert(key.clone(), Instant::now());
        Ok(Some(record))
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        let front = self.front().await;
        self.inner.database.create(key, record).await?;
        // Nobody else knows the new id yet, so its copy cannot be stale. Without one (Redis
        // failing), the first read makes it.
        let _ = front.create(key, record).await;
        Ok(())
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let front = self.front().await;
        let written = self.inner.database.update(key, patch).await?;
        self.drop_copy(&front, key, None).await;
        Ok(written)
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let front = self.front().await;
        let written = self
            .inner
            .database
            .cycle(old, old_user, new, record)
            .await?;
        self.drop_copy(&front, old, old_user).await;
        if written == Written::Applied {
            // A new id, as for `create`.
            let _ = front.create(new, record).await;
        }
        Ok(written)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        let front = self.front().await;
        self.inner.database.delete(key, user).await?;
        self.drop_copy(&front, key, user).await;
        Ok(())
    }

    /// From the database, which holds every session.
    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        self.inner.database.list_user_sessions(user).await
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let front = self.front().await;
        let ended = self.inner.database.delete_user_sessions(user).await?;
        if let Err(error) = front.delete_user_sessions(user).await {
            self.abandon_generation(&error).await;
        }
        Ok(ended)
    }
}
