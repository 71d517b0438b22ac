//! At most N requests of one key in flight across all instances, on the connection registry's
//! leases.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use tower_layer::Layer;
use tower_service::Service;

use super::{ClientIp, KeyExtractor, key::tenant_of, service::take_ready};
use crate::{
    connection::{RegisterError, Registry},
    http::{RefusalBody, RequestView, plain_response},
};

/// Lets at most `max` requests of one key (by default the client's address) be in flight at
/// once, counted across every instance that shares the [`Registry`]'s Redis; past it, `429`
/// with `Retry-After: 1` and the `RateLimit` fields of a `concurrent-requests` quota:
/// `RateLimit-Policy: "concurrency";q=<max>;qu="concurrent-requests"` and
/// `RateLimit: "concurrency";r=0`.
///
/// Each request takes a lease before the inner service runs and gives it back once the inner
/// service has answered (two Redis round trips; the response body may still be streaming).
/// A lease of an instance that dies ends by itself, one lease later. Keys are scoped to the
/// request's tenant. A request without a key is not limited. While Redis is down, each
/// instance counts its own requests, as the registry does for connections.
///
#[cfg_attr(feature = "axum", doc = "```no_run")]
#[cfg_attr(not(feature = "axum"), doc = "```ignore")]
/// use tower_turnstile::{
///     backend::RedisBackend, connection::Registry, ratelimit::InFlightLimitLayer,
/// };
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = Registry::new(RedisBackend::new("redis://127.0.0.1:6379")?)?;
/// let app = axum::Router::<()>::new()
///     .route("/export", axum::routing::post(|| async { "done" }))
///     // Two exports per client address at a time, on all instances together.
///     .layer(InFlightLimitLayer::new(registry, 2));
/// # drop(app);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InFlightLimitLayer {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    max: u32,
    key: Box<dyn KeyExtractor>,
    policy: HeaderValue,
}

impl fmt::Debug for InFlightLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightLimitLayer")
            .field("registry", &self.shared.registry)
            .field("max", &self.shared.max)
            .finish_non_exhaustive()
    }
}

impl InFlightLimitLayer {
    /// At most `max` requests in flight per client address (at least 1).
    pub fn new(registry: Registry, max: u32) -> Self {
        let max = max.max(1);
        let policy = HeaderValue::try_from(format!(
            "\"concurrency\";q={max};qu=\"concurrent-requests\""
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"concurrency\""));
        Self {
            shared: Arc::new(Shared {
                registry,
                max,
                key: Box::new(ClientIp::peer()),
                policy,
            }),
        }
    }

    /// Counts per another key: a header, the session's user, a closure, as for rate limits.
    pub fn with_key(self, key: impl KeyExtractor) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry: self.shared.registry.clone(),
                max: self.shared.max,
                key: Box::new(key),
                policy: self.shared.policy.clone(),
            }),
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimitService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of a [`InFlightLimitLayer`].
#[derive(Clone)]
pub struct InFlightLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for InFlightLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightLimitService")
            .field("inner", &self.inner)
            .field("max", &self.shared.max)
            .finish_non_exhaustive()
    }
}

/// The response future of [`InFlightLimitService`]: a lease is taken (a Redis round trip)
/// before the inner service runs, and given back after it answers.
pub struct InFlightFuture<B, E>(Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>);

impl<B, E> fmt::Debug for InFlightFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightFuture").finish_non_exhaustive()
    }
}

impl<B, E> Future for InFlightFuture<B, E> {
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for InFlightLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: RefusalBody + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = InFlightFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let extracted = self.shared.key.extract(&RequestView::new(&request));
        let tenant = tenant_of(request.extensions()).clone();
        let mut inner = take_ready(&mut self.inner);
        let shared = Arc::clone(&self.shared);
        InFlightFuture(Box::pin(async move {
            let key = extracted.await;
            let Some(key) = key else {
                return inner.call(request).await;
            };
            let scope = format!("in-flight:{key}");
            match shared
                .registry
                .register_capped(&tenant, &scope, "", shared.max)
                .await
            {
                Ok(lease) => {
                    let response = inner.call(request).await;
                    lease.release().await;
                    response
                }
                Err(RegisterError::AtCapacity { .. }) => Ok(refusal(&shared)),
                // A draining registry still serves the requests that reach it.
                Err(_) => inner.call(request).await,
            }
        }))
    }
}

fn refusal<B: RefusalBody>(shared: &Shared) -> Response<B> {
    let mut response = plain_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests in flight; retry when one has finished\n",
    );
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert("ratelimit-policy", shared.policy.clone());
    headers.insert("ratelimit", HeaderValue::from_static("\"concurrency\";r=0"));
    response
}
