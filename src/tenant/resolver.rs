use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use http::{HeaderName, Uri, header, uri::PathAndQuery};

use super::Tenant;
use crate::{ConfigError, RequestView};

/// Where in the request a resolver looks for the tenant; refusals name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TenantSource {
    /// The `Host` header (or, without one, the URI's authority, as HTTP/2 sends it).
    Host,
    /// The URI's path.
    Path,
    /// A request header.
    Header(HeaderName),
    /// Somewhere else (a custom resolver).
    Request,
}

impl fmt::Display for TenantSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("Host header"),
            Self::Path => f.write_str("path"),
            Self::Header(name) => write!(f, "{name} header"),
            Self::Request => f.write_str("request"),
        }
    }
}

/// A tenant name found in a request, not validated yet: the layer validates it (and lower-cases
/// it) with [`Tenant::new`] before it goes anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    name: String,
    origin: TenantSource,
    uri: Option<Uri>,
}

impl Candidate {
    /// `name`, as found in `origin`.
    pub fn new(name: impl Into<String>, origin: TenantSource) -> Self {
        Self {
            name: name.into(),
            origin,
            uri: None,
        }
    }

    /// Once the name is valid, hands the inner service `uri` instead of the request's own (the
    /// URI without the tenant's path prefix, say). An invalid name leaves the request alone.
    #[must_use]
    pub fn with_uri(mut self, uri: Uri) -> Self {
        self.uri = Some(uri);
        self
    }

    /// The name as the request gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the name was found.
    pub fn origin(&self) -> &TenantSource {
        &self.origin
    }

    /// The URI the inner service gets, when it is not the request's own.
    pub fn uri(&self) -> Option<&Uri> {
        self.uri.as_ref()
    }

    pub(crate) fn into_parts(self) -> (String, TenantSource, Option<Uri>) {
        (self.name, self.origin, self.uri)
    }
}

/// What a [`ResolveTenant`] found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolution {
    /// A tenant name, which the layer validates.
    Found(Candidate),
    /// The request names no tenant there: the layer uses its default tenant, or refuses the
    /// request when it has none.
    Missing(TenantSource),
    /// The place the tenant comes from is broken (a `Host` that is no host, a header that is
    /// not text or is repeated): the layer always refuses the request.
    Malformed(TenantSource),
}

impl Resolution {
    /// A tenant name found in `origin`.
    pub fn found(name: impl Into<String>, origin: TenantSource) -> Self {
        Self::Found(Candidate::new(name, origin))
    }
}

impl From<Candidate> for Resolution {
    fn from(candidate: Candidate) -> Self {
        Self::Found(candidate)
    }
}

impl From<Option<String>> for Resolution {
    /// `Some(name)` is a name found by a custom resolver, `None` is no tenant.
    fn from(name: Option<String>) -> Self {
        match name {
            Some(name) => Self::found(name, TenantSource::Request),
            None => Self::Missing(TenantSource::Request),
        }
    }
}

impl From<Option<Tenant>> for Resolution {
    /// `Some(tenant)` is that tenant, `None` is no tenant.
    fn from(tenant: Option<Tenant>) -> Self {
        tenant.map(|t| t.as_str().to_owned()).into()
    }
}

/// Finds the tenant a request names.
///
/// Implemented by [`HostSubdomain`], [`HostMap`], [`PathPrefix`], [`HeaderTenant`] and closures
/// `Fn(&RequestView<'_>) -> R` where `R` is an `Option<String>`, an `Option<Tenant>` or a
/// [`Resolution`]. A resolver only finds a name: the layer validates it, so a resolver cannot
/// let an ill-formed name into a key.
///
/// ```
/// use tower_turnstile::{RequestView, tenant::TenantLayer};
///
/// // The tenant from a claim that an outer authentication layer put into the extensions.
/// #[derive(Clone)]
/// struct Claims { org: String }
///
/// let layer = TenantLayer::new(|request: &RequestView<'_>| {
///     request.extensions.get::<Claims>().map(|claims| claims.org.clone())
/// });
/// # let _ = layer;
/// ```
pub trait ResolveTenant: Send + Sync + 'static {
    /// The tenant `request` names.
    fn resolve(&self, request: &RequestView<'_>) -> Resolution;
}

