//! Session storage: the [`SessionStore`] trait, its record types, and the stores.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, SystemTime},
};

use crate::time::{millis, unix_millis};

use async_trait::async_trait;

pub(crate) use super::id::{SessionKey, UserKey};
pub(crate) use crate::StoreError;

#[cfg(all(feature = "redis", feature = "postgres"))]
mod chain;
#[cfg(feature = "memory")]
mod clock;
#[cfg(all(feature = "memory", feature = "redis"))]
mod fallback;
#[cfg(feature = "memory")]
mod memory;
mod migration;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod replay;
mod versioned;

#[cfg(all(feature = "redis", feature = "postgres"))]
pub use chain::ChainStore;
#[cfg(feature = "memory")]
pub use clock::{Clock, ManualClock};
#[cfg(all(feature = "memory", feature = "redis"))]
pub use fallback::{FallbackStatus, FallbackStore, FallbackStoreBuilder, OutageCopy};
#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use migration::MigrationStore;
#[cfg(feature = "postgres")]
pub use postgres::{CleanupTask, PostgresStore};
#[cfg(feature = "redis")]
pub use redis::{LocalCopyStats, RedisStore};
#[cfg(all(fuzzing, feature = "redis"))]
pub(crate) use redis::{hash_fields, parse_record, record_fields};
pub use replay::{JournaledWrite, ReplayStore, Replayed};
pub use versioned::VersionedStore;

/// One session as a store keeps it.
///
/// Values are JSON text: stores keep them as they are and never parse them, so a store needs
/// no knowledge of the application's types.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The session's data: key → JSON text.
    pub data: BTreeMap<String, String>,
    /// The user the session is bound to, if any.
    pub user: Option<String>,
    /// When the session was created, in Unix milliseconds.
    pub created_at: u64,
    /// The absolute end of the session's life, in Unix milliseconds; no activity extends it.
    pub expires_at: u64,
    /// How long the session lives without being used; each load or save restarts this clock.
    pub inactivity_timeout: Duration,
    /// Whether the session's cookie outlives the browser session (it carries `Max-Age`), or is
    /// a browser-session cookie.
    pub persistent: bool,
}

impl Record {
    /// An empty record created now, living at most `lifetime`, expiring after `inactivity`,
    /// with a browser-session cookie.
    pub fn new(inactivity: Duration, lifetime: Duration) -> Self {
        Self::new_at(unix_millis(SystemTime::now()), inactivity, lifetime)
    }

    /// [`Record::new`], created at `now` (Unix ms).
    pub(crate) fn new_at(now: u64, inactivity: Duration, lifetime: Duration) -> Self {
        Self {
            data: BTreeMap::new(),
            user: None,
            created_at: now,
            expires_at: now.saturating_add(millis(lifetime)),
            inactivity_timeout: inactivity,
            persistent: false,
        }
    }

    /// The record's expiry settings.
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            inactivity_timeout: self.inactivity_timeout,
            expires_at: self.expires_at,
            persistent: self.persistent,
        }
    }

    /// How long the record should live from `now_ms`: the inactivity timeout, cut short by the
    /// absolute end of life. Zero means the record is already dead.
    pub fn ttl_at(&self, now_ms: u64) -> Duration {
        self.lifetime().ttl_at(now_ms)
    }

    /// Applies `patch` to the record in place.
    pub fn apply(&mut self, patch: &Patch) {
        for (key, value) in &patch.set {
            self.data.insert(key.clone(), value.clone());
        }
        for key in &patch.remove {
            self.data.remove(key);
        }
        if let Some(lifetime) = patch.lifetime {
            self.inactivity_timeout = lifetime.inactivity_timeout;
            self.expires_at = lifetime.expires_at;
            self.persistent = lifetime.persistent;
        }
    }
}

/// A session's expiry settings as stored, worked out by the layer from the
/// [`Expiry`](crate::session::Expiry) a handler chose (or the layer's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lifetime {
    /// How long the session lives without being used.
    pub inactivity_timeout: Duration,
    /// The absolute end of the session's life, in Unix milliseconds.
    pub expires_at: u64,
    /// Whether the cookie is persistent (`Max-Age`) or a browser-session cookie.
    pub persistent: bool,
}

impl Lifetime {
    /// Settings with these three values.
    pub fn new(inactivity_timeout: Duration, expires_at: u64, persistent: bool) -> Self {
        Self {
            inactivity_timeout,
            expires_at,
            persistent,
        }
    }

    /// [`Record::ttl_at`] for a record with these settings.
    pub(crate) fn ttl_at(&self, now_ms: u64) -> Duration {
        let left = self.expires_at.saturating_sub(now_ms);
        Duration::from_millis(left.min(millis(self.inactivity_timeout)))
    }
}

/// The changes one request made to a session, written field by field so that two requests
/// changing different keys of one session both keep their change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Patch {
    /// Keys to set, with their new JSON text.
    pub set: Vec<(String, String)>,
    /// Keys to remove.
    pub remove: Vec<String>,
    /// New expiry settings, if they changed.
    pub lifetime: Option<Lifetime>,
}

impl Patch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty() && self.lifetime.is_none()
    }
}

/// Whether a write found the session it was meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Written {
    /// The write was applied.
    Applied,
    /// The session no longer exists (expired, or destroyed by another request): nothing was
    /// written, and the session was not brought back.
    Missing,
}

/// One live session of a user, as listed by [`SessionStore::list_user_sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The session's key (its hash; never the id itself).
    pub key: SessionKey,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it ends at the latest.
    pub expires_at: SystemTime,
}

