use std::{fmt, sync::Arc, time::Duration};

use tower_layer::Layer;

use super::{
    cookie::{
        CookieConfig, CookieConfigError, SameSite, SigningKey, header_name, validate_attribute,
        validate_name,
    },
    service::SessionService,
    store::{SessionInfo, SessionStore, StoreError, UserKey},
};
use crate::tenant::Tenant;

/// Configuration shared by a [`SessionLayer`], its services and their sessions.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) cookie: CookieConfig,
    pub(crate) inactivity_timeout: Duration,
    pub(crate) absolute_lifetime: Duration,
    pub(crate) fail_closed: bool,
    pub(crate) fail_closed_on_write: bool,
    pub(crate) restart_when_unavailable: bool,
    pub(crate) save_on_server_error: bool,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("store", &self.store)
            .field("cookie", &self.cookie)
            .field("inactivity_timeout", &self.inactivity_timeout)
            .field("absolute_lifetime", &self.absolute_lifetime)
            .field("fail_closed", &self.fail_closed)
            .field("fail_closed_on_write", &self.fail_closed_on_write)
            .field("restart_when_unavailable", &self.restart_when_unavailable)
            .field("save_on_server_error", &self.save_on_server_error)
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
/// | store failure | fail open | the request goes on with an empty session and a log line; [`with_fail_closed`](Self::with_fail_closed) answers `503` |
/// | after a `5xx` | nothing saved | a failed request does not half-write a session; see [`with_save_on_server_error`](Self::with_save_on_server_error) |
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
                fail_closed: false,
                fail_closed_on_write: false,
                restart_when_unavailable: false,
                save_on_server_error: false,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The cookie's name. Default: `id`.
    pub fn try_with_cookie_name(self, name: impl Into<String>) -> Result<Self, CookieConfigError> {
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
    pub fn try_with_id_header(self, name: &str) -> Result<Self, CookieConfigError> {
        let name = header_name(name)?;
        Ok(self.edit(|s| s.cookie.header = Some(name)))
    }

    /// The cookie's `Path`. Default: `/`.
    pub fn try_with_cookie_path(self, path: impl Into<String>) -> Result<Self, CookieConfigError> {
        let path = path.into();
        validate_attribute("path", &path)?;
        Ok(self.edit(|s| s.cookie.path = path))
    }

    /// The cookie's `Domain`. Default: none (the cookie goes back to the exact host only).
    pub fn try_with_cookie_domain(
        self,
        domain: impl Into<String>,
    ) -> Result<Self, CookieConfigError> {
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

    /// Fail closed: when the store fails during a request, answer `503 Service Unavailable`
    /// instead of the handler's response, and let session reads return the error. Default:
    /// off (the request goes on with an empty session, and the failure is logged).
    pub fn with_fail_closed(self, fail_closed: bool) -> Self {
        self.edit(|s| s.fail_closed = fail_closed)
    }

    /// Fail open for reads, closed for writes: when the request's session changes could not be
    /// stored anywhere, answer `503 Service Unavailable` instead of the handler's response, so
    /// a client is never told "done" about a write that was lost. Requests that only read still
    /// get the handler's answer (with an empty session when the store failed). Default: off.
    ///
    /// With a [`FallbackStore`](super::FallbackStore), writes during a Redis outage are kept
    /// locally and journaled, so this answers `503` only for what even the fallback could not
    /// keep (a session this instance never saw, a full journal).
    pub fn with_fail_closed_on_write(self, fail_closed: bool) -> Self {
        self.edit(|s| s.fail_closed_on_write = fail_closed)
    }

    /// When the cookie's session could not be read (the store failed) and the request changed
    /// it, keep the changes in a new session under a new id and cookie instead of dropping
    /// them, as for a session that is gone ([`SessionEvent::Restarted`](super::SessionEvent::Restarted)).
    /// Default: off (the changes are dropped, the request's event is
    /// [`SessionEvent::Failed`](super::SessionEvent::Failed)).
    ///
    /// The trade is the client's old session for an answer. The handler saw an empty session
    /// (see [`Session::is_degraded`](super::Session::is_degraded)), so its answer is true of
    /// the new session, which the store keeps. The old session is not touched, but this client
    /// no longer holds its cookie. With a [`FallbackStore`](super::FallbackStore) this happens
    /// only during a Redis outage, to a session this instance never saw: a forged or unknown
    /// id gets a fresh session instead of a `503`, and so does a real session served so far by
    /// another instance. Changes that hold no data and no user (a removal, an expiry) start
    /// nothing and are dropped as before. When the new session cannot be stored either, the
    /// request's event is `Failed`, and
    /// [`with_fail_closed_on_write`](Self::with_fail_closed_on_write) answers `503`.
    ///
    #[cfg_attr(all(feature = "memory", feature = "redis"), doc = "```no_run")]
    #[cfg_attr(not(all(feature = "memory", feature = "redis")), doc = "```ignore")]
    /// use tower_turnstile::{backend::RedisBackend, session::{FallbackStore, RedisStore, SessionLayer}};
    ///
    /// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
    /// let layer = SessionLayer::new(FallbackStore::new(RedisStore::new(redis)))
    ///     .with_restart_when_unavailable(true)
    ///     .with_fail_closed_on_write(true);
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_restart_when_unavailable(self, restart: bool) -> Self {
        self.edit(|s| s.restart_when_unavailable = restart)
    }

    /// Save the session's changes even when the inner service answers `5xx`. Default: off.
    pub fn with_save_on_server_error(self, save: bool) -> Self {
        self.edit(|s| s.save_on_server_error = save)
    }

    /// A handle to list and end users' sessions outside any request (an admin page, a password
    /// change job), on every instance that shares the store.
    pub fn user_sessions(&self) -> UserSessions {
        UserSessions {
            store: Arc::clone(&self.shared.store),
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
    store: Arc<dyn SessionStore>,
}

impl UserSessions {
    /// The live sessions of `user` in `tenant`.
    pub async fn list(&self, tenant: &Tenant, user: &str) -> Result<Vec<SessionInfo>, StoreError> {
        self.store
            .list_user_sessions(&UserKey::new(tenant, user))
            .await
    }

    /// Ends every session of `user` in `tenant`; returns how many there were.
    pub async fn destroy_all(&self, tenant: &Tenant, user: &str) -> Result<usize, StoreError> {
        self.store
            .delete_user_sessions(&UserKey::new(tenant, user))
            .await
    }
}
