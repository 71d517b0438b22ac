use std::{fmt, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tower_layer::Layer;

use super::{
    Expiry, FailurePolicy,
    cap::{Cap, OverCap},
    ended::{Announcing, SessionEndListener},
    events::{LifecycleKind, SessionEvents},
    service::SessionService,
    store::{Lifetime, SessionInfo, SessionKey, SessionStore, StoreError, UserKey},
    transport::{
        CookieConfig, SameSite, SigningKey, header_name, validate_attribute, validate_name,
    },
};
use crate::{ConfigError, tenant::Tenant};

/// Configuration shared by a [`SessionLayer`], its services and their sessions.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) cookie: CookieConfig,
    pub(crate) inactivity_timeout: Duration,
    pub(crate) absolute_lifetime: Duration,
    pub(crate) failure: FailurePolicy,
    pub(crate) cap: Option<Cap>,
    pub(crate) events: Option<SessionEvents>,
    /// Whether ended sessions are announced ([`SessionLayer::on_session_end`]).
    pub(crate) announces: bool,
}

impl Shared {
    /// Indexes a logged-in session's possible end for the sweep of expiries, when the layer
    /// keeps lifecycle events.
    pub(crate) fn schedule_end<'a>(
        &'a self,
        tenant: &'a Tenant,
        key: &'a SessionKey,
        record: &'a crate::session::store::Record,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (Some(events), Some(user)) = (&self.events, &record.user) else {
                return;
            };
            let now = crate::time::now_millis();
            let end = now.saturating_add(crate::time::millis(record.ttl_at(now)));
            let idle = record.inactivity_timeout;
            events.schedule(tenant, user, &key.hash(), idle, end).await;
        })
    }

    /// Takes sessions that end some other way out of the index of ends.
    pub(crate) fn unschedule_ends<'a>(
        &'a self,
        tenant: &'a Tenant,
        keys: &'a [SessionKey],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(events) = &self.events {
                let hashes: Vec<String> = keys.iter().map(SessionKey::hash).collect();
                events.unschedule(tenant, &hashes).await;
            }
        })
    }

    /// Before "log out everywhere": takes the user's sessions out of the index of ends (one
    /// listing, only when the layer keeps lifecycle events).
    pub(crate) async fn unschedule_user(&self, user: &UserKey) {
        if self.events.is_none() {
            return;
        }
        if let Ok(listed) = self.store.list_user_sessions(user).await {
            let keys: Vec<SessionKey> = listed.into_iter().map(|info| info.key).collect();
            self.unschedule_ends(user.tenant(), &keys).await;
        }
    }

    /// Writes a lifecycle event, when the layer keeps them. Boxed: it sits deep inside the
    /// commit's future, which would otherwise grow past the compiler's layout depth.
    pub(crate) fn lifecycle<'a>(
        &'a self,
        kind: LifecycleKind,
        tenant: &'a Tenant,
        user: Option<&'a str>,
        session: Option<&'a SessionKey>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(events) = &self.events {
                let hash = session.map(SessionKey::hash).unwrap_or_default();
                events.record(kind, tenant, user, &hash).await;
            }
        })
    }

    /// The stored expiry settings for `expiry` on a session created at `created_at` (Unix ms).
    pub(crate) fn resolve(&self, expiry: Expiry, created_at: u64) -> Lifetime {
        expiry.resolve(created_at, self.inactivity_timeout, self.absolute_lifetime)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("store", &self.store)
            .field("cookie", &self.cookie)
            .field("inactivity_timeout", &self.inactivity_timeout)
            .field("absolute_lifetime", &self.absolute_lifetime)
            .field("failure", &self.failure)
            .field("cap", &self.cap)
            .field("events", &self.events)
            .field("announces", &self.announces)
            .finish()
    }
}

