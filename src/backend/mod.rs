//! The shared Redis backend: one auto-reconnecting multiplexed connection, a deadline on every
//! command, and a circuit breaker that every user of the handle shares.
//!
//! Build one [`RedisBackend`] per process and hand clones of it to the stores that need Redis
//! (the session store, the rate limiter, the connection registry). They then share one socket, one breaker and
//! one [`BackendStatus`]: when Redis stops answering, the breaker opens once for all of them, and
//! callers go straight to their fallback instead of each paying a timeout.
//!
//! # Examples
//!
//! The defaults: a lazy connection (the process starts even while Redis is down), a
//! `250ms` deadline for session commands, and a breaker that opens after three failures in a row.
//!
//! ```no_run
//! use tower_turnstile::backend::RedisBackend;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! redis.ping().await?;
//! println!("{:?}", redis.status().state);
//! # Ok(())
//! # }
//! ```
//!
//! Tuned for a service that would rather fall back quickly:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_turnstile::backend::{BreakerConfig, RedisBackend};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::builder("redis://127.0.0.1:6379")
//!     .connect_timeout(Duration::from_millis(200))
//!     .breaker(BreakerConfig::default().failure_threshold(2).open_for(Duration::from_secs(5)))
//!     .build()?;
//! # let _ = redis;
//! # Ok(())
//! # }
//! ```

mod batch;
mod breaker;
mod builder;
#[cfg(feature = "cluster")]
mod cluster;
mod error;
mod handle;
mod marker;
mod memory;
mod node;
mod refusal;
#[cfg(feature = "sentinel")]
mod sentinel;
mod status;
pub(crate) mod stream;
mod tracking;

pub(crate) use batch::{Batch, Part, Replies};
pub use breaker::{BreakerConfig, BreakerState};
pub use builder::RedisBackendBuilder;
pub use error::BackendError;
pub(crate) use error::fails_the_call;
pub use handle::RedisBackend;
pub use memory::MemorySettings;
pub use status::BackendStatus;
pub(crate) use tracking::{Invalidated, Tracking};
