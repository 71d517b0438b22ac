use std::{
    fmt,
    hash::BuildHasher,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use hashbrown::HashTable;

use super::{Check, CounterKey, Decision, RateLimitStore, Settlement, StoreError};

mod settle;
use crate::{
    ratelimit::{
        Algorithm, Answer, Quota,
        algorithm::{Counted, Gcra, Log, Offences, Window},
    },
    sync::lock,
    time::{from_unix_micros, unix_micros},
};

/// Rate-limit counts in process memory: bounded in size, idle keys swept by themselves.
///
/// For a single instance, for tests, and as the local fallback next to [`RedisRateStore`]. It
/// makes the same decisions as the Redis store for the same trace of checks: the sliding-window
/// algorithms repeat the Lua scripts' integer arithmetic, GCRA included. Each check honours [`Check::at`], so a
/// trace can be replayed; without it the decision time is [`SystemTime::now`].
///
/// The number of keys is capped (a full table first sweeps its expired keys, then drops an
/// arbitrary one), and a key left alone for two windows of its quota expires and is swept by
/// itself, so a flood of distinct keys cannot grow memory without bound. A dropped key starts
/// again from nothing, as it would after its state expired.
///
/// Clones share the same counts.
///
/// ```
/// use tower_turnstile::ratelimit::{Algorithm, Check, MemoryRateStore, Quota, RateLimitStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryRateStore::builder().max_keys(10_000).build();
/// let login = Check::new("login:203.0.113.7", Quota::per_minute(5), Algorithm::SlidingLog, 1);
///
/// let decision = store.check(&login).await?; // decided at once: `Answer::now` has it too
/// assert!(decision.allowed);
/// assert_eq!(decision.remaining, 4);
/// # Ok(())
/// # }
/// ```
///
/// [`RedisRateStore`]: super::RedisRateStore
#[derive(Clone)]
pub struct MemoryRateStore {
    counters: Arc<Counters>,
}

/// Builds a [`MemoryRateStore`] with a non-default capacity.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryRateStoreBuilder {
    max_keys: u64,
}

impl MemoryRateStoreBuilder {
    /// The most keys counted at once. Default: 100 000.
    pub fn max_keys(mut self, max: u64) -> Self {
        self.max_keys = max;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryRateStore {
        MemoryRateStore {
            counters: Arc::new(Counters::new(self.max_keys)),
        }
    }
}

impl Default for MemoryRateStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the entries: there may be a hundred thousand of them.
        f.debug_struct("MemoryRateStore")
            .field("keys", &self.counters.held())
            .field("max_keys", &self.counters.max_keys)
            .finish()
    }
}

impl MemoryRateStore {
    /// A store with the default capacity (100 000 keys).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for a store with another capacity.
    pub fn builder() -> MemoryRateStoreBuilder {
        MemoryRateStoreBuilder { max_keys: 100_000 }
    }

    /// How many keys are counted (keys idle past their expiry are swept first).
    pub fn len(&self) -> u64 {
        self.counters.sweep_all(unix_micros(SystemTime::now()));
        self.counters.held()
    }

    /// Whether the store counts no key (see [`MemoryRateStore::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RateLimitStore for MemoryRateStore {
    /// Always decided at once: the counts are in this process.
    fn check(&self, check: &Check) -> Answer<Result<Decision, StoreError>> {
        Answer::ready(self.decide(check))
    }

    /// Always settled at once, atomically with the key's checks.
    fn settle(&self, settlement: &Settlement) -> Answer<Result<Decision, StoreError>> {
        Answer::ready(self.settle_now(settlement))
    }
}

impl MemoryRateStore {
    fn decide(&self, check: &Check) -> Result<Decision, StoreError> {
        let limit = check.quota.limit();
        if limit == 0 {
            return Ok(Decision::denied(0, 0, Duration::ZERO, None));
        }
        let real_now = real_now();
        let now = check.at.map_or(real_now, unix_micros);
        let terms = check.penalty.map(|penalty| penalty.terms(check.quota));
        let verdict = self.with_state(check, real_now, |state, offences| {
            let mut count = || decide(state, check.algorithm, now, check.quota, check.cost);
            match terms {
                None => count(),
                Some(terms) => offences
                    .judge(now, terms, check.cost > 0, count)
                    .map(|judged| judged.counted),
            }
        })?;
        let mut decision = verdict.into_decision(limit);
        decision.at = Some(from_unix_micros(now));
        Ok(decision)
    }

    fn settle_now(&self, settlement: &Settlement) -> Result<Decision, StoreError> {
        let check = &settlement.check;
        let limit = check.quota.limit();
        if limit == 0 {
            return Ok(Decision::allowed(0, 0, Duration::ZERO));
        }
        let real_now = real_now();
        let now = settlement.at.map_or(real_now, unix_micros);
        let costs = (
            unix_micros(settlement.reserved_at),
            check.cost,
            settlement.actual,
        );
        let settled = self.with_state(check, real_now, |state, _| {
            settle::settle(state, check.algorithm, now, check.quota, costs)
        })?;
        Ok(settled.into_decision(limit))
    }

