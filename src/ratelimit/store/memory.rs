use std::{
    cell::Cell,
    collections::BTreeMap,
    fmt,
    hash::BuildHasher,
    num::NonZeroU32,
    sync::{Arc, LazyLock, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use governor::{
    RateLimiter,
    clock::Clock,
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{NotKeyed, StateStore},
};
use hashbrown::HashTable;

use super::{Check, Checking, CounterKey, Decision, RateLimitStore, StoreError};
use crate::ratelimit::{Algorithm, Quota};

/// Rate-limit counts in process memory: bounded in size, idle keys swept by themselves.
///
/// For a single instance, for tests, and as the local fallback next to [`RedisRateStore`]. It
/// makes the same decisions as the Redis store for the same trace of checks: the sliding-window
/// algorithms repeat the Lua scripts' integer arithmetic, and GCRA feeds the same
/// whole-microsecond integers to [`governor`]'s GCRA. Each check honours [`Check::at`], so a
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
/// let decision = store.check(&login).await?; // decided at once: `Checking::now` has it too
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
    fn check(&self, check: &Check) -> Checking {
        Checking::ready(self.decide(check))
    }
}

impl MemoryRateStore {
    fn decide(&self, check: &Check) -> Result<Decision, StoreError> {
        let limit = check.quota.limit();
        if limit == 0 {
            return Ok(Decision::denied(0, 0, Duration::ZERO, None));
        }
        // Expiry runs on the real clock; decisions on the check's time when it names one.
        let real_now = wall_micros();
        let now = check.at.map_or(real_now, unix_micros);
        let window = check.quota.window_ms() * 1000;
        let verdict = self
            .counters
            .with_state(&check.key, real_now, 2 * window, |state| {
                decide(state, check.algorithm, now, check.quota, check.cost)
            })
            .map_err(|source| StoreError::Failed {
                source: Box::new(source),
            })?;
        Ok(verdict.into_decision(limit))
    }
}

/// Microseconds since the Unix epoch (0 before it): the time unit of every algorithm, on both
/// stores.
fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

/// The wall clock in Unix microseconds, cheaply: the CPU's cycle counter (through `quanta`)
/// measures from an anchor taken from the system clock, and each thread takes a new anchor
/// every 100 ms, so the error stays within the drift of 100 ms (microseconds at most) while
/// a decision costs no system clock read.
fn wall_micros() -> u64 {
    /// How long one anchor is trusted, in nanoseconds.
    const REANCHOR_NS: u64 = 100_000_000;
    static CLOCK: LazyLock<quanta::Clock> = LazyLock::new(quanta::Clock::new);
    thread_local! {
        /// (Unix µs, raw counter) at the last anchoring; (0, 0) before the first.
        static ANCHOR: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    let raw = CLOCK.raw();
    ANCHOR.with(|anchor| {
        let (unix, at) = anchor.get();
        let elapsed = if unix == 0 {
            u64::MAX
        } else {
            CLOCK.delta_as_nanos(at, raw)
        };
        if elapsed >= REANCHOR_NS {
            let unix = unix_micros(SystemTime::now());
            anchor.set((unix, raw));
            unix
        } else {
            unix + elapsed / 1000
        }
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is one decision over plain integers: a panic inside one cannot
    // leave the counts inconsistent, so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    /// Unix µs (real clock) after which the counts no longer matter: two windows of the last
    /// quota checked after the last check, the longest any algorithm needs.
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
        f: impl FnOnce(&mut State) -> T,
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
            }
            entry.expires = now.saturating_add(keep_for);
            return f(&mut entry.state);
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
            expires: now.saturating_add(keep_for),
        };
        let mut slot = shard.keys.insert_unique(hash, entry, |e| e.hash);
        f(&mut slot.get_mut().state)
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

/// A decision, with durations in microseconds, as the Lua scripts return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    allowed: bool,
    remaining: u64,
    reset: u64,
    retry: Option<u64>,
}

impl Verdict {
    fn into_decision(self, limit: u64) -> Decision {
        let reset = Duration::from_micros(self.reset);
        if self.allowed {
            Decision::allowed(limit, self.remaining, reset)
        } else {
            Decision::denied(
                limit,
                self.remaining,
                reset,
                self.retry.map(Duration::from_micros),
            )
        }
    }
}

/// Decides one check of `cost` against `quota` at `now` (µs since the epoch), spending the
/// cost if allowed. The quota's limit is at least 1 (a limit of 0 needs no state).
fn decide(
    state: &mut State,
    algorithm: Algorithm,
    now: u64,
    quota: Quota,
    cost: u64,
) -> Result<Verdict, WrongAlgorithm> {
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

/// Sliding-window counter: the count of the current fixed window (`index`) and of the one
/// before it. The arithmetic is `lua/sliding_window.lua`'s, line for line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Window {
    index: u64,
    current: u64,
    previous: u64,
}

impl Window {
    #[cfg(test)]
    fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Verdict {
        let resolution = crate::ratelimit::quota::sliding_ticks(window, limit);
        self.decide_in_ticks(now, window, limit, cost, resolution)
    }

    /// Decides in the resolution `(tick, ticks)` that
    /// [`sliding_ticks`](crate::ratelimit::quota::sliding_ticks) gives for `window` and `limit`.
    fn decide_in_ticks(
        &mut self,
        now: u64,
        window: u64,
        limit: u64,
        cost: u64,
        (tick, ticks): (u64, u64),
    ) -> Verdict {
        let mut now = now;
        let mut index = self.index_at(now, window);
        let (mut current, mut previous) = (0, 0);
        if self.index >= index {
            // Only an explicit time can be earlier than the stored window; it counts as that
            // window's start, so that time never runs backwards for one key.
            if self.index > index {
                index = self.index;
                now = index * window;
            }
            (current, previous) = (self.current, self.previous);
        } else if self.index + 1 == index {
            previous = self.current;
        }
        let start = index * window;
        let elapsed = if tick == 1 {
            now - start
        } else {
            // Below a window, far below 2^53: exact in doubles, and quicker than dividing.
            ((now - start) as f64 / tick as f64) as u64
        };
        let overlap = ticks - elapsed;

        // u128 only matters for a key whose counts were made under a much larger quota:
        // under one quota every product stays below 2^51, as in the script.
        let weighted = wide(previous, overlap);
        let allowed = cost <= limit && weighted + wide(current + cost, ticks) <= wide(limit, ticks);
        if allowed && cost > 0 {
            current += cost;
            *self = Self {
                index,
                current,
                previous,
            };
        }

        let previous_share = ceil_div(weighted, ticks);
        let remaining = limit.saturating_sub(current).saturating_sub(previous_share);
        let reset = if current > 0 {
            start + 2 * window - now
        } else if previous > 0 {
            start + window - now
        } else {
            0
        };
        let retry = if allowed || cost > limit {
            None
        } else {
            Some(Self::retry(
                now,
                start,
                window,
                (tick, ticks),
                limit,
                current,
                previous,
                cost,
            ))
        };
        Verdict {
            allowed,
            remaining,
            reset,
            retry,
        }
    }

    /// `now / window`, the index of the window `now` falls in; found without a division when
    /// it is the stored window or the next one, as it is for a key in use.
    fn index_at(&self, now: u64, window: u64) -> u64 {
        if let Some(start) = self.index.checked_mul(window)
            && let Some(since) = now.checked_sub(start)
        {
            if since < window {
                return self.index;
            }
            if since - window < window {
                return self.index + 1;
            }
        }
        now / window
    }

    /// The earliest time (µs from `now`) at which `cost` fits, if nothing else is spent.
    #[allow(clippy::too_many_arguments)]
    fn retry(
        now: u64,
        start: u64,
        window: u64,
        (tick, ticks): (u64, u64),
        limit: u64,
        current: u64,
        previous: u64,
        cost: u64,
    ) -> u64 {
        // Later in this window, once the previous count's weight has shrunk enough...
        if let Some(spare) = limit.checked_sub(current + cost)
            && previous > 0
        {
            let need = ticks.saturating_sub(narrow(wide(spare, ticks) / u128::from(previous)));
            if need < ticks {
                return (start + need * tick).saturating_sub(now);
            }
        }
        // ...or in the next window, where this window's count becomes the previous one, or at
        // the start of the one after, when nothing counts any more.
        let need = wide(limit - cost, ticks)
            .checked_div(u128::from(current))
            .map_or(0, |fits| ticks.saturating_sub(narrow(fits)));
        if need < ticks {
            start + window + need * tick - now
        } else {
            start + 2 * window - now
        }
    }
}

/// `ceil(n / d)`, through a floating-point division where it is exact (a 64-bit integer
/// division takes several times longer, and this runs on every request). For integers below
/// 2^53, `floor(n / d)` computed in doubles is the integer quotient: the true quotient lies at
/// least `1/d` below the next integer, more than half a unit in the last place of the result.
/// This is also how the Lua script computes it.
fn ceil_div(n: u128, d: u64) -> u64 {
    const DOUBLE_EXACT: u64 = 1 << 52;
    match u64::try_from(n) {
        Ok(0) => 0,
        Ok(n) if n < DOUBLE_EXACT && d < DOUBLE_EXACT && d > 0 => {
            // Both below 2^53: exact as doubles. The quotient is not negative, so the cast's
            // truncation is the floor (and needs no call to `floor`).
            ((n + d - 1) as f64 / d as f64) as u64
        }
        _ => narrow(n.div_ceil(u128::from(d.max(1)))),
    }
}

fn wide(a: u64, b: u64) -> u128 {
    u128::from(a) * u128::from(b)
}

fn narrow(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Sliding log: how many units were spent at each time (µs), like the sorted set of
/// `lua/sliding_log.lua` with its members counted per score.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Log {
    spent: BTreeMap<u64, u64>,
    count: u64,
}

impl Log {
    fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Verdict {
        // A unit spent at t counts while now < t + window; trimming is kept even when the
        // check is denied, as the script's ZREMRANGEBYSCORE is.
        if let Some(oldest_kept) = (now + 1).checked_sub(window) {
            let kept = self.spent.split_off(&oldest_kept);
            let gone: u64 = self.spent.values().sum();
            self.count -= gone;
            self.spent = kept;
        }
        let allowed = cost <= limit && self.count + cost <= limit;
        if allowed && cost > 0 {
            *self.spent.entry(now).or_default() += cost;
            self.count += cost;
        }
        let reset = self
            .spent
            .last_key_value()
            .map_or(0, |(&newest, _)| newest + window - now);
        let remaining = limit.saturating_sub(self.count);
        let retry = if allowed || cost > limit {
            None
        } else {
            // The same cost fits once the (count + cost - limit) oldest units have left.
            let rank = self.count + cost - limit;
            let mut seen = 0;
            self.spent.iter().find_map(|(&at, &units)| {
                seen += units;
                (seen >= rank).then(|| at + window - now)
            })
        };
        Verdict {
            allowed,
            remaining,
            reset,
            retry,
        }
    }
}

/// GCRA: the theoretical arrival time (µs since the epoch), as `lua/gcra.lua` keeps it. The
/// decision itself is governor's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Gcra {
    tat: Option<u64>,
}

impl Gcra {
    fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Verdict {
        let interval = (window / limit).max(1);
        let burst = limit * interval;
        let (allowed, retry) = if cost > limit {
            (false, None)
        } else if cost == 0 {
            // Governor has no read-only check; reading needs no GCRA anyway.
            let ahead = self.ahead(now);
            (ahead <= burst, (ahead > burst).then(|| ahead - burst))
        } else {
            self.governor_check(now, interval, limit, cost)
        };
        let ahead = self.ahead(now);
        Verdict {
            allowed,
            remaining: burst.saturating_sub(ahead) / interval,
            reset: ahead,
            retry,
        }
    }

    /// How far the TAT is ahead of `now`: the time until a full burst is available.
    fn ahead(&self, now: u64) -> u64 {
        self.tat.map_or(0, |tat| tat.saturating_sub(now))
    }

    /// Runs governor's GCRA for one check, spending `cost` (1 ..= `limit`) if it fits.
    ///
    /// Governor reads the time from its clock and keeps the TAT relative to the clock's reading
    /// when the limiter was built. Building a limiter per check, on a clock that reads zero,
    /// makes the decision time governor's origin: the TAT is handed over relative to `now` and
    /// taken back as an absolute time, so the key's state lives here, bounded, and each check
    /// is decided at its own time. Every input is a whole number of microseconds, so
    /// governor's nanosecond arithmetic gives exactly the script's results.
    fn governor_check(
        &mut self,
        now: u64,
        interval: u64,
        limit: u64,
        cost: u64,
    ) -> (bool, Option<u64>) {
        let burst =
            NonZeroU32::new(u32::try_from(limit).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let cost =
            NonZeroU32::new(u32::try_from(cost).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let Some(quota) = governor::Quota::with_period(Duration::from_micros(interval)) else {
            // Unreachable: the interval is at least 1 µs.
            return (false, None);
        };
        let limiter: RateLimiter<NotKeyed, Shifted, DecisionTime, NoOpMiddleware<Nanos>> =
            RateLimiter::new(
                quota.allow_burst(burst),
                Shifted::new(now, self.tat),
                DecisionTime,
            );
        match limiter.check_n(cost) {
            Ok(Ok(())) => {
                self.tat = limiter.into_state_store().tat();
                (true, None)
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DecisionTime.now());
                (
                    false,
                    Some(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX)),
                )
            }
            // Unreachable: the cost is at most the limit, which is the burst.
            Err(_insufficient) => (false, None),
        }
    }
}

/// Governor's clock during one check: the decision time is its zero.
#[derive(Debug, Clone, Copy)]
struct DecisionTime;

impl Clock for DecisionTime {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(0)
    }
}

