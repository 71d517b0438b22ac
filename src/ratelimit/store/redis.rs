use std::{
    sync::LazyLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Script;

use super::{Check, Checking, Decision, RateLimitStore, StoreError};
use crate::{backend::RedisBackend, ratelimit::Algorithm};

static SLIDING_WINDOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/prelude.lua"),
        include_str!("lua/sliding_window.lua")
    ))
});
static SLIDING_LOG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/prelude.lua"),
        include_str!("lua/sliding_log.lua")
    ))
});
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/prelude.lua"),
        include_str!("lua/gcra.lua")
    ))
});

/// Rate-limit counts in Redis, shared by every instance that uses the same Redis.
///
/// Each check is one round trip: an `EVALSHA` of the algorithm's Lua script (loaded again by
/// itself after a Redis restart), which reads, decides and spends atomically on one key, so
/// concurrent instances never grant more than the quota between them, and the store works on
/// Redis Cluster. The script takes the time from Redis `TIME`, not from the instance, so
/// instances whose clocks disagree still agree on every decision (unless the check carries an
/// explicit [`Check::at`], which replays a trace). Keys expire by themselves once their counts
/// no longer matter.
///
/// The Redis key is `{prefix}{check.key}`; the layer has already folded the policy, tenant and
/// client into `check.key`. Keep one algorithm per key: a key counted by one algorithm and
/// checked with another fails (Redis answers `WRONGTYPE`).
///
/// Time is counted in whole microseconds. The sliding window weighs the previous window at
/// 1 µs resolution (coarser only for quotas so large that `limit × window` would lose integer
/// precision); GCRA spaces units `window / limit` apart, rounded down to a whole microsecond.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_turnstile::{
///     backend::RedisBackend,
///     ratelimit::{Algorithm, Check, Quota, RateLimitStore, RedisRateStore},
/// };
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let store = RedisRateStore::new(redis)
///     .with_key_prefix("myapp:rl:")
///     .with_timeout(Duration::from_millis(50));
///
/// let check = Check::new("api:user:42", Quota::per_minute(100), Algorithm::SlidingWindow, 1);
/// let decision = store.check(&check).await?;
/// if !decision.allowed {
///     println!("retry in {:?}", decision.retry_after);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisRateStore {
    backend: RedisBackend,
    prefix: String,
    timeout: Duration,
}

impl RedisRateStore {
    /// A store on `backend`, with key prefix `turnstile:` and a 25 ms deadline per round trip.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            prefix: "turnstile:".to_owned(),
            // A rate limit sits in front of every request: past this, fall back rather than
            // make the request wait on Redis.
            timeout: Duration::from_millis(25),
        }
    }

    /// The prefix of every key this store writes. Default: `turnstile:`.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The deadline of one round trip; past it the check fails as an outage. Default: 25 ms.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The backend this store uses.
    pub fn backend(&self) -> &RedisBackend {
        &self.backend
    }
}

impl RateLimitStore for RedisRateStore {
    /// One round trip: the algorithm's script on the key `{prefix}{key}`.
    fn check(&self, check: &Check) -> Checking {
        let limit = check.quota.limit();
        if limit == 0 {
            // Denied for good, whatever the key holds: no need to ask Redis.
            return Checking::ready(Ok(Decision::denied(0, 0, Duration::ZERO, None)));
        }
        let script = match check.algorithm {
            Algorithm::SlidingWindow => &*SLIDING_WINDOW,
            Algorithm::SlidingLog => &*SLIDING_LOG,
            Algorithm::Gcra => &*GCRA,
        };
        let mut invocation = script.key(format!("{}{}", self.prefix, check.key));
        invocation
            // An empty time makes the script read Redis `TIME`.
            .arg(
                check
                    .at
                    .map(unix_micros)
                    .map_or_else(String::new, |at| at.to_string()),
            )
            .arg(check.quota.window_ms() * 1000)
            .arg(limit)
            .arg(check.cost);
        let (backend, timeout) = (self.backend.clone(), self.timeout);
        Checking::pending(async move {
            let (allowed, remaining, reset, retry): (i64, i64, i64, i64) = backend
                .run(timeout, |mut conn| async move {
                    invocation.invoke_async(&mut conn).await
                })
                .await
                .map_err(StoreError::from)?;
            let remaining = u64::try_from(remaining).unwrap_or(0);
            let reset = micros(reset);
            Ok(if allowed == 1 {
                Decision::allowed(limit, remaining, reset)
            } else {
                let retry = (retry >= 0).then(|| micros(retry));
                Decision::denied(limit, remaining, reset, retry)
            })
        })
    }

    /// Shared: every instance on this Redis sees the same counts.
    fn is_shared(&self) -> bool {
        true
    }
}

fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

fn micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}
