//! Tenants: the namespace every session and rate-limit key lives in.
//!
//! A [`Tenant`] is a validated name: a DNS label (`a`–`z`, `0`–`9` and `-`, 1 to 63 characters,
//! no hyphen at either end), lower-cased. Because it becomes part of Redis keys, nothing else
//! can be a tenant: no `:`, no `{`/`}` (Redis Cluster hash tags), no glob characters, no spaces.
//!
//! ```
//! use tower_turnstile::tenant::Tenant;
//!
//! let acme = Tenant::new("ACME")?;
//! assert_eq!(acme.as_str(), "acme");
//! assert!(Tenant::new("evil:key").is_err());
//! assert!(Tenant::new("{slot}").is_err());
//! assert_eq!(Tenant::default_tenant().as_str(), "default");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`TenantLayer`] finds each request's tenant with a resolver, validates it and puts the
//! `Tenant` into the request's extensions, where the session layer scopes its keys to it (a
//! cookie replayed on another tenant finds nothing), the rate-limit layer scopes its counters
//! to it, and handlers read it (an axum extractor, with the `axum` feature). Put it outside the
//! session layer and the per-user rate limits, so they see the tenant (see the crate docs for
//! the whole stack).
//!
//! Resolvers ([`ResolveTenant`]): [`HostSubdomain`] (`acme.example.com` → `acme`),
//! [`HostMap`] (custom domains), [`PathPrefix`] (`/t/acme/...`, optionally stripped),
//! [`HeaderTenant`] (a header that only a trusted gateway sets), or a closure.
//!
//! The tenant layer is optional: without one (or without a `Tenant` put into the extensions
//! by your own middleware) the session and rate-limit layers use [`Tenant::default_tenant`], so
//! a single-tenant service needs no tenant code at all.
//!
//! # Refusals
//!
//! A name that is not a valid tenant (`acme_corp`, `a:b`, `{x}`, `ümlaut`, an empty or
//! over-long label) is never normalised into something else: the request is refused, by
//! default with `400 Bad Request` and a plain-text reason, and the reason
//! ([`TenantRejected`]) goes into the response's extensions. Only ASCII upper case is
//! normalised (`ACME` is `acme`). A request that names no tenant gets the default tenant, or
//! is refused if the layer has none.
//!
//! # Examples
//!
//! The first label of the host is the tenant (`acme.localhost:3000` → `acme`); a bare host or
//! an IP address is the `default` tenant:
//!
#![cfg_attr(all(feature = "memory", feature = "axum"), doc = "```")]
#![cfg_attr(not(all(feature = "memory", feature = "axum")), doc = "```ignore")]
//! use axum::{Router, routing::get};
//! use tower_turnstile::{
//!     session::{MemoryStore, Session, SessionLayer},
//!     tenant::{HostSubdomain, Tenant, TenantLayer},
//! };
//!
//! async fn whoami(tenant: Tenant, session: Session) -> String {
//!     let user: Option<String> = session.user_id().await.ok().flatten();
//!     format!("{} in {tenant}", user.as_deref().unwrap_or("anonymous"))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/whoami", get(whoami))
//!     .layer(SessionLayer::new(MemoryStore::new()))
//!     // Added last, so it runs first: the session layer sees the tenant.
//!     .layer(TenantLayer::new(HostSubdomain::first_label()));
//! # let _ = app;
//! ```
//!
//! Customised: the tenant is the path segment after `/t`, which the routes do not see
//! (`/t/acme/orders?page=2` reaches `/orders?page=2` as tenant `acme`); a request without one
//! is refused, and every refusal is a `404`. Stripping must happen before routing, so the layer wraps the whole
//! router rather than going through `Router::layer`:
//!
#![cfg_attr(feature = "axum", doc = "```no_run")]
#![cfg_attr(not(feature = "axum"), doc = "```ignore")]
//! use axum::{Router, routing::get};
//! use http::StatusCode;
//! use tower::Layer;
//! use tower_turnstile::tenant::{PathPrefix, Tenant, TenantLayer};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! async fn orders(tenant: Tenant) -> String {
//!     format!("orders of {tenant}")
//! }
//!
//! let routes: Router = Router::new().route("/orders", get(orders));
//! let tenants = TenantLayer::new(PathPrefix::new("/t")?.with_strip_prefix(true))
//!     .with_default_tenant(None)
//!     .with_rejection_status(StatusCode::NOT_FOUND);
//! let app = Router::new().fallback_service(tenants.layer(routes));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "axum")]
mod extract;
mod layer;
mod name;
mod resolver;
mod service;

#[cfg(feature = "axum")]
pub use extract::MissingTenantLayer;
pub use layer::{TenantLayer, TenantRejected};
pub use name::{InvalidTenant, MAX_TENANT_LEN, Tenant};
pub use resolver::{
    Candidate, HeaderTenant, HostMap, HostSubdomain, PathPrefix, Resolution, ResolveTenant,
    TenantSource,
};
pub use service::{ResponseFuture, TenantService};