impl<F, R> ResolveTenant for F
where
    F: Fn(&RequestView<'_>) -> R + Send + Sync + 'static,
    R: Into<Resolution>,
{
    fn resolve(&self, request: &RequestView<'_>) -> Resolution {
        self(request).into()
    }
}

/// The tenant from a subdomain of the `Host` header.
///
/// The host is read from `Host` (or, without one, from the URI's authority, as HTTP/2 sends
/// it); the port and a trailing dot are ignored. Two `Host` headers, a value that is not text
/// or not a host (a bad port, an unclosed `[`, an empty label such as `acme..example.com`) are
/// malformed, and always refused.
///
/// - [`HostSubdomain::first_label`]: the first label of a host that has a subdomain
///   (`acme.localhost:3000` → `acme`, `acme.example.com` → `acme`).
/// - [`HostSubdomain::new`]: the subdomain of one base domain (`acme.example.com` → `acme`);
///   a deeper subdomain (`www.acme.example.com`) is not a valid name and is refused.
///
/// A bare host (`localhost`, the base domain itself), an IP literal (`127.0.0.1`, `[::1]:3000`),
/// a host outside the base domain, an empty host and a request without one name no tenant:
/// they get the layer's default tenant, or are refused when it has none.
///
/// ```
/// use tower_turnstile::tenant::{HostSubdomain, TenantLayer};
///
/// let layer = TenantLayer::new(HostSubdomain::new("example.com")?);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct HostSubdomain {
    /// Lower case, without leading or trailing dots; `None` for the first-label rule.
    base: Option<Arc<str>>,
}

impl HostSubdomain {
    /// [`HostSubdomain::new`] for a literal base domain.
    ///
    /// # Panics
    ///
    /// If `base_domain` is not a valid domain name: meant for literals in code.
    ///
    /// ```
    /// use tower_turnstile::tenant::{HostSubdomain, TenantLayer};
    ///
    /// let layer = TenantLayer::new(HostSubdomain::from_static("example.com"));
    /// # let _ = layer;
    /// ```
    #[track_caller]
    pub fn from_static(base_domain: &'static str) -> Self {
        match Self::new(base_domain) {
            Ok(resolver) => resolver,
            Err(error) => panic!("{error}"),
        }
    }

    /// The subdomain directly under `base_domain` (such as `example.com`) is the tenant.
    pub fn new(base_domain: &str) -> Result<Self, ConfigError> {
        let trimmed = base_domain.strip_prefix('.').unwrap_or(base_domain);
        let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
        let valid = !trimmed.is_empty()
            && trimmed.len() <= 253
            && trimmed
                .split('.')
                .all(|label| is_host_label(label) && label.len() <= 63);
        if !valid {
            return Err(ConfigError::BaseDomain(base_domain.to_owned()));
        }
        Ok(Self {
            base: Some(Arc::from(trimmed.to_ascii_lowercase())),
        })
    }

    /// The first label of any host that has a subdomain is the tenant (`acme.localhost:3000`
    /// → `acme`).
    pub fn first_label() -> Self {
        Self { base: None }
    }
}

impl ResolveTenant for HostSubdomain {
    fn resolve(&self, request: &RequestView<'_>) -> Resolution {
        let Ok(host) = host_of(request).and_then(parse_host) else {
            return Resolution::Malformed(TenantSource::Host);
        };
        let ParsedHost::Name(name) = host else {
            return Resolution::Missing(TenantSource::Host);
        };
        match &self.base {
            None => match name.split_once('.') {
                Some((first, _)) => Resolution::found(first, TenantSource::Host),
                None => Resolution::Missing(TenantSource::Host),
            },
            Some(base) => {
                let name = name.to_ascii_lowercase();
                match name.strip_suffix(&**base).and_then(|s| s.strip_suffix('.')) {
                    Some(sub) => Resolution::found(sub, TenantSource::Host),
                    None => Resolution::Missing(TenantSource::Host),
                }
            }
        }
    }
}

