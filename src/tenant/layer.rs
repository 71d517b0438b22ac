use std::{any, fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use tower_layer::Layer;

use super::{
    InvalidTenant, Tenant,
    resolver::{Resolution, ResolveTenant, TenantSource},
    service::TenantService,
};
use crate::http::{GRPC_INVALID_ARGUMENT, RefusalBody, RequestView, grpc_status};

type RejectionFn = dyn Fn(&TenantRejected) -> Response<Bytes> + Send + Sync;

/// Why a [`TenantLayer`] refused a request. The refusal's response carries it in its
/// extensions, so outer layers (logging, metrics) can tell why; its `Display` is the plain
/// reason the default refusal sends. It never repeats the name the request gave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TenantRejected {
    /// The request names no tenant and the layer has no default tenant.
    #[error("the {0} names no tenant")]
    Missing(TenantSource),
    /// Where the tenant comes from is broken (a `Host` that is no host, a repeated header).
    #[error("the {0} is malformed")]
    Malformed(TenantSource),
    /// The name the request gives is not a valid tenant name.
    #[error("the {origin} names no valid tenant: {reason}")]
    Invalid {
        /// Where the name was found.
        origin: TenantSource,
        /// What is wrong with it.
        #[source]
        reason: InvalidTenant,
    },
}

/// Configuration shared by a [`TenantLayer`] and every service it makes.
#[derive(Clone)]
pub(crate) struct Shared {
    resolver: Arc<dyn ResolveTenant>,
    /// The resolver's type, for `Debug` (closures have no other name).
    resolver_type: &'static str,
    default_tenant: Option<Tenant>,
    rejection_status: StatusCode,
    rejection: Option<Arc<RejectionFn>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantConfig")
            .field("resolver", &self.resolver_type)
            .field("default_tenant", &self.default_tenant)
            .field("rejection_status", &self.rejection_status)
            .field("custom_rejection", &self.rejection.is_some())
            .finish()
    }
}

impl Shared {
    /// The tenant of `request`, and the URI the inner service gets instead of its own.
    pub(crate) fn resolve(
        &self,
        request: &RequestView<'_>,
    ) -> Result<(Tenant, Option<Uri>), TenantRejected> {
        match self.resolver.resolve(request) {
            Resolution::Found(candidate) => {
                let (name, origin, uri) = candidate.into_parts();
                match Tenant::new(&name) {
                    Ok(tenant) => Ok((tenant, uri)),
                    Err(reason) => Err(TenantRejected::Invalid { origin, reason }),
                }
            }
            Resolution::Missing(origin) => match &self.default_tenant {
                Some(tenant) => Ok((tenant.clone(), None)),
                None => Err(TenantRejected::Missing(origin)),
            },
            Resolution::Malformed(origin) => Err(TenantRejected::Malformed(origin)),
        }
    }

    /// The response refusing a request for `rejected`: a gRPC call gets a trailers-only
    /// `INVALID_ARGUMENT`, anything else the configured status with the reason as text.
    pub(crate) fn reject<B: RefusalBody>(
        &self,
        rejected: TenantRejected,
        grpc: bool,
    ) -> Response<B> {
        tracing::debug!(reason = %rejected, "request refused: no valid tenant");
        let mut response = match &self.rejection {
            Some(custom) => custom(&rejected).map(B::from_bytes),
            None if grpc => grpc_status(GRPC_INVALID_ARGUMENT, "no valid tenant"),
            None => {
                let mut response = Response::new(B::from_bytes(format!("{rejected}\n").into()));
                *response.status_mut() = self.rejection_status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                response
            }
        };
        response.extensions_mut().insert(rejected);
        response
    }
}

/// Finds the tenant of every request, validates it, and puts it into the request's extensions
/// as a [`Tenant`], where the session and rate-limit layers (and handlers) find it.
///
/// The resolver (a [`ResolveTenant`]) only finds a name; the layer validates it with
/// [`Tenant::new`] (a DNS label, lower-cased) before the request goes on, so nothing else can
/// become part of a key. A `Tenant` an outer layer put into the extensions is replaced.
///
/// Defaults: a request that names no tenant gets [`Tenant::default_tenant`]; an invalid name
/// or a malformed source is refused with `400 Bad Request` and a plain-text reason. The
/// reason, a [`TenantRejected`], is also in the refusal's extensions.
///
/// ```
/// use tower_turnstile::tenant::{HostSubdomain, TenantLayer};
///
/// // `acme.example.com` is tenant `acme`; `example.com` and IP addresses are `default`.
/// let layer = TenantLayer::new(HostSubdomain::new("example.com")?);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// No default tenant, `404` for every refusal, or a response of your own:
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, StatusCode};
/// use tower_turnstile::tenant::{HostSubdomain, TenantLayer, TenantRejected};
///
/// let strict = TenantLayer::new(HostSubdomain::new("example.com")?)
///     .with_default_tenant(None)
///     .with_rejection_status(StatusCode::NOT_FOUND);
///
/// let custom = TenantLayer::new(HostSubdomain::first_label()).with_rejection(
///     |rejected: &TenantRejected| {
///         let status = match rejected {
///             TenantRejected::Missing(_) => StatusCode::NOT_FOUND,
///             _ => StatusCode::BAD_REQUEST,
///         };
///         let mut response = Response::new(Bytes::from(format!("{{\"error\":\"{rejected}\"}}")));
///         *response.status_mut() = status;
///         response
///     },
/// );
/// # let _ = (strict, custom);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct TenantLayer {
    shared: Arc<Shared>,
}

impl TenantLayer {
    /// A layer finding tenants with `resolver`, with the defaults above.
    pub fn new<R: ResolveTenant>(resolver: R) -> Self {
        Self {
            shared: Arc::new(Shared {
                resolver: Arc::new(resolver),
                resolver_type: any::type_name::<R>(),
                default_tenant: Some(Tenant::default_tenant()),
                rejection_status: StatusCode::BAD_REQUEST,
                rejection: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The tenant of requests that name none; `None` refuses them instead. Default:
    /// [`Tenant::default_tenant`].
    pub fn with_default_tenant(self, tenant: impl Into<Option<Tenant>>) -> Self {
        let tenant = tenant.into();
        self.edit(|s| s.default_tenant = tenant)
    }

    /// The status of the default refusal. Default: `400 Bad Request`.
    pub fn with_rejection_status(self, status: StatusCode) -> Self {
        self.edit(|s| s.rejection_status = status)
    }

    /// Builds the refusal response yourself (status, body, headers). The layer still puts the
    /// [`TenantRejected`] into its extensions.
    pub fn with_rejection(
        self,
        rejection: impl Fn(&TenantRejected) -> Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.edit(|s| s.rejection = Some(Arc::new(rejection)))
    }

    /// The tenant this layer gives `request`, or why it refuses it; the layer does exactly
    /// this for every request (and then rewrites the URI if the resolver asks for it).
    pub fn resolve<B>(&self, request: &Request<B>) -> Result<Tenant, TenantRejected> {
        self.shared
            .resolve(&RequestView::new(request))
            .map(|(tenant, _)| tenant)
    }
}

impl<S> Layer<S> for TenantLayer {
    type Service = TenantService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantService::new(inner, Arc::clone(&self.shared))
    }
}
