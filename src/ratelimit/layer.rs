use std::{
    fmt,
    sync::{Arc, atomic::AtomicBool},
};

use bytes::Bytes;
use http::{HeaderValue, Response};
use tower_layer::Layer;

use super::{
    headers::policy_value,
    lease::Lease,
    limiter::{Fallback, Limiter},
    policy::Policy,
    service::RateLimitService,
    shadow::Shadow,
    store::{Decision, RateLimitStore},
};

type RejectionFn = dyn Fn(&Rejection<'_>) -> Response<Bytes> + Send + Sync;

/// What a custom rejection sees: why the request was refused.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Rejection<'a> {
    /// The name of the policy that refused it.
    pub policy: &'a str,
    /// The decision.
    pub decision: &'a Decision,
    /// Whether the request is gRPC.
    pub grpc: bool,
}

/// Put into the extensions of every response the layer refuses, so outer layers (logging,
/// metrics) can tell why.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RateLimited {
    /// The name of the policy that refused the request.
    pub policy: Arc<str>,
    /// The decision; `None` when the limiter was unavailable and fails closed.
    pub decision: Option<Decision>,
}

/// Configuration shared by a layer and every service it makes, built once per layer.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) policy: Policy,
    pub(crate) limiter: Limiter,
    pub(crate) headers: bool,
    pub(crate) rejection: Option<Arc<RejectionFn>>,
    pub(crate) policy_header: HeaderValue,
    /// `{policy}:{algorithm}`, the scope of every counter key of this layer.
    pub(crate) scope: Arc<str>,
    pub(crate) warned_missing_key: Arc<AtomicBool>,
    /// Set by [`RateLimitLayer::with_shadow`]: decide and count, never refuse.
    pub(crate) shadow: Option<Shadow>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitConfig")
            .field("policy", &self.policy)
            .field("limiter", &self.limiter)
            .field("headers", &self.headers)
            .field("custom_rejection", &self.rejection.is_some())
            .field("shadow", &self.shadow.is_some())
            .finish()
    }
}

