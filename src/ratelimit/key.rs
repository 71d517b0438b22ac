use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use http::{Extensions, HeaderMap, HeaderName, header};
use ipnet::IpNet;

use super::{Answer, store::Client};
use crate::{
    ConfigError,
    http::{RequestView, peer_addr},
    tenant::Tenant,
};

/// Decides which counter a request spends from: a client key, known at once or once some I/O
/// is done (the session's user, say), or `None` when the request has none (see
/// [`Policy::on_missing_key`](super::Policy::on_missing_key)).
///
/// Implemented by [`ClientIp`], [`HeaderKey`], [`PerTenant`], [`RouteKey`], [`SessionUser`],
/// pairs of extractors (both keys joined), and closures `Fn(&RequestView) -> Option<String>`.
/// Keys are always scoped to the request's tenant and the policy by the layer.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key of `request`.
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        Answer::ready(self(request).map(Client::from))
    }
}

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for (A, B) {
    /// Both keys joined with `|`; no key when either has none.
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        match (self.0.extract(request).now(), self.1.extract(request).now()) {
            (Ok(a), Ok(b)) => Answer::ready(join(a, b)),
            (a, b) => Answer::later(async move {
                let a = match a {
                    Ok(a) => a,
                    Err(later) => later.await,
                };
                let b = match b {
                    Ok(b) => b,
                    Err(later) => later.await,
                };
                join(a, b)
            }),
        }
    }
}

fn join(a: Option<Client>, b: Option<Client>) -> Option<Client> {
    Some(Client::from(format!("{}|{}", a?, b?)))
}

/// The client's IP address, as the key.
///
/// The address is the TCP peer, from axum's `ConnectInfo<SocketAddr>`, tonic's
/// `TcpConnectInfo` (feature `tonic`) or a `SocketAddr`
/// extension (put there by your server). `Forwarded` and `X-Forwarded-For` are believed only
/// when the peer is a configured trusted proxy: walking the chain from the right, the first
/// address that is not a trusted proxy is the client. A client therefore cannot choose its own
/// key by sending these headers, and garbage in them falls back to the last good hop.
///
/// IPv6 clients are grouped by prefix (default /64, what one subscriber usually gets), so one
/// client cannot spread over 2^64 keys: the key is the address with the bits past the prefix
/// cleared (`2001:db8:1:2::` for any address in `2001:db8:1:2::/64`).
///
/// ```
/// use tower_turnstile::ratelimit::ClientIp;
///
/// let direct = ClientIp::peer();
/// let behind_lb = ClientIp::trusting(["10.0.0.0/8", "fd00::/8"])?;
/// # let _ = (direct, behind_lb);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
    ipv6_prefix: u8,
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::peer()
    }
}

impl ClientIp {
    /// The TCP peer, trusting no forwarding header.
    pub fn peer() -> Self {
        Self {
            trusted: Arc::from([]),
            ipv6_prefix: 64,
        }
    }

    /// The client behind the given trusted proxies (IP addresses or CIDR blocks).
    pub fn trusting<I, S>(proxies: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let trusted = proxies
            .into_iter()
            .map(|p| parse_net(p.as_ref()).ok_or_else(|| ConfigError::Proxy(p.as_ref().to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trusted: trusted.into(),
            ipv6_prefix: 64,
        })
    }

    /// How many leading bits of an IPv6 address make the key (default 64; 128 keys each
    /// address on its own).
    pub fn try_with_ipv6_prefix(mut self, bits: u8) -> Result<Self, ConfigError> {
        if bits > 128 {
            return Err(ConfigError::Ipv6Prefix);
        }
        self.ipv6_prefix = bits;
        Ok(self)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address of the request, or `None` when the server recorded no peer.
    pub fn client(&self, request: &RequestView<'_>) -> Option<IpAddr> {
        let peer = peer_addr(request.extensions)?;
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Right to left: each hop was added by the one after it; stop at the first hop that
        // is not one of ours, or at anything unparseable (it may be forged).
        for hop in forwarded_chain(request.headers).iter().rev() {
            match hop {
                Some(ip) => {
                    client = *ip;
                    if !self.is_trusted(*ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        Some(client)
    }

    /// The address standing for `v6`'s group: its first `ipv6_prefix` bits, the rest cleared.
    fn group(&self, v6: Ipv6Addr) -> Ipv6Addr {
        let kept = u128::MAX
            .checked_shl(128 - u32::from(self.ipv6_prefix))
            .unwrap_or(0);
        Ipv6Addr::from_bits(v6.to_bits() & kept)
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        match self.client(request) {
            None => Answer::ready(None),
            Some(IpAddr::V4(v4)) => Answer::ready(Some(Client::Address(IpAddr::V4(v4)))),
            Some(IpAddr::V6(v6)) => {
                Answer::ready(Some(Client::Address(match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(self.group(v6)),
                })))
            }
        }
    }
}

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The forwarding chain, left to right: `Forwarded` if present, else `X-Forwarded-For`. An
/// entry that is not an address is `None` (obfuscated identifiers, `unknown`, garbage).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|line| line.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| parse_node(value.trim().trim_matches('"')))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().ok())
        .flat_map(|line| match line {
            Some(line) => line
                .split(',')
                .map(|hop| parse_node(hop.trim()))
                .collect::<Vec<_>>(),
            None => vec![None],
        })
        .collect()
}

/// An address as forwarding headers write it: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:80`,
/// `2001:db8::1`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    // `[v6]` or `[v6]:port`; an unclosed bracket or trailing junk is not an address.
    let (inner, rest) = text.strip_prefix('[')?.split_once(']')?;
    let port_ok = rest.is_empty()
        || rest
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok());
    port_ok.then(|| inner.parse().ok()).flatten()
}

/// The value of a header, as the key (an API key, say). Requests without it have no key.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// The value of header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        let value = request
            .headers
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        Answer::ready(value.map(Client::from))
    }
}

