use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::sync::Cache;

use super::{
    Quota,
    store::{Check, CounterKey, Decision, MemoryRateStore, RateLimitStore, StoreError},
};

/// What the rate limiter does while its shared store (Redis) is unreachable.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Fallback {
    /// Limit locally, in this instance's memory, with `share` (0.0–1.0) of the quota: with N
    /// instances behind a load balancer, `1.0 / N` keeps the total near the quota. The default
    /// is the whole quota (`share: 1.0`).
    Local {
        /// The fraction of the quota each instance grants alone.
        share: f64,
    },
    /// Let every request through (availability over enforcement).
    Open,
    /// Refuse every request with `503 Service Unavailable` (enforcement over availability).
    Closed,
}

impl Default for Fallback {
    /// [`Fallback::Local`] with the whole quota.
    fn default() -> Self {
        Self::Local { share: 1.0 }
    }
}

impl Fallback {
    /// Local limiting with `1 / instances` of the quota per instance.
    pub fn local_share_of(instances: u32) -> Self {
        Self::Local {
            share: 1.0 / f64::from(instances.max(1)),
        }
    }
}

/// What the limiter answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Verdict {
    Decided(Decision),
    /// The shared store failed and the fallback is [`Fallback::Closed`].
    Unavailable,
}

/// The limiter's answer: known at once (memory, a remembered denial, a fallback), or once the
/// store's round trip is done.
pub(crate) enum Deciding {
    Now(Verdict),
    Later(Pin<Box<dyn Future<Output = Verdict> + Send>>),
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

/// The store and what to do when it fails, plus what every service of one layer shares: the
/// local limiter of the fallback, the cache of denied keys, the counters.
#[derive(Clone)]
pub(crate) struct Limiter {
    pub(crate) store: Arc<dyn RateLimitStore>,
    pub(crate) fallback: Fallback,
    state: Arc<State>,
}

struct State {
    local: MemoryRateStore,
    denied: Cache<CounterKey, Denial>,
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

impl Default for Limiter {
    /// Counts in this process's memory.
    fn default() -> Self {
        Self {
            store: Arc::new(MemoryRateStore::new()),
            fallback: Fallback::default(),
            state: Arc::new(State {
                local: MemoryRateStore::new(),
                denied: Cache::builder().max_capacity(100_000).build(),
                falling_back: AtomicBool::new(false),
                fallback_decisions: AtomicU64::new(0),
            }),
        }
    }
}

impl Limiter {
    /// The same fallback on another store, with state of its own (no denial learned from one
    /// store answers for another).
    pub(crate) fn with_store(&self, store: Arc<dyn RateLimitStore>) -> Self {
        Self {
            store,
            fallback: self.fallback,
            ..Self::default()
        }
    }

    /// Decides `check`: from a remembered denial, the store's ready answer, or the store's
    /// round trip; a store failure goes to the fallback.
    pub(crate) fn decide(&self, check: Check) -> Deciding {
        let shared = self.store.is_shared();
        if shared && let Some(denial) = self.remembered(&check) {
            return Deciding::Now(Verdict::Decided(denial));
        }
        match self.store.check(&check).now() {
            Ok(result) => Deciding::Now(self.settle(&check, result, shared)),
            Err(pending) => {
                let limiter = self.clone();
                Deciding::Later(Box::pin(async move {
                    let result = pending.await;
                    limiter.settle(&check, result, shared)
                }))
            }
        }
    }

    fn settle(&self, check: &Check, result: Result<Decision, StoreError>, shared: bool) -> Verdict {
        match result {
            Ok(decision) => {
                let state = &self.state;
                if state.falling_back.load(Ordering::Relaxed)
                    && state.falling_back.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(target: "tower_turnstile::ratelimit", "shared rate-limit store answers again; fallback ended");
                }
                if shared && !decision.allowed {
                    self.remember(check, decision);
                }
                Verdict::Decided(decision)
            }
            Err(error) => self.fall_back(check, &error),
        }
    }

    fn remembered(&self, check: &Check) -> Option<Decision> {
        let denial = self.state.denied.get(&check.key)?;
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

    fn remember(&self, check: &Check, decision: Decision) {
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
        self.state.denied.insert(check.key.clone(), denial);
    }

    fn fall_back(&self, check: &Check, error: &StoreError) -> Verdict {
        let state = &self.state;
        state.fallback_decisions.fetch_add(1, Ordering::Relaxed);
        crate::metrics::count("turnstile_ratelimit_fallback_decisions_total", 1);
        if !state.falling_back.swap(true, Ordering::Relaxed) {
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
        }
    }

    fn local_decision(&self, check: &Check, quota: Quota) -> Verdict {
        let mut local = check.clone();
        local.quota = quota;
        match self.state.local.check(&local).now() {
            Ok(Ok(decision)) => Verdict::Decided(decision),
            // The in-memory store always decides at once and cannot fail; should that ever
            // change, letting the request through is the fallback's fallback.
            _ => {
                let limit = quota.limit();
                Verdict::Decided(Decision::allowed(limit, limit, Duration::ZERO))
            }
        }
    }

    /// Whether the last decision came from the fallback.
    pub(crate) fn is_falling_back(&self) -> bool {
        self.state.falling_back.load(Ordering::Relaxed)
    }

    /// Decisions made without the shared store, since the limiter was built.
    pub(crate) fn fallback_decisions(&self) -> u64 {
        self.state.fallback_decisions.load(Ordering::Relaxed)
    }
}
