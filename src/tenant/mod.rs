//! Tenants: the namespace every session and rate-limit key lives in.
//!
//! A [`Tenant`] is a validated name: a DNS label (`a`–`z`, `0`–`9` and `-`, 1 to 63 characters,
//! no hyphen at either end), lower-cased. Because it becomes part of Redis keys, nothing else
//! can be a tenant: no `:`, no `{`/`}` (Redis Cluster hash tags), no glob characters, no spaces.
//!
//! The layers read the tenant from the request extensions: put a `Tenant` there (a tenant layer
//! or your own middleware does) and the session layer scopes its keys to it. Without one, they
//! use [`Tenant::default_tenant`], so a single-tenant service needs no tenant code at all.
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
        static DEFAULT: LazyLock<Tenant> = LazyLock::new(|| Tenant(Arc::from("default")));
        DEFAULT.clone()
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
