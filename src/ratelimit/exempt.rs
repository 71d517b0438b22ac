//! Requests a policy does not count: an allowlist of addresses and keys, and a skip predicate.

use std::{collections::HashSet, fmt, net::IpAddr};

use ipnet::IpNet;

use crate::{ConfigError, http::RequestView};

/// Clients a [`Policy`](super::Policy) never limits: address ranges (CIDRs) and keys; see
/// [`Policy::with_allowlist`](super::Policy::with_allowlist).
///
/// A range matches the client's address: the key itself when the policy's key is an address
/// ([`ClientIp`](super::ClientIp), so forwarding headers count only from trusted proxies), and
/// otherwise the peer address of the connection. A key matches the policy's key exactly (an API
/// key, a user id).
///
/// ```
/// use tower_turnstile::ratelimit::Allowlist;
///
/// let allow = Allowlist::new()
///     .with_cidr("10.0.0.0/8")?      // the internal network
///     .with_cidr("2001:db8::/32")?
///     .with_key("uptime-monitor");   // a key from `HeaderKey`, say
/// # let _ = allow;
/// # Ok::<(), tower_turnstile::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Allowlist {
    nets: Vec<IpNet>,
    keys: HashSet<String>,
}

impl Allowlist {
    /// An empty allowlist.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an address range (`10.0.0.0/8`) or a single address (`192.0.2.7`).
    pub fn with_cidr(mut self, cidr: &str) -> Result<Self, ConfigError> {
        let cidr = cidr.trim();
        let net = match cidr.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => cidr
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| ConfigError::Allowlist(cidr.to_owned()))?,
        };
        self.nets.push(net.trunc());
        Ok(self)
    }

    /// Adds a key, matched exactly against the policy's key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.insert(key.into());
        self
    }

    /// Whether the client with key `key` (and, as a fallback address, `peer`) is allowlisted.
    pub(crate) fn allows(&self, key: &str, peer: Option<IpAddr>) -> bool {
        if self.keys.contains(key) {
            return true;
        }
        if self.nets.is_empty() {
            return false;
        }
        // An address key (`192.0.2.7`, or an IPv6 `/64` group), else the peer's address.
        let address = key
            .parse::<IpAddr>()
            .ok()
            .or_else(|| key.parse::<IpNet>().ok().map(|net| net.network()))
            .or(peer);
        address.is_some_and(|address| self.nets.iter().any(|net| net.contains(&address)))
    }
}

/// A predicate on the request: `true` skips the limit.
pub(crate) type SkipFn = dyn Fn(&RequestView<'_>) -> bool + Send + Sync;

/// Prints a skip predicate in a policy's `Debug`.
pub(crate) struct Skip<'a>(pub(crate) &'a Option<std::sync::Arc<SkipFn>>);

impl fmt::Debug for Skip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
