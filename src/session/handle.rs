use std::{
    collections::BTreeMap,
    error::Error as StdError,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    expiry::Expiry,
    id::SessionId,
    layer::Shared,
    store::{Lifetime, Patch, Record, SessionInfo, StoreError, UserKey, Written},
};
use crate::{tenant::Tenant, time::now_millis};

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
    expiry: Option<Expiry>,
}

/// What the layer must do with the client's cookie once the session is written.
#[derive(Debug)]
pub(crate) enum CookieChange {
    Keep,
    /// Hand `id` to the client: a persistent cookie living this long, or a browser-session
    /// cookie (`None`).
    Set(SessionId, Option<Duration>),
    Remove,
}

/// What the session layer wrote for a request. It is put into the response's extensions
/// whenever the layer wrote (or failed to write) something, so outer layers and tests can see
/// it; a request that changed nothing gets none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A new session was stored and its cookie set.
    Created,
    /// The request's cookie named a session that was gone by the time its changes were
    /// written (expired, unknown, or destroyed elsewhere). The changes went into a new session
    /// under a new id and cookie; nothing of the old session (data, user) was carried over, and
    /// the old id stays dead. With
    /// [`SessionLayer::with_restart_when_unavailable`](super::SessionLayer::with_restart_when_unavailable),
    /// also a session that could not be read because the store failed; the old session is
    /// then left as it is.
    Restarted,
    /// The changed fields were written to the existing session.
    Saved,
    /// The session moved to a new id ([`Session::cycle_id`], [`Session::set_user`]).
    Cycled,
    /// The session was removed and the cookie cleared.
    Destroyed,
    /// The store failed: the request's changes were not written, or its destroy did not
    /// reach the store (fail-open mode; see also
    /// [`SessionLayer::with_fail_closed_on_write`](super::SessionLayer::with_fail_closed_on_write)).
    Failed,
}

/// The result of writing a session: the cookie to send, and what happened.
#[derive(Debug)]
pub(crate) struct Committed {
    pub(crate) cookie: CookieChange,
    pub(crate) event: Option<SessionEvent>,
}

impl Committed {
    const NOTHING: Self = Self {
        cookie: CookieChange::Keep,
        event: None,
    };
    const FAILED: Self = Self {
        cookie: CookieChange::Keep,
        event: Some(SessionEvent::Failed),
    };

    fn new(cookie: CookieChange, event: SessionEvent) -> Self {
        Self {
            cookie,
            event: Some(event),
        }
    }
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

    /// Chooses how long this session lives and what kind of cookie carries it (a "remember
    /// me" checkbox, say); see [`Expiry`]. The choice is stored with the session, capped by the
    /// layer's absolute lifetime, and the cookie is sent again if its attributes change.
    ///
    /// To compare the choice with the stored one, the session is read before it is written, if
    /// nothing read it yet: one round trip more than a blind write.
    pub async fn set_expiry(&self, expiry: Expiry) {
        let mut state = self.state().await;
        if expiry.is_past() {
            state.destroyed = true;
        }
        state.expiry = Some(expiry);
    }