    /// Runs `f` on the state of `check`'s key, kept as long as the check's quota and penalty
    /// need it after `real_now` (Unix µs: expiry runs on the real clock, decisions on the
    /// check's time when it names one).
    fn with_state<T>(
        &self,
        check: &Check,
        real_now: u64,
        f: impl FnOnce(&mut State, &mut Offences) -> Result<T, WrongAlgorithm>,
    ) -> Result<T, StoreError> {
        let window = check.quota.window_ms() * 1000;
        // Offences matter past the counts: up to the longest block and the quiet after it.
        let keep_for = check.penalty.map_or(2 * window, |penalty| {
            let terms = penalty.terms(check.quota);
            (2 * window).max(terms.max_block.saturating_add(terms.quiet))
        });
        self.counters
            .with_state(&check.key, real_now, keep_for, f)
            .map_err(|source| StoreError::Failed {
                source: Box::new(source),
            })
    }
}

/// Now, in Unix µs.
fn real_now() -> u64 {
    unix_micros(SystemTime::now())
}

/// How many shards the key table has: enough that concurrent decisions on different keys
/// rarely wait for one another. A power of two.
const SHARDS: usize = 64;
/// A shard sweeps its idle keys after this many decisions, so memory is given back even when
/// no shard ever fills up.
const SWEEP_EVERY: u32 = 1024;

/// The key table: shards of a hash table, each behind its own lock, so that a decision and its
/// spending are atomic per key and a lookup costs one hash and one uncontended lock.
///
/// Bounded: a shard holds at most its share of `max_keys`. A full shard first sweeps the keys
/// idle past their expiry; if none is, it drops an arbitrary key, which starts again from
/// nothing, as it would after expiring. Each shard also sweeps itself every `SWEEP_EVERY`
/// decisions, so idle keys go away by themselves.
struct Counters {
    shards: Box<[Mutex<Shard>]>,
    /// Randomly seeded per store, so clients cannot aim their keys at one shard or bucket.
    hasher: foldhash::fast::RandomState,
    per_shard: usize,
    max_keys: u64,
}

#[derive(Default)]
struct Shard {
    keys: HashTable<Entry>,
    decisions: u32,
}

/// One key: the algorithm's state and when it may be forgotten.
struct Entry {
    key: CounterKey,
    /// The key's hash, kept so that growing the table never hashes again.
    hash: u64,
    state: State,
    /// Its refusals and blocks, for a check under a penalty.
    offences: Offences,
    /// Unix µs (real clock) after which the counts no longer matter: two windows of the last
    /// quota checked after the last check, the longest any algorithm needs (or, under a
    /// penalty, the longest block and the quiet period after it, if longer).
    expires: u64,
}

impl Counters {
    fn new(max_keys: u64) -> Self {
        let max = usize::try_from(max_keys).unwrap_or(usize::MAX).max(1);
        // Never more shards than keys, and each shard's share rounded down: the total held
        // stays within `max_keys`.
        let shards = max.min(SHARDS);
        // A power of two, so that picking a shard is a mask, not a division.
        let shards = 1 << shards.ilog2();
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            per_shard: max / shards,
            max_keys,
        }
    }

    /// Runs `f` on the state of `key` under its shard's lock, creating the key if needed.
    fn with_state<T>(
        &self,
        key: &CounterKey,
        now: u64,
        keep_for: u64,
        f: impl FnOnce(&mut State, &mut Offences) -> T,
    ) -> T {
        // One hash picks the shard (high bits) and the bucket within it.
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash >> 32) as usize) & (self.shards.len() - 1)];
        let mut shard = lock(shard);
        shard.decisions = shard.decisions.wrapping_add(1);
        if shard.decisions.is_multiple_of(SWEEP_EVERY) {
            shard.sweep(now);
        }
        if let Some(entry) = shard.keys.find_mut(hash, |e| e.key == *key) {
            if entry.expires <= now {
                // Forgotten: what the Redis key's TTL would have done.
                entry.state = State::Fresh;
                entry.offences = Offences::default();
            }
            entry.expires = now.saturating_add(keep_for);
            return f(&mut entry.state, &mut entry.offences);
        }
        if shard.keys.len() >= self.per_shard {
            shard.sweep(now);
            if shard.keys.len() >= self.per_shard {
                // The first entry found; its hash finds it again, and the address of its
                // state tells it from others with the same hash.
                let victim = shard
                    .keys
                    .iter()
                    .next()
                    .map(|e| (e.hash, std::ptr::from_ref(&e.state)));
                if let Some((victim_hash, victim)) = victim
                    && let Ok(found) = shard
                        .keys
                        .find_entry(victim_hash, |e| std::ptr::eq(&e.state, victim))
                {
                    found.remove();
                }
            }
        }
        let entry = Entry {
            key: key.clone(),
            hash,
            state: State::Fresh,
            offences: Offences::default(),
            expires: now.saturating_add(keep_for),
        };
        let mut slot = shard.keys.insert_unique(hash, entry, |e| e.hash);
        let entry = slot.get_mut();
        f(&mut entry.state, &mut entry.offences)
    }

    fn sweep_all(&self, now: u64) {
        for shard in &*self.shards {
            lock(shard).sweep(now);
        }
    }

    fn held(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| lock(shard).keys.len() as u64)
            .sum()
    }
}

