//! Tower middleware for services that keep no state of their own.
//!
//! Sessions, tenant scoping and rate limits live in shared storage (Redis), so any number of
//! instances can serve any request, restart, or be redeployed without logging anyone out or
//! letting anyone past a limit. When
//! Redis is unreachable the layers degrade (in-memory fallback, logged) instead of failing
//! requests, unless you ask them to fail closed.
//!
#![cfg_attr(all(feature = "redis", feature = "axum"), doc = "```no_run")]
#![cfg_attr(not(all(feature = "redis", feature = "axum")), doc = "```ignore")]
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
//! # Layout
//!
//! Lower modules never import higher ones; each row uses only the rows above it.
//!
//! | module | its job |
//! | --- | --- |
//! | `time`, `sync`, `script`, `http` (crate-private) | Unix-millisecond times, locks that outlive a panic, script files, response bodies, gRPC answers, the peer address, [`RequestView`] |
//! | [`backend`] | Redis: one handle over a server, a Sentinel master or a Cluster; deadlines, the circuit breaker, [`backend::BackendStatus`]; `Batch` sends one operation's commands as one pipeline, or one per hash slot on a cluster |
//! | [`tenant`] | [`tenant::TenantLayer`]: which tenant a request belongs to |
//! | [`session`] | [`session::SessionLayer`] and the [`session::Session`] handle; `commit` (plan, then apply); the stores: memory, Redis (`store/redis`: layout, ttl, replay), the fallback (journal, replay), PostgreSQL (`store/postgres`: SQL as files), chain, migration |
//! | [`connection`] | live connections across instances: registry, registrations, delivery, keys, background tasks |
//! | [`ratelimit`] | [`ratelimit::RateLimitLayer`]: policies, key extractors, the limiter and its fallback, penalties and their blocks feed, settlements, shadows, the algorithms and their Lua mirrors, the stores; [`ratelimit::InFlightLimitLayer`] on the registry's leases |
//! | [`health`] | [`health::HealthService`]: one report on the backend, the session fallback and the rate limiter |
//!
//! # Features
//!
//! | feature  | default | what it adds |
//! |----------|---------|--------------|
//! | `memory` | yes     | [`session::MemoryStore`]: bounded in-memory sessions with TTL |
//! | `redis`  | yes     | [`backend`] (shared Redis connection, deadlines, breaker), [`health`], [`session::RedisStore`], [`ratelimit::RedisRateStore`] |
//! | `sentinel` | no    | [`backend::RedisBackend::sentinel`]: the master of a Sentinel-managed group, found again after a failover |
//! | `cluster` | no     | [`backend::RedisBackend::cluster`]: a Redis Cluster, every command routed by hash slot |
//! | `tls`    | no      | `rediss://` URLs on every kind of backend (rustls with ring; the system's roots, or `RedisBackendBuilder::tls_root_certificates`) |
//! | `tonic`  | no      | the layers on tonic servers: [`RefusalBody`] for tonic's body, client addresses from its `TcpConnectInfo` |
//! | `axum`   | yes     | [`session::Session`] and [`tenant::Tenant`] as axum extractors; client addresses from `ConnectInfo` |
//! | `postgres` | no    | `session::PostgresStore`: sessions in PostgreSQL on a `sqlx` pool; with `redis`, `session::ChainStore` (Redis in front of PostgreSQL) |
//! | `connections` | no  | `connection::Registry`: live connections registered in Redis across instances, delivery to a user's connections everywhere, caps per user; `ratelimit::InFlightLimitLayer` |
//! | `metrics` | no     | counters and histograms through the `metrics` facade (below) |
//! | `full` | no | all of the above |
//!
//! With `memory` and `redis` together, [`session::FallbackStore`] keeps sessions working through
//! a Redis outage: a local copy serves them, writes are journaled and replayed once Redis is
//! back, and [`health::HealthService`] reports it. With `postgres` and `redis`,
//! `session::ChainStore` keeps every session in PostgreSQL with copies in Redis, and serves
//! from PostgreSQL alone while Redis is down.
//!
//! # Behaviour when Redis is down
//!
//! Nothing fails by default. Every Redis call has a deadline, and a circuit breaker shared by
//! every user of one [`backend::RedisBackend`] stops calling a Redis that keeps failing, then
//! probes it until it answers.
//!
//! - **Sessions on [`session::FallbackStore`]** are served from a local copy while Redis is
//!   unreachable. Writes are journaled and replayed in order once it answers, never bringing
//!   back a session destroyed elsewhere.
//! - **Sessions on a bare [`session::RedisStore`]** degrade to an empty session and a log
//!   line, or to `503` with [`FailurePolicy::fail_closed`](session::FailurePolicy::fail_closed).
//! - **Rate limits** fall back to a local limiter with a share of the quota, or let requests
//!   through, or refuse them with `503` (see [`ratelimit::Fallback`]).
//! - **Health**: [`health::HealthService`] reports all of it as JSON.
//!
//! # Running on Redis Cluster or Sentinel
//!
//! Build the [`backend::RedisBackend`] with [`RedisBackend::cluster`](backend::RedisBackend::cluster)
//! or [`RedisBackend::sentinel`](backend::RedisBackend::sentinel) instead of
//! [`RedisBackend::new`](backend::RedisBackend::new); every store and layer works unchanged on
//! it. On a cluster each rate-limit decision touches one key, and the session store sends the
//! parts of an operation that touch keys of different slots (a session and its user's index)
//! as separate pipelines at the same time, so keys spread over every master and no slot is hot.
//! During a failover the layers fall back as when Redis is down; writes a master acknowledged
//! but had not replicated when it died are lost from Redis (the README says exactly what is
//! kept).
//!
//! # Metrics
//!
//! With the `metrics` feature, the crate records through whatever `metrics` recorder the
//! application installed (Prometheus exporter, StatsD, ...); [`register_metrics`] describes
//! them all and shows every counter at zero before its first event:
//!
//! | name | kind | labels | counts |
//! | --- | --- | --- | --- |
//! | `turnstile_redis_call_seconds` | histogram | `outcome` = `ok`, `outage`, `refused`, `error`, `rejected` | each Redis round trip (`refused`: a write Redis refused, out of memory; `rejected`: the breaker was open) |
//! | `turnstile_breaker_transitions_total` | counter | `to` = `open`, `closed` | circuit-breaker transitions |
//! | `turnstile_session_copy_total` | counter | `outcome` = `hit`, `miss`, `invalidated` | session reads served from the instance's local copy or sent to Redis, and copies dropped because another client changed the session |
//! | `turnstile_session_fallback_transitions_total` | counter | `to` = `local`, `redis` | session fallback runs starting and ending |
//! | `turnstile_session_journaled_total` | counter | | session writes journaled during an outage |
//! | `turnstile_session_replayed_total` | counter | | journaled writes replayed into Redis |
//! | `turnstile_session_superseded_total` | counter | | journaled writes of sessions gone from Redis, not replayed |
//! | `turnstile_session_dropped_total` | counter | | session writes that could not be kept (journal full, refused on replay) |
//! | `turnstile_session_events_dropped_total` | counter | | session lifecycle events not written (Redis unreachable; they are not journaled) |
//! | `turnstile_ratelimit_shadow_refusals_total` | counter | | requests a shadow rate limit (`with_shadow`) let through that it would have refused |
//! | `turnstile_ratelimit_fallback_decisions_total` | counter | | rate-limit decisions made without the shared store |
//! | `turnstile_ratelimit_settle_failures_total` | counter | | settlements (`Policy::with_settlement`) the store could not make; the reservation stood |
//! | `turnstile_ratelimit_allowed_total` | counter | | requests a rate limit let through (with a decision; a skipped request is not counted) |
//! | `turnstile_ratelimit_denied_total` | counter | | requests refused with `429` |
//! | `turnstile_connections` | gauge | | live connections this instance holds in a connection registry |
//!
//! # How the layers fit
//!
//! Layers are independent and talk only through request extensions: the
//! [`tenant::TenantLayer`] inserts a [`tenant::Tenant`], which scopes every session and
//! rate-limit key; the [`session::SessionLayer`] inserts the [`session::Session`] handlers use.
//! Each works in any Tower stack (axum's `Router::layer`, `ServiceBuilder` around a hyper
//! service, tonic's `Server::builder().layer`). A layer's service answers with the inner
//! service's own body type; for the answers it writes itself (429, 400, 503) that type
//! implements [`RefusalBody`] (axum's body, `Full`, the boxed bodies, `String`), or the inner
//! responses are wrapped in [`ResponseBody`].
//!
//! The full stack, outermost first: a per-IP limit refuses floods before anything else runs; the
//! tenant is known before anything keyed by it; a per-user limit comes after the session layer,
//! which it needs to find the user. (That is `ServiceBuilder`'s order. axum's `Router::layer`
//! wraps everything added before it, so on a router the same stack is written the other way
//! round, innermost first; or hand the router the whole `ServiceBuilder` in one `.layer(..)`.)
//! On a server without axum, [`PeerAddrLayer`] puts the connection's peer address where the
//! rate limiter looks for it; `examples/hyper_server.rs` shows a hyper server, and
//! `examples/tonic_server.rs` a tonic one (feature `tonic`), the session id travelling in a
//! metadata entry ([`session::SessionLayer::try_with_id_header`]). They are layers rather than
//! tonic `Interceptor`s because an interceptor cannot wait for Redis.
//!
#![cfg_attr(all(feature = "redis", feature = "axum"), doc = "```no_run")]
#![cfg_attr(not(all(feature = "redis", feature = "axum")), doc = "```ignore")]
//! use tower::ServiceBuilder;
//! use tower_turnstile::{
//!     backend::RedisBackend,
//!     ratelimit::{ClientIp, Policy, Quota, RateLimitLayer, SessionUser},
//!     session::{RedisStore, SessionLayer},
//!     tenant::{HostSubdomain, TenantLayer},
//! };
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! let per_ip = Policy::new("per-ip", Quota::per_minute(300))?.with_key(ClientIp::trusting(["10.0.0.0/8"])?);
//! let per_user = Policy::new("per-user", Quota::per_minute(60))?.with_key(SessionUser);
//! let app = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(per_ip).with_redis(redis.clone()))
//!     .layer(TenantLayer::new(HostSubdomain::new("example.com")?))
//!     .layer(SessionLayer::new(RedisStore::new(redis.clone())))
//!     .layer(RateLimitLayer::new(per_user).with_redis(redis))
//!     .service(axum::Router::<()>::new().route("/", axum::routing::get(|| async { "hi" })));
//! # fn is_service<S: tower::Service<http::Request<axum::body::Body>>>(_: &S) {}
//! # is_service(&app);
//! # Ok(())
//! # }
//! ```
//!
//! # Coming from tower_governor
//!
//! tower_governor limits each process on its own: with N instances behind a load balancer a
//! client gets N times the quota, and a restart forgets every count. [`ratelimit::RateLimitLayer`]
//! counts in Redis, one count across every instance, and falls back to memory when Redis is
//! unreachable. What maps to what:
//!
//! | tower_governor 0.8 | tower-turnstile |
//! | --- | --- |
//! | `GovernorConfigBuilder::default().per_second(p).burst_size(b)` (GCRA: a burst of `b`, then one request every `p` seconds) | `Policy::new(name, Quota::new(b, b * p)?)?.with_algorithm(Algorithm::Gcra)`; the default algorithm is a sliding window (`Quota::per_minute(n)`: at most `n` in any minute) |
//! | `GovernorLayer::new(config)` (memory, per process) | `RateLimitLayer::new(policy).with_redis(backend)` (shared); without `with_redis`, memory |
//! | `PeerIpKeyExtractor` | [`ratelimit::ClientIp::peer`] (the default key), IPv6 grouped by /64 |
//! | `SmartIpKeyExtractor` (believes `X-Forwarded-For`, `X-Real-IP`, `Forwarded` from anyone) | [`ratelimit::ClientIp::trusting`]`(proxies)`: forwarding headers believed only from the proxies you name, so a client cannot choose its own key |
//! | a custom `KeyExtractor` | [`ratelimit::KeyExtractor`] (it may wait: the session's user, a database lookup); ready-made: [`ratelimit::HeaderKey`], [`ratelimit::SessionUser`], [`ratelimit::RouteKey`], [`ratelimit::PerTenant`] |
//! | `GlobalKeyExtractor` | [`ratelimit::PerTenant`] (one count per tenant) |
//! | `x-ratelimit-after`, `retry-after`, and with `use_headers()` `x-ratelimit-limit` and `x-ratelimit-remaining` | `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy` fields on every answer (`with_headers(false)` turns the latter off) |
//! | `error_handler(..)` | [`ratelimit::RateLimitLayer::with_rejection`]; gRPC requests get `RESOURCE_EXHAUSTED` |
//!
//! What you gain besides one count across instances: the limit scoped per tenant (with
//! per-tenant quotas, `Policy::with_quota_for`), costs per request (`with_cost_fn`), a choice
//! of what happens when Redis is down ([`ratelimit::Fallback`]: local with a share of the
//! quota, open, or closed), a local lease of units that takes most decisions off Redis with a
//! stated bound on the error ([`ratelimit::Lease`]), and refusals answered from memory while a
//! denial lasts, so a flood costs Redis nothing; escalating blocks for repeat offenders that
//! every instance enforces ([`ratelimit::Penalty`]), shadow limits, an allowlist. What it costs: a Redis round trip per allowed
//! request without a lease (see `BENCHMARKS.md` for the numbers).
//!
#![cfg_attr(feature = "redis", doc = "```no_run")]
#![cfg_attr(not(feature = "redis"), doc = "```ignore")]
//! use tower_turnstile::{
//!     backend::RedisBackend,
//!     ratelimit::{Algorithm, ClientIp, Policy, Quota, RateLimitLayer},
//! };
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // tower_governor: per_second(2).burst_size(5), behind a proxy at 10.0.0.1.
//! let quota = Quota::new(5, std::time::Duration::from_secs(10))?;
//! let policy = Policy::new("per-ip", quota)?
//!     .with_algorithm(Algorithm::Gcra)
//!     .with_key(ClientIp::trusting(["10.0.0.1"])?);
//! let layer = RateLimitLayer::new(policy).with_redis(RedisBackend::new("redis://127.0.0.1:6379")?);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

