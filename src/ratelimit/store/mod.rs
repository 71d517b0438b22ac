//! Where rate-limit counts live: the [`RateLimitStore`] trait and its implementations.

use std::{
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

pub(crate) use crate::StoreError;

use super::{Algorithm, Answer, Penalty, Quota};
use crate::tenant::Tenant;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::{MemoryRateStore, MemoryRateStoreBuilder};
#[cfg(feature = "redis")]
pub use redis::RedisRateStore;
#[cfg(all(fuzzing, feature = "redis"))]
pub(crate) use redis::read_reply;

/// The longest text client key written as it is; longer ones (and odd ones) are written as
/// their hash, so a client cannot make keys of any size or shape.
const MAX_RAW_CLIENT: usize = 128;

/// Whose count a check spends: a tenant, a scope (the policy and its algorithm, for the layer)
/// and a client. Every store gets the key in these parts; each keeps it its own way (the
/// memory store hashes the parts, the Redis store writes the key as text: see the `Display`
/// impl).
///
/// ```
/// use tower_turnstile::{ratelimit::CounterKey, tenant::Tenant};
///
/// let key = CounterKey::new(Tenant::new("acme")?, "login:sliding_log", "203.0.113.7".parse::<std::net::IpAddr>()?);
/// assert_eq!(key.to_string(), "acme:rl:login:sliding_log:203.0.113.7");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    tenant: Tenant,
    scope: Arc<str>,
    client: Client,
}

/// The client part of a [`CounterKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Client {
    /// An address (for IPv6, with the bits past the grouping prefix already cleared).
    Address(IpAddr),
    /// Any other key: a user, an API key, a route, several joined.
    Text(Arc<str>),
}

impl CounterKey {
    /// The key of `client`'s counter under `scope`, in `tenant`.
    pub fn new(tenant: Tenant, scope: impl Into<Arc<str>>, client: impl Into<Client>) -> Self {
        Self {
            tenant,
            scope: scope.into(),
            client: client.into(),
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The scope (for the layer: `{policy}:{algorithm}`).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl CounterKey {
    /// A key of the default tenant with no scope, for a store used on its own.
    fn of_text(client: &str) -> Self {
        Self::new(Tenant::default(), "", Client::from(client))
    }
}

/// A key of the default tenant with no scope, for a store used on its own.
impl From<&str> for CounterKey {
    fn from(client: &str) -> Self {
        Self::of_text(client)
    }
}

/// A key of the default tenant with no scope, for a store used on its own.
impl From<&String> for CounterKey {
    fn from(client: &String) -> Self {
        Self::of_text(client)
    }
}

/// A key of the default tenant with no scope, for a store used on its own.
impl From<String> for CounterKey {
    fn from(client: String) -> Self {
        Self::of_text(&client)
    }
}

impl fmt::Display for CounterKey {
    /// `{tenant}:rl:{scope}:{client}`. A text client that is long or holds anything but
    /// printable ASCII (or `{`, `}`, which Redis Cluster reads as a hash tag) is written as
    /// `#` and its SHA-256 in base64url.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:rl:{}:", self.tenant, self.scope)?;
        match &self.client {
            Client::Address(ip) => write!(f, "{ip}"),
            Client::Text(text) => {
                let plain = text.len() <= MAX_RAW_CLIENT
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
                if plain {
                    f.write_str(text)
                } else {
                    write!(
                        f,
                        "#{}",
                        URL_SAFE_NO_PAD.encode(Sha256::digest(text.as_bytes()))
                    )
                }
            }
        }
    }
}

impl From<IpAddr> for Client {
    fn from(ip: IpAddr) -> Self {
        Self::Address(ip)
    }
}

impl From<&str> for Client {
    fn from(text: &str) -> Self {
        Self::Text(text.into())
    }
}

impl From<String> for Client {
    fn from(text: String) -> Self {
        Self::Text(text.into())
    }
}

impl fmt::Display for Client {
    /// The client as the key extractor gave it (an address in its usual form).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(ip) => write!(f, "{ip}"),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// One rate-limit decision to make.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// Whose counter.
    pub key: CounterKey,
    /// The quota to enforce.
    pub quota: Quota,
    /// How to count.
    pub algorithm: Algorithm,
    /// What this request costs (at least 1 in practice; 0 only reads the state).
    pub cost: u64,
    /// The time of the decision; `None` means the store's own clock (Redis `TIME` for the Redis
    /// store, so that instances with skewed clocks agree). Tests replay traces with it.
    pub at: Option<SystemTime>,
    /// Blocks for repeat offenders, decided with the count; `None`: no penalty.
    pub penalty: Option<Penalty>,
}

impl Check {
    /// A check of `cost` against `quota` for `key`, now.
    pub fn new(key: impl Into<CounterKey>, quota: Quota, algorithm: Algorithm, cost: u64) -> Self {
        Self {
            key: key.into(),
            quota,
            algorithm,
            cost,
            at: None,
            penalty: None,
        }
    }

    /// The same check at an explicit time.
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = Some(at);
        self
    }

    /// The same check under `penalty`: its refusals are strikes, and a blocked key is
    /// refused until the block ends.
    pub fn with_penalty(mut self, penalty: Penalty) -> Self {
        self.penalty = Some(penalty);
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
    /// Refused by a [`Penalty`] block: `retry_after` is the block's remaining time.
    pub blocked: bool,
    /// When the store decided, on its clock (Redis `TIME` for Redis, unless the check named a
    /// time): what a [`Settlement`] of the decision's cost names. `None` for a decision made
    /// without counting (a limit of 0, a batch of a [`Lease`](super::Lease)).
    pub at: Option<SystemTime>,
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
            blocked: false,
            at: None,
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
            blocked: false,
            at: None,
        }
    }
}

