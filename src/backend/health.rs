use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use serde::Serialize;

use super::{BreakerState, RedisBackend};
use http_body_util::Full;

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

fn unix_millis(time: &SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn serialize_time<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(unix_millis(time))
}

fn serialize_opt_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.serialize_some(&unix_millis(t)),
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

    /// A Tower service that answers every request with [`Health::check`] as JSON:
    /// `200` while healthy, `503` otherwise.
    pub fn service(&self) -> HealthService {
        HealthService {
            health: self.clone(),
        }
    }
}

/// A ready-made health endpoint: answers any request with the backend's
/// [`HealthSnapshot`] as JSON, `200` when healthy and `503` when not.
///
/// ```no_run
/// use axum::{Router, routing::get_service};
/// use tower_turnstile::backend::RedisBackend;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let app: Router = Router::new().route_service("/health/redis", redis.health().service());
/// # let _ = app;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HealthService {
    health: Health,
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
        let health = self.health.clone();
        HealthFuture {
            inner: Box::pin(async move {
                let snapshot = health.check().await;
                let status = if snapshot.healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok(json_response(status, &snapshot))
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
