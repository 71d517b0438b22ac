//! A health endpoint that reports on everything that may fall back: the Redis backend, the
//! session store's fallback, the rate limiter's. It sits above the layers it reports on.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::{
    backend::{BackendStatus, BreakerState, RedisBackend},
    ratelimit::RateLimitLayer,
};
#[cfg(feature = "memory")]
use {
    crate::session::{FallbackStatus, FallbackStore, ReplayStore},
    std::sync::Arc,
};

/// What a [`HealthService`] answers: the backend's health, and whether anything is falling back.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `"healthy"`; `"degraded"` while Redis answers but refuses writes (out of memory: the
    /// backend's `refusing_writes`, `last_write_refusal` and `writes_refused` say why and how
    /// often); or `"unhealthy"`.
    pub redis: &'static str,
    /// Whether sessions or rate limits are being served without Redis right now.
    pub fallback_active: bool,
    /// The backend's breaker and counters.
    #[serde(flatten)]
    pub backend: BackendStatus,
    /// The session fallback store, when one is reported on.
    #[cfg(feature = "memory")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<FallbackStatus>,
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
    /// Requests a shadow layer let through that it would have refused
    /// ([`RateLimitLayer::with_shadow`]); 0 for a layer that refuses.
    pub shadow_refusals: u64,
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
///     health::HealthService,
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
/// let health = HealthService::new(redis.clone())
///     .with_sessions(&sessions)
///     .with_rate_limit(&limits)
///     .with_degraded_status(StatusCode::SERVICE_UNAVAILABLE);
/// let app: Router = Router::new().route_service("/health", health);
/// # let _ = app;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HealthService {
    backend: RedisBackend,
    /// What the session store's fallback is doing, read at each report.
    #[cfg(feature = "memory")]
    sessions: Option<Arc<dyn Fn() -> FallbackStatus + Send + Sync>>,
    rate_limit: Option<RateLimitLayer>,
    degraded_status: StatusCode,
}

impl fmt::Debug for HealthService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("HealthService");
        debug.field("backend", &self.backend);
        #[cfg(feature = "memory")]
        debug.field("sessions", &self.sessions.is_some());
        debug
            .field("rate_limit", &self.rate_limit)
            .field("degraded_status", &self.degraded_status)
            .finish()
    }
}

impl HealthService {
    /// A health endpoint for `backend`, reporting on it alone until told about more.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            #[cfg(feature = "memory")]
            sessions: None,
            rate_limit: None,
            degraded_status: StatusCode::OK,
        }
    }

    /// Also reports `store`'s fallback: whether sessions are served locally, the journal, and
    /// what was replayed or dropped.
    #[cfg(feature = "memory")]
    pub fn with_sessions<P: ReplayStore>(mut self, store: &FallbackStore<P>) -> Self {
        let store = store.clone();
        self.sessions = Some(Arc::new(move || store.status()));
        self
    }

    /// Also reports `layer`'s fallback decisions.
    pub fn with_rate_limit(mut self, layer: &RateLimitLayer) -> Self {
        self.rate_limit = Some(layer.clone());
        self
    }

    /// The status while Redis is unhealthy or anything falls back. Default: `200`.
    pub fn with_degraded_status(mut self, status: StatusCode) -> Self {
        self.degraded_status = status;
        self
    }

    /// Checks the backend (see [`RedisBackend::check`]) and reports on everything this service
    /// watches: what it answers, for a handler that adds fields of its own.
    pub async fn report(&self) -> HealthReport {
        let backend = self.backend.check().await;
        let healthy = backend.healthy;
        // Redis answers, but writes fall back (its decisions write too).
        let degraded = healthy && backend.refusing_writes;
        // The limiter knows how its last decision was made; with Redis healthy and taking
        // writes, its next one goes to Redis.
        let rate_limit = self.rate_limit.as_ref().map(|layer| RateLimitStatus {
            falling_back: layer.is_falling_back() && (!healthy || backend.refusing_writes),
            fallback_decisions: layer.fallback_decisions(),
            shadow_refusals: layer.shadow_refusals(),
        });
        #[cfg(feature = "memory")]
        let sessions = self.sessions.as_ref().map(|status| status());
        #[cfg(feature = "memory")]
        let sessions_local = sessions.as_ref().is_some_and(|s| s.active);
        #[cfg(not(feature = "memory"))]
        let sessions_local = false;
        HealthReport {
            redis: match (healthy, degraded) {
                (false, _) => "unhealthy",
                (true, true) => "degraded",
                (true, false) => "healthy",
            },
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
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