//! # Coming from tower-sessions
//!
//! Two ways, and they mix. **Keep your handlers**: put any store of this crate behind
//! tower-sessions' own layer with `session::TowerSessionsStore` (features `tower-sessions` for
//! tower-sessions 0.14 and axum-login 0.18, `tower-sessions-015` for 0.15). One line changes,
//! and the application gets Redis Cluster and Sentinel on redis-rs, the outage fallback with its
//! journal and replay, and the PostgreSQL chain. Values are stored as the JSON text the crate's
//! own [`session::Session`] reads, so handlers can then move to [`session::SessionLayer`] one
//! at a time. **Or move to the layer** itself; what maps to what:
//!
//! | tower-sessions 0.14 | tower-turnstile |
//! | --- | --- |
//! | `SessionManagerLayer::new(store)` | [`session::SessionLayer::new`]`(store)` |
//! | `RedisStore` (fred), `MemoryStore`, `PostgresStore` (sqlx) | [`session::RedisStore`] (redis-rs; single node, Cluster, Sentinel), [`session::MemoryStore`], [`session::PostgresStore`]; [`session::FallbackStore`] keeps serving through a Redis outage |
//! | `CachingSessionStore` (a cache other instances do not invalidate) | `RedisStore::with_local_copy` (a copy Redis keeps coherent by client-side caching) |
//! | `session.insert` / `get` / `remove` | [`session::Session::insert`] / `get` / `remove`; saved field by field, so concurrent requests changing different keys both keep their change |
//! | `session.cycle_id()` | [`session::Session::cycle_id`]; [`session::Session::set_user`] binds the user and moves the session to a new id |
//! | `session.flush()` | [`session::Session::destroy`]; "log out everywhere" is [`session::Session::destroy_user_sessions`] |
//! | `Expiry::OnInactivity` / `AtDateTime` / `OnSessionEnd` | [`session::Expiry`]: an inactivity timeout and an absolute lifetime at once, stored with the session |
//! | `with_signed(key)` | [`session::SessionLayer::with_signing_key`] |
//!
//! What you gain on the layer besides the adapter's: sessions scoped per tenant, a per-user
//! index (list and end a user's sessions), a clear answer instead of a `500` when the store
//! fails ([`session::FailurePolicy`]), and a session read from the local copy in no round trip.
//!
#![cfg_attr(all(feature = "tower-sessions", feature = "redis"), doc = "```no_run")]
#![cfg_attr(
    not(all(feature = "tower-sessions", feature = "redis")),
    doc = "```ignore"
)]
//! use tower_sessions::SessionManagerLayer;
//! use tower_turnstile::{
//!     backend::RedisBackend,
//!     session::{FallbackStore, RedisStore, TowerSessionsStore},
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Was: SessionManagerLayer::new(tower_sessions_redis_store::RedisStore::new(pool))
//! let redis = RedisStore::new(RedisBackend::new("redis://127.0.0.1:6379")?);
//! let layer = SessionManagerLayer::new(TowerSessionsStore::new(FallbackStore::new(redis)));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

/// `get_ref`, `get_mut` and `into_inner` for a layer's service, whose inner service is its
/// `inner` field.
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// The inner service, consuming this one.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

#[cfg(feature = "redis")]
pub mod backend;
#[cfg(feature = "connections")]
pub mod connection;
mod error;
// The fuzz targets' way in (`fuzz/`); only in a `--cfg fuzzing` build.
#[cfg(all(fuzzing, feature = "redis"))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "redis")]
pub mod health;
mod http;
mod metrics;
pub mod ratelimit;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod script;
pub mod session;
mod sync;
pub mod tenant;
mod time;

pub use error::{ConfigError, StoreError};
pub use http::{PeerAddr, PeerAddrLayer, RefusalBody, RequestView, ResponseBody, ResponseView};
#[cfg(feature = "metrics")]
pub use metrics::register_metrics;