/// The tenant from an exact host → tenant table (`acme.example.com` → `acme`,
/// `shop.globex.test` → `globex`), for custom domains.
///
/// The port and a trailing dot of the request's host are ignored and case does not matter.
/// A host not in the table names no tenant: the layer's default, or a refusal when it has none
/// (with `404`, say). A malformed `Host` is refused, as for [`HostSubdomain`].
///
/// ```
/// use http::StatusCode;
/// use tower_turnstile::tenant::{HostMap, Tenant, TenantLayer};
///
/// let hosts = HostMap::new()
///     .try_with_host("app.acme.com", Tenant::new("acme")?)?
///     .try_with_host("shop.globex.test", Tenant::new("globex")?)?;
/// let layer = TenantLayer::new(hosts)
///     .with_default_tenant(None)
///     .with_rejection_status(StatusCode::NOT_FOUND);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct HostMap {
    hosts: Arc<HashMap<String, Tenant>>,
}

impl HostMap {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`HostMap::try_with_host`] for literals.
    ///
    /// # Panics
    ///
    /// If `host` or `tenant` is invalid: meant for literals in code.
    ///
    /// ```
    /// use tower_turnstile::tenant::HostMap;
    ///
    /// let hosts = HostMap::new()
    ///     .with_static_host("shop.acme.test", "acme")
    ///     .with_static_host("globex.example", "globex");
    /// # let _ = hosts;
    /// ```
    #[track_caller]
    pub fn with_static_host(self, host: &'static str, tenant: &'static str) -> Self {
        match self.try_with_host(host, Tenant::from_static(tenant)) {
            Ok(map) => map,
            Err(error) => panic!("{error}"),
        }
    }

    /// Maps `host` (a DNS name or an IP address, without a port) to `tenant`, replacing an
    /// earlier entry for the same host.
    pub fn try_with_host(mut self, host: &str, tenant: Tenant) -> Result<Self, ConfigError> {
        let key = match parse_host(host) {
            Ok(ParsedHost::Name(name))
                if !host.contains(':') && name.split('.').all(is_host_label) =>
            {
                name.to_ascii_lowercase()
            }
            Ok(ParsedHost::Ip(ip)) if !has_port(host) => ip.to_string(),
            _ => return Err(ConfigError::Host(host.to_owned())),
        };
        Arc::make_mut(&mut self.hosts).insert(key, tenant);
        Ok(self)
    }
}

impl ResolveTenant for HostMap {
    fn resolve(&self, request: &RequestView<'_>) -> Resolution {
        let key = match host_of(request).and_then(parse_host) {
            Ok(ParsedHost::Name(name)) => name.to_ascii_lowercase(),
            Ok(ParsedHost::Ip(ip)) => ip.to_string(),
            Ok(ParsedHost::Empty) => return Resolution::Missing(TenantSource::Host),
            Err(Malformed) => return Resolution::Malformed(TenantSource::Host),
        };
        match self.hosts.get(&key) {
            Some(tenant) => Resolution::found(tenant.as_str(), TenantSource::Host),
            None => Resolution::Missing(TenantSource::Host),
        }
    }
}

/// The tenant from a path segment: `/t/acme/orders?page=2` → `acme` with prefix `/t`.
///
/// Segments are compared as they are: nothing is percent-decoded, so `%61cme` is not a valid
/// name and is refused. A path without the prefix, or with nothing after it (`/t`, `/t/`),
/// names no tenant; an empty segment after the prefix (`/t//orders`) is refused.
///
/// With [`with_strip_prefix`](Self::with_strip_prefix), the inner service sees the path
/// without the prefix and the tenant segment (`/orders?page=2`; `/` when nothing is left).
/// In axum, `Router::layer` runs after routing, so for the router to route the stripped path
/// wrap the router itself: `Router::new().fallback_service(tenants.layer(router))`.
///
/// ```
/// use tower_turnstile::tenant::{PathPrefix, TenantLayer};
///
/// let layer = TenantLayer::new(PathPrefix::new("/t")?.with_strip_prefix(true));
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct PathPrefix {
    /// Without a trailing `/`; empty for the first segment.
    prefix: Arc<str>,
    strip: bool,
}

impl PathPrefix {
    /// [`PathPrefix::new`] for a literal prefix.
    ///
    /// # Panics
    ///
    /// If `prefix` is not a valid path prefix: meant for literals in code.
    #[track_caller]
    pub fn from_static(prefix: &'static str) -> Self {
        match Self::new(prefix) {
            Ok(resolver) => resolver,
            Err(error) => panic!("{error}"),
        }
    }

