use std::{
    collections::BTreeMap,
    error::Error as StdError,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    id::SessionId,
    layer::Shared,
    store::{Patch, Record, SessionInfo, StoreError, UserKey, Written, unix_millis},
};
use crate::tenant::Tenant;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The longest session key accepted.
const MAX_KEY_LEN: usize = 256;
/// The longest user id accepted.
const MAX_USER_LEN: usize = 1024;

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A value could not be turned into JSON.
    #[error("session value for key {key:?} could not be serialized")]
    Serialize {
        /// The session key.
        key: String,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// A stored value does not deserialize into the type asked for.
    #[error("session value for key {key:?} does not deserialize into the requested type")]
    Deserialize {
        /// The session key.
        key: String,
        /// The deserializer's error.
        #[source]
        source: BoxError,
    },
    /// The session key is empty or longer than 256 bytes.
    #[error("session keys must be 1 to 256 bytes long")]
    InvalidKey,
    /// The user id is empty or longer than 1024 bytes.
    #[error("user ids must be 1 to 1024 bytes long")]
    InvalidUser,
    /// The store failed. Session reads and writes report this only when the layer is
    /// fail-closed (otherwise they degrade to an empty session); the user-level operations
    /// ([`Session::user_sessions`], [`Session::destroy_user_sessions`]) always report it.
    #[error("session store failed")]
    Store(#[from] StoreError),
}

/// The session of the current request. The session layer puts one in every request's
/// extensions; in axum, take it as an extractor.
///
/// Cheap to clone (clones share the same state). Nothing is read from the store until a method
/// needs it, and only what changed is written back, once, after the handler returns: a request
/// that does not touch the session costs no store round trip at all.
///
/// ```
/// use tower_turnstile::session::Session;
///
/// async fn visit(session: Session) -> Result<String, tower_turnstile::session::SessionError> {
///     let visits: u64 = session.get("visits").await?.unwrap_or(0) + 1;
///     session.insert("visits", visits).await?;
///     Ok(format!("visit number {visits}"))
/// }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tenant: Tenant,
    incoming: Option<SessionId>,
    touched: AtomicBool,
    failed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
enum Loaded {
    #[default]
    NotYet,
    Missing,
    Found(Record),
    Failed,
}

#[derive(Debug, Default)]
struct State {
    loaded: Loaded,
    /// Key → new JSON text, or `None` for a removal.
    changes: BTreeMap<String, Option<String>>,
    /// The user `set_user` bound the session to.
    user: Option<String>,
    cycle: bool,
    destroyed: bool,
    inactivity_timeout: Option<Duration>,
}

/// What the layer must do with the client's cookie once the session is written.
#[derive(Debug)]
pub(crate) enum CookieChange {
    Keep,
    Set(SessionId, Duration),
    Remove,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("tenant", &self.inner.tenant)
            .field("has_cookie", &self.inner.incoming.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, tenant: Tenant, incoming: Option<SessionId>) -> Self {
        Self {
            inner: Arc::new(Inner {
                shared,
                tenant,
                incoming,
                touched: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The tenant the session belongs to.
    pub fn tenant(&self) -> &Tenant {
        &self.inner.tenant
    }

    /// The value stored under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let mut state = self.state().await;
        if state.destroyed {
            return Ok(None);
        }
        let text = match state.changes.get(key) {
            Some(change) => change.clone(),
            None => self
                .loaded(&mut state)
                .await?
                .and_then(|r| r.data.get(key).cloned()),
        };
        text.map(|text| {
            serde_json::from_str(&text).map_err(|e| SessionError::Deserialize {
                key: key.to_owned(),
                source: Box::new(e),
            })
        })
        .transpose()
    }

    /// Stores `value` under `key`. Does not read the session: a handler that only writes costs
    /// one round trip in all.
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        check_key(key)?;
        let text = serde_json::to_string(&value).map_err(|e| SessionError::Serialize {
            key: key.to_owned(),
            source: Box::new(e),
        })?;
        self.state()
            .await
            .changes
            .insert(key.to_owned(), Some(text));
        Ok(())
    }

    /// Removes `key` from the session. Does not read the session.
    pub async fn remove(&self, key: &str) -> Result<(), SessionError> {
        check_key(key)?;
        self.state().await.changes.insert(key.to_owned(), None);
        Ok(())
    }

    /// The user this session is bound to, if any.
    pub async fn user_id(&self) -> Result<Option<String>, SessionError> {
        let mut state = self.state().await;
        if state.destroyed {
            return Ok(None);
        }
        if let Some(user) = &state.user {
            return Ok(Some(user.clone()));
        }
        Ok(self.loaded(&mut state).await?.and_then(|r| r.user.clone()))
    }

    /// Binds the session to `user` (as after a login): it joins the user's index, so it can be
    /// listed and revoked, and its id changes (the old id stops working) against session
    /// fixation. The session's data is kept.
    pub async fn set_user(&self, user: impl Into<String>) -> Result<(), SessionError> {
        let user = user.into();
        if user.is_empty() || user.len() > MAX_USER_LEN {
            return Err(SessionError::InvalidUser);
        }
        let mut state = self.state().await;
        state.user = Some(user);
        state.cycle = true;
        Ok(())
    }

    /// Gives the session a new id, keeping its data; the old id stops working. The new record
    /// is written before the old one is removed, so no request ever finds the session missing.
    pub async fn cycle_id(&self) {
        self.state().await.cycle = true;
    }

    /// Ends the session: it is removed from the store and the cookie is cleared. Changes made
    /// in the same request are dropped.
    pub async fn destroy(&self) {
        self.state().await.destroyed = true;
    }

    /// Changes how long this session may stay unused (for a "remember me" session, say).
    pub async fn set_inactivity_timeout(&self, timeout: Duration) {
        self.state().await.inactivity_timeout = Some(timeout);
    }

    /// The live sessions of this session's user, on every instance; empty when no user is set.
    pub async fn user_sessions(&self) -> Result<Vec<SessionInfo>, SessionError> {
        let Some(user) = self.user_id().await? else {
            return Ok(Vec::new());
        };
        let key = UserKey::new(&self.inner.tenant, user);
        Ok(self.inner.shared.store.list_user_sessions(&key).await?)
    }

    /// Ends every session of this session's user, on every instance, this one included ("log
    /// out everywhere"). Returns how many sessions were ended; 0 when no user is set.
    pub async fn destroy_user_sessions(&self) -> Result<usize, SessionError> {
        let Some(user) = self.user_id().await? else {
            return Ok(0);
        };
        let key = UserKey::new(&self.inner.tenant, user);
        let ended = self.inner.shared.store.delete_user_sessions(&key).await?;
        self.destroy().await;
        Ok(ended)
    }

    async fn state(&self) -> MutexGuard<'_, State> {
        self.inner.touched.store(true, Ordering::Relaxed);
        self.inner.state.lock().await
    }

    /// The stored record, loading it on first use. On a store failure the session reads as
    /// empty (or, fail-closed, the error is returned).
    async fn loaded<'a>(&self, state: &'a mut State) -> Result<Option<&'a Record>, SessionError> {
        if let Loaded::NotYet = state.loaded {
            state.loaded = match self.inner.incoming {
                None => Loaded::Missing,
                Some(id) => match self
                    .inner
                    .shared
                    .store
                    .load(&id.key(&self.inner.tenant))
                    .await
                {
                    Ok(Some(record)) => Loaded::Found(record),
                    Ok(None) => Loaded::Missing,
                    Err(error) => {
                        self.store_failed(&error, "load");
                        if self.inner.shared.fail_closed {
                            return Err(SessionError::Store(error));
                        }
                        Loaded::Failed
                    }
                },
            };
        }
        match &state.loaded {
            Loaded::Found(record) => Ok(Some(record)),
            Loaded::Failed if self.inner.shared.fail_closed => {
                Err(SessionError::Store(StoreError::Unavailable {
                    source: "an earlier load failed".into(),
                }))
            }
            _ => Ok(None),
        }
    }

    fn store_failed(&self, error: &StoreError, operation: &'static str) {
        self.inner.failed.store(true, Ordering::Relaxed);
        tracing::warn!(
            target: "tower_turnstile::session",
            operation,
            error = %error,
            source = error.source().map(ToString::to_string),
            "session store failed; the request goes on without it"
        );
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Whether the store failed during this request, so that the session reads as empty and
    /// its changes may not be saved (fail-open mode). Lets a handler tell "no session" from
    /// "session unavailable", for example to answer `503` where an empty session would mislead.
    pub fn is_degraded(&self) -> bool {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Whether the request may have changed the session, so that a commit is needed. A
    /// session that was only read needs none, and its response can go out at once.
    pub(crate) fn needs_commit(&self) -> bool {
        if !self.inner.touched.load(Ordering::Relaxed) {
            return false;
        }
        // Nobody else holds the lock once the inner service has answered, unless the handler
        // leaked a clone into a task that is still running: then commit to be safe.
        self.inner.state.try_lock().map_or(true, |state| {
            state.destroyed
                || state.cycle
                || state.user.is_some()
                || state.inactivity_timeout.is_some()
                || !state.changes.is_empty()
        })
    }

    /// Writes what the request changed, in as few round trips as the change allows, and says
    /// what to do with the cookie.
    pub(crate) async fn commit(&self, server_error: bool) -> CookieChange {
        let shared = Arc::clone(&self.inner.shared);
        let tenant = &self.inner.tenant;
        let mut state = self.inner.state.lock().await;

        if state.destroyed {
            let Some(id) = self.inner.incoming else {
                return CookieChange::Keep;
            };
            let user = match &state.loaded {
                Loaded::Found(record) => record.user.clone(),
                _ => None,
            };
            if let Err(error) = shared.store.delete(&id.key(tenant), user.as_deref()).await {
                self.store_failed(&error, "destroy");
            }
            return CookieChange::Remove;
        }
        if server_error && !shared.save_on_server_error {
            return CookieChange::Keep;
        }
        let patch = Patch {
            set: state
                .changes
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect(),
            remove: state
                .changes
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k.clone())
                .collect(),
            inactivity_timeout: state.inactivity_timeout,
        };
        let moves = state.cycle || state.user.is_some();
        if patch.is_empty() && !moves {
            return CookieChange::Keep;
        }
        let Some(id) = self.inner.incoming else {
            return self.create(&state, &patch).await;
        };
        if moves && matches!(state.loaded, Loaded::NotYet) {
            // Moving a session copies it whole, so it must be read first.
            if self.loaded(&mut state).await.is_err() {
                return CookieChange::Keep;
            }
        }
        let old = id.key(tenant);
        match &state.loaded {
            Loaded::Failed => {
                tracing::warn!(
                    target: "tower_turnstile::session",
                    "session changes dropped: the store was unavailable when the session was read"
                );
                CookieChange::Keep
            }
            // The cookie named no live session, and the handler saw an empty one: this is a new
            // visitor as far as the store is concerned.
            Loaded::Missing => self.create(&state, &patch).await,
            Loaded::Found(record) if moves => {
                let mut moved = record.clone();
                moved.apply(&patch);
                if state.user.is_some() {
                    moved.user.clone_from(&state.user);
                }
                let Some(new_id) = SessionId::random() else {
                    return CookieChange::Keep;
                };
                match shared
                    .store
                    .cycle(&old, record.user.as_deref(), &new_id.key(tenant), &moved)
                    .await
                {
                    Ok(Written::Applied) => CookieChange::Set(new_id, time_left(&moved)),
                    Ok(Written::Missing) => CookieChange::Remove,
                    Err(error) => {
                        self.store_failed(&error, "cycle");
                        CookieChange::Keep
                    }
                }
            }
            Loaded::Found(_) | Loaded::NotYet => match shared.store.update(&old, &patch).await {
                Ok(Written::Applied) => CookieChange::Keep,
                Ok(Written::Missing) => {
                    tracing::debug!(
                        target: "tower_turnstile::session",
                        "session gone before its changes were written; changes dropped"
                    );
                    CookieChange::Remove
                }
                Err(error) => {
                    self.store_failed(&error, "save");
                    CookieChange::Keep
                }
            },
        }
    }

    /// Stores a brand-new session holding the request's changes, unless it would be empty.
    async fn create(&self, state: &State, patch: &Patch) -> CookieChange {
        let shared = &self.inner.shared;
        let mut record = Record::new(
            state
                .inactivity_timeout
                .unwrap_or(shared.inactivity_timeout),
            shared.absolute_lifetime,
        );
        record.apply(patch);
        record.user.clone_from(&state.user);
        if record.data.is_empty() && record.user.is_none() {
            // An empty session is never stored and gets no cookie; a dead one is cleared.
            return if self.inner.incoming.is_some() {
                CookieChange::Remove
            } else {
                CookieChange::Keep
            };
        }
        let Some(id) = SessionId::random() else {
            tracing::error!(target: "tower_turnstile::session", "the OS random generator failed; no session created");
            return CookieChange::Keep;
        };
        match shared
            .store
            .create(&id.key(&self.inner.tenant), &record)
            .await
        {
            Ok(()) => CookieChange::Set(id, time_left(&record)),
            Err(error) => {
                self.store_failed(&error, "create");
                CookieChange::Keep
            }
        }
    }
}

fn time_left(record: &Record) -> Duration {
    Duration::from_millis(
        record
            .expires_at
            .saturating_sub(unix_millis(SystemTime::now())),
    )
}

fn check_key(key: &str) -> Result<(), SessionError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(SessionError::InvalidKey);
    }
    Ok(())
}