/// One key's TAT as governor sees it during one check: relative to the decision time, in
/// nanoseconds. A TAT in the past reads as the decision time itself, which GCRA treats the
/// same way (a full burst is available).
#[derive(Debug)]
struct Shifted {
    now: u64,
    tat: Cell<Option<u64>>,
}

impl Shifted {
    fn new(now: u64, tat: Option<u64>) -> Self {
        Self {
            now,
            tat: Cell::new(tat),
        }
    }

    fn tat(&self) -> Option<u64> {
        self.tat.get()
    }
}

impl StateStore for Shifted {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _: &NotKeyed, decide: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let relative = self
            .tat
            .get()
            .map(|tat| Nanos::from(tat.saturating_sub(self.now) * 1000));
        let (outcome, next) = decide(relative)?;
        // `next` is a whole number of microseconds: every input to governor was one.
        let next = next.as_u64() / 1000;
        self.tat.set(Some(self.now + next));
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use crate::{
        ratelimit::{
            quota::{EXACT, sliding_ticks},
            store::Client,
        },
        tenant::Tenant,
    };

    #[test]
    fn the_cheap_wall_clock_follows_the_system_clock() {
        for _ in 0..3 {
            let system = unix_micros(SystemTime::now());
            let cheap = wall_micros();
            // Read one after the other: within a few milliseconds even on a loaded machine.
            assert!(cheap.abs_diff(system) < 20_000, "{cheap} vs {system}");
            std::thread::sleep(Duration::from_millis(60));
        }
        // Across a re-anchoring the clock still moves forward.
        let before = wall_micros();
        std::thread::sleep(Duration::from_millis(150));
        assert!(wall_micros() > before);
    }

