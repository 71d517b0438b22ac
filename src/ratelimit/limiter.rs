use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::sync::Cache;
use tokio::sync::Mutex;

use super::{
    Answer, Penalty, Quota,
    lease::{Grant, Lease},
    store::{
        Blocks, Check, CounterKey, Decision, MemoryRateStore, RateLimitStore, Settlement,
        StoreError,
    },
};
use crate::sync::{every_while_alive, lock};

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

/// What becomes of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Verdict {
    /// No limit applies: the request has no key, and the policy lets such requests through.
    Pass,
    /// Refused: the request has no key, and the policy refuses such requests.
    NoKey,
    /// Decided, under this quota (the policy's, for the request's tenant), counted in this
    /// ledger.
    Decided(Decision, Quota, Ledger),
    /// The shared store failed and the fallback is [`Fallback::Closed`].
    Unavailable,
}

/// Where a decision's cost was counted, so that a settlement corrects it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ledger {
    /// In the layer's store.
    Store,
    /// In the local limiter of the fallback, with its share of the quota.
    Local,
    /// Nowhere a settlement can reach: a remembered denial, a lease's batch, the fallback
    /// letting requests through.
    Nowhere,
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
    lease: Option<Lease>,
    state: Arc<State>,
}

/// One key's batch. The lock is held across the round trip that takes a new batch, so the
/// requests of one key on this instance wait for that batch instead of each taking their own.
type Slot = Arc<Mutex<Grant>>;

struct State {
    local: MemoryRateStore,
    denied: Cache<CounterKey, Denial>,
    leases: Cache<CounterKey, Slot>,
    falling_back: AtomicBool,
    fallback_decisions: AtomicU64,
    /// Whether a task reads the blocks the shared store announces (see [`Penalty`]).
    following_blocks: AtomicBool,
    /// Where that task's next read starts.
    blocks_cursor: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .field("fallback", &self.fallback)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Default for Limiter {
    /// Counts in this process's memory.
    fn default() -> Self {
        Self {
            store: Arc::new(MemoryRateStore::new()),
            fallback: Fallback::default(),
            lease: None,
            state: Arc::new(State::with_lease(None)),
        }
    }
}

impl State {
    fn with_lease(lease: Option<Lease>) -> Self {
        let leases = match lease {
            // A slot unused for a while holds an expired batch at most.
            Some(lease) => Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(lease.lifetime().max(Duration::from_secs(1)) * 2)
                .build(),
            None => Cache::builder().max_capacity(0).build(),
        };
        Self {
            local: MemoryRateStore::new(),
            denied: Cache::builder().max_capacity(100_000).build(),
            leases,
            falling_back: AtomicBool::new(false),
            fallback_decisions: AtomicU64::new(0),
            following_blocks: AtomicBool::new(false),
            blocks_cursor: std::sync::Mutex::new(None),
        }
    }
}

impl State {
    /// Refuses each blocked key from memory until its block ends.
    fn learn(&self, blocks: Blocks) {
        let now = Instant::now();
        for block in blocks.blocks {
            let mut decision = Decision::denied(block.limit, 0, block.left, Some(block.left));
            decision.blocked = true;
            let denial = Denial {
                at: now,
                until: now + block.left,
                cost: 0,
                decision,
            };
            self.denied.insert(block.key, denial);
        }
        if blocks.cursor.is_some() {
            *lock(&self.blocks_cursor) = blocks.cursor;
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
            lease: self.lease,
            state: Arc::new(State::with_lease(self.lease)),
        }
    }

    /// The same store and fallback, taking batches of quota as `lease` says, with state of its
    /// own.
    pub(crate) fn with_lease(&self, lease: Option<Lease>) -> Self {
        Self {
            store: Arc::clone(&self.store),
            fallback: self.fallback,
            lease,
            state: Arc::new(State::with_lease(lease)),
        }
    }

    /// Decides `check`: at once from a remembered denial, a lease (if `leased`) or the store's
    /// ready answer, or once the store's round trip is done; a store failure goes to the
    /// fallback. A check whose cost will be settled is not leased: a batch's units cannot be
    /// settled one by one.
    pub(crate) fn decide(&self, check: Check, leased: bool) -> Answer<Verdict> {
        let shared = self.store.is_shared();
        if shared && check.penalty.is_some() {
            self.follow_blocks();
        }
        if shared && let Some(denial) = self.remembered(&check) {
            return Answer::ready(Verdict::Decided(denial, check.quota, Ledger::Nowhere));
        }
        if shared
            && leased
            && let Some(lease) = self.lease
            // A batch is at most the whole quota, and is worth taking only if it holds more
            // than this request.
            && let units = lease.units().min(check.quota.limit())
            && check.cost < units
            && check.at.is_none()
        {
            return self.decide_leased(check, lease, units);
        }
        match self.store.check(&check).now() {
            Ok(result) => Answer::ready(self.conclude(&check, result, shared)),
            Err(pending) => {
                let limiter = self.clone();
                Answer::later(async move {
                    let result = pending.await;
                    limiter.conclude(&check, result, shared)
                })
            }
        }
    }