impl Shard {
    fn sweep(&mut self, now: u64) {
        self.keys.retain(|entry| entry.expires > now);
    }
}

/// What one key holds: nothing yet, or the state of the algorithm that counts it.
#[derive(Debug)]
enum State {
    Fresh,
    Window(Window),
    Log(Log),
    Gcra(Gcra),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::Fresh => "no",
            Self::Window(_) => Algorithm::SlidingWindow.as_str(),
            Self::Log(_) => Algorithm::SlidingLog.as_str(),
            Self::Gcra(_) => Algorithm::Gcra.as_str(),
        }
    }
}

/// A key counted by one algorithm was checked with another (Redis answers `WRONGTYPE`).
#[derive(Debug, thiserror::Error)]
#[error("the key holds {held} state, not {wanted} state")]
struct WrongAlgorithm {
    held: &'static str,
    wanted: &'static str,
}

/// Decides one check of `cost` against `quota` at `now` (µs since the epoch), spending the
/// cost if allowed. The quota's limit is at least 1 (a limit of 0 needs no state).
fn decide(
    state: &mut State,
    algorithm: Algorithm,
    now: u64,
    quota: Quota,
    cost: u64,
) -> Result<Counted, WrongAlgorithm> {
    let (window, limit) = (quota.window_ms() * 1000, quota.limit());
    if let State::Fresh = state {
        *state = match algorithm {
            Algorithm::SlidingWindow => State::Window(Window::default()),
            Algorithm::SlidingLog => State::Log(Log::default()),
            Algorithm::Gcra => State::Gcra(Gcra::default()),
        };
    }
    match (algorithm, state) {
        (Algorithm::SlidingWindow, State::Window(counts)) => {
            Ok(counts.decide_in_ticks(now, window, limit, cost, quota.sliding_ticks()))
        }
        (Algorithm::SlidingLog, State::Log(log)) => Ok(log.decide(now, window, limit, cost)),
        (Algorithm::Gcra, State::Gcra(gcra)) => Ok(gcra.decide(now, window, limit, cost)),
        (wanted, held) => Err(WrongAlgorithm {
            held: held.name(),
            wanted: wanted.as_str(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use crate::{
        ratelimit::{algorithm::test_support::T0, store::Client},
        tenant::Tenant,
    };

    #[test]
    fn keys_keep_to_one_algorithm() {
        let mut state = State::Fresh;
        let quota = Quota::new(5, Duration::from_secs(1)).unwrap();
        assert!(decide(&mut state, Algorithm::Gcra, T0, quota, 1).is_ok());
        let error = decide(&mut state, Algorithm::SlidingLog, T0, quota, 1).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the key holds gcra state, not sliding-log state"
        );
    }

    fn check_of(key: CounterKey, limit: u64) -> Check {
        let quota = crate::ratelimit::Quota::new(limit, Duration::from_secs(60)).unwrap();
        Check::new(key, quota, Algorithm::SlidingWindow, 1)
    }

    #[test]
    fn keys_count_per_tenant_scope_and_client() {
        let store = MemoryRateStore::new();
        let (acme, globex) = (Tenant::new("acme").unwrap(), Tenant::new("globex").unwrap());
        let a = IpAddr::from([198, 51, 100, 1]);
        let b = IpAddr::from([198, 51, 100, 2]);
        let key = |tenant: &Tenant, scope: &str, client: Client| {
            CounterKey::new(tenant.clone(), scope, client)
        };
        let spend = |key| store.decide(&check_of(key, 2)).unwrap();

        assert_eq!(spend(key(&acme, "per-ip:sw", a.into())).remaining, 1);
        // The same parts in other allocations: another layer with the same policy.
        assert_eq!(
            spend(key(&acme, &String::from("per-ip:sw"), a.into())).remaining,
            0
        );
        assert!(!spend(key(&acme, "per-ip:sw", a.into())).allowed);
        // Another address, tenant or scope has a count of its own.
        assert_eq!(spend(key(&acme, "per-ip:sw", b.into())).remaining, 1);
        assert_eq!(spend(key(&globex, "per-ip:sw", a.into())).remaining, 1);
        assert_eq!(spend(key(&acme, "login:sw", a.into())).remaining, 1);
        // So has a text client that reads like the address.
        assert_eq!(
            spend(key(&acme, "per-ip:sw", "198.51.100.1".into())).remaining,
            1
        );
        assert_eq!(store.len(), 5);
    }

    #[test]
    fn a_flood_of_address_keys_stays_within_max_keys() {
        let store = MemoryRateStore::builder().max_keys(64).build();
        let tenant = Tenant::new("acme").unwrap();
        for i in 0..10_000u32 {
            let key = CounterKey::new(tenant.clone(), "per-ip:sw", IpAddr::from(i.to_be_bytes()));
            assert!(store.decide(&check_of(key, 5)).unwrap().allowed);
        }
        assert!(store.len() <= 64, "{} keys held", store.len());
        assert!(!store.is_empty());
    }
}