    const S: u64 = 1_000_000;
    /// A decision time on a window boundary of every window used below (µs since the epoch).
    const T0: u64 = 1_700_000_000 * S;

    fn allowed(remaining: u64, reset: u64) -> Verdict {
        Verdict {
            allowed: true,
            remaining,
            reset,
            retry: None,
        }
    }

    fn denied(remaining: u64, reset: u64, retry: Option<u64>) -> Verdict {
        Verdict {
            allowed: false,
            remaining,
            reset,
            retry,
        }
    }

    #[test]
    fn ticks_are_microseconds_unless_products_would_pass_2_pow_51() {
        assert_eq!(sliding_ticks(60 * S, 100), (1, 60 * S));
        assert_eq!(sliding_ticks(3600 * S, 100_000), (1, 3600 * S));
        assert_eq!(sliding_ticks(3600 * S, 1_000_000), (5, 720 * S));
        // A year at a billion: ticks coarsen, and every product stays exact.
        let year = 365 * 24 * 3600 * S;
        let (tick, ticks) = sliding_ticks(year, 1_000_000_000);
        assert!(tick > 1);
        assert!(3 * (1_000_000_000 + 1) * ticks <= EXACT);
        assert!(ticks * tick >= year && (ticks - 1) * tick < year);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let mut w = Window::default();
        // 10 per second; spend it all half-way through a window.
        let half = T0 + S / 2;
        assert_eq!(w.decide(half, S, 10, 10), allowed(0, S / 2 + S));
        // Denied: in the next window the 10 weigh 10 * (1 - e) and 1 fits once e >= 0.1.
        assert_eq!(
            w.decide(half, S, 10, 1),
            denied(0, S / 2 + S, Some(S / 2 + S / 10))
        );
        // A quarter into the next window, 10 * 0.75 = 7.5 still count: 2 remain.
        let quarter = T0 + S + S / 4;
        assert_eq!(w.decide(quarter, S, 10, 0), allowed(2, 3 * S / 4));
        assert_eq!(w.decide(quarter, S, 10, 2), allowed(0, 2 * S - S / 4));
        // One more fits once 10 * (1 - e) + 2 + 1 <= 10, at e = 0.3: 50 ms from now.
        assert_eq!(
            w.decide(quarter, S, 10, 1),
            denied(0, 2 * S - S / 4, Some(S / 20))
        );
        assert_eq!(
            w,
            Window {
                index: T0 / S + 1,
                current: 2,
                previous: 10
            }
        );
    }

