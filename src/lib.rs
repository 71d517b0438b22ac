//! Tower middleware for services that keep no state of their own.
//!
//! Sessions, tenant scoping and rate limits live in shared storage (Redis), so any number of
//! instances can serve any request, restart, or be redeployed without logging anyone out. When
//! Redis is unreachable the layers degrade (in-memory fallback, logged) instead of failing
//! requests, unless you ask them to fail closed.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_turnstile::{backend::RedisBackend, session::{RedisStore, Session, SessionLayer}};
//!
//! async fn count(session: Session) -> String {
//!     let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
//!     let _ = session.insert("n", n).await;
//!     n.to_string()
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! let app = Router::new()
//!     .route("/count", post(count))
//!     .layer(SessionLayer::new(RedisStore::new(redis)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature  | default | what it adds |
//! |----------|---------|--------------|
//! | `memory` | yes     | [`session::MemoryStore`]: bounded in-memory sessions with TTL |
//! | `redis`  | yes     | [`backend`] (shared Redis connection, deadlines, breaker, health) and [`session::RedisStore`] |
//! | `axum`   | yes     | [`session::Session`] as an axum extractor |
//!
//! # How the layers fit
//!
//! Layers are independent and talk only through request extensions. The
//! [`tenant::Tenant`] of a request, when one is set, scopes every session key; the
//! [`session::Session`] handle is what handlers use. Each layer works in any Tower stack (axum's
//! `Router::layer`, `ServiceBuilder` around a hyper service, tonic's `Server::builder().layer`),
//! and the responses a layer writes itself use [`ResponseBody`], which wraps any inner body.

#[cfg(feature = "redis")]
pub mod backend;
mod body;
mod error;
pub mod ratelimit;
pub mod session;
pub mod tenant;

pub use body::ResponseBody;
pub use error::StoreError;
