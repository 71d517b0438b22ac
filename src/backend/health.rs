use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use serde::Serialize;

use super::{BreakerState, RedisBackend};
use http_body_util::Full;

use crate::time::unix_millis;

/// A read-only view of a [`RedisBackend`]'s health, for readiness checks and dashboards.
#[derive(Debug, Clone)]
pub struct Health {
    backend: RedisBackend,
}

/// The health of a Redis backend at one instant.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthSnapshot {
    /// `true` while the breaker is closed and the last call succeeded.
    pub healthy: bool,
    /// The breaker's state.
    #[serde(serialize_with = "serialize_state")]
    pub state: BreakerState,
    /// When the breaker last opened or closed (Unix milliseconds in JSON).
    #[serde(serialize_with = "serialize_time")]
    pub since: SystemTime,
    /// Outages in a row (resets on success).
    pub consecutive_failures: u32,
    /// The last outage seen, if any.
    pub last_error: Option<String>,
    /// When the last outage was seen (Unix milliseconds in JSON).
    #[serde(serialize_with = "serialize_opt_time")]
    pub last_error_at: Option<SystemTime>,
    /// Calls that Redis answered.
    pub successes: u64,
    /// Calls that failed for an outage (timeout, refused or broken connection).
    pub failures: u64,
    /// Calls not attempted because the breaker was open.
    pub rejected: u64,
    /// Round trips sent to Redis.
    pub round_trips: u64,
    /// The Redis server, as `host:port/db` (no credentials).
    pub target: String,
}

fn serialize_state<S: serde::Serializer>(state: &BreakerState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

fn serialize_time<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(unix_millis(*time))
}

fn serialize_opt_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.serialize_some(&unix_millis(*t)),
        None => s.serialize_none(),
    }
}

impl Health {
    pub(crate) fn new(backend: RedisBackend) -> Self {
        Self { backend }
    }

    /// The backend this view reports on.
    pub fn backend(&self) -> &RedisBackend {
        &self.backend
    }

    /// The current state, without any I/O.
    pub fn snapshot(&self) -> HealthSnapshot {
        let inner = &self.backend.inner;
        let view = inner.breaker.view();
        let counters = &inner.breaker.counters;
        let (last_error, last_error_at) = match view.last_error {
            Some((error, at)) => (Some(error), Some(at)),
            None => (None, None),
        };
        HealthSnapshot {
            // A failed call makes Redis unhealthy at once, even before enough of them in a row
            // open the breaker.
            healthy: view.state == BreakerState::Closed && view.consecutive_failures == 0,
            state: view.state,
            since: view.since,
            consecutive_failures: view.consecutive_failures,
            last_error,
            last_error_at,
            successes: counters.successes.load(Ordering::Relaxed),
            failures: counters.failures.load(Ordering::Relaxed),
            rejected: counters.rejected.load(Ordering::Relaxed),
            round_trips: inner.round_trips.load(Ordering::Relaxed),
            target: inner.target.clone(),
        }
    }

    /// Pings Redis when the breaker would let a call through (closed, or open long enough for
    /// a probe), then returns the snapshot. A service with no traffic still sees its breaker
    /// close again this way once Redis is back.
    pub async fn check(&self) -> HealthSnapshot {
        // The outcome is recorded by the breaker; the snapshot reports it.
        let _ = self.backend.ping().await;
        self.snapshot()
    }

    /// A Tower service that answers every request with a [`HealthReport`] as JSON; see
    /// [`HealthService`].
    pub fn service(&self) -> HealthService {
        HealthService {
            health: self.clone(),
            #[cfg(feature = "memory")]
            sessions: None,
            rate_limit: None,
            degraded_status: StatusCode::OK,
        }
    }
}

/// What a [`HealthService`] answers: the backend's health, and whether anything is falling back.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `"healthy"` or `"unhealthy"`.
    pub redis: &'static str,
    /// Whether sessions or rate limits are being served without Redis right now.
    pub fallback_active: bool,
    /// The backend's breaker and counters.
    #[serde(flatten)]
    pub backend: HealthSnapshot,
    /// The session fallback store, when one is reported on.
    #[cfg(feature = "memory")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<crate::session::FallbackStatus>,
    /// The rate limiter, when one is reported on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitStatus>,
}

/// The rate limiter's part of a [`HealthReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RateLimitStatus {
    /// Whether decisions are made without Redis right now.
    pub falling_back: bool,
    /// Decisions made without Redis since the layer was built.
    pub fallback_decisions: u64,
}