/// Enforces a [`Policy`] on every request: over the quota, the request is answered `429 Too
/// Many Requests` (gRPC: `RESOURCE_EXHAUSTED`) without reaching the inner service.
///
/// Counts live in a store shared by every clone of the service (axum clones services freely),
/// in memory by default or in Redis for all instances at once. With Redis, each decision is
/// one round trip; a key denied until time T is answered locally until T; and when Redis
/// fails, a local limiter takes over (see [`Fallback`]) until it answers again.
///
/// Allowed and refused responses carry `RateLimit-Policy` and `RateLimit`
/// (draft-ietf-httpapi-ratelimit-headers); refusals also carry `Retry-After` in whole seconds
/// (at least 1).
///
#[cfg_attr(feature = "axum", doc = "```")]
#[cfg_attr(not(feature = "axum"), doc = "```ignore")]
/// use axum::{Router, routing::get};
/// use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(100))?));
/// # let _ = app;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Shared by every instance through Redis, behind a load balancer, with a quarter of the quota
/// per instance (four instances) while Redis is down:
///
#[cfg_attr(feature = "redis", doc = "```no_run")]
#[cfg_attr(not(feature = "redis"), doc = "```ignore")]
/// use tower_turnstile::{
///     backend::RedisBackend,
///     ratelimit::{ClientIp, Fallback, Policy, Quota, RateLimitLayer},
/// };
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let policy = Policy::new("per-ip", Quota::per_minute(100))?
///     .with_key(ClientIp::trusting(["10.0.0.0/8"])?);
/// let layer = RateLimitLayer::new(policy)
///     .with_redis(redis)
///     .with_fallback(Fallback::local_share_of(4));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer enforcing `policy`, counting in this process's memory.
    pub fn new(policy: Policy) -> Self {
        let policy_header = policy_value(
            policy.name(),
            policy.quota().limit(),
            policy.quota().window(),
        );
        let scope = format!("{}:{}", policy.name(), policy.algorithm().as_str()).into();
        Self {
            shared: Arc::new(Shared {
                policy,
                limiter: Limiter::default(),
                headers: true,
                rejection: None,
                policy_header,
                scope,
                warned_missing_key: Arc::new(AtomicBool::new(false)),
                shadow: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// Counts in `store` (shared by every instance when it is Redis).
    pub fn with_store(self, store: impl RateLimitStore) -> Self {
        self.with_shared_store(Arc::new(store))
    }

    /// Counts in a store that other layers use too.
    pub fn with_shared_store(self, store: Arc<dyn RateLimitStore>) -> Self {
        self.edit(|s| s.limiter = s.limiter.with_store(store))
    }

    /// Counts in Redis through `backend` (a [`RedisRateStore`](super::RedisRateStore) with
    /// default settings).
    #[cfg(feature = "redis")]
    pub fn with_redis(self, backend: crate::backend::RedisBackend) -> Self {
        self.with_store(super::RedisRateStore::new(backend))
    }

    /// What to do while a shared store is unreachable. Default: [`Fallback::Local`] with the
    /// whole quota.
    pub fn with_fallback(self, fallback: Fallback) -> Self {
        self.edit(|s| s.limiter.fallback = fallback)
    }

    /// Takes the quota from a shared store in batches and spends them locally (see [`Lease`]
    /// for the bound on the error this allows). Default: no lease, every request is checked
    /// in the store. Has no effect on an in-memory store.
    pub fn with_lease(self, lease: Lease) -> Self {
        self.edit(|s| s.limiter = s.limiter.with_lease(Some(lease)))
    }

    /// Whether responses carry the `RateLimit` and `RateLimit-Policy` fields. Default: `true`.
    pub fn with_headers(self, headers: bool) -> Self {
        self.edit(|s| s.headers = headers)
    }

    /// Builds the refusal response yourself (status, body, headers). The layer still adds
    /// `Retry-After` and the `RateLimit` fields when the response lacks them.
    pub fn with_rejection(
        self,
        rejection: impl Fn(&Rejection<'_>) -> Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.edit(|s| s.rejection = Some(Arc::new(rejection)))
    }

    /// Makes the layer a shadow: it decides, counts and sends the `RateLimit` fields as
    /// before, but never refuses. Each refusal it did not make is counted
    /// ([`shadow_refusals`](Self::shadow_refusals), the metric
    /// `turnstile_ratelimit_shadow_refusals_total`, `/health`) and logged once per key per
    /// window. How a new limit is rolled out: watch what it would refuse, then turn the shadow
    /// off. Default: `false`.
    ///
    #[cfg_attr(feature = "axum", doc = "```")]
    #[cfg_attr(not(feature = "axum"), doc = "```ignore")]
    /// use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};
    ///
    /// let trial = RateLimitLayer::new(Policy::new("per-ip-v2", Quota::per_minute(30))?)
    ///     .with_shadow(true);
    /// # let _ = trial;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_shadow(self, shadow: bool) -> Self {
        self.edit(|s| s.shadow = shadow.then(|| Shadow::new(s.policy.quota().window())))
    }

    /// How many requests a shadow layer let through that it would have refused, since it was
    /// built (0 for a layer that refuses).
    pub fn shadow_refusals(&self) -> u64 {
        self.shared.shadow.as_ref().map_or(0, Shadow::refusals)
    }

    /// Whether the layer is a shadow ([`with_shadow`](Self::with_shadow)).
    pub fn is_shadow(&self) -> bool {
        self.shared.shadow.is_some()
    }

    /// The policy this layer enforces.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// Whether the last decision came from the fallback (the shared store was unreachable).
    pub fn is_falling_back(&self) -> bool {
        self.shared.limiter.is_falling_back()
    }

    /// How many decisions this layer made without its shared store (local limiter, fail-open
    /// or fail-closed), since it was built.
    pub fn fallback_decisions(&self) -> u64 {
        self.shared.limiter.fallback_decisions()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(inner, Arc::clone(&self.shared))
    }
}
