//! [`TowerSessionsStore`]: any of the crate's session stores behind tower-sessions' store trait,
//! so that an application built on tower-sessions (or axum-login, which builds on it) keeps its
//! handlers and gains Cluster, Sentinel, the outage fallback and the PostgreSQL chain.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use moka::sync::Cache;
use serde_json::Value;
use time::OffsetDateTime;

use super::{
    id::SessionId,
    store::{Lifetime, Patch, Record, SessionKey, SessionStore, Written},
};
use crate::{
    StoreError,
    tenant::Tenant,
    time::{millis, unix_millis},
};

/// A session's values as tower-sessions keeps them.
type TsData = HashMap<String, Value>;

/// The data of a session as this instance last read it: what a save is compared with.
type Seen = Arc<BTreeMap<String, String>>;

/// How long what a load read is kept for the save that follows it in the same request.
const SEEN_IDLE: Duration = Duration::from_secs(300);

/// How many fresh ids `create` draws before it gives up (each clash has odds of 2⁻¹²⁸).
const CREATE_ATTEMPTS: usize = 4;

/// One of the crate's session stores, offered to tower-sessions 0.14 (and axum-login 0.18) as
/// their [`SessionStore`](tower_sessions_core::SessionStore).
///
/// Replace the store handed to `SessionManagerLayer::new` and keep every handler: the session
/// then lives in a [`RedisStore`](super::RedisStore) (single node, Cluster or Sentinel, on
/// redis-rs), a [`FallbackStore`](super::FallbackStore) that keeps serving through a Redis
/// outage and replays what it kept, a [`PostgresStore`](super::PostgresStore), or a
/// [`ChainStore`](super::ChainStore).
///
#[cfg_attr(all(feature = "memory", feature = "tower-sessions"), doc = "```")]
#[cfg_attr(
    not(all(feature = "memory", feature = "tower-sessions")),
    doc = "```ignore"
)]
/// use tower_sessions::SessionManagerLayer;
/// use tower_turnstile::session::{MemoryStore, TowerSessionsStore};
///
/// let store = TowerSessionsStore::new(MemoryStore::builder().build());
/// let layer = SessionManagerLayer::new(store);
/// # let _ = layer;
/// ```
///
/// What maps, and how:
/// - **Ids.** tower-sessions' id is 128 random bits, like the crate's own; the store keeps
///   only its SHA-256 hash, as [`SessionLayer`](super::SessionLayer) does. Any id that is not
///   a live session (garbage, forged, expired) loads as no session, never as an error.
/// - **Tenant.** Every session lives in one tenant: the default, or the one given to
///   [`TowerSessionsStore::with_tenant`].
/// - **Values** are kept as JSON text, the form the crate's own [`Session`](super::Session)
///   reads, so an application can move handlers from one to the other one at a time.
/// - **Saves are field by field.** tower-sessions hands the store the whole record; the adapter
///   compares it with what this instance read of the session and writes only the keys that
///   changed (and removes the keys that went). Two requests on two instances that change
///   different keys of one session both keep their change, where a whole-record store keeps
///   only the last. Two overlapping requests on *one* instance are compared with the latest
///   read: a key one of them did not change may then be written back with the value it read.
///   When nothing read is at hand (after [`TowerSessionsStore::with_read_capacity`] entries
///   were passed), the save reads the session first, one more round trip.
/// - **Expiry.** The record's `expiry_date` is kept as the session's absolute end and as its
///   inactivity timeout from the save, so it ends when tower-sessions said, on every instance.
/// - **`create`** never overwrites a session: it draws a fresh id while the one it was given
///   names a live session (a look before the write; two creates racing on one id would need
///   two 128-bit draws to meet). While a [`FallbackStore`](super::FallbackStore) cannot reach
///   Redis, the look cannot tell; the create is journaled, and its replay fills in a session
///   only where Redis has none.
/// - **`save` never brings a session back**: a session that ended meanwhile (a logout on
///   another instance, say) stays ended, and the next request starts a new one.
/// - **`cycle_id`** (axum-login's login) deletes the old id in the store, so no instance serves
///   it again, then creates the new one.
///
/// What does not map: the user index. tower-sessions has no notion of the session's user, so
/// sessions written through the adapter are not listed by
/// [`SessionStore::list_user_sessions`] and are not ended by "log out everywhere".
#[derive(Clone)]
pub struct TowerSessionsStore<S> {
    store: S,
    tenant: Tenant,
    seen: Cache<SessionKey, Seen>,
}