/// One counter for the whole tenant: every request of a tenant spends from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerTenant;

impl KeyExtractor for PerTenant {
    fn extract(&self, _: &RequestView<'_>) -> Answer<Option<Client>> {
        // The layer scopes every key to the tenant already; a constant key is the tenant.
        Answer::ready(Some(Client::from("*")))
    }
}

/// The route (method and path) as the key: a counter per endpoint. Combine it with another
/// extractor, `(ClientIp::peer(), RouteKey)`, for a counter per client and endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteKey;

impl KeyExtractor for RouteKey {
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        Answer::ready(Some(Client::from(format!(
            "{} {}",
            request.method,
            request.uri.path()
        ))))
    }
}

/// The user the request's session is bound to (needs the session layer outside this one).
/// Loading the session here costs nothing extra: the handler shares the loaded session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionUser;

impl KeyExtractor for SessionUser {
    fn extract(&self, request: &RequestView<'_>) -> Answer<Option<Client>> {
        let Some(session) = request.extensions.get::<crate::session::Session>().cloned() else {
            return Answer::ready(None);
        };
        Answer::later(async move { session.user_id().await.ok().flatten().map(Client::from) })
    }
}

/// The tenant of a request, as the layers see it (borrowed: no reference count is touched).
pub(crate) fn tenant_of(extensions: &Extensions) -> &Tenant {
    extensions
        .get::<Tenant>()
        .unwrap_or_else(|| Tenant::default_ref())
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        request
    }

    fn key(extractor: &ClientIp, request: &Request<()>) -> Option<String> {
        let answer = extractor.extract(&RequestView::new(request)).now();
        answer
            .expect("client ip is immediate")
            .map(|client| client.to_string())
    }

    #[test]
    fn without_trusted_proxies_headers_change_nothing() {
        let ip = ClientIp::peer();
        let r = request(
            "203.0.113.7:5000",
            &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")],
        );
        assert_eq!(key(&ip, &r).as_deref(), Some("203.0.113.7"));
    }

    #[test]
    fn trusted_proxy_yields_the_rightmost_untrusted_hop() {
        let ip = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        // The client forged the left-most entry; the proxy appended the real client.
        let r = request(
            "10.0.0.2:80",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.0.0.5")],
        );
        assert_eq!(key(&ip, &r).as_deref(), Some("198.51.100.9"));
        let r = request(
            "10.0.0.2:80",
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https",
            )],
        );
        assert_eq!(key(&ip, &r).as_deref(), Some("2001:db8::"));
        // Headers from an untrusted peer are ignored.
        let r = request("192.0.2.1:80", &[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(key(&ip, &r).as_deref(), Some("192.0.2.1"));
    }

    #[test]
    fn garbage_forwarding_headers_fall_back_to_the_last_good_hop() {
        let ip = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        for garbage in ["not-an-ip", "", "1.2.3.4.5", "unknown", "[::1", "999.1.1.1"] {
            let r = request("10.0.0.2:80", &[("x-forwarded-for", garbage)]);
            assert_eq!(key(&ip, &r).as_deref(), Some("10.0.0.2"), "{garbage:?}");
        }
        let r = request(
            "10.0.0.2:80",
            &[("x-forwarded-for", "198.51.100.9, garbage")],
        );
        assert_eq!(key(&ip, &r).as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn ipv6_is_grouped_by_prefix() {
        let r = request("[2001:db8:1:2:3:4:5:6]:80", &[]);
        assert_eq!(
            key(&ClientIp::peer(), &r).as_deref(),
            Some("2001:db8:1:2::")
        );
        let wide = ClientIp::peer().try_with_ipv6_prefix(48).unwrap();
        assert_eq!(key(&wide, &r).as_deref(), Some("2001:db8:1::"));
        let all = ClientIp::peer().try_with_ipv6_prefix(0).unwrap();
        assert_eq!(key(&all, &r).as_deref(), Some("::"));
        let exact = ClientIp::peer().try_with_ipv6_prefix(128).unwrap();
        assert_eq!(key(&exact, &r).as_deref(), Some("2001:db8:1:2:3:4:5:6"));
        let mapped = request("[::ffff:192.0.2.1]:80", &[]);
        assert_eq!(
            key(&ClientIp::peer(), &mapped).as_deref(),
            Some("192.0.2.1")
        );
        assert!(ClientIp::peer().try_with_ipv6_prefix(129).is_err());
    }

    #[test]
    fn no_peer_means_no_key() {
        let r = Request::new(());
        assert_eq!(key(&ClientIp::peer(), &r), None);
        assert!(ClientIp::trusting(["nonsense"]).is_err());
    }
}