    /// Decides `check` from this instance's batch of the key's quota, taking a new batch from
    /// the store when it is spent or expired.
    fn decide_leased(&self, check: Check, lease: Lease, units: u64) -> Answer<Verdict> {
        let slot = match self.state.leases.get(&check.key) {
            Some(slot) => slot,
            None => self
                .state
                .leases
                .get_with(check.key.clone(), || Arc::new(Mutex::new(Grant::none()))),
        };
        // Uncontended and not spent: served here, with no I/O.
        if let Ok(mut grant) = slot.try_lock()
            && let Some(decision) = grant.spend(check.cost)
        {
            return Answer::ready(Verdict::Decided(decision, check.quota, Ledger::Nowhere));
        }
        let limiter = self.clone();
        Answer::later(async move {
            let mut grant = slot.lock().await;
            // Another request of this key may have taken a batch meanwhile.
            if let Some(decision) = grant.spend(check.cost) {
                return Verdict::Decided(decision, check.quota, Ledger::Nowhere);
            }
            let mut batch = check.clone();
            batch.cost = units;
            match limiter.store.check(&batch).await {
                Ok(decision) if decision.allowed => {
                    limiter.conclude(&batch, Ok(decision), true);
                    let lifetime = lease.lifetime().min(check.quota.window());
                    *grant = Grant::new(decision, units, check.cost, lifetime);
                    Verdict::Decided(grant.answer(Instant::now()), check.quota, Ledger::Nowhere)
                }
                // Fewer than a batch left: this request alone, exactly (its denial is
                // remembered with its own retry time).
                Ok(_) => {
                    drop(grant);
                    let result = limiter.store.check(&check).await;
                    limiter.conclude(&check, result, true)
                }
                Err(error) => limiter.fall_back(&check, &error),
            }
        })
    }

    fn conclude(
        &self,
        check: &Check,
        result: Result<Decision, StoreError>,
        shared: bool,
    ) -> Verdict {
        match result {
            Ok(decision) => {
                let state = &self.state;
                if state.falling_back.load(Ordering::Relaxed)
                    && state.falling_back.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(target: "tower_turnstile::ratelimit", "shared rate-limit store answers again; fallback ended");
                }
                // Under a penalty, each refusal must reach the store as a strike: only a
                // block is answered from memory.
                if shared && !decision.allowed && (check.penalty.is_none() || decision.blocked) {
                    self.remember(check, decision);
                }
                Verdict::Decided(decision, check.quota, Ledger::Store)
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
            // A block refuses every cost.
            cost: if decision.blocked { 0 } else { check.cost },
            decision,
        };
        self.state.denied.insert(check.key.clone(), denial);
    }

    /// Starts reading the blocks the shared store announces, once per limiter (and only within
    /// a Tokio runtime), every [`Penalty::BROADCAST_DELAY`] while the limiter lives.
    fn follow_blocks(&self) {
        let state = &self.state;
        if state.following_blocks.load(Ordering::Relaxed)
            || state.following_blocks.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            state.following_blocks.store(false, Ordering::Relaxed);
            return;
        };
        let store = Arc::clone(&self.store);
        let owner = Arc::downgrade(state);
        runtime.spawn(every_while_alive(
            owner,
            Penalty::BROADCAST_DELAY,
            move |state: Arc<State>| {
                let read = store.blocks_since(lock(&state.blocks_cursor).as_deref());
                async move {
                    // While the store is unreachable there is nothing to learn; the next read
                    // starts from the same place.
                    if let Ok(blocks) = read.await {
                        state.learn(blocks);
                    }
                }
            },
        ));
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
                let decision = Decision::allowed(limit, limit, Duration::ZERO);
                Verdict::Decided(decision, check.quota, Ledger::Nowhere)
            }
            Fallback::Local { share } => Verdict::Decided(
                self.local_decision(check, check.quota.share(share)),
                check.quota,
                Ledger::Local,
            ),
        }
    }

    fn local_decision(&self, check: &Check, quota: Quota) -> Decision {
        let mut local = check.clone();
        local.quota = quota;
        match self.state.local.check(&local).now() {
            Ok(Ok(decision)) => decision,
            // The in-memory store always decides at once and cannot fail; should that ever
            // change, letting the request through is the fallback's fallback.
            _ => {
                let limit = quota.limit();
                Decision::allowed(limit, limit, Duration::ZERO)
            }
        }
    }

    /// Corrects the cost `check` reserved (allowed by `decision`, counted in `ledger`) to
    /// `actual`; the key's state afterwards, or `None` when there is nothing to settle or the
    /// store failed (the reservation then stands, and is logged).
    pub(crate) async fn settle(
        &self,
        check: Check,
        decision: &Decision,
        ledger: Ledger,
        actual: u64,
    ) -> Option<Decision> {
        let store: &dyn RateLimitStore = match ledger {
            Ledger::Store => &*self.store,
            Ledger::Local => &self.state.local,
            Ledger::Nowhere => return None,
        };
        let mut settlement = Settlement::of(check, decision, actual)?;
        if let (Ledger::Local, Fallback::Local { share }) = (ledger, self.fallback) {
            settlement.check.quota = settlement.check.quota.share(share);
        }
        match store.settle(&settlement).await {
            Ok(settled) => Some(settled),
            Err(error) => {
                crate::metrics::count("turnstile_ratelimit_settle_failures_total", 1);
                tracing::warn!(
                    target: "tower_turnstile::ratelimit",
                    %error,
                    reserved = settlement.check.cost,
                    actual,
                    "a rate-limit cost could not be settled; the reservation stands"
                );
                None
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
