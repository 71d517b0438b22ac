//! At most N requests of one key in flight across all instances.

use std::{
    fmt,
    future::Future,
    mem,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use tower_layer::Layer;
use tower_service::Service;

use super::{RegisterError, Registry};
use crate::{
    http::{RefusalBody, RequestView, plain_response},
    ratelimit::{ClientIp, Extracted, KeyExtractor},
    tenant::Tenant,
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
/// use tower_turnstile::{backend::RedisBackend, connection::{ConcurrencyLimitLayer, Registry}};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = Registry::new(RedisBackend::new("redis://127.0.0.1:6379")?)?;
/// let app = axum::Router::<()>::new()
///     .route("/export", axum::routing::post(|| async { "done" }))
///     // Two exports per client address at a time, on all instances together.
///     .layer(ConcurrencyLimitLayer::new(registry, 2));
/// # drop(app);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    max: u32,
    key: Box<dyn KeyExtractor>,
    policy: HeaderValue,
}

impl fmt::Debug for ConcurrencyLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("registry", &self.shared.registry)
            .field("max", &self.shared.max)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyLimitLayer {
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

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimitService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of a [`ConcurrencyLimitLayer`].
#[derive(Clone)]
pub struct ConcurrencyLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for ConcurrencyLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitService")
            .field("inner", &self.inner)
            .field("max", &self.shared.max)
            .finish_non_exhaustive()
    }
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ConcurrencyLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: RefusalBody + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxedResponse<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let extracted = self.shared.key.extract(&RequestView::new(&request));
        let tenant = request
            .extensions()
            .get::<Tenant>()
            .cloned()
            .unwrap_or_default();
        // The ready service goes into the future; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let key = match extracted {
                Extracted::Ready(key) => key,
                Extracted::Pending(pending) => pending.await,
            };
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
        })
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