/// Where sessions live. Implemented by `MemoryStore`, `RedisStore`, `PostgresStore` and the
/// stores made of others (`FallbackStore`, `ChainStore`, `MigrationStore`); implement it to keep
/// sessions anywhere else.
///
/// Its methods are `async fn`s (boxed futures, through `async-trait`), unlike
/// [`RateLimitStore::check`](crate::ratelimit::RateLimitStore::check): a session operation
/// happens only when a handler touches the session and is worth a round trip anyway, while a
/// rate-limit check runs on every request, often in memory, where a boxed future would cost
/// more than the decision.
///
/// Every method is one unit of work for the store (one round trip for a networked store), and
/// each must keep these promises, which the conformance tests check for every store:
/// - `load` slides the inactivity expiry (a store may do so only when it is due, as long as
///   it says how early a session can end), and never returns an expired record.
/// - `update` and `cycle` never bring back a session that is gone: they answer
///   [`Written::Missing`] instead.
/// - `cycle` writes the new record before it removes the old one.
/// - a record's [`Lifetime`] (inactivity timeout, absolute end, cookie kind) is stored with it
///   and read back as written, so every instance applies the same expiry.
/// - records are scoped by the key's tenant; one tenant's key never finds another's record.
#[async_trait]
pub trait SessionStore: fmt::Debug + Send + Sync + 'static {
    /// Loads a session and restarts its inactivity clock. `Ok(None)` when there is no such
    /// live session (a corrupted record counts as none).
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError>;

    /// Stores a new session, and indexes it under its user if it has one.
    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError>;

    /// Applies the changed fields of an existing session and restarts its inactivity clock.
    /// Answers [`Written::Missing`] when the session is gone, or when the change ends its life
    /// (a new [`Lifetime`] already past): it is then removed.
    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError>;

    /// Moves a session to a new key: writes `record` under `new` (indexing it under its user),
    /// then removes `old` (and its entry in `old_user`'s index). If `old` is already gone, the
    /// new record is removed again and the answer is [`Written::Missing`].
    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError>;

    /// Removes a session, and its entry in `user`'s index when the user is known.
    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError>;

    /// The live sessions of one user (dropping index entries of sessions that are gone).
    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError>;

    /// Removes every session of one user; returns how many existed.
    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError>;

    /// Whether a live session is stored under `key`, ideally without restarting its
    /// inactivity clock (what a watch on a live connection asks; see
    /// [`Registry::watch_sessions`](crate::connection::Registry::watch_sessions)). The default
    /// [`load`](Self::load)s it, which does restart the clock; `RedisStore`, `MemoryStore` and
    /// `FallbackStore` look without touching.
    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        Ok(self.load(key).await?.is_some())
    }

    /// The sessions a login of `user` into `login` ends so that at most `max` of the user's
    /// sessions stay live: the oldest others by creation (ties broken by key). Called once the
    /// login is stored; the caller ends what it answers. `held` is the place
    /// [`hold_login`](Self::hold_login) took for this login, if any, given back now.
    ///
    /// `RedisStore` (and `FallbackStore` while Redis answers) decides it atomically across
    /// instances: of several logins of one user at once, each ends different sessions, and
    /// `max` stay. The default lists the user's sessions and ranks them, so concurrent logins
    /// may act on the same listing (between 1 and `max` sessions then stay).
    async fn sessions_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        let _ = held;
        let listed = self.list_user_sessions(user).await?;
        Ok(oldest_over(listed, login, max))
    }

    /// Before a login of `user` under a cap of `max` that refuses logins beyond it: whether
    /// the user has room besides the session `login` (when it is stored already).
    ///
    /// `RedisStore` (and `FallbackStore` while Redis answers) decides it atomically and holds
    /// a place for the login until it is stored (or for a minute), so of concurrent logins no
    /// more pass than there is room for. The default counts the user's listed sessions and
    /// holds nothing, so two logins at the very same moment may both pass.
    async fn hold_login(
        &self,
        user: &UserKey,
        login: Option<&SessionKey>,
        max: usize,
    ) -> Result<LoginHold, StoreError> {
        Ok(room_for(&self.list_user_sessions(user).await?, login, max))
    }
}

/// Whether `listed` sessions leave room for a login from `login` under a cap of `max`; a
/// place is held nowhere.
pub(crate) fn room_for(
    listed: &[SessionInfo],
    login: Option<&SessionKey>,
    max: usize,
) -> LoginHold {
    let others = listed
        .iter()
        .filter(|info| Some(&info.key) != login)
        .count();
    if others >= max {
        LoginHold::Refused
    } else {
        LoginHold::Admitted(None)
    }
}

/// What [`SessionStore::hold_login`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginHold {
    /// No room: the user has the most sessions allowed (counting places held for logins under
    /// way) besides this one.
    Refused,
    /// The login may go on. The store holds a place for it under this name, if it holds one,
    /// until the login is stored ([`SessionStore::sessions_over_cap`] gives it back) or for a
    /// minute at most.
    Admitted(Option<String>),
}

/// Of `sessions`, those besides `login` that a cap of `max` ends: the oldest by creation (ties
/// broken by key), as many as keep `max` with the login.
pub(crate) fn oldest_over(
    mut sessions: Vec<SessionInfo>,
    login: &SessionKey,
    max: usize,
) -> Vec<SessionKey> {
    sessions.retain(|info| info.key != *login);
    sessions.sort_by_key(|info| (info.created_at, info.key.hash()));
    let excess = (sessions.len() + 1).saturating_sub(max);
    sessions
        .into_iter()
        .take(excess)
        .map(|info| info.key)
        .collect()
}