/// A reserved cost corrected once the response is known: the request reserved
/// `check.cost` when it was allowed at `reserved_at`, and turned out to cost `actual`.
///
/// A refund gives the difference back where the reservation was counted (for the sliding
/// window, the window it fell in, while that window still weighs). A top-up spends the
/// difference at the settlement's time, as a request would, but never more than is left: a
/// settlement does not put a key in debt. Atomic on every store, like a check.
///
/// ```
/// use tower_turnstile::ratelimit::{Algorithm, Check, MemoryRateStore, Quota, RateLimitStore, Settlement};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryRateStore::new();
/// // Reserve 1 000 tokens of 10 000 a minute; the call used 250.
/// let check = Check::new("team-7", Quota::per_minute(10_000), Algorithm::SlidingWindow, 1_000);
/// let reserved = store.check(&check).await?;
/// assert_eq!(reserved.remaining, 9_000);
/// let settled = store.settle(&Settlement::of(check, &reserved, 250).expect("allowed")).await?;
/// assert_eq!(settled.remaining, 9_750);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settlement {
    /// The check that reserved the cost; its `cost` is what was reserved.
    pub check: Check,
    /// When the reservation was counted: the allowed decision's [`Decision::at`].
    pub reserved_at: SystemTime,
    /// What the request turned out to cost.
    pub actual: u64,
    /// The time of the settlement; `None` means the store's own clock.
    pub at: Option<SystemTime>,
}

impl Settlement {
    /// The settlement of `decision`, made for `check`, to `actual`; `None` when the decision
    /// reserved nothing to settle (a refusal, or a decision made without counting).
    pub fn of(check: Check, decision: &Decision, actual: u64) -> Option<Self> {
        let reserved_at = decision.at.filter(|_| decision.allowed)?;
        let at = check.at;
        Some(Self {
            check,
            reserved_at,
            actual,
            at,
        })
    }
}

/// Where counts live. Implemented by [`MemoryRateStore`] (one process) and [`RedisRateStore`]
/// (shared by every instance).
///
/// A check is atomic: concurrent checks of one key never grant more than the quota, and a
/// denied check spends nothing. One trace of checks (time, key, cost) gives the same decisions
/// on every store.
///
/// A store that decides without I/O answers [`Answer::ready`], which the layer takes as it is;
/// a networked store answers [`Answer::later`] with a future that owns what it needs. (The
/// session stores' methods are `async fn`s instead: see
/// [`SessionStore`](crate::session::SessionStore) for why the two differ.)
///
/// ```
/// use tower_turnstile::ratelimit::{Answer, Check, Decision, RateLimitStore};
///
/// /// Lets everything through, and says so.
/// #[derive(Debug)]
/// struct Unlimited;
///
/// impl RateLimitStore for Unlimited {
///     fn check(&self, check: &Check) -> Answer<Result<Decision, tower_turnstile::StoreError>> {
///         let limit = check.quota.limit();
///         Answer::ready(Ok(Decision::allowed(limit, limit, std::time::Duration::ZERO)))
///     }
/// }
/// ```
pub trait RateLimitStore: fmt::Debug + Send + Sync + 'static {
    /// Decides one check, spending its cost if allowed.
    fn check(&self, check: &Check) -> Answer<Result<Decision, StoreError>>;

    /// Whether the store is shared with other instances (Redis) rather than local to this
    /// process. Only shared stores get a fallback and a local cache of denied keys.
    fn is_shared(&self) -> bool {
        false
    }

    /// Corrects a reserved cost (see [`Settlement`]); answers the key's state afterwards, as an
    /// allowed decision. The default fails: a store that cannot settle says so, and the layer
    /// keeps the reservation (and logs it).
    fn settle(&self, settlement: &Settlement) -> Answer<Result<Decision, StoreError>> {
        let _ = settlement;
        Answer::ready(Err(StoreError::Failed {
            source: "this rate-limit store does not settle costs".into(),
        }))
    }

    /// The [`Penalty`] blocks placed since `cursor` (from the oldest still kept when `None`),
    /// by any instance: a shared store announces each block it places, and every layer with a
    /// penalty reads them every [`Penalty::BROADCAST_DELAY`] to refuse blocked keys from
    /// memory. The default announces nothing, which suits a store of one process.
    fn blocks_since(&self, cursor: Option<&str>) -> Answer<Result<Blocks, StoreError>> {
        let _ = cursor;
        Answer::ready(Ok(Blocks::default()))
    }
}

/// A [`Penalty`] block, as a shared store announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Block {
    /// The blocked key.
    pub key: CounterKey,
    /// The limit of the quota the key was blocked under, for the refusal's `RateLimit` field.
    pub limit: u64,
    /// How long the block still holds, as of the read.
    pub left: Duration,
}

/// Blocks read from a store, and where the next read starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Blocks {
    /// The blocks that still hold (ended ones are left out).
    pub blocks: Vec<Block>,
    /// Where the next read starts; `None`: nothing was ever announced.
    pub cursor: Option<String>,
}

impl Block {
    /// A block of `key`, under a quota of `limit`, that holds for `left` more.
    pub fn new(key: CounterKey, limit: u64, left: Duration) -> Self {
        Self { key, limit, left }
    }
}

impl Blocks {
    /// `blocks`, read up to `cursor`.
    pub fn new(blocks: Vec<Block>, cursor: Option<String>) -> Self {
        Self { blocks, cursor }
    }
}
