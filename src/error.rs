//! The crate's errors that belong to no one layer: a store failing, and a setting refused.

use std::error::Error as StdError;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a store operation (session or rate-limit) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store's backend is unavailable (down, timing out, or its breaker is open), or will
    /// not take writes now (Redis out of memory).
    #[error("store is unavailable")]
    Unavailable {
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
    /// The backend answered, but the operation failed.
    #[error("store operation failed")]
    Failed {
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whether the error is an outage (as opposed to a failed operation).
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

#[cfg(all(feature = "redis", feature = "memory"))]
impl StoreError {
    /// Whether Redis refused a write while it still serves reads (out of memory).
    pub(crate) fn refuses_writes(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(backend) = cause.downcast_ref::<crate::backend::BackendError>() {
                return backend.refuses_writes();
            }
            source = cause.source();
        }
        false
    }
}

#[cfg(feature = "redis")]
impl From<crate::backend::BackendError> for StoreError {
    /// An outage (timeout, unreachable, breaker open) or a refused write (Redis out of memory)
    /// is `Unavailable`; anything else Redis answered is `Failed`.
    fn from(error: crate::backend::BackendError) -> Self {
        if error.is_outage() || error.refuses_writes() {
            Self::Unavailable {
                source: Box::new(error),
            }
        } else {
            Self::Failed {
                source: Box::new(error),
            }
        }
    }
}

/// A setting was refused: a layer, store, key extractor or backend was configured with a value
/// that cannot work. Returned by the constructors and `try_with_*` setters, never at request
/// time, so it is a startup error to report and fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cookie name is empty or has characters a cookie name may not have.
    #[error("invalid cookie name {0:?}: use letters, digits and !#$%&'*+-.^_`|~")]
    CookieName(String),
    /// The cookie path or domain has characters that would break the `Set-Cookie` header.
    #[error("invalid cookie {attribute} {value:?}: no control characters, spaces, ';' or ','")]
    CookieAttribute {
        /// `path` or `domain`.
        attribute: &'static str,
        /// The refused value.
        value: String,
    },
    /// The cookie signing secret is empty.
    #[error("the cookie signing secret is empty")]
    EmptySecret,
    /// The name given for the session id's header is not a valid header name, or names a
    /// header with a meaning of its own (`cookie`, `set-cookie`, HTTP/2 pseudo-headers).
    #[error("invalid session header name {0:?}: use lower-case letters, digits and '-'")]
    HeaderName(String),
    /// The PostgreSQL table name is not `table` or `schema.table` of plain lower-case names.
    #[error(
        "invalid table name {0:?}: use `table` or `schema.table`, each part 1 to 63 lower-case \
         letters, digits or `_`, not starting with a digit"
    )]
    TableName(String),
    /// A trusted proxy is not an IP address or CIDR block.
    #[error(
        "invalid trusted proxy {0:?}: expected an IP address or a CIDR block such as 10.0.0.0/8"
    )]
    Proxy(String),
    /// A rate-limit penalty's settings are out of range (see
    /// [`Penalty`](crate::ratelimit::Penalty)).
    #[error("invalid penalty: {0}")]
    Penalty(&'static str),
    /// An allowlist entry is not an IP address or CIDR block.
    #[error(
        "invalid allowlist entry {0:?}: expected an IP address or a CIDR block such as 10.0.0.0/8"
    )]
    Allowlist(String),
    /// The IPv6 prefix length is over 128.
    #[error("IPv6 prefix length must be at most 128")]
    Ipv6Prefix,
    /// The policy name is empty, longer than 64 bytes, or has characters other than ASCII
    /// letters, digits, `-`, `_` and `.` (it goes into headers and Redis keys).
    #[error("invalid policy name {0:?}: use 1 to 64 ASCII letters, digits, '-', '_' or '.'")]
    PolicyName(String),
    /// A quota window is shorter than a millisecond or longer than a year.
    #[error("a quota window must be between 1 ms and 365 days")]
    QuotaWindow,
    /// A quota limit is larger than 1 000 000 000.
    #[error("a quota limit must be at most 1000000000")]
    QuotaLimit,
    /// A quota's text is not `N/<duration>`.
    #[error("invalid quota {0:?}: expected N/<duration>, such as 100/60s, 5/m or 10/500ms")]
    QuotaSyntax(String),
    /// A tenant resolver's base domain is not a DNS name.
    #[error("invalid base domain {0:?}: expected a DNS name such as example.com")]
    BaseDomain(String),
    /// A tenant resolver's host is not a DNS name or an IP address.
    #[error("invalid host {0:?}: expected a DNS name or an IP address, without a port")]
    Host(String),
    /// A tenant resolver's path prefix is not an absolute path of plain segments.
    #[error("invalid path prefix {0:?}: expected a path such as /t")]
    PathPrefix(String),
    /// A Redis URL could not be parsed.
    #[error("invalid Redis URL")]
    RedisUrl {
        /// What the client library said about it.
        #[source]
        source: BoxError,
    },
    /// Built outside a Tokio runtime: the Redis connection and the background tasks need one.
    /// Holds what was being built.
    #[error("{0} must be built inside a Tokio runtime")]
    NoRuntime(&'static str),
}
