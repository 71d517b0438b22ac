//! Rate limiting: quotas enforced across instances through a shared store.
//!
//! A [`RateLimitLayer`] enforces one [`Policy`]: a name, a [`Quota`] (`limit` per `window`), an
//! [`Algorithm`], a [`KeyExtractor`] that picks whose counter a request spends from, and a cost
//! per request. Stack several layers for several policies (per IP outside, per user inside).
//!
//! - **Shared and exact**: with Redis every decision is one atomic script on one key, using
//!   Redis's clock, so N instances together grant exactly the quota, whatever their clocks say.
//! - **Cheap floods**: a key denied until time T is answered from memory until T, with no Redis
//!   round trip.
//! - **Repeat offenders blocked**: with a [`Penalty`], a key refused again and again is blocked
//!   for longer each time, decided in the same script as the limit; every instance learns of
//!   a block and refuses the key from memory until it ends.
//! - **Costs known only after the response**: with [`Policy::with_settlement`], a cost is
//!   reserved before the inner service runs and settled (refunded or topped up) from the
//!   response, atomically, before the response goes out.
//! - **Cheaper still, if you accept a stated error**: with a [`Lease`], an instance takes a
//!   batch of a hot key's quota in one round trip and spends it locally; the overshoot across
//!   instances is bounded by `instances × (units − 1)`.
//! - **Degrades, never breaks**: when Redis is unreachable (or its breaker is open), a local
//!   limiter takes over, with a share of the quota you choose, or requests pass, or are refused
//!   with `503` — see [`Fallback`]. Back to Redis by itself when it answers.
//! - **Unspoofable client keys**: [`ClientIp`] believes `Forwarded`/`X-Forwarded-For` only from
//!   trusted proxies, taking the right-most untrusted hop; IPv6 is grouped by /64.
//! - **Standard answers**: `429` with `Retry-After` (whole seconds, at least 1) and the IETF
//!   `RateLimit` / `RateLimit-Policy` fields, also on allowed responses; gRPC requests get a
//!   trailers-only `RESOURCE_EXHAUSTED`.
//! - **Tenants**: every counter is scoped to the request's [`Tenant`](crate::tenant::Tenant).
//!
//! # Examples
//!
//! 100 requests a minute per client IP, in memory:
//!
#![cfg_attr(feature = "axum", doc = "```")]
#![cfg_attr(not(feature = "axum"), doc = "```ignore")]
//! use axum::{Router, routing::get};
//! use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(100))?));
//! # let _ = app;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Across instances through Redis, an exact sliding log for logins keyed by client and route
//! behind a load balancer, refusing with `503` while Redis is down:
//!
#![cfg_attr(feature = "redis", doc = "```no_run")]
#![cfg_attr(not(feature = "redis"), doc = "```ignore")]
//! use tower_turnstile::{
//!     backend::RedisBackend,
//!     ratelimit::{Algorithm, ClientIp, Fallback, Policy, Quota, RateLimitLayer, RouteKey},
//! };
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! let logins = Policy::new("login", Quota::per_hour(10))?
//!     .with_algorithm(Algorithm::SlidingLog)
//!     .with_key((ClientIp::trusting(["10.0.0.0/8"])?, RouteKey));
//! let layer = RateLimitLayer::new(logins).with_redis(redis).with_fallback(Fallback::Closed);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod algorithm;
mod answer;
mod exempt;
mod headers;
#[cfg(feature = "connections")]
mod inflight;
mod key;
mod layer;
mod lease;
mod limiter;
mod penalty;
mod policy;
mod quota;
mod service;
mod settle;
mod shadow;
mod store;

pub use algorithm::Algorithm;
pub use answer::Answer;
pub use exempt::Allowlist;
#[cfg(feature = "connections")]
pub use inflight::{InFlightFuture, InFlightLimitLayer, InFlightLimitService};
pub use key::{ClientIp, HeaderKey, KeyExtractor, PerTenant, RouteKey, SessionUser};
pub use layer::{RateLimitLayer, RateLimited, Rejection};
pub use lease::Lease;
pub use limiter::Fallback;
pub use penalty::Penalty;
pub use policy::{MissingKey, Policy};
pub use quota::Quota;
pub use service::{RateLimitService, ResponseFuture};
#[cfg(feature = "redis")]
pub use store::RedisRateStore;
pub use store::{
    Block, Blocks, Check, Client, CounterKey, Decision, MemoryRateStore, MemoryRateStoreBuilder,
    RateLimitStore, Settlement,
};

#[cfg(all(fuzzing, feature = "redis"))]
pub(crate) use store::read_reply;