impl<S: SessionStore> TowerSessionsStore<S> {
    /// Serves `store` to tower-sessions, in the default tenant.
    pub fn new(store: S) -> Self {
        Self {
            store,
            tenant: Tenant::default_tenant().clone(),
            seen: seen_cache(10_000),
        }
    }

    /// Keeps every session in `tenant` instead of the default one.
    ///
    #[cfg_attr(feature = "memory", doc = "```")]
    #[cfg_attr(not(feature = "memory"), doc = "```ignore")]
    /// use tower_turnstile::{session::{MemoryStore, TowerSessionsStore}, tenant::Tenant};
    ///
    /// let tenant = Tenant::new("acme").expect("a valid tenant name");
    /// let store = TowerSessionsStore::new(MemoryStore::builder().build()).with_tenant(tenant);
    /// # let _ = store;
    /// ```
    #[must_use]
    pub fn with_tenant(mut self, tenant: Tenant) -> Self {
        self.tenant = tenant;
        self
    }

    /// How many sessions' last read data is kept for the field-by-field comparison of their
    /// next save. Default: 10 000; each entry is kept at most five minutes without use. A save
    /// without its entry reads the session first.
    #[must_use]
    pub fn with_read_capacity(mut self, sessions: u64) -> Self {
        self.seen = seen_cache(sessions);
        self
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.store
    }

    fn key(&self, id: i128) -> SessionKey {
        SessionId::from_bytes(id.to_le_bytes()).key(&self.tenant)
    }

    /// The changes that turn the session, as last read, into `data` ending at `expiry`.
    async fn patch_for(
        &self,
        key: &SessionKey,
        data: &TsData,
        expiry: OffsetDateTime,
    ) -> Result<Patch, Fault> {
        let before = match self.seen.get(key) {
            Some(seen) => seen,
            None => match self.store.load(key).await? {
                Some(stored) => Arc::new(stored.data),
                None => Arc::default(),
            },
        };
        let data = encode_data(data)?;
        let mut patch = Patch {
            lifetime: Some(lifetime_of(expiry)),
            ..Patch::default()
        };
        for (field, text) in &data {
            if before.get(field) != Some(text) {
                patch.set.push((field.clone(), text.clone()));
            }
        }
        for field in before.keys() {
            if !data.contains_key(field) {
                patch.remove.push(field.clone());
            }
        }
        Ok(patch)
    }
}

fn seen_cache(capacity: u64) -> Cache<SessionKey, Seen> {
    Cache::builder()
        .max_capacity(capacity)
        .time_to_idle(SEEN_IDLE)
        .build()
}

impl<S: fmt::Debug> fmt::Debug for TowerSessionsStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TowerSessionsStore")
            .field("store", &self.store)
            .field("tenant", &self.tenant)
            .field("read_sessions", &self.seen.entry_count())
            .finish()
    }
}

impl<S: SessionStore> TowerSessionsStore<S> {
    /// Stores a new session under `id`, or under a fresh id when `id` names a live one.
    async fn create_session(
        &self,
        id: &mut i128,
        data: &TsData,
        expiry: OffsetDateTime,
    ) -> Result<(), Fault> {
        let mut attempts = 0;
        let key = loop {
            let key = self.key(*id);
            // A look, not a load: nothing is parsed, no clock restarted.
            match self.store.exists(&key).await {
                Ok(false) => break key,
                Ok(true) => {}
                // A fallback store that cannot ask Redis now: the write is journaled, and its
                // replay writes a session only where none exists.
                Err(err) if err.is_outage() => break key,
                Err(err) => return Err(err.into()),
            }
            attempts += 1;
            if attempts == CREATE_ATTEMPTS {
                return Err(Fault::Backend("no free session id was drawn".into()));
            }
            *id = fresh_id()?;
        };
        let data = encode_data(data)?;
        let mut stored = Record::new(Duration::ZERO, Duration::ZERO);
        stored.apply(&Patch {
            lifetime: Some(lifetime_of(expiry)),
            ..Patch::default()
        });
        stored.data = data.clone();
        self.store.create(&key, &stored).await?;
        self.seen.insert(key, Arc::new(data));
        Ok(())
    }

    /// Writes what changed of a session since this instance read it.
    async fn save_session(
        &self,
        id: i128,
        data: &TsData,
        expiry: OffsetDateTime,
    ) -> Result<(), Fault> {
        let key = self.key(id);
        let patch = self.patch_for(&key, data, expiry).await?;
        match self.store.update(&key, &patch).await? {
            Written::Applied => {}
            // Ended meanwhile (on any instance): it stays ended.
            Written::Missing => self.seen.invalidate(&key),
        }
        Ok(())
    }