/// Adds a lazily loaded [`Session`](super::Session) to every request and writes back what
/// changed after the response.
///
/// # Defaults
///
/// Chosen against the OWASP Session Management Cheat Sheet; each has a setter.
///
/// | setting | default | why |
/// | --- | --- | --- |
/// | cookie name | `id` | a generic name does not reveal the framework behind the site |
/// | `HttpOnly` | on | scripts (and so XSS) cannot read the id |
/// | `Secure` | on | the id never travels over plain http; turn off for local http only |
/// | `SameSite` | `Lax` | not sent on cross-site subrequests (CSRF), still sent on top-level links |
/// | `Path` / `Domain` | `/` / none | the cookie goes back to this exact host only |
/// | `Max-Age` | none: a browser-session cookie | the browser forgets the id when it closes; a session opts in to a persistent cookie with [`Session::set_expiry`](super::Session::set_expiry) ("remember me"), or every session with [`with_persistent_cookie`](Self::with_persistent_cookie) |
/// | inactivity timeout | 24 hours | enforced by the store, whatever the cookie says |
/// | absolute lifetime | 30 days | no activity and no [`Expiry`](super::Expiry) extends a session past it |
/// | ids | 128 bits from the OS CSPRNG | the store holds only their SHA-256 |
/// | login | [`Session::set_user`](super::Session::set_user) changes the id | against session fixation |
/// | malformed, oversized or forged cookie | ignored | treated as no cookie: no store round trip, never a `4xx`/`5xx`; the next write starts a new session with a new id |
/// | a cookie of a session that is gone | read as empty | a write starts a new session (new id, none of the old data or user); see [`SessionEvent::Restarted`](super::SessionEvent::Restarted) |
/// | store failure | fail open | the request goes on with an empty session and a log line; see [`FailurePolicy`] to answer `503` |
/// | after a `5xx` | nothing saved | a failed request does not half-write a session; see [`FailurePolicy::with_save_on_server_error`] |
///
#[cfg_attr(feature = "memory", doc = "```")]
#[cfg_attr(not(feature = "memory"), doc = "```ignore")]
/// use std::time::Duration;
/// use tower_turnstile::session::{MemoryStore, SessionLayer, SigningKey};
///
/// let layer = SessionLayer::new(MemoryStore::new())
///     .try_with_cookie_name("sid")?
///     .with_secure(false) // local http only
///     .with_inactivity_timeout(Duration::from_secs(30 * 60))
///     .with_signing_key(SigningKey::from_secret("a secret every instance shares")?);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl SessionLayer {
    /// A layer keeping sessions in `store`, with the defaults above.
    pub fn new(store: impl SessionStore) -> Self {
        Self::from_shared_store(Arc::new(store))
    }

    /// A layer on a store already shared elsewhere (by another layer, say).
    pub fn from_shared_store(store: Arc<dyn SessionStore>) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                cookie: CookieConfig::default(),
                inactivity_timeout: Duration::from_secs(24 * 3600),
                absolute_lifetime: Duration::from_secs(30 * 24 * 3600),
                failure: FailurePolicy::default(),
                cap: None,
                events: None,
                announces: false,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The cookie's name. Default: `id`.
    pub fn try_with_cookie_name(self, name: impl Into<String>) -> Result<Self, ConfigError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(self.edit(|s| s.cookie.name = name))
    }

    /// Carries the session id in the header `name` instead of a cookie: read from the request's
    /// `name` header, handed out in the response's (the id alone, signed when a signing key is
    /// set; an empty value when the session ends). For clients that keep no cookies: gRPC
    /// clients (`name` is then a metadata key), mobile apps, scripts. The cookie settings
    /// (path, domain, `Secure`, `SameSite`, persistence) no longer apply; the store's expiry
    /// still does.
    ///
    /// `name` must be a lower-case header name other than `cookie` and `set-cookie`.
    ///
    #[cfg_attr(feature = "memory", doc = "```")]
    #[cfg_attr(not(feature = "memory"), doc = "```ignore")]
    /// use tower_turnstile::session::{MemoryStore, SessionLayer};
    ///
    /// let layer = SessionLayer::new(MemoryStore::new()).try_with_id_header("x-session-id")?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_with_id_header(self, name: &str) -> Result<Self, ConfigError> {
        let name = header_name(name)?;
        Ok(self.edit(|s| s.cookie.header = Some(name)))
    }

    /// The cookie's `Path`. Default: `/`.
    pub fn try_with_cookie_path(self, path: impl Into<String>) -> Result<Self, ConfigError> {
        let path = path.into();
        validate_attribute("path", &path)?;
        Ok(self.edit(|s| s.cookie.path = path))
    }

    /// The cookie's `Domain`. Default: none (the cookie goes back to the exact host only).
    pub fn try_with_cookie_domain(self, domain: impl Into<String>) -> Result<Self, ConfigError> {
        let domain = domain.into();
        validate_attribute("domain", &domain)?;
        Ok(self.edit(|s| s.cookie.domain = Some(domain)))
    }

    /// Whether the cookie is `Secure` (sent over HTTPS only). Default: `true`; turn it off only
    /// for local plain-http development.
    pub fn with_secure(self, secure: bool) -> Self {
        self.edit(|s| s.cookie.secure = secure)
    }

    /// Whether the cookie is `HttpOnly` (hidden from scripts). Default: `true`.
    pub fn with_http_only(self, http_only: bool) -> Self {
        self.edit(|s| s.cookie.http_only = http_only)
    }

    /// The cookie's `SameSite`. Default: [`SameSite::Lax`].
    pub fn with_same_site(self, same_site: SameSite) -> Self {
        self.edit(|s| s.cookie.same_site = same_site)
    }

    /// Whether new sessions get a persistent cookie (it carries `Max-Age` up to the session's
    /// absolute end) rather than a browser-session cookie. Default: `false`. One session
    /// chooses for itself with [`Session::set_expiry`](super::Session::set_expiry).
    pub fn with_persistent_cookie(self, persistent: bool) -> Self {
        self.edit(|s| s.cookie.persistent = persistent)
    }

    /// Signs cookies with `key`; unsigned, forged or altered cookies are then refused without a
    /// store round trip. Replaces the current key; see
    /// [`with_previous_signing_key`](Self::with_previous_signing_key) to rotate.
    pub fn with_signing_key(self, key: SigningKey) -> Self {
        self.edit(|s| {
            if s.cookie.signing.is_empty() {
                s.cookie.signing.push(key);
            } else {
                s.cookie.signing[0] = key;
            }
        })
    }

    /// Still accepts cookies signed with an older `key` (new cookies are signed with the
    /// current one). Call it once per retired key; it has no effect without a current key.
    pub fn with_previous_signing_key(self, key: SigningKey) -> Self {
        self.edit(|s| {
            if !s.cookie.signing.is_empty() {
                s.cookie.signing.push(key);
            }
        })
    }

    /// How long a session may stay unused; every request that reads or writes it restarts the
    /// clock. Default: 24 hours. One session chooses its own with
    /// [`Expiry::Inactivity`](super::Expiry::Inactivity).
    pub fn with_inactivity_timeout(self, timeout: Duration) -> Self {
        self.edit(|s| s.inactivity_timeout = timeout)
    }

    /// The longest a session may live, however active. Default: 30 days.
    pub fn with_absolute_lifetime(self, lifetime: Duration) -> Self {
        self.edit(|s| s.absolute_lifetime = lifetime)
    }

    /// What the layer does when the store or the handler fails. Default:
    /// [`FailurePolicy::fail_open`].
    pub fn with_failure_policy(self, policy: FailurePolicy) -> Self {
        self.edit(|s| s.failure = policy)
    }

    /// At most `max` live sessions per user (per tenant), on every instance together: a login
    /// beyond it ends the user's oldest other sessions (by creation time, in milliseconds;
    /// the store hash breaks ties), or is refused with
    /// [`with_over_cap`](Self::with_over_cap)`(`[`OverCap::RefuseLogin`]`)`. `0` lifts the cap.
    /// Ended sessions are announced like a logout ([`on_session_end`](Self::on_session_end)),
    /// so their live connections close.
    ///
    /// The cap is decided after each login by the store
    /// ([`SessionStore::sessions_over_cap`](super::SessionStore::sessions_over_cap)). On
    /// `RedisStore` (and `FallbackStore` while Redis answers) it is atomic across instances:
    /// one script on the user's logins, so of logins made at the same moment on several
    /// instances each ends different sessions, and once they are done the user has exactly
    /// `max`. `MemoryStore` decides under the user's lock; other stores list and rank, and
    /// then concurrent logins leave between one and `max`. A refusing cap decides before the
    /// login ([`SessionStore::hold_login`](super::SessionStore::hold_login)); on Redis it holds
    /// a place for each admitted login until it is stored (or a minute at most), so of
    /// concurrent logins exactly as many pass as there is room for. Other stores count, and
    /// two logins at the very same moment may both pass. On Redis a place held for a login that
    /// is never stored (its request failed after `set_user`) counts for that minute, and a
    /// session bound to the user some other way (a journal's replay) is counted from the next
    /// login on; if it ends at the very moment of that login, it may be counted once more.
    ///
    #[cfg_attr(feature = "memory", doc = "```")]
    #[cfg_attr(not(feature = "memory"), doc = "```ignore")]
    /// use tower_turnstile::session::{MemoryStore, SessionLayer};
    ///
    /// // A third login of a user ends their oldest session.
    /// let layer = SessionLayer::new(MemoryStore::new()).with_max_sessions_per_user(2);
    /// # let _ = layer;
    /// ```
    pub fn with_max_sessions_per_user(self, max: usize) -> Self {
        self.edit(|s| {
            let over = s.cap.map(|cap| cap.over).unwrap_or_default();
            s.cap = (max > 0).then_some(Cap { max, over });
        })
    }

    /// What a login over [`with_max_sessions_per_user`](Self::with_max_sessions_per_user)'s
    /// cap does. Default: [`OverCap::EndOldest`].
    pub fn with_over_cap(self, over: OverCap) -> Self {
        self.edit(|s| {
            if let Some(cap) = &mut s.cap {
                cap.over = over;
            }
        })
    }

    /// Writes the lifecycle of every session to `events`: logins, id changes, logouts,
    /// revocations ("log out everywhere", an admin), and sessions ended by the per-user cap
    /// (and new sessions, with [`SessionEvents::with_created`]). Each costs one write when it
    /// happens; reads cost nothing.
    ///
    #[cfg_attr(feature = "memory", doc = "```")]
    #[cfg_attr(not(feature = "memory"), doc = "```ignore")]
    /// use tower_turnstile::session::{MemoryStore, SessionEvents, SessionLayer};
    ///
    /// let events = SessionEvents::memory();
    /// let layer = SessionLayer::new(MemoryStore::new()).with_lifecycle_events(events.clone());
    /// // Later, for an audit page: events.latest(&tenant, 100).await
    /// # let _ = layer;
    /// ```
    pub fn with_lifecycle_events(self, events: SessionEvents) -> Self {
        self.edit(|s| s.events = Some(events))
    }

    /// Tells `listener` of every session the layer ends (a logout, a new id, "log out
    /// everywhere"), after the store removed it; see [`SessionEndListener`]. Give it the
    /// [`connection::Registry`](crate::connection::Registry) to close the live connections
    /// registered under a session when it ends, on every instance.
    ///
    /// ```
    /// # #[cfg(all(feature = "memory", feature = "connections"))] {
    /// use tower_turnstile::{connection::Registry, session::{MemoryStore, SessionLayer}};
    ///
    /// let registry = Registry::local();
    /// let layer = SessionLayer::new(MemoryStore::builder().build()).on_session_end(registry);
    /// # let _ = layer;
    /// # }
    /// ```
    pub fn on_session_end(self, listener: impl SessionEndListener) -> Self {
        let listener: Arc<dyn SessionEndListener> = Arc::new(listener);
        self.edit(|s| {
            s.store = Arc::new(Announcing {
                store: Arc::clone(&s.store),
                listener,
            });
            s.announces = true;
        })
    }

    /// The configuration this layer hands its services.
    #[cfg(all(test, feature = "memory"))]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The store the layer uses (with what it was given wrapped around it, such as
    /// [`on_session_end`](Self::on_session_end)'s announcements): for
    /// [`Registry::watch_sessions`](crate::connection::Registry::watch_sessions), say.
    pub fn store(&self) -> Arc<dyn SessionStore> {
        Arc::clone(&self.shared.store)
    }

    /// A handle to list and end users' sessions outside any request (an admin page, a password
    /// change job), on every instance that shares the store.
    pub fn user_sessions(&self) -> UserSessions {
        UserSessions {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, Arc::clone(&self.shared))
    }
}

/// Lists and ends a user's sessions from outside a request; see [`SessionLayer::user_sessions`].
#[derive(Debug, Clone)]
pub struct UserSessions {
    shared: Arc<Shared>,
}

impl UserSessions {
    /// The live sessions of `user` in `tenant`.
    pub async fn list(&self, tenant: &Tenant, user: &str) -> Result<Vec<SessionInfo>, StoreError> {
        self.shared
            .store
            .list_user_sessions(&UserKey::new(tenant, user))
            .await
    }

    /// Ends every session of `user` in `tenant`; returns how many there were.
    pub async fn destroy_all(&self, tenant: &Tenant, user: &str) -> Result<usize, StoreError> {
        let key = UserKey::new(tenant, user);
        self.shared.unschedule_user(&key).await;
        let ended = self.shared.store.delete_user_sessions(&key).await?;
        let revoked = LifecycleKind::Revoked;
        self.shared
            .lifecycle(revoked, tenant, Some(user), None)
            .await;
        Ok(ended)
    }
}