    #[test]
    fn sliding_window_retry_is_the_first_microsecond_that_fits() {
        // 3 per 7 ms windows: 3/7 does not divide evenly, so the earliest time is rounded up.
        let window = 7_000;
        let start = T0 / window * window + window;
        let mut w = Window::default();
        assert!(w.decide(start, window, 3, 3).allowed);
        let next = start + window;
        let denial = w.decide(next, window, 3, 1);
        let retry = denial.retry.expect("a wait");
        assert!(!w.decide(next + retry - 1, window, 3, 1).allowed);
        assert!(w.decide(next + retry, window, 3, 1).allowed);
        // 3 * (7000 - e) <= 2 * 7000  <=>  e >= 2333.33..: the first whole microsecond is 2334.
        assert_eq!(retry, 2_334);
    }

    #[test]
    fn sliding_window_full_cost_waits_until_nothing_counts() {
        let mut w = Window::default();
        assert!(w.decide(T0, S, 4, 1).allowed);
        // Cost 4 = limit needs the estimate at 0: two windows after this one started.
        assert_eq!(
            w.decide(T0 + 10, S, 4, 4),
            denied(3, 2 * S - 10, Some(2 * S - 10))
        );
    }

    #[test]
    fn sliding_window_denials_spend_nothing_and_time_does_not_run_back() {
        let mut w = Window::default();
        assert!(w.decide(T0 + S, S, 2, 2).allowed);
        let before = w;
        assert!(!w.decide(T0 + S, S, 2, 1).allowed);
        assert!(!w.decide(T0 + S, S, 2, 3).allowed);
        assert_eq!(w, before);
        // An earlier time counts as the stored window's start.
        assert_eq!(w.decide(T0, S, 2, 0), w.decide(T0 + S, S, 2, 0));
    }