/// A ready-made health endpoint: answers any request with a [`HealthReport`] as JSON.
///
/// By default it answers `200` whatever the state (the JSON says what is degraded): during a
/// Redis outage every instance degrades at once, and a load balancer that took them all out
/// would turn a degraded service into no service. For probes that should fail while
/// degraded, set [`with_degraded_status`](Self::with_degraded_status).
///
#[cfg_attr(all(feature = "memory", feature = "axum"), doc = "```no_run")]
#[cfg_attr(not(all(feature = "memory", feature = "axum")), doc = "```ignore")]
/// use axum::{Router, http::StatusCode, routing::get_service};
/// use tower_turnstile::{
///     backend::RedisBackend,
///     ratelimit::{Policy, Quota, RateLimitLayer},
///     session::{FallbackStore, RedisStore},
/// };
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let sessions = FallbackStore::new(RedisStore::new(redis.clone()));
/// let limits = RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(100))?)
///     .with_redis(redis.clone());
/// let health = redis
///     .health()
///     .service()
///     .with_sessions(sessions.clone())
///     .with_rate_limit(&limits)
///     .with_degraded_status(StatusCode::SERVICE_UNAVAILABLE);
/// let app: Router = Router::new().route_service("/health", health);
/// # let _ = app;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HealthService {
    health: Health,
    #[cfg(feature = "memory")]
    sessions: Option<crate::session::FallbackStore>,
    rate_limit: Option<crate::ratelimit::RateLimitLayer>,
    degraded_status: StatusCode,
}

impl HealthService {
    /// Also reports `store`'s fallback: whether sessions are served locally, the journal, and
    /// what was replayed or dropped.
    #[cfg(feature = "memory")]
    pub fn with_sessions(mut self, store: crate::session::FallbackStore) -> Self {
        self.sessions = Some(store);
        self
    }

    /// Also reports `layer`'s fallback decisions.
    pub fn with_rate_limit(mut self, layer: &crate::ratelimit::RateLimitLayer) -> Self {
        self.rate_limit = Some(layer.clone());
        self
    }

    /// The status while Redis is unhealthy or anything falls back. Default: `200`.
    pub fn with_degraded_status(mut self, status: StatusCode) -> Self {
        self.degraded_status = status;
        self
    }

    /// Checks the backend (see [`Health::check`]) and reports on everything this service
    /// watches: what it answers, for a handler that adds fields of its own.
    pub async fn report(&self) -> HealthReport {
        let backend = self.health.check().await;
        let healthy = backend.healthy;
        // The limiter knows how its last decision was made; with Redis healthy, its next one
        // goes to Redis.
        let rate_limit = self.rate_limit.as_ref().map(|layer| RateLimitStatus {
            falling_back: layer.is_falling_back() && !healthy,
            fallback_decisions: layer.fallback_decisions(),
        });
        #[cfg(feature = "memory")]
        let sessions = self
            .sessions
            .as_ref()
            .map(crate::session::FallbackStore::status);
        #[cfg(feature = "memory")]
        let sessions_local = sessions.as_ref().is_some_and(|s| s.active);
        #[cfg(not(feature = "memory"))]
        let sessions_local = false;
        HealthReport {
            redis: if healthy { "healthy" } else { "unhealthy" },
            fallback_active: backend.state != BreakerState::Closed
                || sessions_local
                || rate_limit.is_some_and(|r| r.falling_back),
            backend,
            #[cfg(feature = "memory")]
            sessions,
            rate_limit,
        }
    }
}

type HealthResult = Result<Response<Full<Bytes>>, Infallible>;

/// The future of [`HealthService`].
pub struct HealthFuture {
    inner: Pin<Box<dyn Future<Output = HealthResult> + Send>>,
}

impl fmt::Debug for HealthFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthFuture").finish_non_exhaustive()
    }
}

impl Future for HealthFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B> tower_service::Service<Request<B>> for HealthService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = HealthFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let service = self.clone();
        HealthFuture {
            inner: Box::pin(async move {
                let report = service.report().await;
                let status = if report.redis == "healthy" && !report.fallback_active {
                    StatusCode::OK
                } else {
                    service.degraded_status
                };
                Ok(json_response(status, &report))
            }),
        }
    }
}

/// A JSON response; serialising plain data cannot fail, but if it did the answer is still JSON.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
