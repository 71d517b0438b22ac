//! Where rate-limit counts live: the [`RateLimitStore`] trait and its implementations.

use std::{
    any::Any,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;

pub use crate::error::StoreError;

use super::{Algorithm, Quota};
use crate::tenant::Tenant;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryRateStore;
#[cfg(feature = "redis")]
pub use redis::RedisRateStore;

/// One rate-limit decision to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check<'a> {
    /// The full key of the counter (policy, tenant and client key already folded in).
    pub key: &'a str,
    /// The quota to enforce.
    pub quota: Quota,
    /// How to count.
    pub algorithm: Algorithm,
    /// What this request costs (at least 1 in practice; 0 only reads the state).
    pub cost: u64,
    /// The time of the decision; `None` means the store's own clock (Redis `TIME` for the Redis
    /// store, so that instances with skewed clocks agree). Tests replay traces with it.
    pub at: Option<SystemTime>,
    /// The key in parts, when the layer asks [`MemoryRateStore`] about a client address: the
    /// parts are hashed and compared as they are, with no string joined per request. `key` is
    /// then empty.
    pub(crate) parts: Option<KeyParts<'a>>,
}

/// A counter key of the rate-limit layer for a client address, in parts: what `key` would
/// hold joined (`{tenant}{scope}{address}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyParts<'a> {
    pub(crate) tenant: &'a Tenant,
    /// `:rl:{policy}:{algorithm}:`.
    pub(crate) scope: &'a Arc<str>,
    pub(crate) address: IpAddr,
}

impl<'a> Check<'a> {
    /// A check of `cost` against `quota` for `key`, now.
    pub fn new(key: &'a str, quota: Quota, algorithm: Algorithm, cost: u64) -> Self {
        Self {
            key,
            quota,
            algorithm,
            cost,
            at: None,
            parts: None,
        }
    }

    /// A check of the layer's counter for a client address, given in parts.
    pub(crate) fn of_address(
        parts: KeyParts<'a>,
        quota: Quota,
        algorithm: Algorithm,
        cost: u64,
    ) -> Self {
        Self {
            parts: Some(parts),
            ..Self::new("", quota, algorithm, cost)
        }
    }

    /// The same check at an explicit time.
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = Some(at);
        self
    }
}

/// The answer to a [`Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request may go on (its cost was spent) or not (nothing was spent).
    pub allowed: bool,
    /// The quota's limit.
    pub limit: u64,
    /// What is left to spend now, after this request.
    pub remaining: u64,
    /// How long until the full quota is available again.
    pub reset: Duration,
    /// When denied: how long until the same request would be allowed. `None` when denied
    /// for good (the cost exceeds the limit) and always `None` when allowed.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// An allowed decision.
    pub fn allowed(limit: u64, remaining: u64, reset: Duration) -> Self {
        Self {
            allowed: true,
            limit,
            remaining,
            reset,
            retry_after: None,
        }
    }

    /// A denied decision.
    pub fn denied(
        limit: u64,
        remaining: u64,
        reset: Duration,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            allowed: false,
            limit,
            remaining,
            reset,
            retry_after,
        }
    }
}

/// Where counts live. Implemented by [`MemoryRateStore`] (one process) and [`RedisRateStore`]
/// (shared by every instance).
///
/// A check is atomic: concurrent checks of one key never grant more than the quota, and a
/// denied check spends nothing. One trace of checks (time, key, cost) gives the same decisions
/// on every store for the sliding-window algorithms; GCRA agrees within one request per window.
#[async_trait]
pub trait RateLimitStore: Any + std::fmt::Debug + Send + Sync {
    /// Decides one check, spending its cost if allowed.
    async fn check(&self, check: &Check<'_>) -> Result<Decision, StoreError>;

    /// Decides one check without waiting, when the store can (an in-memory store can; a
    /// networked one cannot and returns `None`, the default). The layer uses it to skip the
    /// allocation of an async decision on its fast path.
    fn check_now(&self, check: &Check<'_>) -> Option<Result<Decision, StoreError>> {
        let _ = check;
        None
    }

    /// Whether the store is shared with other instances (Redis) rather than local to this
    /// process. Only shared stores get a fallback and a local cache of denied keys.
    fn is_shared(&self) -> bool {
        false
    }
}