    /// The segment after `prefix` (such as `/t`, or `/` for the first segment) is the tenant.
    pub fn new(prefix: &str) -> Result<Self, ConfigError> {
        let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
        let valid = prefix.starts_with('/')
            && (trimmed.is_empty()
                || trimmed[1..].split('/').all(|segment| {
                    !segment.is_empty()
                        && segment.bytes().all(|b| {
                            b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b'/')
                        })
                }));
        if !valid {
            return Err(ConfigError::PathPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: Arc::from(trimmed),
            strip: false,
        })
    }

    /// The first path segment is the tenant (`/acme/orders` → `acme`).
    pub fn first_segment() -> Self {
        Self {
            prefix: Arc::from(""),
            strip: false,
        }
    }

    /// Whether the inner service sees the path without the prefix and the tenant segment.
    /// The query is kept. Default: `false`.
    #[must_use]
    pub fn with_strip_prefix(mut self, strip: bool) -> Self {
        self.strip = strip;
        self
    }
}

impl ResolveTenant for PathPrefix {
    fn resolve(&self, request: &RequestView<'_>) -> Resolution {
        let path = request.uri.path();
        let rest = match path.strip_prefix(&*self.prefix) {
            Some(rest) if rest.len() > 1 && rest.starts_with('/') => &rest[1..],
            _ => return Resolution::Missing(TenantSource::Path),
        };
        let (segment, remaining) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let candidate = Candidate::new(segment, TenantSource::Path);
        if !self.strip {
            return candidate.into();
        }
        match rewrite_path(request.uri, remaining) {
            Some(uri) => candidate.with_uri(uri).into(),
            None => Resolution::Malformed(TenantSource::Path),
        }
    }
}

/// `uri` with path `remaining` (`/` when empty), keeping its scheme, authority and query.
fn rewrite_path(uri: &Uri, remaining: &str) -> Option<Uri> {
    let path = if remaining.is_empty() { "/" } else { remaining };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

/// The tenant from a request header, such as `X-Tenant`.
///
/// **Only behind a gateway that sets this header and strips any copy the client sent.**
/// Anyone who can reach the service directly can otherwise name any tenant they like. The
/// layer still validates the value, so it cannot shape a key, but it cannot tell whether the
/// client is entitled to that tenant. Two copies of the header, or a value that is not text,
/// are malformed and refused; an empty value is refused as an invalid name.
///
/// ```
/// use http::HeaderName;
/// use tower_turnstile::tenant::{HeaderTenant, TenantLayer};
///
/// let layer = TenantLayer::new(HeaderTenant::new(HeaderName::from_static("x-tenant")))
///     .with_default_tenant(None);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct HeaderTenant {
    name: HeaderName,
}

impl HeaderTenant {
    /// The value of header `name` is the tenant.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl ResolveTenant for HeaderTenant {
    fn resolve(&self, request: &RequestView<'_>) -> Resolution {
        let source = || TenantSource::Header(self.name.clone());
        let mut values = request.headers.get_all(&self.name).iter();
        match (values.next(), values.next()) {
            (None, _) => Resolution::Missing(source()),
            (Some(value), None) => match value.to_str() {
                Ok(name) => Resolution::found(name, source()),
                Err(_) => Resolution::Malformed(source()),
            },
            (Some(_), Some(_)) => Resolution::Malformed(source()),
        }
    }
}

/// A host that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed;

/// A request's host, port and trailing dot removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParsedHost<'a> {
    /// No host at all.
    Empty,
    /// An IP literal.
    Ip(IpAddr),
    /// A name as the request spells it (case kept). Every label but the first is a non-empty
    /// host label; the first is whatever the request sent.
    Name(&'a str),
}

/// The host of a request: its `Host` header, or its URI's authority (HTTP/2's `:authority`)
/// when it has no `Host`, or `""`.
fn host_of<'a>(request: &RequestView<'a>) -> Result<&'a str, Malformed> {
    let mut hosts = request.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        // Two Host headers: which one a proxy in front used is anyone's guess (RFC 9112
        // says 400).
        (Some(_), Some(_)) => Err(Malformed),
        (Some(host), None) => host.to_str().map_err(|_| Malformed),
        (None, _) => Ok(request.uri.authority().map_or("", |a| a.as_str())),
    }
}

