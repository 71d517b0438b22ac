//! Moving live sessions from one store to another without logging anyone out.

use std::{collections::BTreeSet, fmt, sync::Arc, time::SystemTime};

use async_trait::async_trait;

use super::{Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written};

/// Moves live sessions from an old store to a new one while both serve traffic: every
/// instance runs this store for the move, and nobody is logged out.
///
/// - **Reads** ask the new store; on a miss, the old one, and a session found there is copied
///   into the new store (it has then moved).
/// - **Writes** go to the new store, and until the cut-over also to the old one, so switching
///   back to the old store before the cut-over loses nothing. A save to a session that has not
///   moved yet moves it first.
/// - **Destroys** ("log out", "log out everywhere") reach both stores, always, so a session
///   ended in the new store is never copied back from the old one.
/// - **Listing** a user's sessions joins both stores.
/// - **When the old store fails**, it is logged at `warn` on every failure: writes still
///   succeed (the new store has them), but a session that has not moved is unavailable (the
///   read reports the failure, and the layer degrades as for any store failure).
///
/// After the cut-over the old store is only read for sessions that have not moved yet, and
/// cleaned of those that end. Once the old store's sessions have all expired (its longest
/// session lifetime after the cut-over), replace this store with the new one.
///
/// All instances should run the move at once: an instance still on the old store alone would
/// change sessions the others read from the new one.
///
#[cfg_attr(all(feature = "memory", feature = "redis"), doc = "```no_run")]
#[cfg_attr(not(all(feature = "memory", feature = "redis")), doc = "```ignore")]
/// use std::time::{Duration, SystemTime};
/// use tower_turnstile::{
///     backend::RedisBackend,
///     session::{MemoryStore, MigrationStore, RedisStore, SessionLayer},
/// };
///
/// # fn old_store() -> MemoryStore { MemoryStore::new() }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisStore::new(RedisBackend::new("redis://127.0.0.1:6379")?);
/// // Written to both for a day, then to Redis alone.
/// let cut_over = SystemTime::now() + Duration::from_secs(24 * 3600);
/// let moving = MigrationStore::new(old_store(), redis).with_cut_over(cut_over);
/// let layer = SessionLayer::new(moving);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MigrationStore {
    old: Arc<dyn SessionStore>,
    new: Arc<dyn SessionStore>,
    cut_over: Option<SystemTime>,
}

impl fmt::Debug for MigrationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationStore")
            .field("old", &self.old)
            .field("new", &self.new)
            .field("cut_over", &self.cut_over)
            .finish()
    }
}

impl MigrationStore {
    /// Moves sessions from `old` to `new`, writing to both until a cut-over is set and passed.
    pub fn new(old: impl SessionStore, new: impl SessionStore) -> Self {
        Self::from_shared(Arc::new(old), Arc::new(new))
    }

    /// [`new`](Self::new) with stores already shared elsewhere.
    pub fn from_shared(old: Arc<dyn SessionStore>, new: Arc<dyn SessionStore>) -> Self {
        Self {
            old,
            new,
            cut_over: None,
        }
    }

    /// From `at` on, writes go to the new store alone. Default: never (both are written).
    pub fn with_cut_over(mut self, at: SystemTime) -> Self {
        self.cut_over = Some(at);
        self
    }

    /// Whether writes still reach the old store.
    pub fn writes_old(&self) -> bool {
        self.cut_over.is_none_or(|at| SystemTime::now() < at)
    }

    fn old_failed(&self, operation: &'static str, error: &StoreError) {
        tracing::warn!(
            target: "tower_turnstile::session",
            operation,
            error = %error,
            source = std::error::Error::source(error).map(ToString::to_string),
            "the old session store failed during a move; sessions that have not moved yet are \
             unavailable until it answers"
        );
    }

    /// Copies a session that has not moved yet into the new store. `None` when the old store
    /// does not have it either.
    async fn move_forward(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let record = match self.old.load(key).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(error) => {
                self.old_failed("load", &error);
                return Err(error);
            }
        };
        self.new.create(key, &record).await?;
        tracing::debug!(
            target: "tower_turnstile::session",
            session = %key.hash(),
            "session moved to the new store"
        );
        Ok(Some(record))
    }

    /// Runs a write on the old store too while it is written; its failure is logged only.
    async fn also_old<T>(
        &self,
        operation: &'static str,
        write: impl Future<Output = Result<T, StoreError>>,
    ) {
        if let Err(error) = write.await {
            self.old_failed(operation, &error);
        }
    }
}

#[async_trait]
impl SessionStore for MigrationStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        if let Some(record) = self.new.load(key).await? {
            return Ok(Some(record));
        }
        self.move_forward(key).await
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        self.new.create(key, record).await?;
        if self.writes_old() {
            self.also_old("create", self.old.create(key, record)).await;
        }
        Ok(())
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let mut written = self.new.update(key, patch).await?;
        if written == Written::Missing && self.move_forward(key).await?.is_some() {
            written = self.new.update(key, patch).await?;
        }
        if self.writes_old() {
            self.also_old("update", self.old.update(key, patch)).await;
        }
        Ok(written)
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let mut written = self.new.cycle(old, old_user, new, record).await?;
        if written == Written::Missing && self.move_forward(old).await?.is_some() {
            written = self.new.cycle(old, old_user, new, record).await?;
        }
        if self.writes_old() {
            self.also_old("cycle", self.old.cycle(old, old_user, new, record))
                .await;
        } else {
            self.also_old("delete", self.old.delete(old, old_user))
                .await;
        }
        Ok(written)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        self.new.delete(key, user).await?;
        self.also_old("delete", self.old.delete(key, user)).await;
        Ok(())
    }

    /// Both stores' sessions of `user`, each once. When the old store fails, the new store's.
    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let mut sessions = self.new.list_user_sessions(user).await?;
        match self.old.list_user_sessions(user).await {
            Ok(old) => {
                let known: BTreeSet<String> = sessions.iter().map(|s| s.key.hash()).collect();
                sessions.extend(old.into_iter().filter(|s| !known.contains(&s.key.hash())));
            }
            Err(error) => self.old_failed("list", &error),
        }
        Ok(sessions)
    }

    /// Ends the user's sessions in both stores; counts each session once.
    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let live = self.list_user_sessions(user).await?.len();
        let ended = self.new.delete_user_sessions(user).await?;
        self.also_old("delete_user", self.old.delete_user_sessions(user))
            .await;
        Ok(live.max(ended))
    }
}
