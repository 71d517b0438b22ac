use std::{
    error::Error as StdError,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    commit::{Changes, Loaded},
    expiry::Expiry,
    id::SessionId,
    layer::Shared,
    store::{Record, SessionInfo, StoreError, UserKey},
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
    /// The user already has the most live sessions allowed, and the layer refuses logins over
    /// it ([`OverCap::RefuseLogin`](super::OverCap::RefuseLogin)).
    #[error("at most {limit} sessions per user")]
    TooManySessions {
        /// The cap.
        limit: usize,
    },
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
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) shared: Arc<Shared>,
    pub(super) tenant: Tenant,
    /// The id the request came with, if it was valid.
    pub(super) incoming: Option<SessionId>,
    /// The incoming id's key in the store, hashed once per request when first needed.
    key: std::sync::OnceLock<super::SessionKey>,
    /// Whether a handler called any method: a session nobody touched needs no commit.
    touched: AtomicBool,
    /// Whether the store failed during the request (see `Session::is_degraded`).
    failed: AtomicBool,
    /// Behind an async lock: a load holds it across the store's round trip.
    pub(super) state: Mutex<State>,
    /// The place the store holds for a login under a refusing cap, until the login is stored
    /// (see `cap.rs`).
    pub(super) held: std::sync::Mutex<Option<String>>,
}

/// What a request did to its session, and what it knows of the stored one.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) loaded: Loaded,
    pub(super) changes: Changes,
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
    /// [`FailurePolicy::with_restart_when_unavailable`](super::FailurePolicy::with_restart_when_unavailable),
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
    /// [`FailurePolicy::fail_closed_on_write`](super::FailurePolicy::fail_closed_on_write)).
    Failed,
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
                key: std::sync::OnceLock::new(),
                touched: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                held: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The tenant the session belongs to.
    pub fn tenant(&self) -> &Tenant {
        &self.inner.tenant
    }

    /// Where the session the request came with lives in the store (its tenant and the hash of
    /// its id; never the id), when its cookie held a well-formed id: what a live connection is
    /// registered under ([`Registry::register_for_session`](crate::connection::Registry::register_for_session)).
    /// `None` without a cookie; the cookie's session may still be gone (see
    /// [`Session::user_id`]).
    pub fn key(&self) -> Option<super::SessionKey> {
        let id = self.inner.incoming?;
        Some(
            self.inner
                .key
                .get_or_init(|| id.key(&self.inner.tenant))
                .clone(),
        )
    }

    /// The value stored under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let mut state = self.state().await;
        if state.changes.destroyed {
            return Ok(None);
        }
        // Read in place, under the lock: the text is not copied out first.
        let text = match state.changes.fields.get(key) {
            Some(change) => change.as_deref(),
            None => self
                .loaded(&mut state)
                .await?
                .and_then(|r| r.data.get(key))
                .map(String::as_str),
        };
        text.map(|text| {
            serde_json::from_str(text).map_err(|e| SessionError::Deserialize {
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
            .fields
            .insert(key.to_owned(), Some(text));
        Ok(())
    }

    /// Removes `key` from the session. Does not read the session.
    pub async fn remove(&self, key: &str) -> Result<(), SessionError> {
        check_key(key)?;
        self.state()
            .await
            .changes
            .fields
            .insert(key.to_owned(), None);
        Ok(())
    }

    /// The user this session is bound to, if any.
    pub async fn user_id(&self) -> Result<Option<String>, SessionError> {
        let mut state = self.state().await;
        if state.changes.destroyed {
            return Ok(None);
        }
        if let Some(user) = &state.changes.user {
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
        self.admit_login(&user).await?;
        let mut state = self.state().await;
        state.changes.user = Some(user);
        state.changes.cycle = true;
        Ok(())
    }

    /// Gives the session a new id, keeping its data; the old id stops working. The new record
    /// is written before the old one is removed, so no request ever finds the session missing.
    pub async fn cycle_id(&self) {
        self.state().await.changes.cycle = true;
    }

    /// Ends the session: it is removed from the store and the cookie is cleared. Changes made
    /// in the same request are dropped.
    pub async fn destroy(&self) {
        self.state().await.changes.destroyed = true;
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
            state.changes.destroyed = true;
        }
        state.changes.expiry = Some(expiry);
    }

    /// Whether this request came without a live session: no cookie, or a cookie naming a
    /// session that is gone (expired, unknown, or destroyed elsewhere). Reads the session if
    /// nothing read it yet. A session that could not be read (the store failed, fail-open) is
    /// not new; see [`Session::is_degraded`].
    pub async fn is_new(&self) -> Result<bool, SessionError> {
        let mut state = self.state().await;
        if state.changes.destroyed {
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
        let key = UserKey::new(&self.inner.tenant, &user);
        let shared = &self.inner.shared;
        shared.unschedule_user(&key).await;
        let ended = shared.store.delete_user_sessions(&key).await?;
        let revoked = super::LifecycleKind::Revoked;
        shared
            .lifecycle(revoked, &self.inner.tenant, Some(&user), None)
            .await;
        self.destroy().await;
        Ok(ended)
    }

    async fn state(&self) -> MutexGuard<'_, State> {
        self.inner.touched.store(true, Ordering::Relaxed);
        self.inner.state.lock().await
    }

    /// The stored record, loading it on first use. On a store failure the session reads as
    /// empty (or, fail-closed, the error is returned).
    pub(super) async fn loaded<'a>(
        &self,
        state: &'a mut State,
    ) -> Result<Option<&'a Record>, SessionError> {
        if let Loaded::NotYet = state.loaded {
            state.loaded = match self.key() {
                None => Loaded::Missing,
                Some(key) => match self.inner.shared.store.load(&key).await {
                    Ok(Some(record)) => Loaded::Found(record),
                    Ok(None) => Loaded::Missing,
                    Err(error) => {
                        self.store_failed(&error, "load");
                        if self.inner.shared.failure.refuses_any_failure() {
                            return Err(SessionError::Store(error));
                        }
                        Loaded::Failed
                    }
                },
            };
        }
        match &state.loaded {
            Loaded::Found(record) => Ok(Some(record)),
            Loaded::Failed if self.inner.shared.failure.refuses_any_failure() => {
                Err(SessionError::Store(StoreError::Unavailable {
                    source: "an earlier load failed".into(),
                }))
            }
            _ => Ok(None),
        }
    }

    pub(super) fn store_failed(&self, error: &StoreError, operation: &'static str) {
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
        self.inner
            .state
            .try_lock()
            .map_or(true, |state| state.changes.any())
    }
}

fn check_key(key: &str) -> Result<(), SessionError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(SessionError::InvalidKey);
    }
    Ok(())
}
