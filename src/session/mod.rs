//! Sessions kept in a shared store, loaded lazily, saved field by field.
//!
//! [`SessionLayer`] reads the session cookie, puts a [`Session`] into the request's
//! extensions and, after the inner service answers, writes back only what changed and sets or
//! clears the cookie. Nothing is read from the store until the handler asks, so a route that
//! never looks at the session costs no store round trip.
//!
//! # Guarantees
//!
//! - **Ids** are 128 bits from the OS CSPRNG. Stores see only their SHA-256 hash, so a copy of
//!   Redis yields no usable cookie. Optional signing (with key rotation) refuses forged cookies
//!   before any store round trip.
//! - **Writes are field-level**: two concurrent requests that change different keys of one
//!   session both keep their change, and a write to a session destroyed meanwhile (by "log out
//!   everywhere", say) does not bring it back.
//! - **Login** ([`Session::set_user`]) moves the session to a new id, writing the new record
//!   before removing the old one, and indexes it under the user so that
//!   [`Session::user_sessions`] and [`Session::destroy_user_sessions`] work from any instance.
//! - **Expiry**: an inactivity timeout that each use restarts, and an absolute lifetime that
//!   nothing extends; the store's TTL does the cleanup. One session can choose its own
//!   ([`Session::set_expiry`] with an [`Expiry`]): it is stored with the session, and the
//!   cookie is sent again whenever its attributes change.
//! - **No write is dropped**: a write whose cookie names a session that is gone (expired,
//!   unknown, destroyed elsewhere) starts a new session under a new id holding just that write,
//!   never the old data or user; the response carries [`SessionEvent::Restarted`].
//! - **Failures** never panic and never become an opaque `500`: by default a store failure
//!   leaves the request with an empty session (and a log line); with
//!   [`FailurePolicy::fail_closed`] the layer answers `503`.
//! - **Tenants**: a [`Tenant`](crate::tenant::Tenant) in the request extensions scopes the
//!   session; a cookie replayed under another tenant finds nothing.
//!
//! # Examples
//!
//! In memory, with the defaults:
//!
#![cfg_attr(all(feature = "memory", feature = "axum"), doc = "```")]
#![cfg_attr(not(all(feature = "memory", feature = "axum")), doc = "```ignore")]
//! use axum::{Router, routing::post};
//! use tower_turnstile::session::{MemoryStore, Session, SessionLayer};
//!
//! async fn count(session: Session) -> String {
//!     let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
//!     let _ = session.insert("n", n).await;
//!     n.to_string()
//! }
//!
//! let app: Router = Router::new()
//!     .route("/count", post(count))
//!     .layer(SessionLayer::new(MemoryStore::new()));
//! # let _ = app;
//! ```
//!
//! In Redis, shared by every instance, with signed cookies and a short inactivity timeout:
//!
#![cfg_attr(all(feature = "redis", feature = "axum"), doc = "```no_run")]
#![cfg_attr(not(all(feature = "redis", feature = "axum")), doc = "```ignore")]
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_turnstile::{backend::RedisBackend, session::{RedisStore, SessionLayer, SigningKey}};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! let sessions = SessionLayer::new(RedisStore::new(redis))
//!     .with_signing_key(SigningKey::from_secret(std::env::var("SESSION_SECRET")?)?)
//!     .with_inactivity_timeout(Duration::from_secs(15 * 60));
//! let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(sessions);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

mod cap;
mod commit;
mod ended;
mod events;
mod expiry;
#[cfg(feature = "axum")]
mod extract;
mod failure;
mod id;
mod layer;
mod service;
#[allow(clippy::module_inception)] // the handle is the module's namesake
mod session;
mod store;
#[cfg(any(feature = "tower-sessions", feature = "tower-sessions-015"))]
mod tower_sessions;
mod transport;

pub use cap::OverCap;
pub use ended::SessionEndListener;
pub use events::{LifecycleEvent, LifecycleKind, SESSION_PREFIX_LEN, SessionEvents};
pub use expiry::Expiry;
#[cfg(feature = "axum")]
pub use extract::MissingSessionLayer;
pub use failure::FailurePolicy;
pub use id::{SessionKey, UserKey};
pub use layer::{SessionLayer, UserSessions};
pub use service::{ResponseFuture, SessionService, SessionUnavailable};
pub use session::{Session, SessionError, SessionEvent};
#[cfg(all(feature = "redis", feature = "postgres"))]
pub use store::ChainStore;
#[cfg(feature = "postgres")]
pub use store::{CleanupTask, PostgresStore};
#[cfg(feature = "memory")]
pub use store::{Clock, ManualClock, MemoryStore, MemoryStoreBuilder};
#[cfg(all(feature = "memory", feature = "redis"))]
pub use store::{FallbackStatus, FallbackStore, FallbackStoreBuilder, OutageCopy};
pub use store::{
    JournaledWrite, Lifetime, LoginHold, MigrationStore, Patch, Record, ReplayStore, Replayed,
    SessionInfo, SessionStore, VersionedStore, Written,
};
#[cfg(feature = "redis")]
pub use store::{LocalCopyStats, RedisStore};
#[cfg(any(feature = "tower-sessions", feature = "tower-sessions-015"))]
pub use tower_sessions::TowerSessionsStore;
pub use transport::{SameSite, SigningKey};

#[cfg(fuzzing)]
pub(crate) use id::SessionId;
#[cfg(all(fuzzing, feature = "redis"))]
pub(crate) use store::{hash_fields, parse_record, record_fields};
#[cfg(fuzzing)]
pub(crate) use transport::{CookieConfig, header_name, validate_name};