    #[test]
    fn counts_made_under_a_larger_quota_do_not_overflow() {
        let year = 365 * 24 * 3600 * S;
        let start = (T0 / year + 1) * year;
        let mut w = Window::default();
        assert!(w.decide(start, year, 1_000_000_000, 1_000_000_000).allowed);
        // Next window, the quota cut to 1 a year: 10^9 weighed in µs ticks passes u64.
        let denial = w.decide(start + year, year, 1, 1);
        assert_eq!(denial, denied(0, year, Some(year)));
    }

    #[test]
    fn sliding_log_counts_every_unit_for_one_window() {
        let mut log = Log::default();
        for step in 0..5 {
            assert!(log.decide(T0 + step * 100_000, S, 5, 1).allowed);
        }
        // Full: the oldest unit (at T0) leaves at T0 + 1 s.
        let now = T0 + 900_000;
        assert_eq!(
            log.decide(now, S, 5, 1),
            denied(0, S - 500_000, Some(100_000))
        );
        // Cost 3 waits for the third oldest.
        assert_eq!(
            log.decide(now, S, 5, 3),
            denied(0, S - 500_000, Some(300_000))
        );
        assert_eq!(log.decide(now, S, 5, 6), denied(0, S - 500_000, None));
        // At T0 + 1 s exactly the first unit is gone.
        assert_eq!(log.decide(T0 + S, S, 5, 1), allowed(0, S));
        assert_eq!(log.count, 5);
        assert_eq!(log.spent.len(), 5);
    }