fn parse_host(host: &str) -> Result<ParsedHost<'_>, Malformed> {
    if host.is_empty() {
        return Ok(ParsedHost::Empty);
    }
    if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        let (address, port) = rest.split_once(']').ok_or(Malformed)?;
        let address = address.parse::<Ipv6Addr>().map_err(|_| Malformed)?;
        return match port.strip_prefix(':') {
            Some(port) if is_port(port) => Ok(ParsedHost::Ip(address.into())),
            None if port.is_empty() => Ok(ParsedHost::Ip(address.into())),
            _ => Err(Malformed),
        };
    }
    let name = match host.split_once(':') {
        None => host,
        Some((name, port)) if is_port(port) => name,
        // More than one colon and no brackets: a bare IPv6 address, if anything.
        Some(_) => {
            return host
                .parse::<Ipv6Addr>()
                .map(|ip| ParsedHost::Ip(ip.into()))
                .map_err(|_| Malformed);
        }
    };
    // A fully qualified name may end in a dot.
    let name = name.strip_suffix('.').unwrap_or(name);
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(ParsedHost::Ip(ip.into()));
    }
    if name.is_empty() {
        // `:3000`, `.`
        return Err(Malformed);
    }
    // The first label is the resolvers' business (it may be a tenant to refuse with a
    // reason); the others must be plain host labels.
    if !name.split('.').skip(1).all(is_host_label) {
        return Err(Malformed);
    }
    Ok(ParsedHost::Name(name))
}

