use std::{fmt, sync::Arc};

use super::{
    Algorithm, Allowlist, Penalty, Quota,
    exempt::{Skip, SkipFn},
    key::{ClientIp, KeyExtractor, PerTenant},
};
use crate::{
    ConfigError,
    http::{RequestView, ResponseView},
    tenant::Tenant,
};

/// What to do with a request whose key cannot be extracted (no peer address recorded, no API
/// key header, no session user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Count all such requests against one shared counter (the default): a misconfigured
    /// key degrades to a global limit, never to no limit.
    #[default]
    SharedCounter,
    /// Let them through unlimited (for a policy that only applies to identified clients).
    Allow,
    /// Refuse them as over the limit.
    Deny,
}

type CostFn = dyn Fn(&RequestView<'_>) -> u64 + Send + Sync;
type SettleFn = dyn Fn(&ResponseView<'_>) -> u64 + Send + Sync;
type QuotaFn = dyn Fn(&Tenant) -> Option<Quota> + Send + Sync;

/// A rate-limit policy: a name, a quota, an algorithm, whose counter a request spends from
/// (the key), and how much it spends (the cost).
///
/// ```
/// use tower_turnstile::ratelimit::{Algorithm, ClientIp, Policy, Quota};
///
/// let per_ip = Policy::new("per-ip", Quota::per_minute(100))?;
/// let logins = Policy::new("login", Quota::per_hour(10))?
///     .with_algorithm(Algorithm::SlidingLog)
///     .with_key(ClientIp::trusting(["10.0.0.0/8"])?);
/// # let _ = (per_ip, logins);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) quota: Quota,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: Arc<dyn KeyExtractor>,
    pub(crate) cost: Option<Arc<CostFn>>,
    pub(crate) fixed_cost: u64,
    pub(crate) missing_key: MissingKey,
    pub(crate) tenant_quota: Option<Arc<QuotaFn>>,
    pub(crate) allowlist: Option<Arc<Allowlist>>,
    pub(crate) skip: Option<Arc<SkipFn>>,
    pub(crate) penalty: Option<Penalty>,
    pub(crate) settlement: Option<Arc<SettleFn>>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("algorithm", &self.algorithm)
            .field(
                "cost",
                &if self.cost.is_some() {
                    "per request".to_owned()
                } else {
                    self.fixed_cost.to_string()
                },
            )
            .field("missing_key", &self.missing_key)
            .field("quota_per_tenant", &self.tenant_quota.is_some())
            .field("allowlist", &self.allowlist)
            .field("skip", &Skip(&self.skip))
            .field("penalty", &self.penalty)
            .field("settles", &self.settlement.is_some())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// A policy with a literal name, as `http::HeaderValue::from_static` does for headers.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid policy name (see [`Policy::new`]): meant for literals in code.
    /// Use [`Policy::new`] for names from configuration.
    ///
    /// ```
    /// use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(Policy::from_static("per-ip", Quota::per_minute(100)));
    /// # let _ = layer;
    /// ```
    #[track_caller]
    pub fn from_static(name: &'static str, quota: Quota) -> Self {
        match Self::new(name, quota) {
            Ok(policy) => policy,
            Err(error) => panic!("{error}"),
        }
    }

    /// A policy named `name` enforcing `quota` per client IP (the TCP peer), with the
    /// sliding-window algorithm and a cost of 1 per request.
    pub fn new(name: &str, quota: Quota) -> Result<Self, ConfigError> {
        let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if name.is_empty() || name.len() > 64 || !name.bytes().all(valid) {
            return Err(ConfigError::PolicyName(name.to_owned()));
        }
        Ok(Self {
            name: Arc::from(name),
            quota,
            algorithm: Algorithm::default(),
            key: Arc::new(ClientIp::peer()),
            cost: None,
            fixed_cost: 1,
            missing_key: MissingKey::default(),
            tenant_quota: None,
            allowlist: None,
            skip: None,
            penalty: None,
            settlement: None,
        })
    }

    /// How requests are counted. Default: [`Algorithm::SlidingWindow`].
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Whose counter a request spends from. Default: [`ClientIp::peer`].
    pub fn with_key(mut self, key: impl KeyExtractor) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// What every request costs. Default: 1.
    pub fn with_cost(mut self, cost: u64) -> Self {
        self.fixed_cost = cost;
        self.cost = None;
        self
    }

    /// What a request costs, decided per request (an expensive endpoint may cost more).
    pub fn with_cost_fn(
        mut self,
        cost: impl Fn(&RequestView<'_>) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.cost = Some(Arc::new(cost));
        self
    }

    /// What to do when a request has no key. Default: [`MissingKey::SharedCounter`].
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.missing_key = missing;
        self
    }

    /// A tenant-wide policy: one counter per tenant that every request of the tenant spends
    /// from. Stacked next to a per-client policy, it keeps one noisy tenant from using up a
    /// capacity that all tenants share.
    pub fn tenant_wide(name: &str, quota: Quota) -> Result<Self, ConfigError> {
        Ok(Self::new(name, quota)?.with_key(PerTenant))
    }

    /// Chooses the quota per tenant (a plan table, say); tenants the lookup does not know get
    /// the policy's own quota.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use tower_turnstile::ratelimit::{Policy, Quota};
    ///
    /// let plans = HashMap::from([("acme", Quota::per_minute(1000)), ("trial", Quota::per_minute(10))]);
    /// let policy = Policy::new("per-ip", Quota::per_minute(100))?
    ///     .with_quota_for(move |tenant| plans.get(tenant.as_str()).copied());
    /// # let _ = policy;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_quota_for(
        mut self,
        lookup: impl Fn(&Tenant) -> Option<Quota> + Send + Sync + 'static,
    ) -> Self {
        self.tenant_quota = Some(Arc::new(lookup));
        self
    }

    /// The quota that applies to `tenant`.
    pub fn quota_for(&self, tenant: &Tenant) -> Quota {
        self.tenant_quota
            .as_ref()
            .and_then(|lookup| lookup(tenant))
            .unwrap_or(self.quota)
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy's quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The policy's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Never limits the clients in `allowlist` (address ranges and keys): their requests are
    /// not counted and carry no `RateLimit` fields.
    ///
    /// ```
    /// use tower_turnstile::ratelimit::{Allowlist, Policy, Quota};
    ///
    /// let policy = Policy::new("per-ip", Quota::per_minute(100))?
    ///     .with_allowlist(Allowlist::new().with_cidr("10.0.0.0/8")?);
    /// # let _ = policy;
    /// # Ok::<(), tower_turnstile::ConfigError>(())
    /// ```
    pub fn with_allowlist(mut self, allowlist: Allowlist) -> Self {
        self.allowlist = Some(Arc::new(allowlist));
        self
    }

    /// Skips the limit for requests `skip` says `true` of (health checks, static files, a
    /// route): they are not counted and carry no `RateLimit` fields.
    ///
    /// ```
    /// use tower_turnstile::ratelimit::{Policy, Quota};
    ///
    /// let policy = Policy::new("per-ip", Quota::per_minute(100))?
    ///     .with_skip(|request| request.uri.path().starts_with("/static/"));
    /// # let _ = policy;
    /// # Ok::<(), tower_turnstile::ConfigError>(())
    /// ```
    pub fn with_skip(
        mut self,
        skip: impl Fn(&RequestView<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.skip = Some(Arc::new(skip));
        self
    }

    /// Blocks keys that are refused again and again, for longer each time (see [`Penalty`]).
    /// Refusals of such a policy are counted in the store (a denial is not answered from
    /// memory, as it is without a penalty) until the key is blocked; a block is answered from
    /// memory on every instance. Default: none.
    ///
    /// ```
    /// use tower_turnstile::ratelimit::{Penalty, Policy, Quota};
    ///
    /// let policy = Policy::new("per-ip", Quota::per_minute(100))?
    ///     .with_penalty("10/1m".parse::<Penalty>()?);
    /// assert_eq!(policy.penalty().map(|p| p.strikes()), Some(10));
    /// # Ok::<(), tower_turnstile::ConfigError>(())
    /// ```
    pub fn with_penalty(mut self, penalty: Penalty) -> Self {
        self.penalty = Some(penalty);
        self
    }

    /// The policy's penalty, if it has one.
    pub fn penalty(&self) -> Option<&Penalty> {
        self.penalty.as_ref()
    }

    /// Settles each request's cost once its response is known: the cost
    /// ([`with_cost`](Self::with_cost) or [`with_cost_fn`](Self::with_cost_fn)) is reserved
    /// before the inner service runs, and corrected to what `actual` says of the response (a
    /// refund or a top-up; see [`Settlement`](super::Settlement)) before the response goes
    /// out, so its `RateLimit` field, and the next request's, show the settled count. A
    /// settlement that matches the reservation costs nothing; one that differs costs one more
    /// round trip to a shared store. A settled policy takes no [`Lease`](super::Lease).
    ///
    /// ```
    /// use tower_turnstile::ratelimit::{Policy, Quota};
    ///
    /// // Tokens: reserve 1 000 per call, then count what the model reports.
    /// let tokens = Policy::new("tokens", Quota::per_minute(100_000))?
    ///     .with_cost(1_000)
    ///     .with_settlement(|response| response.header_u64("x-tokens-used").unwrap_or(1_000));
    /// // Server errors are free.
    /// let calls = Policy::new("calls", Quota::per_minute(60))?
    ///     .with_settlement(|response| u64::from(!response.status.is_server_error()));
    /// # let _ = (tokens, calls);
    /// # Ok::<(), tower_turnstile::ConfigError>(())
    /// ```
    pub fn with_settlement(
        mut self,
        actual: impl Fn(&ResponseView<'_>) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.settlement = Some(Arc::new(actual));
        self
    }

    /// What a response says its request cost, under [`with_settlement`](Self::with_settlement).
    pub(crate) fn actual_cost(&self, response: &ResponseView<'_>) -> Option<u64> {
        self.settlement.as_ref().map(|actual| actual(response))
    }

    /// Whether the request is skipped ([`with_skip`](Self::with_skip)).
    pub(crate) fn skips(&self, request: &RequestView<'_>) -> bool {
        self.skip.as_ref().is_some_and(|skip| skip(request))
    }

    /// Whether the client is allowlisted ([`with_allowlist`](Self::with_allowlist)).
    pub(crate) fn allows(&self, key: &str, peer: Option<std::net::IpAddr>) -> bool {
        self.allowlist
            .as_ref()
            .is_some_and(|allowlist| allowlist.allows(key, peer))
    }

    pub(crate) fn cost_of(&self, request: &RequestView<'_>) -> u64 {
        self.cost
            .as_ref()
            .map_or(self.fixed_cost, |cost| cost(request))
    }
}