    #[test]
    fn gcra_spaces_units_by_the_emission_interval() {
        let mut gcra = Gcra::default();
        // 10 per second: one every 100 ms, bursts of 10.
        assert_eq!(gcra.decide(T0, S, 10, 8), allowed(2, 800_000));
        assert_eq!(gcra.decide(T0, S, 10, 3), denied(2, 800_000, Some(100_000)));
        assert_eq!(gcra.decide(T0, S, 10, 2), allowed(0, S));
        assert_eq!(
            gcra.decide(T0 + 50_000, S, 10, 1),
            denied(0, S - 50_000, Some(50_000))
        );
        assert_eq!(gcra.decide(T0 + 100_000, S, 10, 1), allowed(0, S));
        assert_eq!(gcra.decide(T0, S, 10, 11), denied(0, S + 100_000, None));
        // Long idle: the TAT in the past reads as now.
        assert_eq!(gcra.decide(T0 + 60 * S, S, 10, 0), allowed(10, 0));
        assert_eq!(gcra.tat, Some(T0 + S + 100_000));
    }

    #[test]
    fn gcra_rounds_the_emission_interval_down_to_a_microsecond() {
        let mut gcra = Gcra::default();
        // 3 per second: 333 333 µs apart, a burst worth 999 999 µs.
        assert_eq!(gcra.decide(T0, S, 3, 3), allowed(0, 999_999));
        assert_eq!(gcra.decide(T0, S, 3, 1), denied(0, 999_999, Some(333_333)));
    }

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

    #[test]
    fn the_window_index_without_a_division_is_the_quotient() {
        let window = 60 * S;
        for stored in [0, 1, 29_000_000, 29_000_001] {
            let counts = Window {
                index: stored,
                current: 1,
                previous: 0,
            };
            for now in [
                0,
                window - 1,
                stored * window,
                stored * window + 1,
                (stored + 1) * window - 1,
                (stored + 1) * window,
                (stored + 2) * window - 1,
                (stored + 2) * window,
                (stored + 7) * window + 3,
                u64::MAX,
            ] {
                assert_eq!(counts.index_at(now, window), now / window, "{stored} {now}");
            }
        }
        let huge = Window {
            index: u64::MAX / 2,
            current: 1,
            previous: 0,
        };
        assert_eq!(huge.index_at(5 * window, window), 5);
    }

    #[test]
    fn ceil_div_in_doubles_is_the_integer_ceiling() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let exact = |n: u128, d: u64| narrow(n.div_ceil(u128::from(d)));
        for _ in 0..200_000 {
            // Numerators and divisors of every size below 2^52, and quotients near integers.
            let d = (next() >> (12 + next() % 52)).max(1);
            let n = u128::from(next() >> (12 + next() % 52));
            assert_eq!(ceil_div(n, d), exact(n, d), "{n} / {d}");
            let k = u128::from(next() % 1_000_000_001);
            for near in [
                k * u128::from(d),
                (k * u128::from(d)).saturating_sub(1),
                k * u128::from(d) + 1,
            ] {
                assert_eq!(ceil_div(near, d), exact(near, d), "{near} / {d}");
            }
        }
        assert_eq!(ceil_div(0, 7), 0);
        assert_eq!(
            ceil_div(u128::from(u64::MAX) * 3, 2),
            exact(u128::from(u64::MAX) * 3, 2)
        );
    }

    #[test]
    fn the_division_free_tick_agrees_with_the_division_at_its_edge() {
        for limit in [1, 7, 100, 99_999, 1_000_000_000] {
            let edge = EXACT / (3 * (limit + 1));
            assert_eq!(sliding_ticks(edge, limit), (1, edge));
            let (tick, _) = sliding_ticks(edge + 1, limit);
            assert_eq!(tick, 2, "limit {limit}");
        }
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

    #[test]
    fn times_before_the_epoch_read_as_zero() {
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_nanos(1_999)), 1);
    }
}