    /// Whether this request came without a live session: no cookie, or a cookie naming a
    /// session that is gone (expired, unknown, or destroyed elsewhere). Reads the session if
    /// nothing read it yet. A session that could not be read (the store failed, fail-open) is
    /// not new; see [`Session::is_degraded`].
    pub async fn is_new(&self) -> Result<bool, SessionError> {
        let mut state = self.state().await;
        if state.destroyed {
            return Ok(false);
        }
        self.loaded(&mut state).await?;
        Ok(matches!(state.loaded, Loaded::Missing))
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
                || state.expiry.is_some()
                || !state.changes.is_empty()
        })
    }

    /// Writes what the request changed, in as few round trips as the change allows, and says
    /// what to do with the cookie.
    pub(crate) async fn commit(&self, server_error: bool) -> Committed {
        let shared = Arc::clone(&self.inner.shared);
        let tenant = &self.inner.tenant;
        let mut state = self.inner.state.lock().await;

        if state.destroyed {
            let Some(id) = self.inner.incoming else {
                return Committed::NOTHING;
            };
            let user = match &state.loaded {
                Loaded::Found(record) => record.user.clone(),
                _ => None,
            };
            // The cookie goes either way; a failed delete is reported, since the id still
            // works in the store until it expires.
            let event = match shared.store.delete(&id.key(tenant), user.as_deref()).await {
                Ok(()) => SessionEvent::Destroyed,
                Err(error) => {
                    self.store_failed(&error, "destroy");
                    SessionEvent::Failed
                }
            };
            return Committed::new(CookieChange::Remove, event);
        }
        if server_error && !shared.save_on_server_error {
            return Committed::NOTHING;
        }
        let mut patch = Patch {
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
            lifetime: None,
        };
        let moves = state.cycle || state.user.is_some();
        if patch.is_empty() && !moves && state.expiry.is_none() {
            return Committed::NOTHING;
        }
        let Some(id) = self.inner.incoming else {
            return self.create(&state, &patch, SessionEvent::Created).await;
        };
        if (moves || state.expiry.is_some()) && matches!(state.loaded, Loaded::NotYet) {
            // Moving a session copies it whole, and a new expiry is compared with the stored
            // one: both need the record.
            if self.loaded(&mut state).await.is_err() {
                return Committed::FAILED;
            }
        }
        let old = id.key(tenant);
        let record = match &state.loaded {
            Loaded::Failed if self.may_start_over(&state, &patch) => {
                return self.start_over(&state, &patch).await;
            }
            Loaded::Failed => {
                tracing::warn!(
                    target: "tower_turnstile::session",
                    "session changes dropped: the store was unavailable when the session was read"
                );
                return Committed::FAILED;
            }
            // The cookie named no live session, and the handler saw an empty one: this is a new
            // visitor as far as the store is concerned.
            Loaded::Missing => return self.create(&state, &patch, SessionEvent::Created).await,
            Loaded::Found(record) => Some(record),
            Loaded::NotYet => None,
        };
        let stored = record.map(Record::lifetime);
        patch.lifetime = state
            .expiry
            .zip(record)
            .map(|(expiry, record)| self.resolve(expiry, record.created_at))
            .filter(|lifetime| Some(*lifetime) != stored);

        if let (Some(record), true) = (record, moves) {
            let mut moved = record.clone();
            moved.apply(&patch);
            if state.user.is_some() {
                moved.user.clone_from(&state.user);
            }
            let Some(new_id) = SessionId::random() else {
                return Committed::FAILED;
            };
            return match shared
                .store
                .cycle(&old, record.user.as_deref(), &new_id.key(tenant), &moved)
                .await
            {
                Ok(Written::Applied) => Committed::new(
                    CookieChange::Set(new_id, cookie_age(&moved.lifetime())),
                    SessionEvent::Cycled,
                ),
                Ok(Written::Missing) => self.restart(&state, &patch).await,
                Err(error) => {
                    self.store_failed(&error, "cycle");
                    Committed::FAILED
                }
            };
        }
        if patch.is_empty() {
            return Committed::NOTHING;
        }
        match shared.store.update(&old, &patch).await {
            Ok(Written::Applied) => {
                let cookie = match (patch.lifetime, stored) {
                    // The cookie's attributes follow the kind and the absolute end only.
                    (Some(new), Some(old))
                        if (new.persistent, new.expires_at) != (old.persistent, old.expires_at) =>
                    {
                        CookieChange::Set(id, cookie_age(&new))
                    }
                    _ => CookieChange::Keep,
                };
                Committed::new(cookie, SessionEvent::Saved)
            }
            Ok(Written::Missing) => self.restart(&state, &patch).await,
            Err(error) => {
                self.store_failed(&error, "save");
                if self.may_start_over(&state, &patch) {
                    return self.start_over(&state, &patch).await;
                }
                Committed::FAILED
            }
        }
    }

    /// Whether changes the store could not apply to the cookie's session may go into a new one
    /// ([`SessionLayer::with_restart_when_unavailable`](super::SessionLayer::with_restart_when_unavailable)):
    /// only changes that would store something.
    fn may_start_over(&self, state: &State, patch: &Patch) -> bool {
        self.inner.shared.restart_when_unavailable
            && (!patch.set.is_empty() || state.user.is_some())
    }

    async fn start_over(&self, state: &State, patch: &Patch) -> Committed {
        let committed = self.create(state, patch, SessionEvent::Restarted).await;
        if committed.event == Some(SessionEvent::Restarted) {
            tracing::info!(
                target: "tower_turnstile::session",
                "the session was unavailable; the request's changes started a new session"
            );
        }
        committed
    }

    /// The cookie named a session that turned out to be gone when its changes were written:
    /// they start a new session rather than being dropped. The old id stays dead, and nothing of
    /// the old session comes along.
    async fn restart(&self, state: &State, patch: &Patch) -> Committed {
        let committed = self.create(state, patch, SessionEvent::Restarted).await;
        if committed.event == Some(SessionEvent::Restarted) {
            tracing::info!(
                target: "tower_turnstile::session",
                "session gone before its changes were written; they started a new session"
            );
        }
        committed
    }

    /// The stored expiry settings for `expiry` on a session created at `created_at`.
    fn resolve(&self, expiry: Expiry, created_at: u64) -> Lifetime {
        let shared = &self.inner.shared;
        expiry.resolve(
            created_at,
            shared.inactivity_timeout,
            shared.absolute_lifetime,
        )
    }

    /// Stores a brand-new session holding the request's changes, unless it would be empty.
    async fn create(&self, state: &State, patch: &Patch, event: SessionEvent) -> Committed {
        let shared = &self.inner.shared;
        let mut record = Record::new(shared.inactivity_timeout, shared.absolute_lifetime);
        record.persistent = shared.cookie.persistent;
        record.apply(patch);
        if let Some(expiry) = state.expiry {
            record.apply(&Patch {
                lifetime: Some(self.resolve(expiry, record.created_at)),
                ..Patch::default()
            });
        }
        record.user.clone_from(&state.user);
        if record.data.is_empty() && record.user.is_none() {
            // An empty session is never stored and gets no cookie; a dead one is cleared.
            return if self.inner.incoming.is_some() {
                Committed {
                    cookie: CookieChange::Remove,
                    event: None,
                }
            } else {
                Committed::NOTHING
            };
        }
        let Some(id) = SessionId::random() else {
            tracing::error!(target: "tower_turnstile::session", "the OS random generator failed; no session created");
            return Committed::FAILED;
        };
        match shared
            .store
            .create(&id.key(&self.inner.tenant), &record)
            .await
        {
            Ok(()) => Committed::new(CookieChange::Set(id, cookie_age(&record.lifetime())), event),
            Err(error) => {
                self.store_failed(&error, "create");
                Committed::FAILED
            }
        }
    }
}

/// The `Max-Age` of a cookie for a session with these settings; `None` for a browser-session
/// cookie.
fn cookie_age(lifetime: &Lifetime) -> Option<Duration> {
    lifetime
        .persistent
        .then(|| Duration::from_millis(lifetime.expires_at.saturating_sub(now_millis())))
}

fn check_key(key: &str) -> Result<(), SessionError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(SessionError::InvalidKey);
    }
    Ok(())
}
