use std::{
    any::Any,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::sync::Cache;

use super::{
    Quota,
    store::{Check, Decision, MemoryRateStore, RateLimitStore, StoreError},
};

/// What the rate limiter does while its shared store (Redis) is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Fallback {
    /// Limit locally, in this instance's memory, with `share` (0.0–1.0) of the quota: with N
    /// instances behind a load balancer, `1.0 / N` keeps the total near the quota. The default,
    /// with a share of 1.0.
    Local {
        /// The fraction of the quota each instance grants alone.
        share: f64,
    },
    /// Let every request through (availability over enforcement).
    Open,
    /// Refuse every request with `503 Service Unavailable` (enforcement over availability).
    Closed,
    /// Keep the default: [`Fallback::Local`] with the whole quota.
    #[default]
    Default,
}

impl Fallback {
    /// Local limiting with `1 / instances` of the quota per instance.
    pub fn local_share_of(instances: u32) -> Self {
        Self::Local {
            share: 1.0 / f64::from(instances.max(1)),
        }
    }
}

/// The outcome of asking the limiter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Verdict {
    Decided(Decision),
    /// The shared store failed and the fallback is [`Fallback::Closed`].
    Unavailable,
}

/// A denial remembered locally until its retry time, so a flood from an over-limit key is
/// answered without a store round trip.
#[derive(Debug, Clone, Copy)]
struct Denial {
    at: Instant,
    until: Instant,
    cost: u64,
    decision: Decision,
}

/// The store, its fallback and the local cache of denied keys, shared by every clone of a
/// rate-limit service.
pub(crate) struct Limiter {
    store: Arc<dyn RateLimitStore>,
    shared: bool,
    /// The store again when it is this crate's [`MemoryRateStore`].
    memory: Option<MemoryRateStore>,
    fallback: Fallback,
    local: MemoryRateStore,
    denied: Cache<String, Denial>,
    falling_back: AtomicBool,
    fallback_decisions: AtomicU64,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    pub(crate) fn new(store: Arc<dyn RateLimitStore>, fallback: Fallback) -> Self {
        let shared = store.is_shared();
        let memory = (&*store as &dyn Any)
            .downcast_ref::<MemoryRateStore>()
            .cloned();
        Self {
            store,
            shared,
            memory,
            fallback,
            local: MemoryRateStore::new(),
            denied: Cache::builder().max_capacity(100_000).build(),
            falling_back: AtomicBool::new(false),
            fallback_decisions: AtomicU64::new(0),
        }
    }

    /// Answers from this process alone, if it can: a remembered denial, or a local store.
    pub(crate) fn decide_now(&self, check: &Check<'_>) -> Option<Verdict> {
        if let Some(denial) = self.remembered(check) {
            return Some(Verdict::Decided(denial));
        }
        match self.store.check_now(check)? {
            Ok(decision) => Some(Verdict::Decided(decision)),
            Err(error) => Some(self.fall_back(check, &error)),
        }
    }

    /// Asks the store (one round trip for Redis), falling back when it fails. Callers ask
    /// [`Limiter::decide_now`] first, which has already looked for a remembered denial.
    pub(crate) async fn decide(&self, check: &Check<'_>) -> Verdict {
        match self.store.check(check).await {
            Ok(decision) => {
                if self.falling_back.load(Ordering::Relaxed)
                    && self.falling_back.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(target: "tower_turnstile::ratelimit", "shared rate-limit store answers again; fallback ended");
                }
                if self.shared && !decision.allowed {
                    self.remember(check, decision);
                }
                Verdict::Decided(decision)
            }
            Err(error) => self.fall_back(check, &error),
        }
    }

    fn remembered(&self, check: &Check<'_>) -> Option<Decision> {
        if !self.shared {
            return None;
        }
        let denial = self.denied.get(check.key)?;
        let now = Instant::now();
        // A cheaper request than the one denied might fit: only as costly ones are answered.
        if now >= denial.until || check.cost < denial.cost {
            return None;
        }
        let mut decision = denial.decision;
        decision.retry_after = Some(denial.until - now);
        decision.reset = decision.reset.saturating_sub(now - denial.at);
        Some(decision)
    }

    fn remember(&self, check: &Check<'_>, decision: Decision) {
        // Denied for good (cost over the limit) needs no cache: it is answered without I/O.
        let Some(retry_after) = decision.retry_after else {
            return;
        };
        if retry_after < Duration::from_millis(1) {
            return;
        }
        let now = Instant::now();
        let denial = Denial {
            at: now,
            until: now + retry_after,
            cost: check.cost,
            decision,
        };
        self.denied.insert(check.key.to_owned(), denial);
    }

    pub(crate) fn fall_back(&self, check: &Check<'_>, error: &StoreError) -> Verdict {
        self.fallback_decisions.fetch_add(1, Ordering::Relaxed);
        crate::metrics::count("turnstile_ratelimit_fallback_decisions_total", 1);
        if !self.falling_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "tower_turnstile::ratelimit",
                error = %error,
                fallback = ?self.fallback,
                "shared rate-limit store failed; falling back"
            );
        }
        match self.fallback {
            Fallback::Closed => Verdict::Unavailable,
            Fallback::Open => {
                let limit = check.quota.limit();
                Verdict::Decided(Decision::allowed(limit, limit, Duration::ZERO))
            }
            Fallback::Local { share } => self.local_decision(check, check.quota.share(share)),
            Fallback::Default => self.local_decision(check, check.quota),
        }
    }

    fn local_decision(&self, check: &Check<'_>, quota: Quota) -> Verdict {
        let mut local = *check;
        local.quota = quota;
        match self.local.check_now(&local) {
            Some(Ok(decision)) => Verdict::Decided(decision),
            // The in-memory store always decides at once and cannot fail; should that ever
            // change, letting the request through is the fallback's fallback.
            _ => {
                let limit = quota.limit();
                Verdict::Decided(Decision::allowed(limit, limit, Duration::ZERO))
            }
        }
    }

    /// The store, when it is this crate's [`MemoryRateStore`]: asked directly, with address
    /// keys in parts (see [`Check::of_address`]).
    #[inline]
    pub(crate) fn memory(&self) -> Option<&MemoryRateStore> {
        self.memory.as_ref()
    }

    pub(crate) fn store(&self) -> Arc<dyn RateLimitStore> {
        Arc::clone(&self.store)
    }

    /// Whether the last decision came from the fallback.
    pub(crate) fn is_falling_back(&self) -> bool {
        self.falling_back.load(Ordering::Relaxed)
    }

    /// Decisions made without the shared store, since the limiter was built.
    pub(crate) fn fallback_decisions(&self) -> u64 {
        self.fallback_decisions.load(Ordering::Relaxed)
    }
}
