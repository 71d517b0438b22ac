//! Tenant names: validated once, then cheap to clone and safe in any key.

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