    /// A session's values and expiry date, remembering what was read for the next save.
    async fn load_session(&self, id: i128) -> Result<Option<(TsData, OffsetDateTime)>, Fault> {
        let key = self.key(id);
        let Some(stored) = self.store.load(&key).await? else {
            self.seen.invalidate(&key);
            return Ok(None);
        };
        let Some(session) = decode(&stored) else {
            // Values that are not JSON were not written by tower-sessions: no session.
            tracing::warn!(session = %key.hash(), "a session value is not JSON; read as none");
            return Ok(None);
        };
        self.seen.insert(key, Arc::new(stored.data));
        Ok(Some(session))
    }

    async fn delete_session(&self, id: i128) -> Result<(), Fault> {
        let key = self.key(id);
        self.seen.invalidate(&key);
        Ok(self.store.delete(&key, None).await?)
    }
}

/// Implements one version of tower-sessions' store trait over the methods above (the 0.14 and
/// 0.15 traits have the same shape, on types of their own).
macro_rules! store_trait {
    ($core:ident) => {
        #[async_trait]
        impl<S: SessionStore> $core::session_store::SessionStore for TowerSessionsStore<S> {
            async fn create(
                &self,
                record: &mut $core::session::Record,
            ) -> $core::session_store::Result<()> {
                let mut id = record.id.0;
                let created = self.create_session(&mut id, &record.data, record.expiry_date);
                created.await?;
                record.id = $core::session::Id(id);
                Ok(())
            }

            async fn save(
                &self,
                record: &$core::session::Record,
            ) -> $core::session_store::Result<()> {
                let saved = self.save_session(record.id.0, &record.data, record.expiry_date);
                Ok(saved.await?)
            }

            async fn load(
                &self,
                id: &$core::session::Id,
            ) -> $core::session_store::Result<Option<$core::session::Record>> {
                let loaded = self.load_session(id.0).await?;
                Ok(loaded.map(|(data, expiry_date)| $core::session::Record {
                    id: *id,
                    data,
                    expiry_date,
                }))
            }

            async fn delete(&self, id: &$core::session::Id) -> $core::session_store::Result<()> {
                Ok(self.delete_session(id.0).await?)
            }
        }

        impl From<Fault> for $core::session_store::Error {
            fn from(fault: Fault) -> Self {
                match fault {
                    Fault::Encode(text) => Self::Encode(text),
                    Fault::Backend(text) => Self::Backend(text),
                }
            }
        }
    };
}

#[cfg(feature = "tower-sessions")]
store_trait!(tower_sessions_core);
#[cfg(feature = "tower-sessions-015")]
store_trait!(tower_sessions_core_015);

/// Why a call failed, before it is told in the terms of one tower-sessions version.
#[derive(Debug)]
enum Fault {
    Encode(String),
    Backend(String),
}

/// A store failure with its chain of causes.
impl From<StoreError> for Fault {
    fn from(err: StoreError) -> Self {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Backend(text)
    }
}

fn fresh_id() -> Result<i128, Fault> {
    let id = SessionId::random()
        .ok_or_else(|| Fault::Backend("the system's random source failed".into()))?;
    Ok(i128::from_le_bytes(id.bytes()))
}

/// The values as JSON text.
fn encode_data(data: &TsData) -> Result<BTreeMap<String, String>, Fault> {
    data.iter()
        .map(|(field, value)| {
            let text = serde_json::to_string(value).map_err(|e| Fault::Encode(e.to_string()))?;
            Ok((field.clone(), text))
        })
        .collect()
}

/// tower-sessions' expiry date as the session's absolute end, and as its inactivity timeout
/// from now: the store's sliding never carries it past that date.
fn lifetime_of(expiry: OffsetDateTime) -> Lifetime {
    let end = u64::try_from(expiry.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let now = unix_millis(SystemTime::now());
    Lifetime::new(Duration::from_millis(end.saturating_sub(now)), end, true)
}

/// A stored session's values and expiry date, or `None` if a value is not JSON.
fn decode(stored: &Record) -> Option<(TsData, OffsetDateTime)> {
    let mut data = HashMap::with_capacity(stored.data.len());
    for (field, text) in &stored.data {
        data.insert(field.clone(), serde_json::from_str::<Value>(text).ok()?);
    }
    let idle_end = unix_millis(SystemTime::now()).saturating_add(millis(stored.inactivity_timeout));
    let end = stored.expires_at.min(idle_end);
    let expiry = OffsetDateTime::from_unix_timestamp_nanos(i128::from(end) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Some((data, expiry))
}
