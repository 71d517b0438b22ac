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
mod resolver;
mod service;

#[cfg(feature = "axum")]
pub use extract::MissingTenantLayer;
pub use layer::{TenantLayer, TenantRejected};
pub use resolver::{
    Candidate, HeaderTenant, HostMap, HostSubdomain, PathPrefix, RequestView, Resolution,
    ResolveTenant, ResolverConfigError, TenantSource,
};
pub use service::{ResponseFuture, TenantService};

use std::{
    fmt,
    sync::{Arc, LazyLock},
};

/// The longest tenant name: the length limit of one DNS label.
pub const MAX_TENANT_LEN: usize = 63;

/// A validated tenant name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

/// Why a string is not a valid tenant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTenant {
    /// The name is empty.
    #[error("tenant name is empty")]
    Empty,
    /// The name is longer than [`MAX_TENANT_LEN`] bytes.
    #[error("tenant name is longer than {MAX_TENANT_LEN} characters")]
    TooLong,
    /// The name has a character outside `a`–`z`, `0`–`9` and `-`.
    #[error("tenant name may only contain letters, digits and '-'")]
    InvalidCharacter,
    /// The name starts or ends with `-`.
    #[error("tenant name may not start or end with '-'")]
    EdgeHyphen,
}

impl Tenant {
    /// A tenant from a literal name, as `http::HeaderValue::from_static` does for headers.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid tenant name (see [`Tenant::new`]): meant for literals in
    /// code, where the mistake is the programmer's. Use [`Tenant::new`] for names from input.
    ///
    /// ```
    /// use tower_turnstile::tenant::Tenant;
    ///
    /// assert_eq!(Tenant::from_static("acme").as_str(), "acme");
    /// ```
    #[track_caller]
    pub fn from_static(name: &'static str) -> Self {
        match Self::new(name) {
            Ok(tenant) => tenant,
            Err(error) => panic!("invalid tenant name {name:?}: {error}"),
        }
    }

    /// Validates `name` (ASCII letters are lower-cased) and makes it a tenant.
    pub fn new(name: &str) -> Result<Self, InvalidTenant> {
        if name.is_empty() {
            return Err(InvalidTenant::Empty);
        }
        if name.len() > MAX_TENANT_LEN {
            return Err(InvalidTenant::TooLong);
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(InvalidTenant::InvalidCharacter);
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(InvalidTenant::EdgeHyphen);
        }
        Ok(Self(Arc::from(name.to_ascii_lowercase())))
    }

    /// The tenant used when no tenant is set on a request: `default`.
    pub fn default_tenant() -> Self {
        Self::default_ref().clone()
    }

    /// The default tenant, borrowed from its one shared copy.
    pub(crate) fn default_ref() -> &'static Tenant {
        static DEFAULT: LazyLock<Tenant> = LazyLock::new(|| Tenant(Arc::from("default")));
        &DEFAULT
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Tenant").field(&&*self.0).finish()
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Tenant {
    type Err = InvalidTenant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels_and_lowercases() {
        assert_eq!(Tenant::new("Acme-2").unwrap().as_str(), "acme-2");
        assert_eq!(Tenant::new(&"a".repeat(63)).unwrap().as_str().len(), 63);
    }

    #[test]
    fn refuses_everything_that_could_shape_a_key() {
        for bad in [
            "", "a:b", "{a}", "a*", "a b", "ümlaut", "-a", "a-", "a.b", "a/b", "a\n",
        ] {
            assert!(Tenant::new(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(Tenant::new(&"a".repeat(64)), Err(InvalidTenant::TooLong));
    }
}