/// A non-empty label of letters, digits, `-` and `_` (found in internal host names).
fn is_host_label(label: &str) -> bool {
    !label.is_empty()
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A port as `Host` may carry it: digits, possibly none.
fn is_port(port: &str) -> bool {
    port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

fn has_port(host: &str) -> bool {
    match host.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, port)| !port.is_empty()),
        None => host.matches(':').count() == 1,
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn resolve(resolver: &impl ResolveTenant, request: &Request<()>) -> Resolution {
        resolver.resolve(&RequestView::new(request))
    }

    fn with_host(host: &str) -> Request<()> {
        Request::builder()
            .uri("/")
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    fn found(name: &str, origin: TenantSource) -> Resolution {
        Resolution::found(name, origin)
    }

    #[test]
    fn parses_hosts_like_the_reference_app() {
        let name = |n| Ok(ParsedHost::Name(n));
        assert_eq!(parse_host(""), Ok(ParsedHost::Empty));
        assert_eq!(parse_host("acme.localhost:3000"), name("acme.localhost"));
        assert_eq!(parse_host("acme.example.com."), name("acme.example.com"));
        assert_eq!(parse_host("a-1.localhost:"), name("a-1.localhost"));
        assert_eq!(parse_host("localhost."), name("localhost"));
        assert_eq!(parse_host(".localhost"), name(".localhost"));
        for ip in ["127.0.0.1", "127.0.0.1:3000", "[::1]", "[::1]:3000", "::1"] {
            assert!(matches!(parse_host(ip), Ok(ParsedHost::Ip(_))), "{ip}");
        }
        for bad in [
            "localhost:abc",
            "localhost:123456",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[zz]:3000",
            ":3000",
            ".",
            "acme..localhost",
            "acme.localhost:3000:1",
            "acme.local host",
            "acme.{x}",
        ] {
            assert_eq!(parse_host(bad), Err(Malformed), "{bad:?}");
        }
    }

    #[test]
    fn first_label_needs_a_subdomain() {
        let r = HostSubdomain::first_label();
        assert_eq!(
            resolve(&r, &with_host("ACME.localhost:3000")),
            found("ACME", TenantSource::Host)
        );
        assert_eq!(
            resolve(&r, &with_host("a.b.localhost")),
            found("a", TenantSource::Host)
        );
        for bare in ["localhost", "localhost:3000", "10.0.0.1", "[::1]:3000", ""] {
            assert_eq!(
                resolve(&r, &with_host(bare)),
                Resolution::Missing(TenantSource::Host),
                "{bare:?}"
            );
        }
    }

    #[test]
    fn base_domain_takes_what_is_under_it() {
        let r = HostSubdomain::new(".Example.com.").unwrap();
        assert_eq!(
            resolve(&r, &with_host("Acme.EXAMPLE.com:443")),
            found("acme", TenantSource::Host)
        );
        assert_eq!(
            resolve(&r, &with_host("www.acme.example.com")),
            found("www.acme", TenantSource::Host)
        );
        for none in [
            "example.com",
            "acme.example.org",
            "acmeexample.com",
            "acme.localhost",
        ] {
            assert_eq!(
                resolve(&r, &with_host(none)),
                Resolution::Missing(TenantSource::Host),
                "{none:?}"
            );
        }
        for bad in ["", ".", "a..b", "exa mple.com", "a:b", "*.example.com"] {
            assert!(HostSubdomain::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_map_normalises_hosts() {
        let map = HostMap::new()
            .try_with_host("Shop.Globex.test.", Tenant::new("globex").unwrap())
            .unwrap()
            .try_with_host("[::1]", Tenant::new("v6").unwrap())
            .unwrap();
        assert_eq!(
            resolve(&map, &with_host("shop.globex.TEST:8080")),
            found("globex", TenantSource::Host)
        );
        assert_eq!(
            resolve(&map, &with_host("[0:0::1]:80")),
            found("v6", TenantSource::Host)
        );
        assert_eq!(
            resolve(&map, &with_host("other.test")),
            Resolution::Missing(TenantSource::Host)
        );
        for bad in ["", "a:80", "[::1]:80", "a b", "a..b"] {
            assert!(
                HostMap::new()
                    .try_with_host(bad, Tenant::default())
                    .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn path_prefix_finds_and_strips() {
        let request = |uri: &str| Request::builder().uri(uri).body(()).unwrap();
        let r = PathPrefix::new("/t/").unwrap().with_strip_prefix(true);
        let Resolution::Found(c) = resolve(&r, &request("/t/acme/orders?page=2")) else {
            panic!()
        };
        assert_eq!(c.name(), "acme");
        assert_eq!(c.uri().unwrap(), "/orders?page=2");
        let Resolution::Found(c) = resolve(&r, &request("/t/acme?x=1")) else {
            panic!()
        };
        assert_eq!(c.uri().unwrap(), "/?x=1");
        assert_eq!(
            resolve(&r, &request("/t//orders")),
            found("", TenantSource::Path).map_uri(Uri::from_static("/orders"))
        );
        for none in ["/", "/t", "/t/", "/tx/acme", "/other/t/acme"] {
            assert_eq!(
                resolve(&r, &request(none)),
                Resolution::Missing(TenantSource::Path),
                "{none:?}"
            );
        }
        let first = PathPrefix::first_segment();
        assert_eq!(
            resolve(&first, &request("/acme/x")),
            found("acme", TenantSource::Path)
        );
        for bad in ["", "t", "/t?x", "//", "/a//b", "/%2f"] {
            assert!(PathPrefix::new(bad).is_err(), "{bad:?}");
        }
    }

    impl Resolution {
        fn map_uri(self, uri: Uri) -> Self {
            match self {
                Self::Found(c) => Self::Found(c.with_uri(uri)),
                other => other,
            }
        }
    }

    #[test]
    fn header_must_be_single_and_text() {
        let name = HeaderName::from_static("x-tenant");
        let r = HeaderTenant::new(name.clone());
        let request = Request::builder()
            .header("x-tenant", "a")
            .header("x-tenant", "b")
            .body(())
            .unwrap();
        assert_eq!(
            resolve(&r, &request),
            Resolution::Malformed(TenantSource::Header(name.clone()))
        );
        assert_eq!(
            resolve(&r, &Request::new(())),
            Resolution::Missing(TenantSource::Header(name))
        );
    }

    #[test]
    fn closures_resolve() {
        let r = |request: &RequestView<'_>| request.uri.query().map(str::to_owned);
        let request = Request::builder().uri("/?acme").body(()).unwrap();
        assert_eq!(resolve(&r, &request), found("acme", TenantSource::Request));
    }
}
